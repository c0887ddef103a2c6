"""The LLM processor: every synthetic task, codes or pixels, generation-target sizing, packing."""

import io
import pickle

import numpy as np
import pytest
import torch

from kelix.data.images import ImageConfig
from kelix.data.stream import ShardStream
from kelix.llm.data import LLMProcessor, _first_fit, collate_docs
from tests.conftest import jpeg_bytes, write_shard

IMAGE = ImageConfig(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=112 * 112)
GEN = ImageConfig(patch_size=14, merge_size=2, fixed_size=84, aspect_range=(0.5, 2.0))


def processor(**kw):
    return LLMProcessor("builtin:bytes", N=4, K=32, image=IMAGE, gen_image=GEN, **kw)


def npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_every_synthetic_task_is_laid_out(synthetic_dir):
    proc = processor(completion_only=True)
    stream = ShardStream(sorted(str(p) for p in synthetic_dir.glob("*.tar")), processor=proc, shuffle_buffer=1,
                         repeat=False)
    docs = list(stream)
    assert len(docs) == 6 * 2 * 8 and not any(k.startswith("skipped") for k in stream.stats)
    for d in docs:
        assert not d.targets[0] and any(d.targets)
        for img in d.images:
            assert img.codes is None and img.pixels.shape == (3, img.h * 28, img.w * 28)
            assert len(img.positions) == img.h * img.w
    # generation targets (the t2i assistant's image) are resized to gen_image: 84 px -> 3x3 blocks, trained;
    # understanding images (user turns) keep their aspect and are not trained under completion_only
    def images(task):
        s = ShardStream([str(p) for p in synthetic_dir.glob(f"{task}-*.tar")], processor=proc, shuffle_buffer=1,
                        repeat=False)
        return [i for d in s for i in d.images]

    t2i, vqa = images("t2i"), images("vqa")
    assert len(t2i) == 16 and all((i.h, i.w, i.target) == (3, 3, True) for i in t2i)
    assert len(vqa) == 16 and not any(i.target for i in vqa) and len({(i.h, i.w) for i in vqa}) > 1


def test_precomputed_codes_are_used_and_checked(tmp_path):
    codes = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) % 32
    msgs = [{"role": "user", "content": [{"type": "image", "image": "0.jpg"}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "ok"}]
    shard = write_shard(tmp_path / "a.tar", [
        {"__key__": "good", "json": {"messages": msgs}, "0.codes.npy": npy(codes)},
        {"__key__": "range", "json": {"messages": msgs}, "0.codes.npy": npy(codes + 40)},
        {"__key__": "shape", "json": {"messages": msgs}, "0.codes.npy": npy(codes[..., :3])},
        {"__key__": "pixels", "json": {"messages": msgs}, "0.jpg": jpeg_bytes((60, 40))},
    ])
    stream = ShardStream([shard], processor=processor(), shuffle_buffer=1, repeat=False)
    docs = list(stream)
    assert stream.stats["skipped/bad_codes"] == 2 and len(docs) == 2
    good = next(d for d in docs if d.images[0].codes is not None)
    assert torch.equal(good.codes(4)[good.images[0].positions], torch.from_numpy(codes.astype(np.int64)).view(6, 4))
    batch = processor().collate(docs)
    assert len(batch["image_pixels"]) == 1  # only the pixel image is left to the tokenizer
    # use_codes=False ignores the codes (and skips samples that only have codes)
    stream = ShardStream([shard], processor=processor(use_codes=False), shuffle_buffer=1, repeat=False)
    assert len(list(stream)) == 1 and stream.stats["skipped/missing_image"] == 3


def test_too_long_documents_are_skipped(synthetic_dir):
    proc = processor(max_blocks=10)
    stream = ShardStream([str(synthetic_dir / "text-00000.tar")], processor=proc, shuffle_buffer=1, repeat=False)
    assert list(stream) == [] and stream.stats["skipped/too_long"] == 8


def test_processor_pickles_without_its_tokenizer():
    proc = processor()
    proc.layout  # noqa: B018 - builds the tokenizer
    clone = pickle.loads(pickle.dumps(proc))
    assert clone._layout is None and clone.layout.ids == proc.layout.ids


def test_first_fit_packs_rows():
    assert _first_fit([5, 3, 4, 2], 8) == [[0, 1], [2, 3]]
    assert _first_fit([9], 4) == [[0]]  # a longer document gets a row of its own


def test_collate_resets_positions_per_document_and_indexes_images():
    from kelix.llm.layout import BlockDoc, ImageRef

    a, b = BlockDoc(), BlockDoc()
    a.tokens, a.targets = [1, -1, -1, 2], [False, True, True, True]
    a.images = [ImageRef(1, 2, [1, 2], pixels=torch.zeros(3, 28, 56))]
    b.tokens, b.targets = [3, 4, 5], [False, True, True]
    batch = collate_docs([a, b], N=4, pad_id=0, pack=True, max_blocks=8, pad_to_multiple_of=4)
    assert batch["tokens"].tolist() == [[1, -1, -1, 2, 3, 4, 5, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    assert batch["targets"].tolist() == [[False, True, True, True, False, True, True, False]]
    assert [i.tolist() for i in batch["image_index"]] == [[1, 2]] and batch["image_grids"].tolist() == [[1, 2]]
    assert (batch["num_tokens"], batch["batch_size"]) == (7, 2)
    unpacked = collate_docs([a, b], N=4, pack=False)
    assert unpacked["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]  # padding restarts too
    assert [i.tolist() for i in unpacked["image_index"]] == [[1, 2]]


def test_image_configs_must_share_the_token_size():
    with pytest.raises(ValueError, match="patch\\*merge"):
        LLMProcessor("builtin:bytes", N=4, K=32, image=IMAGE, gen_image=ImageConfig(patch_size=16, merge_size=2))


def test_generation_targets_outside_the_aspect_range_are_skipped(tmp_path):
    msgs = [{"role": "user", "content": "draw"}, {"role": "assistant", "content": [{"type": "image", "image": "0.jpg"}]}]
    shard = write_shard(tmp_path / "t.tar", [{"__key__": "wide", "json": {"messages": msgs}, "0.jpg": jpeg_bytes((90, 30))}])
    stream = ShardStream([shard], processor=processor(), shuffle_buffer=1, repeat=False)
    assert list(stream) == [] and stream.stats["skipped/aspect_ratio"] == 1
