"""The DiT's processor: a sample -> (prompt, target image or latents, what the condition provider needs).

Which samples are DiT samples:

* an inverted caption pair (``segments`` with one image and its text; img2dataset shards): the caption is
  the prompt, the image the target (pretraining, paper 4.4.2);
* a text-to-image chat (``messages``): the user's text is the prompt, the assistant's image the target;
* a pre-computed sample (``kelix precompute-dit``): text + ``{key}.latent.npy`` + ``{key}.cond.npy``.

Anything else (VQA, OCR, interleaved...) is skipped and counted (``skipped/not_t2i``).
"""

from typing import Literal

import numpy as np
import torch
from PIL import Image as PILImage

from kelix.data.images import ImageConfig, normalize, to_uint8_tensor
from kelix.data.processor import Processor
from kelix.data.schema import Image, Sample, SampleError

COND_FIELD, LATENT_FIELD = "cond.npy", "latent.npy"
VAE_RANGE = ImageConfig()  # mean = std = 0.5: pixels in [-1, 1], the VAE's range


def vae_pixels(x: torch.Tensor) -> torch.Tensor:
    """A batch's ``pixels`` -> the VAE's input: ``uint8 [..., 3, H, W]`` (the processor's; move them to the
    device first) -> float32 in ``[-1, 1]``, the values :func:`~kelix.data.images.to_tensor` gave;
    float pixels are taken as in ``[-1, 1]`` already."""
    return normalize(x, VAE_RANGE) if x.dtype == torch.uint8 else x


def prompt_and_target(sample: Sample) -> tuple[str, Image | None]:
    """The generation prompt and target image of a sample (the image is None for text-only samples)."""
    where = f"{sample.shard}:{sample.key}"
    if sample.kind == "messages":
        user = [t for t in sample.turns if t.role == "user"]
        if any(p.type == "image" for t in user for p in t.parts):
            raise SampleError("not_t2i", f"{where}: the user turn holds an image (not a text-to-image sample)")
        targets = [p.image for t in sample.turns if t.role == "assistant" for p in t.parts if p.type == "image"]
        prompt = "\n".join(t.text for t in user).strip()
    else:
        targets = sample.images
        prompt = " ".join(p.text.strip() for t in sample.turns for p in t.parts if p.type == "text").strip()
    if len(targets) > 1:
        raise SampleError("not_t2i", f"{where}: {len(targets)} target images; a DiT sample has one")
    return prompt, (targets[0] if targets else None)


def square(img: PILImage.Image, size: int, mode: str) -> PILImage.Image:
    """``size x size``: the whole image squashed (``resize``, paper) or its central square (``center_crop``)."""
    if mode == "center_crop":
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img if img.size == (size, size) else img.resize((size, size), PILImage.BICUBIC)


