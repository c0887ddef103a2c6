"""``kelix eval run|score|list``: predictions, scores, resuming, rescoring, bad input before the model loads."""

import json
import warnings

import pytest

from kelix.cli import main
from kelix.eval import get_benchmark
from kelix.eval.runner import PipelineModel, read_predictions, run, score


class Oracle:
    """Answers right on even ids, wrong on odd ones; counts what it was asked."""

    def __init__(self, items):
        self.gold = {it.prompt: (it.id, it.answer) for it in items}
        self.asked = []

    def answer(self, requests, max_new_tokens=32):
        out = []
        for images, prompt in requests:
            assert len(images) == 1
            i, gold = self.gold[prompt]
            self.asked.append(prompt)
            out.append(gold.capitalize() if i % 2 == 0 else "purple elephant")
        return out


def _lines(path):
    return [json.loads(x) for x in open(path).read().splitlines()]


def test_run_scores_resumes_and_rescoring_agrees(bench_dir, tmp_path):
    bench = get_benchmark("synthetic-vqa")
    items = bench.read(bench_dir)
    # one question per prompt text, so the oracle can tell items apart
    items = list({it.prompt: it for it in items}.values())
    model = Oracle(items)
    out = tmp_path / "run"
    first = run(model, bench, items, str(out), bench_dir, batch_size=2, progress=False)
    expected = sum(it.id % 2 == 0 for it in items) / len(items)
    assert first["overall"]["acc"] == pytest.approx(expected) and first["count"] == len(items)
    rows = _lines(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == [it.id for it in items]
    assert all(set(r) == {"id", "prompt", "prediction", "answer", "score"} for r in rows)
    assert json.load(open(out / "scores.json")) == first
    assert "| acc |" in (out / "scores.md").read_text()

    # an interrupted run: the last two answers lost, a torn line left behind
    text = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(text[:-2]) + text[-2][:10])
    model.asked.clear()
    again = run(model, bench, items, str(out), bench_dir, batch_size=2, progress=False)
    assert model.asked == [it.prompt for it in items[-2:]]  # only the missing items
    assert again == first and len(_lines(out / "predictions.jsonl")) == len(items)
    fewer = run(model, bench, items[:2], str(out), bench_dir, progress=False)  # a smaller --limit on the same run
    assert fewer["count"] == 2 and fewer["missing"] == 0

    # score: from {"id", "prediction"} only, without a model
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"id": r["id"], "prediction": r["prediction"]}) + "\n"
                                              for r in rows))
    preds = {k: r["prediction"] for k, r in read_predictions(str(tmp_path / "p.jsonl")).items()}
    assert score(bench, items, preds, str(tmp_path / "rescored")) == first


