"""Two FSDP2 ranks stop together at budget.max_samples (counted over both), clipping gradients by value."""

import pytest

from tests.distributed import launch
from tests.distributed.conftest import recipe, write_recipe

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # about a minute on 2 busy cores


def test_both_ranks_stop_at_the_sample_budget_with_value_clipping(shards, tmp_path):
    """clip_grad_value_ runs on FSDP2's DTensor gradients; the all-reduced count stops both ranks at one step."""
    # 2 ranks x 2 accumulated batches x 2 samples = 8 samples a step: 20 are reached at step 3 (24)
    cfg = recipe(shards, tmp_path / "keys", **{"budget.max_samples": 20, "model.init_args.optim.grad_clip": 0.01,
                                                "model.init_args.optim.grad_clip_algorithm": "value"})
    path = write_recipe(tmp_path, cfg)
    assert launch.run(["--config", path], tmp_path) == [0, 0], launch.logs(tmp_path)
    assert launch.batches_seen(tmp_path / "keys", 0) == launch.batches_seen(tmp_path / "keys", 1) == 6
    assert "data budget reached at step 3: 24 samples" in launch.logs(tmp_path)
