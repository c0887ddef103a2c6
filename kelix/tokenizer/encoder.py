"""Vision encoder adapter: native-resolution ViT features, grouped for the 2x2 patch merge.

Four kinds of encoder give the same output, a list of per-image patch grids ``[gh, gw, D]``:

* ``naflexvit``: timm ``NaFlexVit``; images of different sizes share one padded batch with
  ``patch_coord``/``patch_valid`` masks (padding never changes the valid tokens' features);
* ``timm``: any timm ViT (``forward_features`` on ``[B, 3, H, W]``), images grouped by size;
* ``hf``: a transformers vision tower, position embeddings interpolated
  (``interpolate_pos_encoding``) for native resolution. SigLIP (``siglip_vision_model``) runs
  images of all sizes in one padded batch with a key-padding attention mask and without its
  attention-pooling head (unused); other towers run one batch per image size;
* ``keye``: the released Kelix's ViT (Keye-VL 1.5's NaViT) on transformers' ``PaddleOCRVisionModel``
  (transformers >= 5), all images packed in one sequence (:mod:`kelix.tokenizer.navit`).

:class:`PatchMerger` is Keye's projector: each ``m x m`` group of patches concatenated and mapped by
an MLP (patch 14 -> one visual token per 28 px), with a LayerNorm on each patch (the kit's default) or
on the concatenation (the release's).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

log = logging.getLogger("kelix.tokenizer")


@dataclass
class EncoderConfig:
    """Which vision encoder to build and where its weights are.

    Args:
        kind: ``naflexvit`` (timm NaFlexVit, native resolution in one padded batch), ``timm``
            (any timm ViT, images batched by size), ``hf`` (a transformers vision tower) or ``keye``
            (the released Kelix's NaViT, transformers' ``PaddleOCRVisionModel``: learned positions
            resampled per image, 2D RoPE; needs transformers >= 5; ``hf_config`` from
            :func:`kelix.tokenizer.navit.keye_vit_config`, or ``path``).
        name: timm model name (``naflexvit`` / ``timm``), e.g. ``naflexvit_base_patch16_gap``;
            its architecture is overridden by ``kwargs``.
        kwargs: timm model arguments (``embed_dim``, ``depth``, ``num_heads``, ``patch_size``...).
            ``num_classes=0`` and ``global_pool=''`` are always set: only patch features are used.
        path: local weights, loaded by :meth:`VisionEncoder.load_weights` (never at construction):
            a ``.safetensors`` file or an HF-style directory; for ``hf`` a transformers model
            directory (its ``config.json`` also gives the architecture). A full vision-language
            checkpoint (e.g. SigLIP) is accepted: its vision tower is taken.
        hf_config: for ``hf`` / ``keye`` without ``path``: the vision config as a dict with ``model_type``
            (e.g. ``{"model_type": "siglip_vision_model", "hidden_size": 32, ...}``). Exported
            tokenizers store it here so they load without the original directory.
        prefix: for ``path``: leading string of the checkpoint keys to strip (e.g.
            ``"visual."`` when the ViT weights sit inside a larger model's file).
    """

    kind: Literal["naflexvit", "timm", "hf", "keye"] = "naflexvit"
    name: str = "naflexvit_base_patch16_gap"
    kwargs: dict = field(default_factory=dict)
    path: str | None = None
    hf_config: dict | None = None
    prefix: str = ""


def _merge_order(x: torch.Tensor, m: int) -> torch.Tensor:
    """``[gh, gw, D]`` -> ``[gh/m * gw/m, m*m*D]``: each merged token's patches, row-major."""
    gh, gw, dim = x.shape
    x = x.view(gh // m, m, gw // m, m, dim).permute(0, 2, 1, 3, 4)
    return x.reshape((gh // m) * (gw // m), m * m * dim)


class VisionEncoder(nn.Module):
    """One of the three encoder kinds behind one call: images -> per-image patch grids.

    Args:
        config: see :class:`EncoderConfig`.
        patch_size: ViT patch side in pixels; must equal the model's own patch size.
    """

    def __init__(self, config: EncoderConfig, patch_size: int):
        super().__init__()
        self.config, self.patch_size = config, patch_size
        if config.kind in ("naflexvit", "timm"):
            import timm

            kwargs = {**config.kwargs, "num_classes": 0, "global_pool": ""}
            self.model = timm.create_model(config.name, pretrained=False, **kwargs)
            self.width = int(self.model.embed_dim)
            self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
            if config.kind == "naflexvit":
                from timm.models.naflexvit import NaFlexVit

                if not isinstance(self.model, NaFlexVit):
                    raise ValueError(f"encoder.kind naflexvit needs a NaFlexVit, but {config.name!r} is "
                                     f"{type(self.model).__name__} (use kind: timm)")
            own = self.model.embeds.patch_size if config.kind == "naflexvit" else self.model.patch_embed.patch_size
            own = tuple(own) if isinstance(own, (tuple, list)) else (own, own)
        elif config.kind == "keye":
            from kelix.tokenizer.navit import MODEL_TYPE, build_keye_vit

            hf = config.hf_config
            if config.path is not None:
                if not os.path.isfile(os.path.join(config.path, "config.json")):
                    raise FileNotFoundError(f"encoder.path {config.path!r} is not a local model directory")
                import json

                with open(os.path.join(config.path, "config.json")) as f:
                    hf = json.load(f)
                hf = hf.get("vision_config", hf)
            if hf is None:
                raise ValueError("encoder.kind keye needs encoder.hf_config (kelix.tokenizer.navit.keye_vit_config) "
                                 "or encoder.path")
            if hf.get("model_type", MODEL_TYPE) != MODEL_TYPE:
                raise ValueError(f"encoder.kind keye needs a {MODEL_TYPE} config, got model_type {hf['model_type']!r}")
            self.model = build_keye_vit(hf)
            self.width = int(self.model.config.hidden_size)
            own = (self.model.config.patch_size,) * 2
            self.num_prefix_tokens = 0
        elif config.kind == "hf":
            from transformers import AutoConfig, AutoModel

            if config.path is not None:
                if not os.path.isdir(config.path):
                    raise FileNotFoundError(f"encoder.path {config.path!r} is not a local directory")
                hf_cfg = AutoConfig.from_pretrained(config.path, local_files_only=True)
            elif config.hf_config is not None:
                d = dict(config.hf_config)
                if "model_type" not in d:
                    raise ValueError("encoder.hf_config needs a 'model_type' (e.g. 'siglip_vision_model')")
                hf_cfg = AutoConfig.for_model(d.pop("model_type"), **d)
            else:
                raise ValueError("encoder.kind hf needs encoder.path (a local model dir) or encoder.hf_config")
            hf_cfg = getattr(hf_cfg, "vision_config", hf_cfg)  # a vision-language checkpoint: its vision tower
            if getattr(hf_cfg, "vision_use_head", None):
                hf_cfg.vision_use_head = False  # SigLIP's attention-pooling head: only patch features are used
            self.model = AutoModel.from_config(hf_cfg)
            self.width = int(hf_cfg.hidden_size)
            own = hf_cfg.patch_size
            own = (own, own)
            self.num_prefix_tokens = -1  # found per call: CLIP-style towers prepend a class token
        else:
            raise ValueError(f"encoder.kind {config.kind!r} is not naflexvit, timm, hf or keye")
        if tuple(own) != (patch_size, patch_size):
            raise ValueError(f"encoder patch size {tuple(own)} differs from image.patch_size {patch_size}")

    def portable_config(self) -> EncoderConfig:
        """This encoder's config without file paths (what an exported tokenizer stores)."""
        c = self.config
        if c.kind == "keye":
            from kelix.tokenizer.navit import MODEL_TYPE

            d = c.hf_config if c.path is None else dict(self.model.config.to_dict(), model_type=MODEL_TYPE)
            return EncoderConfig(kind="keye", name=c.name, kwargs=dict(c.kwargs), hf_config=d)
        if c.kind == "hf":
            d = self.model.config.to_dict()
            return EncoderConfig(kind="hf", name=c.name, kwargs=dict(c.kwargs), hf_config=d)
        return EncoderConfig(kind=c.kind, name=c.name, kwargs=dict(c.kwargs))

    def load_weights(self) -> None:
        """Load ``config.path`` into the model (strict: every encoder tensor must be found)."""
        from kelix.training.weights import read_state_dict

        path = self.config.path
        if path is None:
            log.warning("encoder.path is not set: the vision encoder keeps its random initialisation")
            return
        sd = read_state_dict(path)
        if self.config.prefix:
            sd = {k[len(self.config.prefix):]: v for k, v in sd.items() if k.startswith(self.config.prefix)}
        if self.config.kind in ("naflexvit", "timm"):
            import importlib

            # timm's own key conversion (e.g. classic ViT / open_clip layouts -> NaFlexVit)
            mod = importlib.import_module(type(self.model).__module__)
            if hasattr(mod, "checkpoint_filter_fn"):
                sd = mod.checkpoint_filter_fn(sd, self.model)
        own = self.model.state_dict()
        if self.config.kind in ("hf", "keye") and not (set(sd) & set(own)):
            # a full vision-language checkpoint: keep its vision tower's keys
            for pre in ("vision_model.", "model.vision_model.", "vision_tower.", "model.vision_tower.", "visual."):
                sub = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
                if set(sub) & set(own):
                    sd = sub
                    break
            if not set(sd) & set(own):
                sd = {"vision_model." + k: v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if k in own}
        missing = [k for k in own if k not in sd]
        if missing:
            raise KeyError(f"{path}: {len(missing)} encoder tensor(s) missing, e.g. {missing[:3]} "
                           f"(set encoder.prefix if the keys carry a prefix)")
        self.model.load_state_dict(sd, strict=True)
        log.info("vision encoder: loaded %d tensors from %s", len(sd), path)

    # -- forward
    def forward(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Images ``[3, H, W]`` (H, W multiples of the patch size) -> patch grids ``[H/p, W/p, D]``."""
        p = self.patch_size
        for i, x in enumerate(pixels):
            if x.ndim != 3 or x.shape[0] != 3 or x.shape[1] % p or x.shape[2] % p:
                raise ValueError(f"image {i}: expected [3, H, W] with H, W multiples of {p}, got {tuple(x.shape)}")
        if self.config.kind == "naflexvit":
            return self._naflex(pixels)
        if self.config.kind == "keye":
            from kelix.tokenizer.navit import keye_forward

            return keye_forward(self.model, pixels, p)
        if self._packed_siglip():
            return self._siglip(pixels)
        out: list[torch.Tensor | None] = [None] * len(pixels)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(pixels):
            groups.setdefault(tuple(x.shape[1:]), []).append(i)
        for (h, w), idx in groups.items():
            batch = torch.stack([pixels[i] for i in idx])
            feats = self._dense(batch)  # [B, L, D]
            gh, gw = h // p, w // p
            prefix = feats.shape[1] - gh * gw
            if prefix < 0:
                raise ValueError(f"encoder returned {feats.shape[1]} tokens for a {gh}x{gw} patch grid")
            for j, i in enumerate(idx):
                out[i] = feats[j, prefix:].reshape(gh, gw, -1)
        return out  # type: ignore[return-value]

    def _dense(self, batch: torch.Tensor) -> torch.Tensor:
        if self.config.kind == "timm":
            return self.model.forward_features(batch)
        return self.model(pixel_values=batch, interpolate_pos_encoding=True).last_hidden_state

    def _packed_siglip(self) -> bool:
        cfg = getattr(self.model, "config", None)
        # flash attention takes no additive mask: grouping by size is exact there
        return (self.config.kind == "hf" and getattr(cfg, "model_type", None) == "siglip_vision_model"
                and getattr(cfg, "_attn_implementation", None) != "flash_attention_2")

    def _siglip(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """SigLIP on images of any sizes in one padded batch: padded keys are masked out, so each
        image's features are those it has alone (SigLIP has no class token)."""
        vm = getattr(self.model, "vision_model", self.model)  # transformers < 5 nests the tower
        p = self.patch_size
        seqs: list[torch.Tensor | None] = [None] * len(pixels)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(pixels):
            groups.setdefault(tuple(x.shape[1:]), []).append(i)
        for idx in groups.values():  # patch + interpolated position embeddings, one call per size
            emb = vm.embeddings(torch.stack([pixels[i] for i in idx]), interpolate_pos_encoding=True)
            for j, i in enumerate(idx):
                seqs[i] = emb[j]
        lens = [s.shape[0] for s in seqs]
        n, b = max(lens), len(seqs)
        x = seqs[0].new_zeros(b, n, seqs[0].shape[-1])
        valid = torch.zeros(b, n, dtype=torch.bool, device=x.device)
        for i, s in enumerate(seqs):
            x[i, : len(s)], valid[i, : len(s)] = s, True
        mask = None
        if len(groups) > 1:  # additive key-padding mask, broadcast over heads and queries
            mask = torch.zeros(b, 1, 1, n, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill(~valid[:, None, None], torch.finfo(x.dtype).min)
        h = vm.post_layernorm(vm.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state)
        return [h[i, : (t.shape[1] // p) * (t.shape[2] // p)].reshape(t.shape[1] // p, t.shape[2] // p, -1)
                for i, t in enumerate(pixels)]

    def _naflex(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        from timm.models.naflexvit import batch_patchify

        p = self.patch_size
        patches, coords, grids = [], [], []
        for x in pixels:
            seq, (gh, gw) = batch_patchify(x[None], (p, p))
            patches.append(seq[0])
            yy, xx = torch.meshgrid(torch.arange(gh, device=x.device), torch.arange(gw, device=x.device), indexing="ij")
            coords.append(torch.stack([yy, xx], -1).reshape(-1, 2))
            grids.append((gh, gw))
        n = max(s.shape[0] for s in patches)
        b = len(pixels)
        seq = patches[0].new_zeros(b, n, patches[0].shape[1])
        coord = torch.zeros(b, n, 2, dtype=torch.long, device=seq.device)
        valid = torch.zeros(b, n, dtype=torch.bool, device=seq.device)
        for i, (s, c) in enumerate(zip(patches, coords)):
            seq[i, : len(s)], coord[i, : len(s)], valid[i, : len(s)] = s, c, True
        feats = self.model.forward_features(seq, patch_coord=coord, patch_valid=valid)["patches"]
        feats = feats[:, self.num_prefix_tokens:]
        return [feats[i, : gh * gw].reshape(gh, gw, -1) for i, (gh, gw) in enumerate(grids)]


class PatchMerger(nn.Module):
    """Keye-style 2x2 patch merge: concat m*m patches, Linear -> GELU -> Linear, after a LayerNorm.

    Args:
        width: ViT width D.
        merge_size: patches merged per side (m); 1 keeps one token per patch.
        hidden: MLP hidden width (default m*m*D, as in Keye: 4608 for D=1152).
        out_dim: output width (default m*m*D).
        mlp: False skips the MLP (tokens are the concatenated normalised patches).
        norm: where the LayerNorm (eps 1e-5) sits: ``patch`` (the kit's default: each patch's D
            features, before they are concatenated) or ``concat`` (the released Kelix's: over the
            ``m*m*D`` concatenated features of a merged token).
    """

    def __init__(self, width: int, merge_size: int, hidden: int | None = None, out_dim: int | None = None,
                 mlp: bool = True, norm: str = "patch"):
        super().__init__()
        if norm not in ("patch", "concat"):
            raise ValueError(f"merger norm {norm!r} is not patch or concat")
        self.merge_size, self.norm_at = merge_size, norm
        cat = merge_size * merge_size * width
        self.norm = nn.LayerNorm(width if norm == "patch" else cat, eps=1e-5)
        self.out_dim = (out_dim or cat) if mlp else cat
        self.mlp = nn.Sequential(nn.Linear(cat, hidden or cat), nn.GELU(), nn.Linear(hidden or cat, self.out_dim)) \
            if mlp else nn.Identity()

    def forward(self, grids: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Patch grids ``[gh, gw, D]`` -> packed tokens ``[T, out_dim]`` and merged grid sizes ``(h, w)``."""
        m = self.merge_size
        toks, sizes = [], []
        for g in grids:
            gh, gw, _ = g.shape
            if gh % m or gw % m:
                raise ValueError(f"a {gh}x{gw} patch grid is not divisible by merge_size {m}")
            toks.append(_merge_order(self.norm(g), m) if self.norm_at == "patch" else self.norm(_merge_order(g, m)))
            sizes.append((gh // m, gw // m))
        return self.mlp(torch.cat(toks)), sizes
