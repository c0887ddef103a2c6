"""The image-generation benchmark runs on CPU at tiny sizes and prints one JSON line with its fields
(numbers are never asserted; the fast path's codes must equal the eager path's)."""

import json

from benchmarks.bench_generate import main


def test_generate_benchmark_prints_its_fields(capsys):
    out = main(["--grid", "2", "--images", "2", "--repeat", "1", "--check-grid", "2"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == json.loads(json.dumps(out))
    assert line["benchmark"] == "generate" and line["device"] == "cpu" and line["torch"]
    assert line["grid"] == [2, 2] and line["images"] == 2 and line["N"] == 4 and line["K"] == 64
    for key in ("eager_s", "fast_s", "fast_first_call_s", "eager_blocks_per_s", "fast_blocks_per_s",
                "fast_over_eager_cpu", "s_per_image_fast", "s_per_image_fast_cfg4"):
        assert isinstance(line[key], float) and line[key] > 0, key
    assert line["fast_over_eager"] is None and "fast_over_eager" in line["to_measure_on_gpu"]
    assert line["codes_equal"] is True and line["codes_equal_check"]["grid"] == [2, 2]
    assert line["reference_llamagen_vllm"]["seconds"] == 3.48