class DiTProcessor(Processor):
    """Turn t2i / inverted-caption samples into DiT items; collate them with padded conditions.

    Args:
        target_size: side of the square target image (paper: 1024).
        condition_size: side of the condition image the tokenizer + LLM see (paper: 504); ``llm`` mode only.
        aspect_range: skip source images whose width/height is outside ``[lo, hi]`` (pretraining: 0.67-1.5).
        min_source_side: skip images whose shorter side is below this, so targets are never upsampled
            (SFT: 1024 with ``aspect_range: [1.0, 1.0]`` keeps 1024x1024 sources only).
        max_source_side: skip images whose longer side is above this (None: no limit); the official SFT
            keeps sides of 512 to 1,536 (``valid_hw_range``).
        resize: ``resize`` squashes the whole image to the square (paper); ``center_crop`` crops first.
            Target and condition image get the same transform, so their layouts match; under ``center_crop``
            pre-tokenized codes (made from the whole image) are used for square sources only, other
            sources give the cropped condition image to the frozen tokenizer (``condition_crop`` skips
            codes-only samples, whose crop cannot be made).
        target: ``pixels`` (``uint8 [3, H, W]``, normalised to ``[-1, 1]`` by :func:`vae_pixels` and encoded
            by the frozen VAE on the device) or ``latents`` (``{key}.latent.npy``).
        condition: what the condition provider needs: ``precomputed`` (``{key}.cond.npy`` ``[L, D]``),
            ``llm`` (prompt + the target's codes ``{key}.0.codes.npy`` when present, else the condition
            image), or ``prompt`` (the prompt text only: the smoke-test provider).
        max_condition_length: pre-computed conditions are cut to this many states.
        token_size: pixels per side of one visual token of the tokenizer (``patch_size * merge_size``: 28);
            pre-tokenized codes must be the ``condition_size / token_size`` square grid of the condition
            image, others are skipped (``condition_grid``).
    """

    def __init__(self, target_size: int = 1024, condition_size: int = 504,
                 aspect_range: tuple[float, float] | None = None, min_source_side: int = 0,
                 max_source_side: int | None = None, resize: Literal["resize", "center_crop"] = "resize",
                 target: Literal["pixels", "latents"] = "pixels",
                 condition: Literal["precomputed", "llm", "prompt"] = "precomputed",
                 max_condition_length: int = 720, token_size: int = 28):
        if target_size < 1 or condition_size < 1:
            raise ValueError(f"target_size and condition_size must be >= 1, got {target_size}, {condition_size}")
        if aspect_range is not None and not 0 < aspect_range[0] <= aspect_range[1]:
            raise ValueError(f"aspect_range must be [lo, hi] with 0 < lo <= hi, got {aspect_range}")
        for name, value, options in (("resize", resize, ("resize", "center_crop")), ("target", target, ("pixels", "latents")),
                                     ("condition", condition, ("precomputed", "llm", "prompt"))):
            if value not in options:
                raise ValueError(f"DiTProcessor.{name} {value!r} is not one of {', '.join(options)}")
        self.target_size, self.condition_size = target_size, condition_size
        self.aspect_range = tuple(aspect_range) if aspect_range is not None else None
        self.min_source_side, self.max_source_side, self.resize = min_source_side, max_source_side, resize
        self.target, self.condition, self.max_condition_length = target, condition, max_condition_length
        if condition == "llm" and (token_size < 1 or condition_size % token_size):
            raise ValueError(f"DiTProcessor.condition_size {condition_size} is not a multiple of token_size {token_size}")
        self.token_size = token_size

    def _check_source(self, pixels: PILImage.Image, where: str):
        w, h = pixels.size
        if self.aspect_range is not None and not self.aspect_range[0] <= w / h <= self.aspect_range[1]:
            raise SampleError("aspect_ratio", f"{where}: image {w}x{h} has aspect {w / h:.2f} outside {list(self.aspect_range)}")
        if min(w, h) < self.min_source_side:
            raise SampleError("too_small", f"{where}: image {w}x{h} is smaller than min_source_side {self.min_source_side}")
        if self.max_source_side is not None and max(w, h) > self.max_source_side:
            raise SampleError("too_large", f"{where}: image {w}x{h} is larger than max_source_side {self.max_source_side}")

    def __call__(self, sample: Sample) -> dict:
        where = f"{sample.shard}:{sample.key}"
        prompt, image = prompt_and_target(sample)
        item = {"key": sample.key, "prompt": prompt}
        codes = self._condition_codes(image, where) if self.condition == "llm" else None
        need_pixels = self.target == "pixels" or (self.condition == "llm" and codes is None)
        if need_pixels:
            if image is None or image.pixels is None:
                raise SampleError("not_t2i", f"{where}: no target image pixels (a DiT sample needs one image and a prompt)")
            self._check_source(image.pixels, where)
        if self.target == "pixels":
            # uint8 until the device: a quarter of float32's bytes through the loader and the copy
            item["pixels"] = to_uint8_tensor(square(image.pixels, self.target_size, self.resize))
        else:
            lat = sample.arrays.get(LATENT_FIELD)
            if lat is None or lat.ndim != 3:
                raise SampleError("no_latent", f"{where}: needs {LATENT_FIELD} [C, h, w] (target: latents), "
                                  f"got {None if lat is None else lat.shape}")
            item["latents"] = torch.from_numpy(np.asarray(lat, dtype=np.float32))
        if self.condition != "precomputed" and not prompt:
            raise SampleError("no_prompt", f"{where}: empty prompt")
        if self.condition == "precomputed":
            cond = sample.arrays.get(COND_FIELD)
            if cond is None or cond.ndim != 2 or cond.shape[0] == 0 or not np.issubdtype(cond.dtype, np.floating):
                raise SampleError("no_condition", f"{where}: needs {COND_FIELD} float [L, D] with L >= 1 (condition: "
                                  f"precomputed), got {None if cond is None else (cond.dtype, cond.shape)}")
            # kept in its stored dtype (float16): half the host memory and transfer; cast on the device
            item["cond"] = torch.from_numpy(np.ascontiguousarray(cond[: self.max_condition_length]))
        elif self.condition == "llm":
            if codes is not None:
                item["codes"] = torch.from_numpy(np.asarray(codes, dtype=np.int64))
            else:
                cond = square(image.pixels, self.condition_size, self.resize)
                cond.load()  # a lazily decoded image already square is decoded here: a corrupt one is a counted skip
                item["cond_image"] = cond
        return item

    def _condition_codes(self, image: Image | None, where: str):
        """The pre-tokenized codes to condition on, checked; None: the condition image is tokenized instead."""
        if image is None or image.codes is None:
            return None
        pixels = image.pixels
        if self.resize == "center_crop" and not (pixels is not None and pixels.size[0] == pixels.size[1]):
            if pixels is None:
                raise SampleError("condition_crop", f"{where}: pre-tokenized codes without pixels under resize: "
                                  "center_crop (the codes are of the whole image, the target is its centre)")
            return None  # the codes show the whole image: tokenize the same crop the target gets
        g, codes = self.condition_size // self.token_size, image.codes
        if codes.ndim != 3 or tuple(codes.shape[:2]) != (g, g):
            raise SampleError("condition_grid", f"{where}: pre-tokenized codes {tuple(codes.shape)} are not the "
                              f"{g}x{g} grid of a {self.condition_size}-px condition image (token_size {self.token_size})")
        return codes

    def collate(self, items: list[dict]) -> dict:
        batch: dict = {"keys": [i["key"] for i in items], "prompts": [i["prompt"] for i in items],
                       "batch_size": len(items)}
        for k in ("pixels", "latents"):
            if k in items[0]:
                batch[k] = torch.stack([i[k] for i in items])
        if "cond" in items[0]:
            n = max(i["cond"].shape[0] for i in items)
            dims = {i["cond"].shape[1] for i in items}
            if len(dims) > 1:
                raise ValueError(f"condition widths differ within a batch: {sorted(dims)} (keys {batch['keys']})")
            cond = torch.zeros(len(items), n, dims.pop(), dtype=items[0]["cond"].dtype)
            mask = torch.zeros(len(items), n, dtype=torch.bool)
            for r, i in enumerate(items):
                cond[r, : i["cond"].shape[0]] = i["cond"]
                mask[r, : i["cond"].shape[0]] = True
            batch["cond"], batch["cond_mask"] = cond, mask
        if self.condition == "llm":
            batch["codes"] = [i.get("codes") for i in items]
            batch["cond_images"] = [i.get("cond_image") for i in items]
        return batch
