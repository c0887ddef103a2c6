"""Images through the LLM's stream as ``uint8`` pixels, normalised on the device by the module with the
image tokenizer's mean/std: the codes and loss of the float path (the processor's former ``to_tensor``);
and ``kelix tokenize`` gives the codes the stream gives, also for large JPEGs decoded in draft mode."""

import io

import pytest
import torch
from PIL import Image

from benchmarks.bench_data import photo, photo_jpeg
from kelix.data.images import ImageConfig, to_tensor
from kelix.data.stream import ShardStream
from kelix.llm.data import LLMProcessor
from kelix.llm.model import LLMConfig
from kelix.llm.module import UnifiedLLMModule
from kelix.tokenizer.model import KelixTokenizer, tiny_config
from kelix.tokenizer.pretokenize import tokenize_shard
from tests.conftest import write_shard
from tests.data import test_fast_paths

from .conftest import DECODER

drafts = test_fast_paths.drafts  # (requested, decoded size) of every JPEG draft

# CLIP's mean/std: per-channel values, neither 0.5 nor each other, so a wrong or missing normalisation shows
CLIP = dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
IMAGE = ImageConfig(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=112 * 112, **CLIP)


@pytest.fixture(scope="module")
def clip_tok(tmp_path_factory):
    """A random tiny tokenizer normalising by CLIP's mean/std, and its saved directory."""
    torch.manual_seed(3)
    tok = KelixTokenizer(tiny_config(image=dict(patch_size=14, merge_size=2, min_pixels=56 * 56,
                                                max_pixels=112 * 112, **CLIP))).eval()
    out = tmp_path_factory.mktemp("clip_tokenizer")
    tok.save_pretrained(out)
    return tok, str(out)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """Large JPEGs (each at least twice its target on both sides: decoded in draft mode) and a small PNG,
    in caption and VQA samples."""
    out = tmp_path_factory.mktemp("llm_pixels")
    images = [("jpg", photo_jpeg(640, 480, seed=1)), ("jpg", photo_jpeg(480, 720, seed=2)),
              ("png", None), ("jpg", photo_jpeg(1000, 700, seed=4))]
    records = []
    for i, (ext, data) in enumerate(images):
        if data is None:
            buf = io.BytesIO()
            photo(90, 60, seed=3).save(buf, format="PNG")
            data = buf.getvalue()
        name = f"0.{ext}"
        meta = ({"segments": [{"type": "image", "image": name}, {"type": "text", "text": f"picture {i}"}]} if i % 2
                else {"messages": [{"role": "user", "content": [{"type": "image", "image": name},
                                                                {"type": "text", "text": "what?"}]},
                                   {"role": "assistant", "content": f"thing {i}"}]})
        records.append({"__key__": f"s{i}", "json": meta, name: data})
    return write_shard(out / "pixels.tar", records)


def _processor(**kw):
    return LLMProcessor("builtin:bytes", N=4, K=32, image=IMAGE,
                        gen_image=ImageConfig(patch_size=14, merge_size=2, fixed_size=56, aspect_range=(0.5, 2.0),
                                              **CLIP), **kw)


def _batch(proc, path):
    return proc.collate(list(ShardStream([path], processor=proc, shuffle_buffer=1, repeat=False)))


def _module(tok_dir, backbone_dir):
    torch.manual_seed(0)
    lm = LLMConfig(backbone=backbone_dir, text_tokenizer="builtin:bytes", image_tokenizer=tok_dir,
                   visual_input="projector", **DECODER)
    return UnifiedLLMModule(lm).eval()


def test_uint8_pixels_normalised_in_the_module_give_the_float_paths_codes_and_loss(shard, clip_tok, backbone_dir):
    m = _module(clip_tok[1], backbone_dir)
    u8 = _batch(_processor(use_codes=False), shard)
    assert len(u8["image_pixels"]) == 4 and all(p.dtype == torch.uint8 for p in u8["image_pixels"])
    # the former float path: the processor's to_tensor of the same resized image
    ref = dict(u8, image_pixels=[to_tensor(Image.fromarray(p.permute(1, 2, 0).numpy()), IMAGE)
                                 for p in u8["image_pixels"]])
    codes = m.encode_images(u8)
    assert torch.equal(codes, m.encode_images(ref))
    with torch.no_grad():
        torch.testing.assert_close(m.step(u8, "val")["loss"], m.step(ref, "val")["loss"], atol=1e-6, rtol=0)
    # the comparison sees the normalisation: unnormalised (or 0.5-normalised) pixels give other codes
    raw = dict(u8, image_pixels=[p.float() for p in u8["image_pixels"]])
    half = dict(u8, image_pixels=[(p.float() / 255 - 0.5) / 0.5 for p in u8["image_pixels"]])
    assert not torch.equal(m.encode_images(raw), codes) and not torch.equal(m.encode_images(half), codes)


def _recording(tok):
    """Record the pixels ``tok.quantize`` is given (on this instance only)."""
    seen, quantize = [], tok.quantize

    def spy(pixels, *a, **k):
        seen.extend(p.detach().clone() for p in pixels)
        return quantize(pixels, *a, **k)

    tok.quantize = spy
    return seen


def _by_content(pixels):
    return sorted(pixels, key=lambda p: (tuple(p.shape), float(p.double().sum())))


def test_kelix_tokenize_gives_the_training_streams_codes_for_large_jpegs(shard, clip_tok, backbone_dir, tmp_path,
                                                                         drafts):
    tok, tok_dir = clip_tok
    tokenized = _recording(tok)
    out = str(tmp_path / "tokenized.tar")
    assert tokenize_shard(tok, shard, out, batch_size=3) == {"samples": 4, "images": 4, "skipped": 0}
    del tok.quantize
    scaled = [(120, 180), (125, 88), (160, 120)]  # 480x720, 1000x700 and 640x480 at 1/4, 1/8 and 1/4
    assert sorted(d for _, d in drafts) == scaled  # each large JPEG decoded in draft mode
    drafts.clear()
    m = _module(tok_dir, backbone_dir)
    streamed = _recording(m.image_tokenizer)
    with_pixels = _batch(_processor(use_codes=False), shard)
    assert sorted(d for _, d in drafts) == scaled  # so is it in the training stream
    with_codes = _batch(_processor(), out)
    assert not with_codes["image_pixels"] and (with_codes["codes"] >= 0).any()
    assert torch.equal(m.encode_images(with_pixels), with_codes["codes"])
    # the encoder saw the same pixels on both paths, bit for bit
    assert len(tokenized) == len(streamed) == 4
    for a, b in zip(_by_content(tokenized), _by_content(streamed)):
        assert torch.equal(a, b)
    # which a full decode (kelix tokenize before) does not give: the comparison sees the decode
    full = tok.preprocess([Image.open(io.BytesIO(photo_jpeg(640, 480, seed=1)))])[0]
    same_size = [p for p in tokenized if p.shape == full.shape]
    assert same_size and all(0 < (p - full).abs().max() for p in same_size)
