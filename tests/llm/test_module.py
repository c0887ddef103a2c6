"""UnifiedLLMModule: stage-1 freezing, the two image paths (codes in shards, pixels through the frozen
tokenizer), init_from + unify, processor checks."""

import io

import numpy as np
import pytest
import torch

from kelix.data.images import ImageConfig
from kelix.data.stream import ShardStream
from kelix.llm.data import LLMProcessor
from kelix.llm.model import LLMConfig
from kelix.llm.module import UnifiedLLMModule
from kelix.training.optim import OptimConfig, build_optimizer
from tests.conftest import write_shard

from .conftest import DECODER

IMAGE = ImageConfig(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=112 * 112)


def _processor(**kw):
    return LLMProcessor("builtin:bytes", N=4, K=32, image=IMAGE,
                        gen_image=ImageConfig(patch_size=14, merge_size=2, fixed_size=56, aspect_range=(0.5, 2.0)), **kw)


@pytest.fixture(scope="module")
def shard(tmp_path_factory, image_tokenizer):
    """Caption and VQA samples whose JPEGs also carry the codes the tokenizer gives them."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("llm_shard")
    records = []
    for i, (w, h) in enumerate([(60, 45), (90, 60), (56, 56), (70, 100)]):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        pil = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        codes = image_tokenizer.encode([pil])[0].numpy().astype(np.int16)
        npy = io.BytesIO()
        np.save(npy, codes)
        meta = ({"segments": [{"type": "image", "image": "0.png"}, {"type": "text", "text": f"picture {i}"}]} if i % 2
                else {"messages": [{"role": "user", "content": [{"type": "image", "image": "0.png"},
                                                                {"type": "text", "text": "what?"}]},
                                   {"role": "assistant", "content": f"thing {i}"}]})
        records.append({"__key__": f"s{i}", "json": meta, "0.png": buf.getvalue(), "0.codes.npy": npy.getvalue()})
    return write_shard(out / "mixed.tar", records)


def _batch(proc, shard):
    return proc.collate(list(ShardStream([shard], processor=proc, shuffle_buffer=1, repeat=False)))


def _module(tok_dir, backbone_dir, **kw):
    torch.manual_seed(0)
    lm = LLMConfig(backbone=backbone_dir, text_tokenizer="builtin:bytes", image_tokenizer=tok_dir,
                   visual_input="projector", **DECODER)
    return UnifiedLLMModule(lm, **kw)


def test_pixels_encoded_in_the_module_equal_precomputed_codes(shard, tok_dir, backbone_dir):
    m = _module(tok_dir, backbone_dir).eval()
    with_codes = _batch(_processor(), shard)
    with_pixels = _batch(_processor(use_codes=False), shard)
    assert not with_codes["image_pixels"] and len(with_pixels["image_pixels"]) == 4
    assert torch.equal(m.encode_images(with_pixels), with_codes["codes"])
    with torch.no_grad():
        a, b = m.step(with_codes, "val"), m.step(with_pixels, "val")
    assert a["loss"] == b["loss"] and a["blocks_visual"] > 0


def test_stage1_freezing_leaves_the_backbone_bit_identical(shard, tok_dir, backbone_dir):
    m = _module(tok_dir, backbone_dir, freeze_backbone=True)
    batch = _batch(_processor(), shard)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = build_optimizer(m, OptimConfig(lr=1e-2, schedule="constant"), 10)["optimizer"]
    m.step(batch, "train")["loss"].backward()
    opt.step()
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    body = {k for k in before if k.startswith("lm.backbone.model.")}
    assert body and not body & changed  # embeddings, layers, final norm: untouched
    assert "lm.backbone.lm_head.weight" in changed  # the LM head rows are trained
    assert {"lm.visual.up_projector.weight", "lm.decoder.proj_out.weight"} <= changed
    assert not {"lm.visual.code_vectors", "lm.visual.tok_up.weight"} & changed  # the tokenizer part is frozen


def test_init_from_a_stage1_directory_with_unify(shard, tok_dir, backbone_dir, tmp_path):
    m1 = _module(tok_dir, backbone_dir).eval()
    m1.lm.save_pretrained(tmp_path / "stage1")
    batch = _batch(_processor(), shard)
    m2 = UnifiedLLMModule(init_from=str(tmp_path / "stage1"), unify=True).eval()
    assert m2.lm.visual is None and m2.lm.config.visual_input == "table"
    with torch.no_grad():
        torch.testing.assert_close(m2.step(batch, "val")["loss"], m1.step(batch, "val")["loss"], rtol=1e-5, atol=1e-5)


def test_processor_mismatches_fail_early(tok_dir, backbone_dir):
    m = _module(tok_dir, backbone_dir)
    m.check_processor(_processor())
    with pytest.raises(ValueError, match="N=8"):
        m.check_processor(LLMProcessor("builtin:bytes", N=8, K=32, image=IMAGE))
    with pytest.raises(ValueError, match="row_marker"):
        m.check_processor(_processor(row_marker="{row}"))
    with pytest.raises(ValueError, match="patch\\*merge"):
        m.check_processor(LLMProcessor("builtin:bytes", N=4, K=32, image=ImageConfig(patch_size=16, merge_size=2),
                                       gen_image=ImageConfig(patch_size=16, merge_size=2, fixed_size=64)))


def test_bad_paths_fail_before_any_model_is_built(tmp_path):
    with pytest.raises(FileNotFoundError, match="init_from"):
        UnifiedLLMModule(init_from=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="image_tokenizer"):
        UnifiedLLMModule(LLMConfig(backbone_config={"model_type": "qwen3"}, N=4, K=32),
                         image_tokenizer=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="block_loss"):
        UnifiedLLMModule(LLMConfig(backbone_config={"model_type": "qwen3"}, N=4, K=32), block_loss="mean")


def test_activation_checkpointing_gives_the_same_loss_and_gradients(shard, tok_dir, backbone_dir):
    batch = _batch(_processor(), shard)
    grads = []
    for ac in (False, True):
        m = _module(tok_dir, backbone_dir, activation_checkpointing=ac)
        m.configure_model()  # no device mesh: only checkpointing is applied
        loss = m.step(batch, "train")["loss"]
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1) and g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6)
