"""The README's first command, `kelix quickstart`, end to end (2 steps per stage)."""

import os
import pathlib
import subprocess
import sys

from PIL import Image

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_whole_pipeline_quickstart_runs_and_writes_every_artifact(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "kelix.cli", "quickstart", "--recipes", str(REPO / "recipes" / "quickstart"),
         "--max-steps", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for export in ("tokenizer", "llm", "llm_stage2_2", "dit_llm"):
        assert (tmp_path / "runs" / export / "export" / "config.json").is_file(), export
        assert list((tmp_path / "runs" / export).glob("version_*/events.out.tfevents.*")), export
    pipe = tmp_path / "outputs" / "quickstart" / "pipeline"
    assert {p.name for p in pipe.iterdir()} >= {"pipeline.json", "tokenizer", "llm", "dit"}
    assert Image.open(tmp_path / "outputs" / "quickstart" / "generated.png").size == (32, 32)
    assert "Q: " in out.stdout and "TensorBoard logs: tensorboard --logdir runs" in out.stdout
