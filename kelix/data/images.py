"""Image preprocessing: native resolution (aspect kept, pixel budget) or a fixed square size."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image as PILImage

from kelix.data.decode import is_lazy
from kelix.data.schema import SampleError


@dataclass
class ImageConfig:
    """How images are sized before the vision encoder.

    Args:
        patch_size: ViT patch side in pixels (14 for SigLIP/Keye NaViT).
        merge_size: patches merged per side into one visual token (2 -> one token per 28 px).
        min_pixels: lower bound on H*W after resizing (native resolution mode).
        max_pixels: upper bound on H*W after resizing (native resolution mode).
        fixed_size: if set, every image becomes ``fixed_size x fixed_size`` (e.g. 504 for
            generation targets, paper 4.3.3); must be a multiple of ``patch_size * merge_size``.
        aspect_range: if set, ``(lo, hi)`` bounds on width/height; other images are skipped
            (paper: 0.75-1.33 for LLM generation data, 0.67-1.5 for DiT pretraining).
        mean: per-channel normalisation mean (SigLIP: 0.5).
        std: per-channel normalisation std (SigLIP: 0.5).
        draft: decode a JPEG at least twice as large as its target at a reduced scale (libjpeg's
            DCT scaling by 1/2, 1/4 or 1/8, never below the target), then resize: a 12 MP photo
            to ~1 MP decodes and resizes ~3x faster. Differs from the full decode by a mean of
            < 1 level in 255 (rare pixels on hard edges more); only images decoded lazily
            (:func:`kelix.data.decode.decode_image` ``lazy``) can use it. False: full decode.
        reducing_gap: PIL's ``reducing_gap`` for resizes: a downscale by more than twice this
            first reduces by an integer factor (box filter), then resamples (PIL: 3 is
            indistinguishable from a plain resize in most cases). None: one bicubic resize.
    """

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    fixed_size: int | None = None
    aspect_range: tuple[float, float] | None = None
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    draft: bool = True
    reducing_gap: float | None = 3.0

    def __post_init__(self):
        if self.reducing_gap is not None and self.reducing_gap < 1:
            raise ValueError(f"reducing_gap {self.reducing_gap} must be >= 1 (or None for a plain resize)")
        if self.fixed_size is not None and self.fixed_size % self.factor:
            raise ValueError(f"fixed_size {self.fixed_size} is not a multiple of patch_size*merge_size = {self.factor}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")

    @property
    def factor(self) -> int:
        """Side of one visual token in pixels: resized sides are multiples of it."""
        return self.patch_size * self.merge_size


def target_size(height: int, width: int, cfg: ImageConfig) -> tuple[int, int]:
    """Resized (height, width): sides multiples of ``cfg.factor``, pixels within the budget."""
    if cfg.fixed_size is not None:
        return cfg.fixed_size, cfg.fixed_size
    # Qwen2-VL's rule (keep aspect, round to the factor, rescale into [min, max] pixels).
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=cfg.factor, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)


def resize_image(img: PILImage.Image, cfg: ImageConfig, where: str = "") -> PILImage.Image:
    """Resize one image per ``cfg``; raise :class:`SampleError` if its aspect ratio is out of range.

    The checks read only the size, so a lazily decoded image (see
    :func:`kelix.data.decode.decode_image`) that fails them is never decoded; one that passes is
    decoded here, in draft mode when ``cfg.draft`` and it is a JPEG at least twice its target.
    """
    w, h = img.size
    if cfg.aspect_range is not None:
        lo, hi = cfg.aspect_range
        if not lo <= w / h <= hi:
            raise SampleError("aspect_ratio", f"{where}: image {w}x{h} has aspect {w / h:.2f} outside [{lo}, {hi}]")
    try:
        th, tw = target_size(h, w, cfg)
    except ValueError as e:  # extreme aspect ratios
        raise SampleError("aspect_ratio", f"{where}: image {w}x{h}: {e}") from e
    if cfg.draft and w >= 2 * tw and h >= 2 * th and getattr(img, "format", None) == "JPEG" and is_lazy(img):
        img.draft("RGB", (tw, th))  # decodes at the largest 1/2^k scale still >= the target
    if (th, tw) != img.size[::-1]:
        img = img.resize((tw, th), PILImage.BICUBIC, reducing_gap=cfg.reducing_gap)
    return img


def to_uint8_tensor(img: PILImage.Image) -> torch.Tensor:
    """PIL RGB -> ``uint8 [3, H, W]``: a quarter of the float tensor's bytes through the loader and
    the host-to-device copy; :func:`normalize` it on the device."""
    x = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def normalize(x: torch.Tensor, cfg: ImageConfig) -> torch.Tensor:
    """``uint8 [..., 3, H, W]`` (any device) -> float32 normalised by ``cfg.mean``/``cfg.std``: the
    values of :func:`to_tensor` (the same float32 operations, in the same order)."""
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def to_tensor(img: PILImage.Image, cfg: ImageConfig) -> torch.Tensor:
    """PIL RGB -> float tensor ``[3, H, W]`` normalised by ``cfg.mean``/``cfg.std``."""
    # numpy, not torch: single-threaded and fast on small images, also in the main process
    x = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.float32) / 255.0
    x = (x - np.asarray(cfg.mean, dtype=np.float32)) / np.asarray(cfg.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def to_pil(x: torch.Tensor, cfg: ImageConfig | None = None) -> PILImage.Image:
    """Inverse of :func:`to_tensor` (or of ``[-1, 1]`` images when ``cfg`` is None)."""
    x = x.detach().float().cpu()
    if cfg is None:
        x = (x + 1) / 2
    else:
        x = x * torch.tensor(cfg.std).view(3, 1, 1) + torch.tensor(cfg.mean).view(3, 1, 1)
    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return PILImage.fromarray(arr)
