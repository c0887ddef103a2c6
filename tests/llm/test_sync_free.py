"""The step plan (kelix.llm.plan): the training step gathers by host-computed indices, gives the boolean-mask
path's loss, logged terms and gradients, and asks the device for nothing (no host sync)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kelix.llm.data import collate_docs
from kelix.llm.model import LLMConfig
from kelix.llm.module import UnifiedLLMModule
from tests.llm.conftest import DECODER, random_doc_batch, stand_in_training

LENGTHS = [7, 12, 5, 9, 3, 14, 2]  # several documents per packed row; the last one has a single target
aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.is_nonzero.default}
BOOL_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


class SyncDetector(TorchDispatchMode):
    """Records the aten ops that make a device report data back to the host: ``.item()``, ``bool()``,
    ``int()`` (``_local_scalar_dense``), ``nonzero``, ``masked_select``, boolean-mask indexing (a hidden
    nonzero), and ``Tensor.tolist`` (which bypasses the dispatcher, so it is patched while active)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.seen.append(str(func))
        elif func in BOOL_INDEX_OPS and any(torch.is_tensor(i) and i.dtype == torch.bool for i in args[1] or ()):
            self.seen.append(f"{func} (boolean mask)")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        seen, real = self.seen, self._tolist

        def tolist(t):
            seen.append("Tensor.tolist")
            return real(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def _module(backbone_dir, tok_dir, packed, block_loss="sum", seed=3, visual_input="table", predictor="block_decoder"):
    torch.manual_seed(seed)
    cfg = LLMConfig(backbone=backbone_dir, text_tokenizer="builtin:bytes", image_tokenizer=tok_dir, predictor=predictor,
                    visual_input=visual_input, packed_attention=packed, loss_chunk=16, **DECODER)
    mod = UnifiedLLMModule(cfg, block_loss=block_loss).train()
    stand_in_training(mod.lm, seed)
    return mod


def _batch(mod, seed=4):
    b = collate_docs(random_doc_batch(mod.lm, LENGTHS, seed=seed), mod.lm.vocab.N, pack=True, max_blocks=24)
    assert b["tokens"].shape[0] > 1 and b["num_docs"] > b["tokens"].shape[0]  # rows of several documents
    return b


def _step(mod, batch):
    mod.zero_grad(set_to_none=True)
    out = mod.step(batch, "train")
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in mod.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def _no_plan(batch):
    return {k: v for k, v in batch.items() if k != "plan"}


@pytest.mark.parametrize("packed,visual_input", [("mask", "table"), ("varlen", "table"), ("varlen", "projector")])
@pytest.mark.parametrize("block_loss", ["sum", "equal_block"])
def test_plan_path_equals_the_boolean_mask_path(backbone_dir, tok_dir, packed, visual_input, block_loss):
    mod = _module(backbone_dir, tok_dir, packed, block_loss, visual_input=visual_input)
    batch = _batch(mod)
    plan = batch["plan"]
    assert plan["n_text"] > 0 and plan["n_visual"] > 0 and mod.lm.vocab.N > 1
    want, want_g = _step(mod, _no_plan(batch))
    got, got_g = _step(mod, batch)
    assert want.keys() == got.keys() and {"nll_text", "nll_visual", "acc_visual", "nll_slot3"} <= set(got)
    assert float(got["blocks_text"]) == plan["n_text"] and float(got["blocks_visual"]) == plan["n_visual"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert want_g.keys() == got_g.keys() and len(got_g) > 10
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-6, atol=1e-7, msg=n)
    assert float(sum(g.abs().sum() for g in got_g.values())) > 0


def test_plan_of_a_text_only_batch_and_the_continuous_selection(backbone_dir, tok_dir):
    from kelix.llm.layout import BlockDoc
    from kelix.llm.loss import nbp_loss
    from kelix.llm.plan import text_only

    mod = _module(backbone_dir, tok_dir, "varlen")
    docs = []
    for n in (4, 6):
        d = BlockDoc()
        d.tokens, d.targets = list(range(40, 40 + n)), [i > 0 for i in range(n)]
        docs.append(d)
    batch = collate_docs(docs, mod.lm.vocab.N, pack=True, max_blocks=16)
    assert batch["plan"]["n_visual"] == 0 and batch["plan"]["n_visual_blocks"] == 0
    want, want_g = _step(mod, _no_plan(batch))
    got, got_g = _step(mod, batch)
    assert want.keys() == got.keys() and "nll_visual" not in got
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    # a continuous model's selection (visual targets dropped) is the boolean path's text-target selection
    b = _batch(mod)
    lm, plan = mod.lm, text_only(b["plan"])
    with torch.no_grad():
        keep = b["targets"] & (b["tokens"] >= 0)
        ref = lm(b["tokens"], b["codes"], b["position_ids"], keep)
        pred = lm(b["tokens"], b["codes"], b["position_ids"], b["targets"], plan=plan)
    assert not bool(pred.is_visual.any())
    torch.testing.assert_close(pred.nll0, ref.nll0, rtol=0, atol=0)
    torch.testing.assert_close(nbp_loss(pred, lm.vocab.N)["loss"], nbp_loss(ref, lm.vocab.N)["loss"], rtol=0, atol=0)


@pytest.mark.parametrize("packed,visual_input,predictor", [("varlen", "table", "block_decoder"),
                                                          ("mask", "table", "block_decoder"),
                                                          ("varlen", "projector", "block_decoder"),
                                                          ("varlen", "table", "parallel")])
def test_the_plan_path_never_syncs_and_the_detector_sees_the_fallback_do_it(backbone_dir, tok_dir, packed,
                                                                             visual_input, predictor):
    mod = _module(backbone_dir, tok_dir, packed, "equal_block", visual_input=visual_input, predictor=predictor)
    batch = _batch(mod)
    with SyncDetector() as fallback:
        _step(mod, _no_plan(batch))
    # the detector works: the boolean-mask path counts targets, selects by masks and reads the documents
    # back (varlen: doc_bounds' nonzero and the fallback's .tolist(); mask: transformers' packed check)
    assert {"aten.nonzero.default", "aten._local_scalar_dense.default"} <= set(fallback.seen)
    assert ("Tensor.tolist" in fallback.seen) == (packed == "varlen")
    assert any("boolean mask" in s for s in fallback.seen)
    with SyncDetector() as planned:
        out, grads = _step(mod, batch)
    assert planned.seen == [] and grads and torch.isfinite(out["loss"])


def test_plan_indices_are_the_batch_selection(backbone_dir, tok_dir):
    mod = _module(backbone_dir, tok_dir, "varlen")
    b = _batch(mod)
    p, L = b["plan"], b["tokens"].shape[1]
    rows, pos = b["targets"][:, 1:].nonzero(as_tuple=True)
    assert torch.equal(p["rows"], rows) and torch.equal(p["pos"], pos)
    nxt = b["tokens"][rows, pos + 1]
    assert torch.equal(p["visual"], (nxt < 0).nonzero().flatten()) and p["n_text"] + p["n_visual"] == len(rows)
    assert torch.equal(p["visual_blocks"], (b["tokens"] < 0).flatten().nonzero().flatten())
    assert p["n_visual_blocks"] == int((b["tokens"] < 0).sum())
    # documents (and each row's padding) start where the positions restart at 0
    starts = (b["position_ids"].flatten() == 0).nonzero().flatten().tolist() + [b["tokens"].numel()]
    assert p["doc_bounds"] == starts == p["cu_seqlens"].tolist() and p["cu_seqlens"].dtype == torch.int32
    assert len(starts) - 1 >= b["num_docs"] and L == b["tokens"].shape[1]
