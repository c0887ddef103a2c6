"""``kelix ablate --jobs``: runs at once share each stage (built once, waited for, never read half-written),
a failed stage fails only the runs that need it, the results come in the plan's order whatever order the
runs end in, and each stage child gets ``cpu_count // jobs`` threads. The stages here are fakes that
record their calls and sleep; training itself is tested in tests/test_ablate.py."""

import json
import os
import threading
import time

import pytest

from kelix import ablate, ablate_exec, ablate_report

REC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "ablations")


def _inputs(stage) -> list[str]:
    """The exports of earlier stages that ``stage`` reads (a codebook, a tokenizer or LLM export)."""
    return [a for a in stage.argv if a.endswith(("/export", ".safetensors")) and a != stage.export]


class FakeStages:
    """``build_stage`` and the scoring child, without training: each build sleeps, then writes its export."""

    def __init__(self, slow=(), fail=()):
        self.built, self.ended, self.lock, self.slow, self.fail = [], [], threading.Lock(), slow, fail

    def build(self, stage, bar, log_dir, mode, threads):
        for path in _inputs(stage):  # what it reads is complete: its builder has ended
            assert os.path.exists(path if path.endswith(".safetensors") else os.path.join(path, "config.json")), \
                (stage.id, path)
        with self.lock:
            self.built.append(stage.id)
        time.sleep(0.3 if stage.id in self.slow else 0.05)
        if stage.id in self.fail:
            raise SystemExit(f"kelix ablate: stage {stage.id} failed (exit 1)")
        if stage.kind == "codebook":
            os.makedirs(os.path.dirname(stage.export), exist_ok=True)
            open(stage.export, "w").close()
        else:
            os.makedirs(stage.export, exist_ok=True)
            with open(os.path.join(stage.export, "config.json"), "w") as f:
                json.dump({"written_by": stage.id}, f)
        return "2 steps 0s"

    def forked(self, fn, args, log, bar, threads=None):  # only scoring is forked once build_stage is faked
        run, stages = args[0], args[-1]
        assert fn is ablate_exec.score and os.path.isdir(run.llm)
        k = ablate_report.rows_of("llm").index(run.row) + 10 * run.seed  # scores of the row and seed alone
        doc = {"row": run.row, "seed": run.seed, "general": k / 100, "text_rich": 0.2 + k / 1000, "ocr": 0.3,
               "lm_loss": 1.0 + k, "dense_distinct": 0.5, "stages": stages, "eval_seconds": 0}
        os.makedirs(os.path.dirname(run.scores), exist_ok=True)
        with open(run.scores, "w") as f:
            json.dump(doc, f)
        with self.lock:
            self.ended.append((run.row, run.seed))
        return 0, None


def _suite(tmp_path, monkeypatch, jobs, name, **fake):
    """The LLM suite (2 seeds: 6 runs, all on one tokenizer; exp2 on exp1's stage 1) through ``run_all``."""
    monkeypatch.chdir(tmp_path)
    stages = FakeStages(**fake)
    monkeypatch.setattr(ablate_exec, "build_stage", stages.build)
    monkeypatch.setattr(ablate_exec, "forked", stages.forked)
    monkeypatch.setattr(ablate_exec, "ensure_benchmarks", lambda *a: None)
    runs = ablate.plan("llm", 2, name, REC, max_steps=2)
    return runs, stages, ablate_exec.run_all(runs, name, {"synthetic-vqa": 2}, "subprocess", jobs)


def test_shared_stages_are_built_once_by_concurrent_runs(tmp_path, monkeypatch, capsys):
    runs, stages, scores = _suite(tmp_path, monkeypatch, 3, "j3")
    distinct = list(dict.fromkeys(s.id for r in runs for s in r.stages))
    assert sorted(stages.built) == sorted(distinct)  # each stage once, none left out
    assert len(distinct) == 3 + 4 + 6  # one tokenizer (codebook, stages 1 and 3); stage 1 x 4; stage 3 x 6
    # the tokenizer's three stages: built by one run, "reused" by the five that waited for them
    summaries = [scores[r.row][r.seed]["stages"] for r in runs]
    assert sorted(s["tok3"] for s in summaries) == ["2 steps 0s"] + ["reused"] * 5
    out = capsys.readouterr().out
    assert sum(ln.startswith(("exp1 ", "exp2 ", "exp3 ")) for ln in out.splitlines()) == 6  # a line per run


def test_results_in_plan_order_whatever_order_runs_end(tmp_path, monkeypatch):
    slow = {"exp1_s0_llm3", "exp1_s1_llm3"}  # exp1 ends last with 3 jobs
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()  # two stage trees: the second would reuse the first's
    runs, one, seq = _suite(tmp_path / "a", monkeypatch, 1, "j1", slow=slow)
    runs, three, par = _suite(tmp_path / "b", monkeypatch, 3, "j3", slow=slow)
    assert one.ended == [(r.row, r.seed) for r in runs]
    assert three.ended != one.ended  # the concurrent runs did end in another order
    assert list(par) == list(seq) == ["exp1", "exp2", "exp3"] and all(list(par[k]) == [0, 1] for k in par)
    assert ablate_report.aggregate("llm", par) == ablate_report.aggregate("llm", seq)
    strip = lambda s: {r: {k: {m: v for m, v in d.items() if m != "stages"} for k, d in by.items()} for r, by in s.items()}  # noqa: E731
    assert json.dumps(strip(par)) == json.dumps(strip(seq))


def test_a_failed_stage_fails_only_the_runs_that_need_it(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match=r"2 of 6 runs failed \(exp1 seed 0, exp2 seed 0\)"):
        _suite(tmp_path, monkeypatch, 2, "j2", fail={"exp1_s0_llm1"})  # exp2 seed 0 reads it too
    err = capsys.readouterr().err
    assert "stage exp1_s0_llm1 failed (exit 1)" in err and "exp1_s0_llm1 failed in another run" in err
    scored = sorted(os.path.basename(p) for p in os.listdir(tmp_path / "j2" / "runs"))
    assert scored == ["exp1_s1.json", "exp2_s1.json", "exp3_s0.json", "exp3_s1.json"]


def test_a_failed_stage_stops_the_suite_with_one_job(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="stage exp1_s0_llm1 failed"):  # as before --jobs: the first failure
        _suite(tmp_path, monkeypatch, 1, "j1", fail={"exp1_s0_llm1"})
    assert not os.path.exists(tmp_path / "j1" / "runs")


def test_threads_per_child(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [ablate_exec.threads_per_child(j) for j in (1, 2, 3, 8, 16)] == [None, 4, 2, 1, 1]


def _threads():
    import torch

    return 10 * torch.get_num_threads() + int(os.environ["OMP_NUM_THREADS"])


def test_forked_stage_runs_on_its_threads(tmp_path, monkeypatch):
    from tqdm import tqdm

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with tqdm(disable=True) as bar:
        assert ablate_exec.forked(_threads, (), str(tmp_path / "log"), bar, threads=3)[0] == 33
        assert ablate_exec.forked(_threads, (), str(tmp_path / "log"), bar)[0] % 10 == 1  # one job: unchanged
