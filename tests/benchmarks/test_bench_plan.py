"""The LLM benchmarks time training's sync-free step: their batches carry a step plan that gives the
boolean-mask path's loss, and their forward + loss + backward asks the device for nothing."""

import pytest
import torch

from benchmarks.bench_mfu import packed_rows
from benchmarks.bench_nbp import image_batch
from kelix.hf import TINY_QWEN3
from kelix.llm.loss import nbp_loss
from kelix.llm.model import KelixLM, LLMConfig
from tests.llm.test_sync_free import SyncDetector


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)  # random, non-zero weights (the visual rows too)
    return KelixLM(LLMConfig(backbone_config=dict(TINY_QWEN3, max_position_embeddings=4096),
                             text_tokenizer="builtin:bytes", N=4, K=64, attn_implementation="sdpa",
                             packed_attention="varlen", decoder_width=32, decoder_heads=2, decoder_ffn=64,
                             loss_chunk=16))


def _step(lm, batch, plan):
    lm.zero_grad(set_to_none=True)
    with SyncDetector() as seen:
        pred = lm(*batch, plan=plan)
        loss = nbp_loss(pred, lm.vocab.N)["loss"]
        loss.backward()
    return loss.detach(), pred.plan is not None, seen.seen


@pytest.mark.parametrize("make", [
    lambda vocab, plan: packed_rows(vocab, 2, 96, 0.5, "cpu", min_doc=8, seed=1, plan=plan)[:2],
    lambda vocab, plan: image_batch(vocab, 2, 6, 5, "cpu", plan=plan)], ids=["mfu", "nbp"])
def test_benchmark_batches_take_the_plan_path(lm, make):
    batch, plan = make(lm.vocab, True)
    ref_batch, none = make(lm.vocab, False)
    assert none is None and all(torch.equal(a, b) for a, b in zip(batch, ref_batch))
    assert plan["n_text"] > 0 and plan["n_visual"] > 0
    want, took_plan, fallback_syncs = _step(lm, ref_batch, None)
    assert not took_plan and fallback_syncs  # the detector sees the fallback's syncs
    got, took_plan, syncs = _step(lm, batch, plan)
    assert took_plan and syncs == []
    torch.testing.assert_close(got, want, rtol=0, atol=0)
