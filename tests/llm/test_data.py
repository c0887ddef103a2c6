"""The LLM processor: every synthetic task, codes or pixels, generation-target sizing, packing."""

import io
import pickle

import numpy as np
import pytest
import torch

from kelix.data.images import ImageConfig
from kelix.data.schema import SampleError
from kelix.data.stream import ShardStream
from kelix.data.synthetic import TASKS
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
    assert len(docs) == len(TASKS) * 2 * 8 and not any(k.startswith("skipped") for k in stream.stats)
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


def test_img2dataset_captions_train_only_the_caption_under_completion_only(tmp_path):
    shard = write_shard(tmp_path / "c.tar", [{"__key__": f"{i:09d}", "jpg": jpeg_bytes((60, 40)), "txt": f"cap {i}",
                                             "json": {"width": 60}} for i in range(3)])

    def docs(**kw):
        return list(ShardStream([shard], processor=processor(**kw), shuffle_buffer=1, repeat=False))

    lay = processor().layout
    for d in docs(completion_only=True):
        (img,) = d.images
        assert not img.target and not any(d.targets[img.start:img.end + 1])  # zero visual targets
        trained = [t for t, y in zip(d.tokens, d.targets) if y]
        assert trained[-1] == lay.ids["im_end"] and lay.tok.decode(trained[:-1]).startswith("cap ")
    for d in docs(completion_only=False):  # stage 1: image and caption are one trained document, as before
        assert d.images[0].target and all(d.targets[1:]) and d.tokens[-1] == lay.doc_end


def _t2i_sample(i, shard="t2i-00000.tar", grid=(3, 3)):
    from kelix.data.schema import Image, Part, Sample, Turn

    codes = np.zeros((*grid, 4), dtype=np.int16)
    return Sample(f"s{i:06d}", f"/data/{shard}", "messages", [
        Turn("user", [Part("text", text=f"Generate an image of cube {i}.")]),
        Turn("assistant", [Part("image", image=Image("0.jpg", codes=codes))])], task="t2i")


def test_prompt_dropout_is_a_deterministic_ten_percent_of_t2i_samples():
    assert processor().prompt_dropout == 0.0  # the official code drops no prompt; CFG training is opt-in
    proc = processor(completion_only=True, prompt_dropout=0.1)
    uncond = proc.layout.t2i_prompt("")

    def dropped(p, samples):
        return {s.key for s in samples if p(s).tokens[:len(uncond) + 1] == [*uncond, p.layout.ids["vision_start"]]}

    samples = [_t2i_sample(i) for i in range(2000)]
    got = dropped(proc, samples)
    assert 0.08 < len(got) / len(samples) < 0.12  # 10% (binomial sd 0.7%)
    # a function of (seed, shard name, key): the same in a fresh worker (resume), in another directory
    assert dropped(pickle.loads(pickle.dumps(proc)), samples) == got
    moved = [_t2i_sample(i) for i in range(2000)]
    for s in moved:
        s.shard = "/elsewhere/t2i-00000.tar"
    assert dropped(proc, moved) == got
    other = dropped(processor(completion_only=True, prompt_dropout=0.1, prompt_dropout_seed=1), samples)
    assert 0.08 < len(other) / len(samples) < 0.12 and other != got
    assert dropped(processor(completion_only=True, prompt_dropout=0.0), samples) == set()
    # understanding samples never lose their question
    from kelix.data.schema import Image, Part, Sample, Turn

    vqa = [Sample(f"s{i:06d}", "v.tar", "messages", [
        Turn("user", [Part("image", image=Image("0.jpg", codes=np.zeros((2, 2, 4), dtype=np.int16))),
                      Part("text", text="?")]), Turn("assistant", [Part("text", text="a")])]) for i in range(300)]
    proc1 = processor(completion_only=True, prompt_dropout=1.0)
    assert all(proc1(s).tokens == proc(s).tokens for s in vqa)
    assert all(proc1(s).tokens[:len(uncond) + 1] == [*uncond, proc.layout.ids["vision_start"]] for s in samples[:50])
    with pytest.raises(ValueError, match="prompt_dropout"):
        processor(prompt_dropout=1.5)


