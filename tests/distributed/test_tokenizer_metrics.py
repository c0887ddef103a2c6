"""Codebook metrics on 2 gloo ranks: histograms are summed over ranks, and a rank that saw no
validation codes still joins the sum (no collective under a per-rank condition, no hang)."""

import pytest
import torch

from tests.distributed.tokenizer_ranks import rank_codes, spawn

pytestmark = pytest.mark.distributed


def test_histograms_and_validation_usage_are_summed_over_ranks(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = spawn("metrics_body", tmp_path)
    both = torch.cat([rank_codes(0, 50), rank_codes(1, 80)])
    want = torch.stack([torch.bincount(both[:, j], minlength=32) for j in range(4)])
    assert [torch.tensor(r["local_counts"]).sum().item() for r in results] == [200, 320]  # each rank kept its own
    ea = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0, "scalars": 0})
    ea.Reload()
    for j in range(4):
        (h,) = ea.Histograms(f"codebook/codes_{j}")
        assert h.histogram_value.bucket == want[j].tolist()  # both ranks' codes, not rank 0's alone
    usage = (want > 0).sum(-1).float() / 32
    assert all(torch.allclose(torch.tensor(r["usage"]), usage) for r in results)
    scalars = {t: [e.value for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
    assert scalars["codebook/tokens"] == [130.0]
    # rank 0's 40 validation tokens; the second call (no codes anywhere) logs nothing
    assert scalars["val_codebook/tokens"] == [40.0]
    val = rank_codes(7, 40)
    assert scalars["val_codebook/usage_0"] == [pytest.approx(len(val[:, 0].unique()) / 32)]