def test_eval_verbs_end_to_end_on_a_tiny_pipeline(pipeline_dir, pipe, bench_dir, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "vqa")
    args = ["--benchmark", "synthetic-vqa", "--data", bench_dir, "--limit", "5"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", ResourceWarning)  # hidden from users by Python's defaults anyway
        assert main(["eval", "run", "--pipeline", pipeline_dir, *args, "--out", out, "--batch-size", "3"]) == 0
    assert "synthetic-vqa: 5 item(s), acc=" in capsys.readouterr().out
    rows = _lines(f"{out}/predictions.jsonl")
    bench = get_benchmark("synthetic-vqa")
    items = bench.read(bench_dir)[:5]
    from kelix.eval.base import load_image

    # batched greedy answers are the pipeline's one-at-a-time answers
    for r, it in zip(rows, items):
        assert r["prediction"] == pipe.understand(load_image(it.images[0]), it.prompt, max_new_tokens=bench.max_new_tokens)
        assert r["score"] == bench.score_item(it, r["prediction"])
    scores = json.load(open(f"{out}/scores.json"))

    assert main(["eval", "score", *args, "--predictions", f"{out}/predictions.jsonl", "--out", str(tmp_path / "s")]) == 0
    assert json.load(open(tmp_path / "s" / "scores.json")) == scores
    # a partial predictions file: the unanswered items are counted missing
    open(tmp_path / "part.jsonl", "w").write("".join(open(f"{out}/predictions.jsonl").read().splitlines(True)[:2]))
    assert main(["eval", "score", *args, "--predictions", str(tmp_path / "part.jsonl"), "--out", str(tmp_path / "p")]) == 0
    part = json.load(open(tmp_path / "p" / "scores.json"))
    assert part["count"] == 2 and part["missing"] == 3

    # resume: drop two answers; the rerun answers exactly those
    lines = open(f"{out}/predictions.jsonl").read().splitlines(keepends=True)
    open(f"{out}/predictions.jsonl", "w").write("".join(lines[:3]))
    asked = []
    original = PipelineModel.answer
    monkeypatch.setattr(PipelineModel, "answer",
                        lambda self, reqs, n=32: asked.extend(p for _, p in reqs) or original(self, reqs, n))
    assert main(["eval", "run", "--pipeline", pipeline_dir, *args, "--out", out]) == 0
    assert asked == [it.prompt for it in items[3:]]
    assert _lines(f"{out}/predictions.jsonl") == rows and json.load(open(f"{out}/scores.json")) == scores


def test_t2i_end_to_end_writes_images_scores_and_resumes(pipeline_dir, bench_dir, tmp_path, monkeypatch):
    from PIL import Image

    out = tmp_path / "t2i"
    args = ["eval", "run", "--pipeline", pipeline_dir, "--benchmark", "synthetic-t2i", "--data", bench_dir,
            "--limit", "2", "--out", str(out), "--seed", "5"]
    assert main(args) == 0
    rows = _lines(out / "predictions.jsonl")
    assert [r["seed"] for r in rows] == [5, 6]
    for r in rows:
        assert Image.open(r["prediction"]).size == (32, 32)
        assert set(r["score"]) == {"color", "count", "shape", "overall"}
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["benchmark"] == "synthetic-t2i" and manifest["prompts"] == 2
    calls = []
    monkeypatch.setattr(PipelineModel, "render", lambda self, prompts, seed=0: calls.append(prompts))
    assert main(args) == 0 and calls == []  # every prompt already rendered
    assert main(["eval", "score", "--benchmark", "synthetic-t2i", "--data", bench_dir, "--limit", "2",
                 "--predictions", str(out / "predictions.jsonl"), "--out", str(tmp_path / "s")]) == 0
    assert json.load(open(tmp_path / "s" / "scores.json")) == json.load(open(out / "scores.json"))
    # rescoring in place keeps the run's own predictions file (its seeds) as it is
    before = (out / "predictions.jsonl").read_text()
    assert main(["eval", "score", "--benchmark", "synthetic-t2i", "--data", bench_dir, "--limit", "2",
                 "--predictions", str(out / "predictions.jsonl"), "--out", str(out)]) == 0
    assert (out / "predictions.jsonl").read_text() == before


def test_bad_input_is_one_line_before_the_model_loads(bench_dir, tmp_path, monkeypatch, capsys):
    import kelix.pipeline

    def boom(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(kelix.pipeline.KelixPipeline, "from_pretrained", boom)
    bad = tmp_path / "bad" / "synthetic-vqa"
    bad.mkdir(parents=True)
    (bad / "data.jsonl").write_text('{"id": 0, "image": "x.png", "question": "q", "answer": "a"}\n'
                                    '{"id": 1, "image": "x.png", "answer": "a"}\n')
    run_args = ["eval", "run", "--pipeline", "nowhere", "--out", str(tmp_path / "o")]
    assert main([*run_args, "--benchmark", "synthetic-vqa", "--data", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kelix eval: {bad / 'data.jsonl'} row 1 field 'question': missing"
    (bad / "data.jsonl").write_text('{"id": 0, "image": "x.png", "question": "q", "answer": "a"}\n')
    assert main([*run_args, "--benchmark", "synthetic-vqa", "--data", str(tmp_path / "bad")]) == 2
    assert "row 0 field 'image': image file" in capsys.readouterr().err
    assert main([*run_args, "--benchmark", "nope", "--data", bench_dir]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kelix eval: unknown benchmark 'nope'; choose from ai2d, chartqa")
    (tmp_path / "p.jsonl").write_text('{"id": 99, "prediction": "x"}\n')
    assert main(["eval", "score", "--benchmark", "synthetic-vqa", "--data", bench_dir, "--predictions",
                 str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "s")]) == 2
    assert "id '99' is not an item of synthetic-vqa" in capsys.readouterr().err


def test_list(capsys):
    assert main(["eval", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("mmbench-en", "mmbench-cn", "textvqa", "chartqa", "ocrbench", "geneval", "synthetic-t2i"):
        assert f"\n{name} " in out


def test_sampled_answers_follow_temperature_and_seed(pipeline_dir, pipe, bench_dir, tmp_path):
    from kelix.eval.runner import _load
    from kelix.llm.generate import Sampling

    args = ["eval", "run", "--pipeline", pipeline_dir, "--benchmark", "synthetic-ocr", "--data", bench_dir,
            "--limit", "3", "--temperature", "1.5", "--seed", "4"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    got = [r["prediction"] for r in _lines(tmp_path / "a" / "predictions.jsonl")]
    bench = get_benchmark("synthetic-ocr")
    items = bench.read(bench_dir)[:3]
    reqs = [(_load(it, bench_dir), it.prompt) for it in items]
    assert got == PipelineModel(pipe, Sampling(temperature=1.5, seed=4)).answer(reqs, bench.max_new_tokens)
    assert got != PipelineModel(pipe).answer(reqs, bench.max_new_tokens)  # not the greedy answers
