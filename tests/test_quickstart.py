"""The README's first command, `kelix quickstart`, end to end (2 steps per stage, a few held-out items), then
`kelix chat` and `kelix generate` on its pipeline, as a user runs them: every artifact, the scorecard in
scores.json and TensorBoard, the demo's truth beside its answer, a clean terminal, notebook 03 on its outputs.
The scorecard's table and exit status are checked on hand-made scores; the full quickstart against its regression
guards, and broken copies of its pipeline that miss them, are the slow test."""

import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image
from tqdm import tqdm

from kelix import quickstart as qs_cli
from kelix import quickstart_score as qs
from kelix.eval.answers import normalize_answer

REPO = pathlib.Path(__file__).resolve().parent.parent
# A Python warning ("file.py:12: UserWarning: ..."; Lightning drops the category) or a traceback.
NOISE = re.compile(r"\.py:\d+: |\w+Warning\b|Traceback \(most recent call last\)")
STAGE_NAMES = [s[0] for s in qs_cli.STAGES]
CODEBOOK = qs_cli.codebook_path(str(REPO / "recipes" / "quickstart"))  # built first when the recipe names one
ITEMS = {"synthetic-vqa": 6, "synthetic-ocr": 4, "synthetic-t2i": 3}


def kelix(*args, cwd, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "kelix.cli", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=1800, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert not check or out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def noise(stream: str) -> list[str]:
    return [line for line in stream.replace("\r", "\n").splitlines() if NOISE.search(line)]


def rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """One short quickstart (2 steps per stage, 6/4/3 held-out items) that the tests below share."""
    root = tmp_path_factory.mktemp("quickstart")
    out = kelix("quickstart", "--recipes", str(REPO / "recipes" / "quickstart"), "--max-steps", "2",
                "--eval-items", "vqa=6,ocr=4,t2i=3", cwd=root)
    return root, out


def test_quickstart_artifacts_then_chat_and_generate(quickstart):
    root, _ = quickstart
    for export in STAGE_NAMES:
        assert (root / "runs" / export / "export" / "config.json").is_file(), export
        assert list((root / "runs" / export).glob("version_*/events.out.tfevents.*")), export
    pipe = root / "outputs" / "quickstart" / "pipeline"
    assert {p.name for p in pipe.iterdir()} >= {"pipeline.json", "tokenizer", "llm", "dit"}
    side = qs_cli.pipeline_config(str(REPO / "recipes" / "quickstart"))["image_size"]  # the DiT recipe's
    assert Image.open(root / "outputs" / "quickstart" / "generated.png").size == (side, side)

    chat = kelix("chat", "--pipeline", str(pipe), "--image", str(root / "outputs/quickstart/question.png"),
                 "--max-new-tokens", "8", "What color is the circle?", cwd=root)
    gen = kelix("generate", "--pipeline", str(pipe), "--steps", "2", "--out", "g.png", "a red circle", cwd=root)
    assert chat.stdout.strip().count("\n") == 0  # only the answer on stdout
    assert Image.open(root / "g.png").size == (side, side) and gen.stdout.startswith("wrote g.png")
    for run in (chat, gen):
        assert noise(run.stderr) == [], run.stderr[-3000:]


def test_quickstart_terminal_is_one_bar_and_one_summary_line_per_stage(quickstart):
    root, out = quickstart
    assert noise(out.stderr) == [] and noise(out.stdout) == []
    terminal = (out.stdout + out.stderr).replace("\r", "\n")
    for name in STAGE_NAMES:  # "llm  2 steps in 31 s; train/loss 6.9; val/loss 7.0; 48 samples, skipped: none"
        summary = [line for line in out.stdout.splitlines() if line.split(" ")[0] == name]
        assert len(summary) == 1 and re.match(rf"{name} +2 steps in \d+ s; train/loss [\d.]+; val/loss [\d.]+; "
                                              r"\d+ samples, skipped: ", summary[0]), summary
        log = (root / "outputs" / "quickstart" / "logs" / f"{name}.log").read_text()
        assert log.startswith("$ ") and "part " in log and "data: " in log  # kelix fit's own output, kept
    bars = {line.split(":")[0].strip() for line in terminal.splitlines() if re.search(r"\d+/\d+ \[", line)}
    assert bars == set(STAGE_NAMES) | set(qs.EVAL_ITEMS), bars  # no validation or weight-loading bars
    if CODEBOOK:
        line, = [line for line in out.stdout.splitlines() if line.startswith("codebook ")]
        assert re.fullmatch(rf"codebook +built in \d+ s: {CODEBOOK}  \(outputs/quickstart/logs/codebook.log\)", line)
    for gone in ("Validation", "Loading weights", "Writing model shards", "Epoch 0/", "part ", "GPU available",
                 "skipped sample"):
        assert gone not in terminal, gone


def test_quickstart_writes_the_scorecard_to_scores_json_and_tensorboard(quickstart):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, out = quickstart
    scores = json.loads((root / "outputs" / "quickstart" / "scores.json").read_text())
    assert scores["items"] == ITEMS and set(scores["guards"]) == set(qs.GUARDS)
    for key, row in scores["guards"].items():
        g = qs.GUARDS[key]
        assert (row["guard"], row["chance"], row["longer"]) == (g.min, g.chance, g.longer)
        assert 0 <= row["value"] <= 1 and row["pass"] == (row["value"] >= row["guard"])
    assert scores["passed"] == all(r["pass"] for r in scores["guards"].values())
    bench = scores["benchmarks"]
    assert set(bench["synthetic-ocr"]["overall"]) == {"exact", "char_acc", "corpus_char_acc"}
    assert set(bench["synthetic-t2i"]["overall"]) == {"overall", "color", "count", "shape"}
    assert {k: b["count"] for k, b in bench.items()} == ITEMS
    # the VQA numbers, by hand from the predictions and the benchmark's categories
    data = {r["id"]: r for r in rows(root / "outputs/quickstart/benchmarks/synthetic-vqa/data.jsonl")}
    preds = rows(root / "outputs/quickstart/eval/synthetic-vqa/predictions.jsonl")
    for cat, got in bench["synthetic-vqa"]["per_category"].items():
        mine = [normalize_answer(p["prediction"]) == normalize_answer(data[p["id"]]["answer"]) for p in preds
                if data[p["id"]]["category"] == cat]
        assert got["acc"] == pytest.approx(sum(mine) / len(mine))
    for name in STAGE_NAMES:
        s = scores["stages"][name]
        assert s["status"] == "trained" and s["steps"] == 2 and set(s["losses"]) == {"train/loss", "val/loss"}, name
    assert set(scores["seconds"]["stages"]) == set(STAGE_NAMES) | ({"codebook"} if CODEBOOK else set())
    assert scores["seconds"]["total"] >= scores["seconds"]["eval"]
    # TensorBoard: every guarded value, as scores.json has it
    acc = EventAccumulator(str(root / "runs" / "quickstart" / "version_0"))
    acc.Reload()
    for key, row in scores["guards"].items():
        assert acc.Scalars(f"scorecard/{key}")[-1].value == pytest.approx(row["value"])
    assert "eval/synthetic-ocr/exact" in acc.Tags()["scalars"] and "time/tokenizer_s" in acc.Tags()["scalars"]
    assert "scorecard (held-out synthetic benchmarks" in out.stdout
    assert out.stdout.count(" ok ") + out.stdout.count(" BELOW ") == len(qs.GUARDS)


def test_quickstart_demo_is_the_first_held_out_items_with_their_truth(quickstart):
    root, out = quickstart
    q = root / "outputs" / "quickstart"
    vqa = rows(q / "benchmarks/synthetic-vqa/data.jsonl")[0]
    t2i = rows(q / "benchmarks/synthetic-t2i/data.jsonl")[0]
    answer = rows(q / "eval/synthetic-vqa/predictions.jsonl")[0]["prediction"]
    assert f"Q: {vqa['question']}" in out.stdout
    assert f"model: {answer!r}   truth: {vqa['answer']!r}" in out.stdout
    assert f"prompt: Generate an image of {t2i['prompt']}." in out.stdout
    assert f"truth: {t2i['count']} x {t2i['color']} {t2i['shape']}" in out.stdout
    assert (q / "question.png").read_bytes() == (q / "benchmarks/synthetic-vqa" / vqa["image"]).read_bytes()
    assert (q / "generated.png").read_bytes() == (q / "eval/synthetic-t2i/images/0.png").read_bytes()
    assert f"--image {q.relative_to(root)}/question.png" in out.stdout


def test_quickstart_eval_only_rescores_reusing_the_benchmarks(quickstart):
    root, _ = quickstart
    bench = root / "outputs/quickstart/benchmarks/synthetic-vqa/data.jsonl"
    before = (bench.stat().st_mtime_ns, sorted(p.name for p in (root / "runs").iterdir()))
    out = kelix("quickstart", "--eval-only", "--out", "outputs/rescored", "--benchmarks-dir",
                "outputs/quickstart/benchmarks", "--eval-items", "vqa=4,ocr=2,t2i=1", "--require-bars", cwd=root,
                check=False)
    assert out.returncode == 1, out.stderr[-3000:]  # two steps of training miss the guards
    assert "--require-bars: synthetic-vqa/color" in out.stderr and noise(out.stderr) == []
    assert (bench.stat().st_mtime_ns, sorted(p.name for p in (root / "runs").iterdir())) == before
    assert not (root / "outputs/rescored/benchmarks").exists()
    assert not any(line.split(" ")[0] in STAGE_NAMES for line in out.stdout.splitlines())  # nothing trained
    scores = json.loads((root / "outputs/rescored/scores.json").read_text())
    assert scores["items"] == {"synthetic-vqa": 4, "synthetic-ocr": 2, "synthetic-t2i": 1} and scores["stages"] == {}
    assert len(rows(root / "outputs/rescored/eval/synthetic-vqa/predictions.jsonl")) == 4
    assert (root / "runs" / "quickstart" / "version_1").is_dir()
    # scoring again in the same place answers afresh (the runner would resume an earlier model's predictions)
    again = kelix("quickstart", "--eval-only", "--pipeline", "outputs/rescored/pipeline", "--out", "outputs/rescored",
                  "--benchmarks-dir", "outputs/quickstart/benchmarks", "--eval-items", "vqa=3,ocr=2,t2i=1", cwd=root)
    assert len(rows(root / "outputs/rescored/eval/synthetic-vqa/predictions.jsonl")) == 3, again.stdout[-2000:]


def test_notebook_03_runs_on_the_quickstart(quickstart):
    root, _ = quickstart
    nb = nbformat.read(REPO / "notebooks" / "03_quickstart_results.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not noise("".join(o.get("text", "") for o in outputs if o.output_type == "stream"))
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4  # questions, prompts, one image, histogram


def hand_made_results(**change) -> dict:
    """Scores as the runner returns them, each guard's metric a different value (one exactly at its guard)."""
    results = {
        "synthetic-vqa": {"overall": {"acc": 0.5}, "per_category": {"color": {"acc": 0.95}, "shape": {"acc": 0.24},
                                                                    "count": {"acc": 0.70}}},
        "synthetic-ocr": {"overall": {"exact": 0.1, "char_acc": 0.5, "corpus_char_acc": 0.81}},
        "synthetic-t2i": {"overall": {"overall": 0.1, "color": 0.85, "count": 0.3, "shape": 0.04}},
    }
    for name, value in change.items():
        results[name] = value
    return results


def test_scorecard_reads_each_guard_from_its_place_and_compares_at_least():
    card = qs.scorecard(hand_made_results())
    assert {k: r["value"] for k, r in card.items()} == {
        "synthetic-vqa/color": 0.95, "synthetic-vqa/shape": 0.24, "synthetic-vqa/count": 0.70,
        "synthetic-ocr/char_acc": 0.81, "synthetic-t2i/color": 0.85, "synthetic-t2i/shape": 0.04}
    assert [k for k, r in card.items() if not r["pass"]] == ["synthetic-vqa/shape", "synthetic-t2i/shape"]
    text = qs.format_scorecard(card, {"synthetic-vqa": 6})
    lines = text.splitlines()
    assert lines[0] == "scorecard (held-out synthetic benchmarks, vqa 6 items)"
    assert lines[1].split() == ["metric", "score", "chance", "longer", "guard", "what"]
    # each score beside chance (1 in 7 colours, 1 in 3 shapes or counts), the longest runs and its guard
    assert re.match(r"  synthetic-vqa/count +70\.0% +33\.3% +100% +70% +ok +count questions", lines[4]), lines[4]
    assert re.match(r"  synthetic-vqa/color +95\.0% +14\.3% +73% +50% +ok ", lines[2]), lines[2]
    assert re.match(r"  synthetic-vqa/shape +24\.0% +33\.3% +46% +25% +BELOW ", lines[3]), lines[3]
    assert re.match(r"  synthetic-ocr/char_acc +81\.0% +- +96% +30% +ok ", lines[5]), lines[5]
    assert lines[-1].startswith("2 of 6 guards missed (synthetic-vqa/shape, synthetic-t2i/shape): a correct "
                                "quickstart meets every guard, so something is broken")
    assert "at chance is expected" not in text  # a broken run's scores get no excuse
    assert qs.exit_status(card, require_bars=False) == 0 and qs.exit_status(card, require_bars=True) == 1
    # a benchmark that did not run (or lacks a category) misses its guards rather than passing unseen
    missing = qs.scorecard(hand_made_results(**{"synthetic-t2i": {}}))
    assert missing["synthetic-t2i/color"] == {"value": None, "guard": 0.45, "chance": 1 / 7, "longer": 1.0,
                                              "pass": False}
    assert re.search(r"synthetic-t2i/color +- +14\.3%", qs.format_scorecard(missing))
    good = qs.scorecard(hand_made_results(**{"synthetic-vqa": {"per_category": {
        "color": {"acc": 1.0}, "shape": {"acc": 0.25}, "count": {"acc": 1.0}}},
        "synthetic-t2i": {"overall": {"color": 0.45, "shape": 0.05}}}))
    assert all(r["pass"] for r in good.values()) and qs.exit_status(good, require_bars=True) == 0
    text = qs.format_scorecard(good)
    assert text.splitlines()[-1] == "all 6 guards met: the pipeline learned what an 8-minute CPU run learns"
    # scores within 10 points of chance say why that is expected of a correct run; others say nothing
    assert [line.split()[0] for line in text.splitlines() if "at chance is expected" in line] == \
        ["synthetic-vqa/shape", "synthetic-t2i/shape"]


def test_eval_items_option():
    assert qs.parse_items(None) == qs.EVAL_ITEMS
    assert qs.parse_items("8") == dict.fromkeys(qs.EVAL_ITEMS, 8)
    assert qs.parse_items("vqa=10,t2i=3") == {**qs.EVAL_ITEMS, "synthetic-vqa": 10, "synthetic-t2i": 3}
    for bad in ("0", "vqa=x", "mmbench=3", "vqa=3,"):
        with pytest.raises(SystemExit, match="--eval-items"):
            qs.parse_items(bad)


def test_benchmarks_are_reused_when_they_hold_enough_items(tmp_path):
    from kelix.eval.synthetic import write_benchmark

    paths = qs.ensure_benchmarks(str(tmp_path / "b"), dict.fromkeys(qs.EVAL_ITEMS, 5))
    stamp = {n: os.stat(p).st_mtime_ns for n, p in paths.items()}
    assert qs.ensure_benchmarks(str(tmp_path / "b"), dict.fromkeys(qs.EVAL_ITEMS, 3)) == paths
    assert {n: os.stat(p).st_mtime_ns for n, p in paths.items()} == stamp  # not rewritten
    qs.ensure_benchmarks(str(tmp_path / "b"), {**dict.fromkeys(qs.EVAL_ITEMS, 3), "synthetic-ocr": 7})
    assert len(rows(paths["synthetic-ocr"])) == 7 and len(rows(paths["synthetic-vqa"])) == 5
    # why reuse is sound: the first rows of a longer split are a shorter split's rows, images included
    short = write_benchmark("synthetic-vqa", str(tmp_path / "short"), 3)
    assert rows(short) == rows(paths["synthetic-vqa"])[:3]
    for r in rows(short):
        assert (tmp_path / "short/synthetic-vqa" / r["image"]).read_bytes() == \
            (tmp_path / "b/synthetic-vqa" / r["image"]).read_bytes()


def test_pipeline_sizes_come_from_the_recipes(tmp_path):
    proc = "data:\n  init_args:\n    processor:\n      init_args:\n"
    (tmp_path / "llm_stage2_2.yaml").write_text(proc + "        gen_image: {fixed_size: 56}\n")
    (tmp_path / "dit.yaml").write_text(proc + "        target_size: 32\n")
    (tmp_path / "dit_on_llm.yaml").write_text(proc + "        target_size: 48\n")
    assert qs_cli.pipeline_config(str(tmp_path)) == {**qs_cli.PIPELINE_CONFIG, "condition_size": 56, "image_size": 48}
    (tmp_path / "dit_on_llm.yaml").write_text("model: {}\n")  # an overlay without it keeps the base's
    assert qs_cli.pipeline_config(str(tmp_path))["image_size"] == 32
    (tmp_path / "dit.yaml").write_text(proc + "        other: 1\n")
    with pytest.raises(SystemExit, match="no image_size found in"):
        qs_cli.pipeline_config(str(tmp_path))


def test_a_two_process_cpu_recipe_runs_as_accumulated_batches_where_fewer_devices_are_usable(tmp_path):
    (tmp_path / "a.yaml").write_text("trainer:\n  accelerator: cpu\n  devices: 2\n  strategy: ddp\n")
    fit = qs_cli.fit_devices
    assert fit(str(tmp_path), ["a.yaml"], cpus=2) == []  # it fits: the recipe as it is
    one = ["--trainer.devices", "1", "--trainer.accumulate_grad_batches", "2"]  # the same batch per optimizer step
    assert fit(str(tmp_path), ["a.yaml"], cpus=1) == one
    for gpu in (["--trainer.accelerator", "gpu"], ["--trainer.accelerator=cuda"]):  # README: -- --trainer.accelerator gpu
        assert fit(str(tmp_path), ["a.yaml"], gpu, cpus=16) == one  # one GPU, not 2
    assert fit(str(tmp_path), ["a.yaml"], ["--trainer.accelerator", "gpu", "--trainer.accelerator", "cpu"], cpus=2) == []
    (tmp_path / "b.yaml").write_text("trainer:\n  devices: 4\n  accumulate_grad_batches: 3\n")
    assert fit(str(tmp_path), ["a.yaml", "b.yaml"], cpus=3) == \
        ["--trainer.devices", "2", "--trainer.accumulate_grad_batches", "6"]  # 2 x 6 = 4 x 3; the overlay's values win
    cmd = qs_cli.fit_command("s", ["a.yaml"], "e", str(tmp_path), None, ["--trainer.accelerator", "gpu",
                                                                          "--trainer.devices", "2"])
    assert cmd[-8:] == [*one, "--trainer.accelerator", "gpu", "--trainer.devices", "2"]  # the user's own come last: they win


def test_stage_summary_line_from_the_runs_tensorboard_log(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "version_3")) as w:  # what a fit logs, by hand
        for step, loss in enumerate([5.0, 4.0, 3.25, 2.5]):
            w.add_scalar("train/loss", loss, step)
        w.add_scalar("val/loss", 2.75, 3)
        w.add_scalar("train/nll_text", 9.0, 3)
        w.add_scalar("data/samples", 640, 3)
        w.add_scalar("data/skipped/aspect_ratio", 11, 3)
        w.add_scalar("data/skipped/bad_json", 0, 3)
    s = qs_cli.run_summary(str(tmp_path / "version_3"))
    assert s == {"run": str(tmp_path / "version_3"), "losses": {"train/loss": 2.5, "val/loss": 2.75}, "steps": 4,
                 "samples": 640, "skipped": {"aspect_ratio": 11}}
    line = qs_cli.summary_line("llm", {"status": "trained", "seconds": 61.4, "log": "logs/llm.log", **s})
    assert line == ("llm           4 steps in 61 s; train/loss 2.500; val/loss 2.750; 640 samples, "
                    "skipped: aspect_ratio 11  (logs/llm.log)")
    assert qs_cli.summary_line("dit_llm", {"status": "skipped", "export": "runs/dit_llm/export"}) == \
        "dit_llm       skipped: runs/dit_llm/export exists"


def test_stage_bar_follows_kelix_fit_step_bar():
    """What `kelix fit` prints (Lightning's lines, its step bar with \\r, a validation bar) drives one bar."""
    child = ("Seed set to 0\npart  trainable\n"
             "Training: |          | 0/? [00:00<?, ?it/s]\rSteps:   0%|          | 0/4 [00:00<?, ?it/s]"
             "\rSteps:  25%|██▌       | 1/4 [00:00<00:01,  1.39it/s, epoch=0, train_loss=5.870]"
             "\rSteps:  75%|███████▌  | 3/4 [00:01<00:00,  1.97it/s, epoch=0, train_loss=5.940]\n"
             "Validation DataLoader 0:  50%|█████     | 2/4 [00:00<00:00,  3.40it/s]\x1b[A\n"
             "\rSteps: 100%|██████████| 4/4 [00:02<00:00,  1.05it/s, epoch=0, train_loss=5.770, val_loss=5.600]\n"
             "data: 48 training samples read; skipped: none\n")
    class Trickle:  # 7 bytes a read: lines and multi-byte characters arrive split
        data = child.encode()

        def read1(self, n):
            chunk, self.data = self.data[:7], self.data[7:]
            return chunk

    stream = Trickle()
    log, screen = io.StringIO(), io.StringIO()
    with tqdm(file=screen) as bar:
        step = qs_cli._follow(stream, log, bar)
        assert (step, bar.n, bar.total) == (4, 4, 4)
        assert bar.postfix == "train_loss=5.770, val_loss=5.600"
    assert log.getvalue() == child  # the whole output kept, byte for byte


def shuffle_rows(path: str, key: str, rows: slice | None = None, columns: bool = False, seed: int = 0) -> None:
    """Permute a saved tensor's rows (within ``rows``) or its columns: a wrong index map of the kind a
    faulty converter or a mis-built table makes, keeping every value and shape."""
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(path)
    w, g = sd[key].clone(), torch.Generator().manual_seed(seed)
    if columns:
        w = w[:, torch.randperm(w.shape[1], generator=g)]
    else:
        w[rows] = w[rows][torch.randperm(rows.stop - rows.start, generator=g)]
    sd[key] = w.contiguous()
    save_file(sd, path, metadata={"format": "pt"})


def break_visual_table(pipeline) -> None:
    """Shuffle each slot's K rows of the LLM's visual table: the codes land on other codes' embeddings."""
    cfg = json.loads((pipeline / "llm" / "config.json").read_text())
    for j in range(cfg["N"]):
        start = cfg["visual_offset"] + j * cfg["K"]
        shuffle_rows(str(pipeline / "llm" / "backbone" / "model.safetensors"), "model.embed_tokens.weight",
                     slice(start, start + cfg["K"]), seed=j)


def break_dit_condition(pipeline) -> None:
    """Shuffle the DiT connector's input columns: it reads the LLM's hidden state in the wrong order."""
    shuffle_rows(str(pipeline / "dit" / "model.safetensors"), "connector.0.weight", columns=True)


@pytest.mark.slow
def test_full_quickstart_meets_every_guard_and_a_broken_pipeline_misses_them(tmp_path):
    """README command 1 as it stands: the full quickstart, scored on the default held-out items, meets every
    guard; the same pipeline with its visual table or its DiT condition scrambled misses them."""
    out = kelix("quickstart", "--recipes", str(REPO / "recipes" / "quickstart"), "--require-bars", cwd=tmp_path,
                check=False)
    scores = json.loads((tmp_path / "outputs" / "quickstart" / "scores.json").read_text())
    assert scores["items"] == qs.EVAL_ITEMS
    missed = {k: r["value"] for k, r in scores["guards"].items() if not r["value"] >= qs.GUARDS[k].min}
    assert not missed, f"below the guard: {missed}\n{out.stdout[-3000:]}"
    assert out.returncode == 0, out.stderr[-3000:]
    assert "all 6 guards met" in out.stdout
    for name, brk, expect in [("table", break_visual_table, {"synthetic-vqa/color", "synthetic-vqa/count",
                                                             "synthetic-ocr/char_acc"}),
                              ("dit", break_dit_condition, {"synthetic-t2i/color"})]:
        broken = tmp_path / f"broken_{name}"
        shutil.copytree(tmp_path / "outputs" / "quickstart" / "pipeline", broken)
        brk(broken)
        res = kelix("quickstart", "--eval-only", "--pipeline", str(broken), "--out", f"outputs/{name}",
                    "--benchmarks-dir", "outputs/quickstart/benchmarks", "--require-bars", cwd=tmp_path, check=False)
        card = json.loads((tmp_path / "outputs" / name / "scores.json").read_text())["guards"]
        assert res.returncode == 1 and expect <= {k for k, r in card.items() if not r["pass"]}, (name, card)
        assert "so something is broken" in res.stdout, res.stdout[-2000:]
