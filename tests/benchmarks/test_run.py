"""The benchmarks run on CPU and print one JSON object each with their fields (their numbers are never asserted)."""

import json
import subprocess
from pathlib import Path

from benchmarks.run import main

FIELDS = {  # each benchmark's headline fields (benchmarks/README.md's table)
    "nbp": {"nbp_over_single", "flat_over_nbp", "flops_nbp_over_single", "flops_flat_over_nbp", "nbp_peak_memory_gib", "single_peak_memory_gib",
            "flat_peak_memory_gib", "patches_per_image", "nbp_sequence", "flat_sequence", "device", "step_plan"},
    "mfu": {"tokens_per_s", "mfu", "flops_model", "flops_measured", "blocks_per_row", "packed_attention",
            "mask_over_varlen", "device", "step_plan"},
    "pq_encode": {"ours_over_faiss", "ours_over_gemm", "codes_equal"},
    "generate": {"fast_over_eager", "fast_over_eager_cpu", "codes_equal"},
    "data_stream": {"loader_samples_per_s", "step_samples_per_s", "loader_over_step"},
    "convert": {"seconds", "peak_rss_gib", "release_bytes", "seconds_extrapolated", "peak_rss_gib_extrapolated"},
    "serve": {"batched_over_max_batch_1", "batched", "max_batch_1"},
    "dit": set(), "llm": set(), "tokenizer": set(),
}


def test_every_benchmark_prints_json_with_its_fields(capsys):
    assert main([]) == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert not [r for r in lines if "error" in r]
    by_name = {r["benchmark"]: r for r in lines}
    assert len(by_name) == len(lines) and set(by_name) == set(FIELDS)
    for name, fields in FIELDS.items():
        assert fields <= set(by_name[name]), (name, fields - set(by_name[name]))
        assert "torch" in json.dumps(by_name[name])  # the torch version, in env or beside the fields
    nbp, mfu = by_name["nbp"], by_name["mfu"]
    assert nbp["flat_sequence"] > nbp["nbp_sequence"] == nbp["single_sequence"]
    assert mfu["device"] == "cpu" and mfu["mfu"] is None and mfu["documents"] > mfu["rows"]
    assert mfu["step_plan"] is True and nbp["step_plan"] is True  # training's sync-free step is what is timed


def test_the_gpu_script_is_valid_bash_and_refuses_a_machine_without_cuda(tmp_path):
    script = Path(__file__).parents[2] / "benchmarks" / "gpu_all.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True,
                       cwd=script.parents[1])
    assert r.returncode == 1 and "no CUDA device" in r.stderr
