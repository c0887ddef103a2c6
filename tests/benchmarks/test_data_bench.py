"""The data benchmark runs on CPU at a tiny size and prints its fields (numbers are never asserted)."""

import json

import torch

from benchmarks.bench_data import main


def test_data_benchmark_prints_its_fields_at_a_tiny_size(capsys):
    out = main(["--image-size", "320", "240", "--samples", "8", "--batch-size", "2", "--batches", "1",
                "--workers", "1", "2"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == json.loads(json.dumps(out))
    assert line["benchmark"] == "data_stream" and line["device"] == "cpu" and line["torch"] == torch.__version__
    assert line["image_size"] == [320, 240] and line["loader_workers"] == 2
    assert set(line["loader"]) == {"workers_1", "workers_2"}
    assert all(r["samples"] == 2 for r in line["loader"].values())  # one timed batch of 2 samples each
    for key in ("loader_samples_per_s", "step_samples_per_s", "loader_over_step", "image_ms_fast", "image_ms_eager"):
        assert line[key] > 0
    assert line["loader_over_step"] == round(line["loader_samples_per_s"] / line["step_samples_per_s"], 3)
    assert line["image_fast_vs_eager_mean_abs"] < 0.02  # normalised units: < 1.3 levels in 255
    assert len(line["batch_blocks"]) == 2 and line["step_rows"] == line["batch_blocks"][0]
    assert isinstance(line["workers_for_1_5x_step"], int) and line["workers_for_1_5x_step"] >= 1
