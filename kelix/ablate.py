"""``kelix ablate``: the paper's ablations (Tables 6 and 7) on tiny models and synthetic data.

Every row of a table is a recipe overlay under ``recipes/ablations/<suite>/`` on the small base recipes
of ``recipes/ablations/`` (the paper's protocol, section 6, scaled down): Kelix-Tok stages 1 and 3
(``tokenizer_stage1.yaml``, ``tokenizer_stage3.yaml``, after ``kelix build-codebook --feature input``
for rows with a k-means codebook), then LLM stages 1 and 3 (``llm_stage1.yaml``, ``llm_stage3.yaml``:
multi-task, completion-only) on that tokenizer. The LLM suite runs on one tokenizer (the default
Kelix-Tok, seed 0); its rows overlay one LLM stage (exp2 reuses exp1's stage 1). A stage that several
rows share is trained once. Each stage is an ordinary ``kelix fit`` command line (``--dry-run`` prints
them), run in a process forked from this one (the imports, ~11 s on 2 cores, are paid once; ``--exec
subprocess`` runs the very same commands as new processes); ``--jobs J`` runs J runs at once, each stage on
``cpu_count // J`` torch threads (tiny models gain little from threads, much from running side by side), a
shared stage still trained once. Seeds: ``seed_everything`` and the data seed. TensorBoard: ``runs/ablations/<suite>/<stage>/version_N``; exports beside them.

Then every run is scored on held-out synthetic benchmarks (``synthetic-vqa``: general;
``synthetic-dense``: text-rich; ``synthetic-ocr``) and its last LLM stage's validation loss, into
``<out>/runs/<row>_s<seed>.json``; a run with that file is skipped when the suite runs again.
``<out>/ablations.md`` and ``<out>/ablations.json`` hold the tables (:mod:`kelix.ablate_report`).

    kelix ablate --suite tokenizer --dry-run
    kelix ablate --suite tokenizer --seeds 3 --jobs 2 --out outputs/ablations/tokenizer
    kelix ablate --suite llm --rows exp1,exp3 --max-steps 2 -- --trainer.accelerator gpu
"""

from __future__ import annotations

import argparse
import copy
import glob
import os
import shlex
import sys
import time
from dataclasses import dataclass, field

from kelix import ablate_report as report

RECIPES = os.path.join("recipes", "ablations")
BASE = {"tok1": ["tokenizer_stage1.yaml"], "tok3": ["tokenizer_stage1.yaml", "tokenizer_stage3.yaml"],
        "llm1": ["llm_stage1.yaml"], "llm3": ["llm_stage1.yaml", "llm_stage3.yaml"]}
# LLM suite: row -> (overlay, the stage it overlays, the row whose stage 1 it reuses)
LLM_ROWS = {"exp1": ("llm/exp1_baseline.yaml", "llm1", None), "exp2": ("llm/exp2_random_table.yaml", "llm3", "exp1"),
            "exp3": ("llm/exp3_parallel_heads.yaml", "llm1", None)}
LLM_TOKENIZER = "kelix_tok"  # the one tokenizer of the LLM suite (seed 0)
EVAL_ITEMS = {"synthetic-vqa": 60, "synthetic-dense": 60, "synthetic-ocr": 30}
CODEBOOK_IMAGES = 384  # per 256 centroids (the quickstart's 45 merged features per centroid)


@dataclass
class Stage:
    """One trained (or built) artifact: ``id`` is unique in the suite, and a stage two runs name is run once."""

    id: str
    kind: str  # codebook | tok1 | tok3 | llm1 | llm3
    argv: list[str]  # the kit command after ``kelix`` (fit ... or build-codebook ...)
    export: str  # what it leaves for the next stage (a directory with config.json, or the codebook file)
    shared: bool = False  # another run of this plan made it first

    def done(self) -> bool:
        return os.path.isfile(self.export if self.kind == "codebook" else os.path.join(self.export, "config.json"))