def test_precomputed_generation_targets_must_have_the_fixed_size_grid(tmp_path):
    msgs = [{"role": "user", "content": "draw"}, {"role": "assistant", "content": [{"type": "image", "image": "0.jpg"}]}]
    und = [{"role": "user", "content": [{"type": "image", "image": "0.jpg"}, {"type": "text", "text": "?"}]},
           {"role": "assistant", "content": "ok"}]

    def codes(h, w):
        return npy(np.zeros((h, w, 4), dtype=np.int16))

    # GEN: fixed_size 84 at 28 px per token -> a 3x3 grid, aspect 0.5..2
    shard = write_shard(tmp_path / "g.tar", [
        {"__key__": "good", "json": {"messages": msgs}, "0.codes.npy": codes(3, 3)},
        {"__key__": "native", "json": {"messages": msgs}, "0.codes.npy": codes(2, 3)},
        {"__key__": "big", "json": {"messages": msgs}, "0.codes.npy": codes(18, 18)},
        {"__key__": "wide", "json": {"messages": msgs}, "0.codes.npy": codes(3, 3), "0.jpg": jpeg_bytes((90, 30))},
        {"__key__": "understanding", "json": {"messages": und}, "0.codes.npy": codes(2, 3)},  # native: fine
    ])
    stream = ShardStream([shard], processor=processor(completion_only=True, prompt_dropout=0.0), shuffle_buffer=1,
                         repeat=False)
    docs = list(stream)
    assert len(docs) == 2 and stream.stats["skipped/gen_grid"] == 2 and stream.stats["skipped/aspect_ratio"] == 1
    assert sorted((d.images[0].h, d.images[0].w, d.images[0].target) for d in docs) == [(2, 3, False), (3, 3, True)]


def test_native_resolution_generation_targets_are_checked_against_the_pixel_budget():
    native = ImageConfig(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=112 * 112, aspect_range=(0.5, 2.0))
    proc = LLMProcessor("builtin:bytes", N=4, K=32, image=IMAGE, gen_image=native, prompt_dropout=0.0)
    assert proc(_t2i_sample(0, grid=(2, 3))).images[0].target  # 56x84 px: within budget and aspect
    for grid in ((5, 5), (1, 1), (1, 4)):  # over max_pixels, under min_pixels, aspect 4
        with pytest.raises(SampleError, match="3x3|5x5|1x1|1x4") as e:
            proc(_t2i_sample(0, grid=grid))
        assert e.value.reason == "gen_grid"


def test_the_dropped_prompt_is_the_unconditional_prompt_of_generation_cfg(lm_table, monkeypatch):
    """Generation with CFG runs the conditional rows, then the unconditional ones (left padded); what
    a dropped t2i sample trains before its image must be exactly that unconditional row."""
    from kelix.llm.generate import Sampling, generate_image

    proc = processor(completion_only=True, prompt_dropout=1.0)
    seen = []
    real = lm_table.embed_blocks
    monkeypatch.setattr(lm_table, "embed_blocks", lambda t, c, *a, **k: seen.append(t.clone()) or real(t, c, *a, **k))
    prompt = "Generate an image of cube 7."
    generate_image(lm_table, [prompt], grid=(1, 1), sampling=Sampling(cfg_scale=3.0))
    cond_row, uncond_row = seen[0].tolist()  # the prefill: one conditional and one unconditional row
    pad = lm_table.text_tokenizer.pad_token_id or 0

    def trained_prefix(p, sample):
        d = p(sample)
        return d.tokens[:d.images[0].start], d.targets[:d.images[0].start]

    uncond, targets = trained_prefix(proc, _t2i_sample(7))
    assert uncond_row[len(uncond_row) - len(uncond):] == uncond and not any(targets)
    assert set(uncond_row[:len(uncond_row) - len(uncond)]) <= {pad}  # the rest is left padding
    cond, _ = trained_prefix(processor(completion_only=True, prompt_dropout=0.0), _t2i_sample(7))
    assert cond_row == cond and len(cond) > len(uncond)  # the conditional prompt, as trained
