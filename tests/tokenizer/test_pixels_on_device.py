"""The tokenizer's stream carries ``uint8`` pixels; TokenizerModule normalises them on the device with the
tokenizer's mean/std: the loss of the float path (the processor's former ``to_tensor``)."""

import pytest
import torch
from PIL import Image as PILImage

from benchmarks.bench_data import photo
from kelix.data.images import ImageConfig, to_tensor
from kelix.data.schema import Image, Part, Sample, Turn
from kelix.hf import TINY_QWEN3
from kelix.tokenizer.data import TokenizerProcessor
from kelix.tokenizer.model import tiny_config
from kelix.tokenizer.module import TokenizerModule

# CLIP's mean/std: per channel, neither 0.5 nor each other, so a wrong or missing normalisation shows
IMAGE = dict(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=112 * 112,
             mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))


@pytest.fixture(scope="module")
def batch():
    """Three caption samples of different sizes and aspects, through the processor and its collate."""
    proc = TokenizerProcessor("builtin:bytes", ImageConfig(**IMAGE))
    items = [proc(Sample(f"k{i}", "s.tar", "segments", [Turn(None, [Part("image", image=Image("0.jpg", photo(w, h, i))),
                                                                      Part("text", text=f"picture {i}")])]))
             for i, (w, h) in enumerate([(90, 60), (70, 120), (300, 300)])]
    return proc.collate(items)


def test_uint8_pixels_normalised_in_the_module_give_the_float_paths_loss(batch):
    torch.manual_seed(0)
    m = TokenizerModule(tiny_config(image=IMAGE), aux_lm_config=TINY_QWEN3).eval()
    assert [p.dtype for p in batch["pixels"]] == [torch.uint8] * 3
    assert [tuple(p.shape) for p in batch["pixels"]] == [(3, 56, 84), (3, 112, 56), (3, 84, 84)]
    # the former float path: the processor's to_tensor of the same resized image
    cfg = ImageConfig(**IMAGE)
    ref = dict(batch, pixels=[to_tensor(PILImage.fromarray(p.permute(1, 2, 0).numpy()), cfg) for p in batch["pixels"]])
    for a, b in zip(m.pixels(batch), ref["pixels"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with torch.no_grad():
        out, want = m.step(batch, "val"), m.step(ref, "val")
        for k in ("loss", "ntp", "vq"):
            torch.testing.assert_close(out[k], want[k], atol=1e-6, rtol=0)
        # the comparison sees the normalisation: 0.5-normalised pixels give another loss
        half = dict(batch, pixels=[(p.float() / 255 - 0.5) / 0.5 for p in batch["pixels"]])
        assert (m.step(half, "val")["loss"] - out["loss"]).abs() > 1e-4
