"""A user's input error is one line on stderr, exit 2, no traceback; a bug inside training keeps its traceback.

Every recipe under recipes/ (found on disk, so new ones are covered) runs without its inputs from an empty
directory, in-process; training itself is replaced by a sentinel, so nothing heavy ever runs.
"""

from __future__ import annotations

import glob
import os
import re

import pytest

from kelix.cli import main
from kelix.training.cli import KelixCLI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"),
                                                              recursive=True))


class _WouldTrain(Exception):
    pass


@pytest.fixture
def no_training(monkeypatch, tmp_path):
    """An empty working directory (no runs/, exports/, data/), and training that never starts."""

    def stop(self, subcommand):
        raise _WouldTrain(subcommand)

    monkeypatch.setattr(KelixCLI, "_run_subcommand", stop)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KELIX_DEBUG", raising=False)


def _fails_in_one_line(argv, capfd) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _reads(recipe: str) -> str:
    """The recipe header's ``# Reads:`` section."""
    text, on = [], False
    for line in open(os.path.join(ROOT, recipe), encoding="utf-8"):
        if not line.startswith("#"):
            break
        if re.match(r"#\s*Reads:", line):
            on = True
        elif on and not re.match(r"#\s{3,}\S", line):
            on = False
        if on:
            text.append(line)
    return " ".join(text)


def _command(recipe: str) -> list[str]:
    """How the recipe runs: its header's first ``kelix fit`` command for an overlay (base first), else alone."""
    import yaml

    own = (yaml.safe_load(open(os.path.join(ROOT, recipe), encoding="utf-8")) or {}).get("model") or {}
    head = "".join(ln for ln in open(os.path.join(ROOT, recipe), encoding="utf-8") if ln.startswith("#"))
    run = re.search(r"kelix fit((?: --config \S+)+)", head)
    configs = re.findall(r"--config (\S+)", run.group(1)) if run and "class_path" not in own else [recipe]
    return ["fit", *[a for c in configs for a in ("--config", os.path.join(ROOT, c))]]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_without_inputs_is_one_line(recipe, no_training, capfd):
    argv = _command(recipe)
    try:
        line = _fails_in_one_line(argv, capfd)
    except _WouldTrain:
        # it got as far as training: then it reads nothing the user must make first
        reads = " ".join(_reads(os.path.relpath(c, ROOT)) for c in argv[2::2])
        assert re.search(r"generated (.* )?if missing", reads), f"{recipe} reached training without inputs"
        return
    assert line.startswith("kelix fit: "), line
    # names a missing input: a quoted path that is not there
    quoted = re.findall(r"'([^']+)'", line)
    assert any(not os.path.exists(q) for q in quoted), line
    assert re.search(r"does not exist|not a |no file|not found", line), line


def test_overlay_without_its_base_names_the_base(no_training, capfd):
    overlay = os.path.join(ROOT, "recipes/llm/ablations/exp1_baseline_stage3.yaml")
    line = _fails_in_one_line(["fit", "--config", overlay], capfd)
    assert line == (f"kelix fit: {overlay} is an overlay (it sets no model class_path): give its base first: "
                    "kelix fit --config recipes/llm/stage3_anneal.yaml --config "
                    "recipes/llm/ablations/exp1_baseline_stage3.yaml")


def test_missing_init_from_names_key_value_and_what_to_run(no_training, capfd):
    line = _fails_in_one_line(["fit", "--config", os.path.join(ROOT, "recipes/llm/stage3_anneal.yaml")], capfd)
    assert line == ("kelix fit: init_from 'exports/llm_stage2_2' does not exist: run recipes/llm/stage2_2_multitask.yaml"
                    " first (kelix fit --config recipes/llm/stage2_2_multitask.yaml) or set model.init_args.init_from")


