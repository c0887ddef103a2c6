"""The released Kelix's vision encoder: Keye-VL 1.5's NaViT, computed by transformers' ``PaddleOCRVisionModel``.

Keye-VL 1.5's ViT (SigLIP-style, patch 14) differs from the kit's other towers in three places, all of
which ``PaddleOCRVisionModel`` (model type ``paddleocr_vl_vision``, transformers >= 5) computes the same way:
a square learned position grid bilinearly resampled to each image's patch grid, 2D (row, column) RoPE
inside attention, and images packed in one sequence with attention kept within each image
(``cu_seqlens``). So the kit writes no ViT of its own: it only patchifies the pixels and passes the grid.
"""

from __future__ import annotations

import torch
from torch import nn

MODEL_TYPE = "paddleocr_vl_vision"


def _require_transformers5():
    try:
        from transformers import PaddleOCRVisionConfig, PaddleOCRVisionModel
    except ImportError:
        import transformers

        raise ImportError(f"encoder.kind keye (the released Kelix ViT) needs transformers >= 5 "
                          f"(PaddleOCRVisionModel); this install has transformers {transformers.__version__}: "
                          f"pip install -U 'transformers>=5'") from None
    return PaddleOCRVisionConfig, PaddleOCRVisionModel


def build_keye_vit(hf_config: dict) -> nn.Module:
    """A randomly initialised ``PaddleOCRVisionModel`` from its config dict (``model_type`` optional)."""
    config_cls, model_cls = _require_transformers5()
    d = {k: v for k, v in hf_config.items() if k != "model_type"}
    return model_cls(config_cls(**d))


def keye_vit_config(hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int,
                    image_size: int, patch_size: int, hidden_act: str = "gelu_pytorch_tanh",
                    layer_norm_eps: float = 1e-6, rope_theta: float = 10000.0) -> dict:
    """The ``hf_config`` of a Keye NaViT (what ``EncoderConfig(kind="keye", hf_config=...)`` takes):
    ``image_size / patch_size`` learned positions per side."""
    return dict(model_type=MODEL_TYPE, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                image_size=image_size, patch_size=patch_size, hidden_act=hidden_act, layer_norm_eps=layer_norm_eps,
                rope_parameters={"rope_type": "axial", "rope_theta": float(rope_theta)})


def patchify(pixels: list[torch.Tensor], p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[3, H, W]`` -> patches ``[sum(h*w), 3, p, p]`` (row-major per image, images in order)
    and ``grid_thw [num_images, 3]`` (``t = 1``)."""
    seqs, grids = [], []
    for x in pixels:
        c, H, W = x.shape
        h, w = H // p, W // p
        seqs.append(x.reshape(c, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, c, p, p))
        grids.append((1, h, w))
    return torch.cat(seqs), torch.tensor(grids, dtype=torch.long, device=pixels[0].device)


def keye_forward(model: nn.Module, pixels: list[torch.Tensor], p: int) -> list[torch.Tensor]:
    """All images in one packed call -> per-image patch grids ``[H/p, W/p, D]``."""
    patches, grid = patchify(pixels, p)
    dtype = model.vision_model.embeddings.patch_embedding.weight.dtype
    h = model(pixel_values=patches[None].to(dtype), grid_thw=grid).last_hidden_state.reshape(patches.shape[0], -1)
    sizes = (grid[:, 1] * grid[:, 2]).tolist()
    return [g.reshape(int(t[1]), int(t[2]), -1) for g, t in zip(h.split(sizes), grid.tolist())]
