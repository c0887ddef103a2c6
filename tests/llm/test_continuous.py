"""The continuous baseline in the LLM (Table 6a): a ``quantizer: none`` tokenizer's features reach the
visual positions through a trainable projector (no codes, no visual-token loss), train, save, load and
answer through the pipeline's understanding path."""

import pytest
import torch

from kelix.data.images import ImageConfig
from kelix.data.stream import ShardStream
from kelix.llm.data import LLMProcessor
from kelix.llm.embed import ContinuousProjector
from kelix.llm.model import KelixLM, LLMConfig
from kelix.llm.module import UnifiedLLMModule
from kelix.tokenizer.model import KelixTokenizer, tiny_config
from tests.conftest import write_shard

from .conftest import DECODER

IMAGE = dict(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def cont_tok(tmp_path_factory):
    torch.manual_seed(5)
    tok = KelixTokenizer(tiny_config(quantizer="none")).eval()
    with torch.no_grad():  # features of a random merger are tiny and alike: spread them as training would
        tok.up_projector.weight.mul_(4.0)
    out = tmp_path_factory.mktemp("continuous_tokenizer")
    tok.save_pretrained(out)
    return tok, str(out)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    import io
    import random

    from kelix.data.synthetic import make_sample

    rng, records = random.Random(0), []
    for i, task in enumerate(["vqa", "ocr", "caption", "vqa", "dense"]):
        meta, images = make_sample(task, rng, (60, 110))
        rec = {"__key__": f"s{i}", "json": meta}
        for j, im in enumerate(images):
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            rec[f"{j}.jpg"] = buf.getvalue()
        records.append(rec)
    return write_shard(tmp_path_factory.mktemp("cont") / "mix.tar", records)


def _lm(backbone_dir, tok_dir, **kw):
    torch.manual_seed(0)
    return LLMConfig(**{**dict(backbone=backbone_dir, text_tokenizer="builtin:bytes", image_tokenizer=tok_dir,
                               visual_input="projector", **DECODER), **kw})


def _batch(path, N, K):
    proc = LLMProcessor("builtin:bytes", N=N, K=K, image=ImageConfig(**IMAGE),
                        gen_image=ImageConfig(patch_size=14, merge_size=2, fixed_size=56, aspect_range=(0.5, 2.0)))
    return proc.collate(list(ShardStream([path], processor=proc, shuffle_buffer=1, repeat=False)))


def test_projector_with_a_continuous_tokenizer_becomes_continuous(backbone_dir, cont_tok):
    tok, path = cont_tok
    lm = KelixLM(_lm(backbone_dir, path))
    assert lm.continuous and isinstance(lm.visual, ContinuousProjector)
    with pytest.raises(ValueError, match="continuous"):  # a continuous tokenizer has no codes for a table
        KelixLM(_lm(backbone_dir, path, visual_input="table"))


def test_module_trains_on_features_only_text_targets(backbone_dir, cont_tok, shard, tmp_path):
    tok, path = cont_tok
    mod = UnifiedLLMModule(_lm(backbone_dir, path), freeze_backbone=True)
    batch = _batch(shard, tok.config.N, tok.config.K)
    assert bool((batch["tokens"] < 0).any())
    mod.train()
    codes, feats = mod.visual_inputs(batch)
    assert feats.shape == (int((batch["tokens"] < 0).sum()), tok.config.out_dim)
    assert bool(mod.lm.visual.standardized)  # standardized once, on the first training batch
    x = mod.lm.embed_blocks(batch["tokens"], codes, feats)[batch["tokens"] < 0].detach()
    norm = mod.lm.text_row_norm()
    assert abs(float(x.mean(0).norm())) < 0.05 * norm and 0.5 * norm < float(x.norm(dim=-1).mean()) < 1.5 * norm
    # the features are the images': a block's input is the projection of its own image's feature
    pixels = [p.float() for p in batch["image_pixels"]]
    from kelix.data.images import normalize

    own = tok([normalize(p.to(torch.uint8), tok.image_config) for p in pixels]).embeds
    flat = torch.cat(list(batch["image_index"]))
    want = mod.lm.visual(own[flat.argsort()]).detach()
    assert torch.allclose(x, want, atol=1e-5)
    # no visual target is predicted, text ones are
    pred = mod.lm(batch["tokens"], codes, batch["position_ids"], batch["targets"], visual_embeds=feats)
    assert not bool(pred.is_visual.any()) and pred.nll0.numel() > 0
    text_targets = int((batch["targets"][:, 1:] & (batch["tokens"][:, 1:] >= 0)).sum())
    assert pred.nll0.numel() == text_targets
    out = mod.step(batch, "train")
    out["loss"].backward()
    g = mod.lm.visual.up_projector.weight.grad
    assert g is not None and float(g.abs().sum()) > 0
    # wrong count of features is an error, not a silent misplacement
    with pytest.raises(ValueError, match="visual_embeds"):
        mod.lm.embed_blocks(batch["tokens"], codes, feats[:-1])


def test_save_load_and_answer(backbone_dir, cont_tok, tmp_path):
    from PIL import Image

    from kelix.eval.runner import PipelineModel
    from kelix.pipeline import KelixPipeline

    tok, path = cont_tok
    lm = KelixLM(_lm(backbone_dir, path))
    with torch.no_grad():
        lm.visual.standardize(torch.randn(32, tok.config.out_dim), lm.text_row_norm())
    lm.save_pretrained(tmp_path / "llm")
    back = KelixLM.from_pretrained(tmp_path / "llm")
    assert back.continuous and bool(back.visual.standardized)
    sd, sd2 = lm.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # unify keeps the projector of a continuous model
    mod = UnifiedLLMModule(init_from=str(tmp_path / "llm"), unify=True, image_tokenizer=path)
    assert mod.lm.continuous and isinstance(mod.lm.visual, ContinuousProjector)
    pipe = KelixPipeline(tok, back)
    imgs = [Image.new("RGB", (84, 56), c) for c in ((255, 0, 0), (0, 0, 255))]
    model = PipelineModel(pipe)
    answers = model.answer([([imgs[0]], "what?"), ([imgs[1]], "what colour is it?")], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # batched answers equal one-at-a-time answers (features reach each row's own positions)
    assert answers[1] == model.answer([([imgs[1]], "what colour is it?")], max_new_tokens=4)[0]
    assert pipe.understand(imgs[1], "what colour is it?", max_new_tokens=4) == answers[1]
