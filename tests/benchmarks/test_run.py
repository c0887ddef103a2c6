"""The benchmarks run on CPU and print one JSON object each (their numbers are never asserted)."""

import json

from benchmarks.run import main


def test_every_benchmark_prints_json(capsys):
    assert main([]) == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert {r["benchmark"] for r in lines} == {"data_stream", "dit", "llm", "tokenizer"}
    assert not [r for r in lines if "error" in r]
