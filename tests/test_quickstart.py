"""The README's first command, `kelix quickstart`, end to end (2 steps per stage), then `kelix chat` and
`kelix generate` on its pipeline, as a user runs them: every artifact written, a clean terminal."""

import os
import pathlib
import re
import subprocess
import sys

from PIL import Image

REPO = pathlib.Path(__file__).resolve().parent.parent
# A Python warning ("file.py:12: UserWarning: ..."; Lightning drops the category) or a traceback.
NOISE = re.compile(r"\.py:\d+: |\w+Warning\b|Traceback \(most recent call last\)")


def kelix(*args, cwd) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "kelix.cli", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def noise(stream: str) -> list[str]:
    return [line for line in stream.replace("\r", "\n").splitlines() if NOISE.search(line)]


def test_whole_pipeline_quickstart_then_chat_and_generate_on_a_clean_terminal(tmp_path):
    out = kelix("quickstart", "--recipes", str(REPO / "recipes" / "quickstart"), "--max-steps", "2", cwd=tmp_path)
    for export in ("tokenizer", "llm", "llm_stage2_2", "dit_llm"):
        assert (tmp_path / "runs" / export / "export" / "config.json").is_file(), export
        assert list((tmp_path / "runs" / export).glob("version_*/events.out.tfevents.*")), export
    pipe = tmp_path / "outputs" / "quickstart" / "pipeline"
    assert {p.name for p in pipe.iterdir()} >= {"pipeline.json", "tokenizer", "llm", "dit"}
    assert Image.open(tmp_path / "outputs" / "quickstart" / "generated.png").size == (32, 32)
    assert "Q: " in out.stdout and "TensorBoard logs: tensorboard --logdir runs" in out.stdout
    assert noise(out.stderr) == [] and noise(out.stdout) == []
    terminal = out.stdout + out.stderr
    assert "Epoch 0/-2" not in terminal and "FLOPs" not in terminal  # Lightning's bar and summary
    assert "Steps: 100%" in terminal and terminal.count("part ") == 4  # the step bar; parameters per part
    assert "args parameter" not in terminal

    chat = kelix("chat", "--pipeline", str(pipe), "--image", str(tmp_path / "outputs/quickstart/question.png"),
                 "--max-new-tokens", "8", "What color is the circle?", cwd=tmp_path)
    gen = kelix("generate", "--pipeline", str(pipe), "--steps", "2", "--out", "g.png", "a red circle", cwd=tmp_path)
    assert chat.stdout.strip().count("\n") == 0  # only the answer on stdout
    assert Image.open(tmp_path / "g.png").size == (32, 32) and gen.stdout.startswith("wrote g.png")
    for run in (chat, gen):
        assert noise(run.stderr) == [], run.stderr[-3000:]
