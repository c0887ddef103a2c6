"""``kelix ablate``: every row's recipe parses and trains, --dry-run lists every run, shared stages are
planned once, runs with scores are skipped, and the tables hold the right rows with mean ± spread."""

import glob
import json
import os

import pytest
import torch

from kelix import ablate, ablate_exec, ablate_report
from kelix.training.cli import run_lightning_cli
from tests.llm.test_recipes import printed_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes/ablations/**/*.yaml"), recursive=True))
REC = os.path.join(ROOT, "recipes", "ablations")
TOKENIZER_ROWS = ablate_report.rows_of("tokenizer")
LLM_ROWS = ablate_report.rows_of("llm")
FAST = {"kelix_tok", "continuous", "fsq", "exp2", "exp3"}  # the rest: @slow (each ~5-10 s)
SMALL = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
         "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--data.init_args.batch_size", "4",
         "--data.init_args.num_workers", "0", "--data.init_args.shuffle_buffer", "4"]


def _rows(names):
    return [pytest.param(r, marks=() if r in FAST else pytest.mark.slow) for r in names]


def test_every_row_has_its_recipe():
    for row in TOKENIZER_ROWS:
        assert os.path.isfile(os.path.join(REC, "tokenizer", f"{row}.yaml")), row
    assert sorted(LLM_ROWS) == sorted(ablate.LLM_ROWS)
    on_disk = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(REC, "tokenizer", "*.yaml"))}
    assert on_disk == set(TOKENIZER_ROWS)  # no overlay is left out of the tables


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.relpath(p, ROOT) for p in RECIPES])
def test_recipe_parses(path, monkeypatch, capsys):
    out = printed_config(path, monkeypatch, capsys)
    assert "kelix.tokenizer.module.TokenizerModule" in out or "kelix.llm.module.UnifiedLLMModule" in out
    assert "data/synthetic/ablations/" in out and "accelerator: cpu" in out


@pytest.mark.parametrize("suite", ["tokenizer", "llm"])
def test_dry_run_lists_every_run(suite, capsys):
    assert ablate.main(["--suite", suite, "--seeds", "2", "--dry-run", "--out", "o"]) == 0
    out = capsys.readouterr().out
    rows, lines = ablate_report.rows_of(suite), out.splitlines()
    for row in rows:
        for seed in (0, 1):
            assert lines.count(f"{row} seed {seed}  -> o/runs/{row}_s{seed}.json") == 1, (row, seed)
    assert f"{2 * len(rows)} runs" in out
    if suite == "tokenizer":
        for row in rows:
            cmd = next(ln for ln in out.splitlines() if f"{row}_s0_tok1: kelix fit" in ln)
            assert f"recipes/ablations/tokenizer/{row}.yaml" in cmd and "--seed_everything 0" in cmd
            assert "--data.init_args.seed 0" in cmd
        # kelix_tok stands in four sections but is one run per seed
        assert sum(ln.startswith("kelix_tok seed") for ln in out.splitlines()) == 2
    else:
        exp2 = next(ln for ln in out.splitlines() if "exp2_s1_llm3: kelix fit" in ln)
        assert "exp2_random_table.yaml" in exp2 and "/exp1_s1_llm1/export --model" in exp2
        exp3 = next(ln for ln in out.splitlines() if "exp3_s0_llm1: kelix fit" in ln)
        assert "exp3_parallel_heads.yaml" in exp3