def test_missing_codebook_names_the_verb_that_makes_it(no_training, capfd):
    line = _fails_in_one_line(["fit", "--config", os.path.join(ROOT, "recipes/quickstart/tokenizer.yaml")], capfd)
    assert line == ("kelix fit: codebook 'runs/tokenizer/codebook.safetensors' does not exist: make it first "
                    "(kelix build-codebook) or set model.init_args.tokenizer.codebook")


def test_missing_shard_pattern_is_one_line_before_training(no_training, capfd):
    line = _fails_in_one_line(["fit", "--config", os.path.join(ROOT, "recipes/quickstart/dit.yaml"),
                               "--data.init_args.synthetic", "null"], capfd)  # nothing generates the shards
    assert line.startswith("kelix fit: data source 'data/synthetic/")
    assert "matches no file: set data.init_args.train[0]" in line


def test_misspelled_key_suggests_the_nearest(no_training, capfd):
    base = ["fit", "--config", os.path.join(ROOT, "recipes/quickstart/llm.yaml")]
    line = _fails_in_one_line([*base, "--modell.init_args.lr", "1"], capfd)
    assert line == "kelix fit: unknown option --modell.init_args.lr: did you mean --model.init_args.lr?"
    line = _fails_in_one_line([*base, "--trainer.max_stepz", "3"], capfd)
    assert line == "kelix fit: unknown option --trainer.max_stepz: did you mean --trainer.max_steps?"
    line = _fails_in_one_line([*base, "--model.init_args.init_frm", "x"], capfd)
    assert line == "kelix fit: unknown key model.init_args.init_frm: did you mean model.init_args.init_from?"


def test_misspelled_key_in_a_config_file(no_training, capfd, tmp_path):
    text = open(os.path.join(ROOT, "recipes/quickstart/llm.yaml"), encoding="utf-8").read()
    (tmp_path / "typo.yaml").write_text(text.replace("\ntrainer:", "\ntrainr:"))
    line = _fails_in_one_line(["fit", "--config", str(tmp_path / "typo.yaml")], capfd)
    assert line == "kelix fit: unknown key trainr.accelerator: did you mean trainer.accelerator?"


def test_unknown_verb_is_one_line(capfd):
    assert main(["fitt"]) == 2
    assert capfd.readouterr().err == "kelix: unknown verb 'fitt': did you mean fit? (kelix --help lists the verbs)\n"


def test_wrong_type_names_key_and_value(no_training, capfd):
    base = ["fit", "--config", os.path.join(ROOT, "recipes/quickstart/llm.yaml")]
    assert _fails_in_one_line([*base, "--trainer.max_steps", "abc"], capfd) == (
        "kelix fit: trainer.max_steps: expected int, got 'abc'")
    assert _fails_in_one_line([*base, "--model.init_args.optim.lr", "fast"], capfd) == (
        "kelix fit: model.init_args.optim.init_args.lr: expected float, got 'fast'")


def test_debug_shows_the_traceback(no_training, monkeypatch):
    argv = ["fit", "--config", os.path.join(ROOT, "recipes/llm/stage3_anneal.yaml")]
    with pytest.raises(ValueError) as e:  # jsonargparse's wrapper, the root cause below it
        main([*argv, "--debug"])
    assert isinstance(e.value.__cause__ or e.value.__context__, FileNotFoundError)
    monkeypatch.setenv("KELIX_DEBUG", "1")
    with pytest.raises(ValueError):
        main(argv)


def test_error_inside_training_keeps_its_traceback(monkeypatch, tmp_path):
    def broken(self, *args, **kwargs):
        raise FileNotFoundError("a bug: a file the code itself should have written")

    monkeypatch.setattr("lightning.pytorch.Trainer.fit", broken)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="a bug"):
        main(["fit", "--config", os.path.join(ROOT, "recipes/quickstart/dit.yaml")])


