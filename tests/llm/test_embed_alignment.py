"""Each sample's image embeddings land at exactly that sample's visual positions.

A batch of samples with different numbers and sizes of images (pixels encoded in the module, and a
pre-computed code grid), packed several documents to a row, goes through the training path's input
embedding (``UnifiedLLMModule.encode_images`` then ``KelixLM.embed_blocks``). The reference is built
per sample by hand: each image tokenized alone, each block's embedding summed from the table rows
(``table``) or computed as stage 1 defines it, ``up_projector(tokenizer.embed_codes(c))``
(``projector``), text blocks read from the table.
"""

import io

import numpy as np
import pytest
import torch

from kelix.data.images import ImageConfig, normalize
from kelix.data.stream import ShardStream
from kelix.llm.config import LLMConfig
from kelix.llm.data import LLMProcessor
from kelix.llm.module import UnifiedLLMModule
from tests.conftest import write_shard

from .conftest import DECODER

IMAGE = ImageConfig(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=112 * 112)
GEN = ImageConfig(patch_size=14, merge_size=2, fixed_size=84, aspect_range=(0.5, 2.0))


def _png(rng, w, h) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    rng = np.random.default_rng(0)
    img = {"type": "image", "image": "0.png"}
    img1 = {"type": "image", "image": "1.png"}
    codes = io.BytesIO()
    np.save(codes, rng.integers(0, 32, (2, 2, 4)).astype(np.int16))
    records = [
        {"__key__": "two_images", "0.png": _png(rng, 60, 45), "1.png": _png(rng, 100, 70), "json": {"messages": [
            {"role": "user", "content": [img, img1, {"type": "text", "text": "which is brighter?"}]},
            {"role": "assistant", "content": "the left one"}]}},
        {"__key__": "caption", "jpg": _png(rng, 56, 56), "txt": "a noisy square"},  # img2dataset
        {"__key__": "t2i", "0.png": _png(rng, 70, 70), "json": {"messages": [
            {"role": "user", "content": "draw noise"}, {"role": "assistant", "content": [img]}]}},
        {"__key__": "codes", "0.codes.npy": codes.getvalue(), "json": {"messages": [
            {"role": "user", "content": [img, {"type": "text", "text": "what is it?"}]},
            {"role": "assistant", "content": "noise"}]}},
        {"__key__": "text", "json": {"segments": [{"type": "text", "text": "just some text here"}]}},
        {"__key__": "interleaved", "0.png": _png(rng, 56, 56), "1.png": _png(rng, 84, 56), "json": {"segments": [
            {"type": "text", "text": "first"}, img, {"type": "text", "text": "then"}, img1]}},
    ]
    return write_shard(tmp_path_factory.mktemp("align") / "mixed.tar", records)


@pytest.fixture(scope="module", params=["table", "projector"])
def module(request, backbone_dir, tok_dir):
    torch.manual_seed(0)
    lm = LLMConfig(backbone=backbone_dir, text_tokenizer="builtin:bytes", image_tokenizer=tok_dir,
                   visual_input=request.param, **DECODER)
    return UnifiedLLMModule(lm).eval()


def _reference(module, doc) -> torch.Tensor:
    """The document's input embeddings ``[n, D]``, from this document alone."""
    lm, tok = module.lm, module.image_tokenizer
    emb, v = lm.backbone.get_input_embeddings().weight, lm.vocab
    ref = emb[torch.tensor(doc.tokens).clamp(min=0)].clone()
    for img in doc.images:
        if img.codes is not None:
            codes = img.codes.reshape(-1, v.N)
        else:
            q, grids = tok.quantize([normalize(img.pixels, tok.image_config)])
            assert grids == [(img.h, img.w)]
            codes = q.codes
        if lm.visual is None:  # Eq. 4: the sum of the block's N code rows of the table
            rows = torch.stack([emb[v.visual_offset + j * v.K + codes[:, j]] for j in range(v.N)])
            ref[img.positions] = rows.sum(0)
        else:  # stage 1: the tokenizer's embedding through the LLM's up-projector
            ref[img.positions] = lm.visual.up_projector(tok.embed_codes(codes))
    return ref


def _find(batch, doc) -> tuple[int, int]:
    """Where collate put the document: (row, offset) of its tokens with positions 0..n-1."""
    n, tokens, pos = len(doc), batch["tokens"], batch["position_ids"]
    want = torch.tensor(doc.tokens)
    hits = [(b, o) for b in range(tokens.shape[0]) for o in range(tokens.shape[1] - n + 1)
            if pos[b, o] == 0 and torch.equal(tokens[b, o:o + n], want) and torch.equal(pos[b, o:o + n], torch.arange(n))]
    assert len(hits) == 1, hits
    return hits[0]


@pytest.mark.parametrize("pack", [True, False])
@torch.no_grad()
def test_each_samples_image_embeddings_land_at_its_visual_positions(module, shard, pack):
    proc = LLMProcessor("builtin:bytes", N=4, K=32, image=IMAGE, gen_image=GEN, completion_only=True,
                        prompt_dropout=0.0, max_blocks=200, pack=pack)
    docs = list(ShardStream([shard], processor=proc, shuffle_buffer=1, repeat=False))
    grids = [[(i.h, i.w) for i in d.images] for d in docs]
    assert len(docs) == 6 and sorted(map(len, grids)) == [0, 1, 1, 1, 2, 2]
    assert len({g for gs in grids for g in gs}) >= 3  # images of several sizes
    assert any(i.codes is not None for d in docs for i in d.images)  # a pre-computed grid among pixel images
    batch = proc.collate(docs)
    if pack:  # several documents with images share a row
        rows = [b for b, _ in (_find(batch, d) for d in docs if d.images)]
        assert max(rows.count(r) for r in rows) >= 2
    x = module.lm.embed_blocks(batch["tokens"], module.encode_images(batch))
    for d in docs:
        b, o = _find(batch, d)
        torch.testing.assert_close(x[b, o:o + len(d)], _reference(module, d), rtol=1e-5, atol=1e-5)