def test_dry_run_shows_jobs(monkeypatch, capsys):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert ablate.main(["--suite", "llm", "--seeds", "1", "--jobs", "2", "--dry-run"]) == 0
    assert "jobs 2: up to 2 runs at once, 4 torch thread(s) per stage (8 CPUs)" in capsys.readouterr().out
    assert ablate.main(["--suite", "llm", "--seeds", "1", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "jobs 1: one run at a time"
    with pytest.raises(SystemExit, match="--jobs must be at least 1"):
        ablate.main(["--suite", "llm", "--jobs", "0", "--dry-run"])


def test_plan_trains_shared_stages_once():
    runs = ablate.plan("llm", 2, "o", REC)
    ids = [s.id for r in runs for s in r.stages if not s.shared]
    assert len(ids) == len(set(ids))
    # one tokenizer (seed 0, with its codebook); stage 1: exp1's (also exp2's) and exp3's per seed; stage 3 per run
    assert sorted(i for i in ids if "tok" in i or "codebook" in i) == ["codebook_kelix_tok", "kelix_tok_s0_tok1",
                                                                       "kelix_tok_s0_tok3"]
    assert sorted(i for i in ids if i.endswith("llm1")) == ["exp1_s0_llm1", "exp1_s1_llm1", "exp3_s0_llm1", "exp3_s1_llm1"]
    assert len([i for i in ids if i.endswith("llm3")]) == 6
    tok = ablate.plan("tokenizer", 1, "o", REC)
    by_row = {r.row: r for r in tok}
    assert "codebook" not in {s.kind for s in by_row["continuous"].stages}  # no codes, no k-means
    assert "codebook" not in {s.kind for s in by_row["fsq"].stages}
    assert "codebook" not in {s.kind for s in by_row["rvq"].stages}  # input k-means would not fit residual levels
    n16 = next(s for s in by_row["n16"].stages if s.kind == "llm1").argv
    assert n16[n16.index("--data.init_args.processor.init_args.N") + 1] == "16"


def test_stages_of_other_steps_or_recipes_are_not_reused(tmp_path):
    import shutil

    def export(runs):
        return next(s.export for s in runs[0].stages if s.kind == "tok1")

    full, smoke = ablate.plan("llm", 1, "o", REC), ablate.plan("llm", 1, "o", REC, max_steps=2)
    gpu = ablate.plan("llm", 1, "o", REC, overrides=["--trainer.accelerator", "gpu"])
    assert len({export(full), export(smoke), export(gpu)}) == 3
    assert export(full) == export(ablate.plan("llm", 1, "o", REC))  # the same plan finds its stages again
    copy = tmp_path / "rec"
    shutil.copytree(REC, copy)
    assert export(ablate.plan("llm", 1, "o", str(copy))) == export(full)
    with open(copy / "llm_stage3.yaml", "a") as f:
        f.write("# edited\n")
    assert export(ablate.plan("llm", 1, "o", str(copy))) != export(full)


def test_table_rows_and_mean_spread(tmp_path):
    scores = {"kelix_tok": {0: {"general": 0.5, "text_rich": 0.2, "ocr": 0.4, "lm_loss": 2.0, "dense_distinct": 0.9},
                            1: {"general": 0.7, "text_rich": 0.4, "ocr": 0.4, "lm_loss": 3.0, "dense_distinct": 0.9},
                            2: {"general": 0.6, "text_rich": 0.9, "ocr": 0.4, "lm_loss": 2.5, "dense_distinct": 0.6}},
              "one_code": {0: {"general": 0.25, "text_rich": 0.1, "ocr": None, "lm_loss": 4.0, "dense_distinct": 0.05}}}
    md, js = ablate_report.write(str(tmp_path), "tokenizer", scores, {"seeds": 3})
    text = open(md).read()
    # hand-computed: general 0.5, 0.7, 0.6 -> mean 60.0, sd 10.0; text-rich 0.2, 0.4, 0.9 -> 50.0,
    # sd sqrt((0.09 + 0.01 + 0.16) / 2) = 36.06; OCR 40.0 ± 0.0; loss 2.5 ± 0.5; distinct 0.9, 0.9, 0.6 ->
    # 80.0, sd sqrt((0.01 + 0.01 + 0.04) / 2) = 17.32; one seed: no spread
    want = "| 3 | 60.0 ± 10.0 | 50.0 ± 36.1 | 40.0 ± 0.0 | 2.500 ± 0.500 | 80.0 ± 17.3 |"
    lines = text.splitlines()
    kt = [ln for ln in lines if "| kelix_tok |" in ln]
    assert len(kt) == 4 and all(ln.endswith(want) for ln in kt)  # (a), (b), (c) and the N sweep
    oc = [ln for ln in lines if "| one_code |" in ln]
    assert len(oc) == 4 and all(ln.endswith("| 1 | 25.0 | 10.0 | n/a | 4.000 | 5.0 |") for ln in oc)  # (a), (d), (e), VQ
    assert "| Shared codebook | shared | 0 | n/a | n/a | n/a | n/a | n/a |" in lines
    sections = [ln for ln in lines if ln.startswith("| *")]
    assert len(sections) == len(ablate_report.TABLES["tokenizer"])
    doc = json.load(open(js))
    row = next(r for r in doc["rows"] if r["run"] == "kelix_tok")
    assert row["text_rich"]["mean"] == pytest.approx(0.5) and row["text_rich"]["spread"] == pytest.approx(0.36056, abs=1e-4)
    assert doc["runs"]["kelix_tok"]["1"]["lm_loss"] == 3.0


def test_finished_runs_are_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runs = ablate.plan("llm", 1, "out", REC)
    for r in runs:
        os.makedirs(os.path.dirname(r.scores), exist_ok=True)
        json.dump({"row": r.row, "seed": r.seed, "general": 0.5, "text_rich": 0.1, "ocr": 0.2, "lm_loss": 1.0,
                   "stages": {}, "eval_seconds": 0}, open(r.scores, "w"))

    def boom(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablate_exec, "forked", boom)
    monkeypatch.setattr(ablate_exec, "spawned", boom)
    got = ablate_exec.run_all(runs, "out", {"synthetic-vqa": 2})
    assert sorted(got) == ["exp1", "exp2", "exp3"] and got["exp3"][0]["general"] == 0.5
    assert capsys.readouterr().out.count("skipped") == 3


def _steps():
    import sys

    sys.stderr.write("Steps:  50%|#####     | 1/2 [00:00<00:00, train_loss=3.0]\rSteps: 100%|##########| 2/2\n")
    print("hello from the child")
    return 3


def test_forked_child_reports_its_bar_and_status(tmp_path):
    from tqdm import tqdm

    with tqdm(disable=True) as bar:
        rc, step = ablate_exec.forked(_steps, (), str(tmp_path / "log"), bar)
    assert (rc, step) == (3, 2)
    assert "hello from the child" in open(tmp_path / "log").read()


def test_spawned_runs_the_kelix_command(tmp_path):
    from tqdm import tqdm

    with tqdm(disable=True) as bar:
        rc, step = ablate_exec.spawned(["--version"], str(tmp_path / "log"), bar)
    assert (rc, step) == (0, None)
    log = open(tmp_path / "log").read()
    assert log.startswith("$ kelix --version") and "kelix " in log.splitlines()[1]


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from kelix.data.synthetic import SyntheticData

    root = tmp_path_factory.mktemp("ablate")
    SyntheticData(str(root / "data/synthetic/ablations"), ["ocr", "caption", "vqa", "text", "dense"],
                  samples_per_shard=12).ensure()
    return root


@pytest.mark.parametrize("row", _rows(TOKENIZER_ROWS))
def test_tokenizer_row_trains_two_steps(row, tiny_shards, monkeypatch):
    from kelix.tokenizer.model import KelixTokenizer

    monkeypatch.chdir(tiny_shards)
    want = ablate.tokenizer_config(REC, f"tokenizer/{row}.yaml")
    extra = []
    if want.get("codebook"):  # random centroids of the row's shape (build-codebook has its own tests)
        from safetensors.torch import save_file

        books = 1 if want["quantizer"] == "shared" else want["N"]
        save_file({"centroids": torch.randn(books, want["K"], want["centroid_dim"])}, f"cb_{row}.safetensors")
        extra = ["--model.init_args.tokenizer.codebook", f"cb_{row}.safetensors"]
    run_lightning_cli(["fit", "--config", os.path.join(REC, "tokenizer_stage1.yaml"), "--config",
                       os.path.join(REC, "tokenizer", f"{row}.yaml"), *SMALL, *extra, "--name", f"t_{row}",
                       "--model.init_args.export_dir", f"tok_{row}"])
    tok = KelixTokenizer.from_pretrained(f"tok_{row}")
    for k in ("N", "K", "d", "fusion", "quantizer"):
        assert getattr(tok.config, k) == want.get(k, getattr(tok.config, k)), k
    assert tok.has_codes == (row != "continuous")
    # and the LLM's stage 1 reads this tokenizer (its N and K, or its features)
    from kelix.llm.model import KelixLM

    nk = ["--data.init_args.processor.init_args.N", str(tok.config.N), "--data.init_args.processor.init_args.K",
          str(tok.config.K)]
    run_lightning_cli(["fit", "--config", os.path.join(REC, "llm_stage1.yaml"), *SMALL, *nk, "--name", f"l_{row}",
                       "--model.init_args.lm.image_tokenizer", f"tok_{row}", "--model.init_args.export_dir", f"llm_{row}"])
    lm = KelixLM.from_pretrained(f"llm_{row}")
    assert (lm.vocab.N, lm.vocab.K) == (tok.config.N, tok.config.K) and lm.continuous == (row == "continuous")


@pytest.fixture(scope="module")
def tok_dir(tiny_shards):
    from kelix.tokenizer.model import KelixTokenizer, tiny_config

    torch.manual_seed(0)
    path = tiny_shards / "tok_llm_suite"
    KelixTokenizer(tiny_config(K=64)).save_pretrained(path)  # N=4, K=64: the recipes' defaults
    return str(path)


@pytest.mark.parametrize("row", _rows(LLM_ROWS))
def test_llm_row_trains_two_steps(row, tiny_shards, tok_dir, monkeypatch):
    from kelix.llm.model import KelixLM

    monkeypatch.chdir(tiny_shards)
    overlay, where, share = ablate.LLM_ROWS[row]
    s1 = ["--config", os.path.join(REC, "llm_stage1.yaml")]
    if where == "llm1":
        s1 += ["--config", os.path.join(REC, overlay)]
    run_lightning_cli(["fit", *s1, *SMALL, "--name", f"l1_{row}", "--model.init_args.lm.image_tokenizer", tok_dir,
                       "--model.init_args.export_dir", f"l1_{row}"])
    s3 = ["--config", os.path.join(REC, "llm_stage1.yaml"), "--config", os.path.join(REC, "llm_stage3.yaml")]
    if where == "llm3":
        s3 += ["--config", os.path.join(REC, overlay)]
    run_lightning_cli(["fit", *s3, *SMALL, "--name", f"l3_{row}", "--model.init_args.init_from", f"l1_{row}",
                       "--model.init_args.image_tokenizer", tok_dir, "--data.init_args.processor.init_args.text_tokenizer",
                       f"l1_{row}", "--model.init_args.export_dir", f"l3_{row}"])
    s1_lm, lm = KelixLM.from_pretrained(f"l1_{row}"), KelixLM.from_pretrained(f"l3_{row}")
    assert lm.config.predictor == ("parallel" if row == "exp3" else "block_decoder")
    assert lm.visual is None and s1_lm.visual is not None  # stage 3 reads the table
    if row in ("exp1", "exp2"):  # fold starts the table at the stage-1 projector's rows; random does not
        table, vo = s1_lm.visual.table(), lm.vocab.visual_offset
        rows = lm.backbone.get_input_embeddings().weight[vo:vo + lm.vocab.S].detach()
        near = float((rows - table).norm(dim=-1).mean() / table.norm(dim=-1).mean())
        assert (near > 0.5) if row == "exp2" else (near < 0.5), near


@pytest.mark.slow
def test_suite_end_to_end_and_resume(tiny_shards, monkeypatch, capsys):
    monkeypatch.chdir(tiny_shards)
    args = ["--suite", "tokenizer", "--rows", "kelix_tok,continuous", "--seeds", "2", "--max-steps", "2",
            "--eval-items", "2", "--out", "e2e", "--", "--data.init_args.num_workers", "0"]
    assert ablate.main(args) == 0
    text = open("e2e/ablations.md").read()
    assert text.count("| kelix_tok | 2 |") == 4 and text.count("| continuous | 2 |") == 2
    for row in ("kelix_tok", "continuous"):
        for seed in (0, 1):
            s = json.load(open(f"e2e/runs/{row}_s{seed}.json"))
            assert s["lm_loss"] is not None and 0 <= s["text_rich"] <= 1 and s["row"] == row
    root = glob.glob("runs/ablations/tokenizer/*/kelix_tok_s1_llm3/export")
    assert len(root) == 1 and os.path.isdir(root[0].replace("export", "version_0"))
    versions = sorted(glob.glob("runs/ablations/tokenizer/*/*/version_*"))
    capsys.readouterr()
    assert ablate.main(args) == 0  # everything scored: nothing trains again
    assert capsys.readouterr().out.count("skipped") == 4
    assert sorted(glob.glob("runs/ablations/tokenizer/*/*/version_*")) == versions


@pytest.mark.slow
def test_two_jobs_give_the_tables_of_one(tiny_shards, monkeypatch):
    """--jobs 2 on 2 tiny runs sharing their k-means codebook: the same table rows as --jobs 1 (each in its
    own directory, so that nothing is reused; one torch thread per stage either way, as on 2 CPUs)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    docs = {}
    for jobs in (1, 2):
        d = tiny_shards / f"jobs{jobs}"
        d.mkdir()
        os.symlink(tiny_shards / "data", d / "data")
        monkeypatch.chdir(d)
        assert ablate.main(["--suite", "tokenizer", "--rows", "kelix_tok", "--seeds", "2", "--max-steps", "2",
                            "--eval-items", "2", "--jobs", str(jobs), "--out", "out", "--",
                            "--data.init_args.num_workers", "0"]) == 0
        docs[jobs] = json.load(open("out/ablations.json"))
        assert len(glob.glob("runs/ablations/tokenizer/*/codebooks/kelix_tok.safetensors")) == 1
        assert len(glob.glob("out/logs/codebook_kelix_tok.log")) == 1
    assert docs[2]["rows"] == docs[1]["rows"] and docs[1]["rows"][2]["seeds"] == [0, 1]
    assert list(docs[2]["runs"]["kelix_tok"]) == ["0", "1"]