def test_kit_verb_input_errors_are_one_line(no_training, capfd):
    line = _fails_in_one_line(["chat", "--pipline", "p", "what?"], capfd)
    assert line.startswith("kelix chat: error: unrecognized arguments: --pipline")
    assert "did you mean --pipeline?" in line
    line = _fails_in_one_line(["build-codebook", "--config", "missing.yaml"], capfd)
    assert "missing.yaml" in line and line.startswith("kelix build-codebook: ")


@pytest.mark.parametrize("argv,names", [
    (["chat", "--pipeline", "nope", "hi"], "'nope'"),
    (["generate", "--pipeline", "nope", "hi"], "'nope'"),
    (["serve", "--pipeline", "nope"], "'nope'"),
    (["eval", "run", "--pipeline", "nope", "--benchmark", "synthetic-vqa", "--data", "nodata", "--out", "o"], "nodata"),
    (["convert", "official", "--sft", "nope", "--out", "o"], "nope/config.json"),
    (["estimate", "--config", "nope.yaml"], "'nope.yaml'"),
    (["data", "convert", "--format", "pairs", "--input", "nope.csv", "--out", "o"], "nope.csv"),
    (["quickstart", "--eval-only", "--pipeline", "nope"], "'nope'"),
    (["quickstart", "--recipes", "nope"], "'nope'"),
])
def test_kit_verb_missing_input_is_one_line_before_any_work(argv, names, no_training, capfd, tmp_path):
    try:
        code = main(argv)  # a verb may return its status
    except SystemExit as e:
        code = e.code
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    line = lines[0]
    verb = argv[0] if argv[0] in ("chat", "generate", "serve", "estimate", "quickstart") else " ".join(argv[:2])
    assert line.startswith(f"kelix {verb.split()[0]}") and names in line, line
    assert not any(tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())  # nothing written first


def test_kit_verb_value_errors_the_kit_raises_are_one_line(no_training, capfd, monkeypatch):
    import json

    import kelix.pipeline_cli

    # build-codebook checks the recipe's tokenizer.centroid_dim against the encoder's widths (a ValueError)
    line = _fails_in_one_line(["build-codebook", "--config", os.path.join(ROOT, "recipes/quickstart/tokenizer.yaml"),
                               "--shards", "none-*.tar"], capfd)
    assert line == "kelix build-codebook: tokenizer.centroid_dim 64 is neither the patch width 32 nor the merged width 128"

    def library_bug(argv):
        return json.loads("{")  # a ValueError raised inside a library: a bug, its traceback stays

    monkeypatch.setattr(kelix.pipeline_cli, "generate", library_bug)
    with pytest.raises(json.JSONDecodeError):
        main(["generate", "x"])


def test_a_failed_run_is_not_an_input_error(no_training, capfd, monkeypatch):
    """A stage that failed exits 1 with its message (Python prints it); only the user's input gets exit 2."""
    import kelix.pipeline_cli
    from kelix.console.errors import RunFailed

    def stage_failed(argv):
        raise RunFailed("kelix generate: stage x failed (exit 3); its whole output: x.log")

    monkeypatch.setattr(kelix.pipeline_cli, "generate", stage_failed)
    with pytest.raises(RunFailed) as e:
        main(["generate", "x"])
    assert e.value.code == "kelix generate: stage x failed (exit 3); its whole output: x.log"
    assert capfd.readouterr().err == ""  # printed once, by Python, on the way out: exit status 1


def test_build_codebook_checks_its_options_before_making_shards_or_loading(tmp_path):
    """In a fresh directory (the recipe's synthetic shards not made yet), a wrong option is the only line on
    stderr (no encoder notice before it) and nothing is written: checked before shards are made."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "kelix.cli", "build-codebook", "--config",
                          os.path.join(ROOT, "recipes/quickstart/tokenizer.yaml")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT, "KELIX_DEBUG": ""})
    assert out.returncode == 2 and out.stderr.splitlines() == [
        "kelix build-codebook: tokenizer.centroid_dim 64 is neither the patch width 32 nor the merged width 128"], \
        out.stderr
    assert not any(tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())