@dataclass
class Run:
    row: str
    seed: int
    stages: list[Stage] = field(default_factory=list)
    scores: str = ""
    tokenizer: str = ""
    llm: str = ""
    llm_run: str = ""  # the TensorBoard name of the last LLM stage (its val/loss is the LM loss)


def load_yaml(path: str) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


def merge(base: dict, over: dict) -> dict:
    """``over`` on ``base``, dict by dict (lists and values replace), as several ``--config`` merge."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def tokenizer_config(recipes: str, overlay: str) -> dict:
    """The row's ``model.init_args.tokenizer`` (base stage 1 under its overlay)."""
    cfg = merge(load_yaml(os.path.join(recipes, BASE["tok1"][0])), load_yaml(os.path.join(recipes, overlay)))
    return cfg["model"]["init_args"]["tokenizer"]


def _fit(name: str, seed: int, recipes: str, files: list[str], root: str, stage_id: str, extra: list[str],
         max_steps: int | None, overrides: list[str]) -> tuple[list[str], str]:
    d = os.path.join(root, stage_id)
    argv = ["fit"] + [a for f in files for a in ("--config", os.path.join(recipes, f))]
    argv += ["--name", name, "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
             "--model.init_args.export_dir", os.path.join(d, "export"),
             "--checkpoint.dirpath", os.path.join(d, "checkpoints"), *extra]
    if max_steps is not None:
        argv += ["--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(max_steps),
                 "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "1"]
    return argv + list(overrides), os.path.join(d, "export")


def plan(suite: str, seeds: int, out: str, recipes: str = RECIPES, rows: list[str] | None = None,
         max_steps: int | None = None, overrides: list[str] = ()) -> list[Run]:
    """Every run of ``suite`` (rows x seeds) with its stages; a stage shared with an earlier run is marked."""
    if suite not in report.TABLES:
        raise SystemExit(f"kelix ablate: unknown suite {suite!r}; choose from {', '.join(report.TABLES)}")
    names = report.rows_of(suite)
    bad = [r for r in rows or [] if r not in names]
    if bad:
        raise SystemExit(f"kelix ablate: --rows {','.join(bad)} not in the {suite} suite ({', '.join(names)})")
    root = os.path.join("runs", "ablations", suite, config_hash(recipes, max_steps, overrides))
    tb = os.path.relpath(root, "runs")  # TensorBoard run names: runs/<tb>/<stage>/version_N, beside the exports
    runs, seen = [], {}

    def stage(kind, sid, argv, export):
        s = Stage(sid, kind, argv, export, shared=sid in seen)
        seen.setdefault(sid, s)
        return s

    def tokenizer_stages(row: str, seed: int, run: Run):
        overlay = f"tokenizer/{row}.yaml"  # the LLM suite's one tokenizer is a row of the tokenizer suite
        tok = tokenizer_config(recipes, overlay)
        extra = []
        if tok.get("quantizer", "pq") in ("pq", "shared", "rvq") and tok.get("codebook"):
            cb = os.path.join(root, "codebooks", f"{row}.safetensors")
            cfg_path = os.path.join(out, "configs", f"{row}_codebook.yaml")
            S = (1 if tok.get("quantizer") == "shared" else tok["N"]) * tok["K"]
            argv = ["build-codebook", "--config", cfg_path, "--feature", "input", "--out", cb,
                    "--max-images", str(max(CODEBOOK_IMAGES, CODEBOOK_IMAGES * S // 256))]
            run.stages.append(stage("codebook", f"codebook_{row}", argv, cb))
            extra = ["--model.init_args.tokenizer.codebook", cb]
        t1 = f"{row}_s{seed}_tok1"
        argv, _ = _fit(f"{tb}/{t1}", seed, recipes, BASE["tok1"] + [overlay], root, t1, extra,
                       max_steps, overrides)
        run.stages.append(stage("tok1", t1, argv, os.path.join(root, t1, "export")))
        t3 = f"{row}_s{seed}_tok3"
        ckpt = os.path.join(root, t1, "checkpoints", "last.ckpt")
        argv, export = _fit(f"{tb}/{t3}", seed, recipes, BASE["tok3"] + [overlay], root, t3,
                            extra + ["--model.init_args.init_from", ckpt], max_steps, overrides)
        run.stages.append(stage("tok3", t3, argv, export))
        run.tokenizer = export
        return tok

    for row in rows_in_order(names, rows):
        for seed in range(seeds):
            run = Run(row, seed, scores=os.path.join(out, "runs", f"{row}_s{seed}.json"))
            if suite == "tokenizer":
                tok, overlay, where, s1 = tokenizer_stages(row, seed, run), None, None, row
            else:
                tok = tokenizer_stages(LLM_TOKENIZER, 0, run)
                overlay, where, share = LLM_ROWS[row]
                s1 = share or row
            nk = ["--data.init_args.processor.init_args.N", str(tok.get("N", 4)),
                  "--data.init_args.processor.init_args.K", str(tok.get("K", 64))]
            l1 = f"{s1}_s{seed}_llm1"
            over1 = [LLM_ROWS[s1][0]] if suite == "llm" and LLM_ROWS[s1][1] == "llm1" else []
            argv, e1 = _fit(f"{tb}/{l1}", seed, recipes, BASE["llm1"] + over1, root, l1,
                            ["--model.init_args.lm.image_tokenizer", run.tokenizer, *nk], max_steps, overrides)
            run.stages.append(stage("llm1", l1, argv, e1))
            l3 = f"{row}_s{seed}_llm3"
            over3 = [overlay] if where == "llm3" else []
            argv, e3 = _fit(f"{tb}/{l3}", seed, recipes, BASE["llm3"] + over3, root, l3,
                            ["--model.init_args.init_from", e1, "--model.init_args.image_tokenizer", run.tokenizer,
                             "--data.init_args.processor.init_args.text_tokenizer", e1, *nk], max_steps, overrides)
            run.stages.append(stage("llm3", l3, argv, e3))
            run.llm, run.llm_run = e3, f"{tb}/{l3}"
            runs.append(run)
    return runs


def config_hash(recipes: str, max_steps: int | None, overrides: list[str]) -> str:
    """8 hex digits of everything a stage's result depends on besides its row and seed: the recipes' text,
    ``--max-steps`` and the fit options. Stages live under ``runs/ablations/<suite>/<hash>/``, so a finished
    stage is reused only by a plan that would train it the same way (a --max-steps 2 smoke run, or an
    edited recipe, never hands its exports to a full run)."""
    import hashlib

    h = hashlib.sha1(repr((max_steps, list(overrides))).encode())
    for path in sorted(glob.glob(os.path.join(recipes, "**", "*.yaml"), recursive=True)):
        h.update(os.path.relpath(path, recipes).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:8]


def find_recipes(explicit: str | None = None) -> str:
    """``--recipes``, ``./recipes/ablations``, or the source checkout's."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in (explicit, RECIPES, os.path.join(here, RECIPES)):
        if cand and os.path.isfile(os.path.join(cand, BASE["tok1"][0])):
            return cand
    raise SystemExit("kelix ablate: recipes/ablations not found; run it from the kelix checkout or pass --recipes")


def rows_in_order(names: list[str], wanted: list[str] | None) -> list[str]:
    return [r for r in names if not wanted or r in wanted]


def codebook_configs(runs: list[Run], recipes: str) -> None:
    """The one-file config each ``build-codebook`` stage reads (base stage 1 merged with the row overlay:
    build-codebook takes a single ``--config``)."""
    import yaml

    for run in runs:
        for s in run.stages:
            if s.kind != "codebook":
                continue
            path = s.argv[s.argv.index("--config") + 1]
            row = s.id[len("codebook_"):]
            cfg = merge(load_yaml(os.path.join(recipes, BASE["tok1"][0])),
                        load_yaml(os.path.join(recipes, "tokenizer", f"{row}.yaml")))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                yaml.safe_dump(cfg, f, sort_keys=False)


def format_plan(runs: list[Run], jobs: int = 1) -> str:
    lines, first = [], set()
    for run in runs:
        lines.append(f"{run.row} seed {run.seed}  -> {run.scores}")
        for s in run.stages:
            if s.shared or s.id in first:
                lines.append(f"  {s.kind:<8} {s.id}: shared, trained once (above)")
                continue
            first.add(s.id)
            lines.append(f"  {s.kind:<8} {s.id}: kelix {shlex.join(s.argv)}")
        lines.append(f"  eval     {', '.join(EVAL_ITEMS)} + LM loss (val/loss of {run.llm_run})")
    distinct = {s.id for r in runs for s in r.stages if s.kind != "codebook"}
    lines.append(f"{len(runs)} runs, {len(distinct)} distinct training stages")
    if jobs > 1:
        from kelix.ablate_exec import threads_per_child

        lines.append(f"jobs {jobs}: up to {jobs} runs at once, {threads_per_child(jobs)} torch thread(s) per stage "
                     f"({os.cpu_count()} CPUs); a shared stage is trained once, the other runs wait for it")
    else:
        lines.append("jobs 1: one run at a time")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kelix ablate", description=__doc__.split("\n\n")[0].replace("``", ""),
                                epilog="\n\n".join(__doc__.split("\n\n")[-1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True, choices=list(report.TABLES), help="Table 6 (tokenizer) or Table 7 (llm)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per row (default: %(default)s)")
    p.add_argument("--out", help="tables, scores and logs (default: outputs/ablations/<suite>)")
    p.add_argument("--recipes", help="directory of the ablation recipes (default: recipes/ablations)")
    p.add_argument("--rows", help="comma-separated runs of the suite to train (default: all); the table lists all")
    p.add_argument("--dry-run", action="store_true", help="list every run, its stages and commands; run nothing")
    p.add_argument("--max-steps", type=int, help="override every stage's max_steps (e.g. 2 for a smoke run)")
    p.add_argument("--eval-items", type=int, help="held-out items per benchmark (default: vqa 60, dense 60, ocr 30)")
    p.add_argument("--exec", choices=["fork", "subprocess"], default="fork", dest="exec_mode",
                   help="run each stage in a process forked from this one (imports paid once) or as a new "
                        "`python -m kelix.cli` process (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1, metavar="J",
                   help="runs at once, each stage on cpu_count // J torch threads (default: %(default)s)")
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="after --: options for every kelix fit, e.g. -- --trainer.accelerator gpu")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.seeds < 1 or a.jobs < 1:
        raise SystemExit("kelix ablate: --seeds and --jobs must be at least 1")
    overrides = a.overrides[1:] if a.overrides[:1] == ["--"] else a.overrides
    out = a.out or os.path.join("outputs", "ablations", a.suite)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()] if a.rows else None
    recipes = find_recipes(a.recipes)
    runs = plan(a.suite, a.seeds, out, recipes, rows=rows, max_steps=a.max_steps, overrides=overrides)
    if a.dry_run:
        print(format_plan(runs, a.jobs))
        return 0
    from kelix import ablate_exec

    counts = {k: a.eval_items or v for k, v in EVAL_ITEMS.items()}
    codebook_configs(runs, recipes)
    start = time.time()
    scores = ablate_exec.run_all(runs, out, counts, a.exec_mode, a.jobs)
    md, js = report.write(out, a.suite, scores, {"command": shlex.join(["kelix", "ablate", *(argv or sys.argv[2:])]),
                                                 "seeds": a.seeds, "seconds": round(time.time() - start, 1)})
    print(open(md).read())
    print(f"tables: {md}, {js}; TensorBoard: tensorboard --logdir runs/ablations/{a.suite}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
