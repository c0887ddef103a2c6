"""recipes/official/: each parses with the command its header documents, fits by its own estimate on the
release's sizes (config files of a stand-in ``kelix convert official`` output), and its header's Cost line
states what the estimate says."""

from __future__ import annotations

import glob
import os
import re

import pytest

from kelix.estimate.cli import estimate
from kelix.estimate.memory import GIB
from tests.llm.test_recipes import ROOT, documented_configs, printed_config

RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes/official/*.yaml")))
IDS = [os.path.basename(p) for p in RECIPES]


def test_there_are_the_three_official_recipes():
    assert IDS == ["dit_sft.yaml", "sft.yaml", "sft_lora.yaml"]


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_parses(path, monkeypatch, capsys):
    out = printed_config(path, monkeypatch, capsys)
    assert "precision: bf16-mixed" in out and "init_from: exports/kelix/" in out
    if "lora" in path:
        assert "lora:" in out and "r: 16" in out
    documented_configs(path)


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_fits_by_its_own_estimate_and_says_so(path, release):
    est = estimate([path])
    assert est.fits, f"{path}: {est.memory.total / GIB:.1f} GiB > {est.usable:.1f}"
    head = "".join(ln for ln in open(path) if ln.startswith("#"))
    cost = re.search(r"# Cost: +kelix estimate --config (\S+): (\d+) x 80 GB GPUs?, ([\d.]+) GiB", head)
    assert cost, f"{path}: no Cost line"
    assert os.path.relpath(path, ROOT) == cost.group(1)
    assert int(cost.group(2)) == est.shape.gpus
    assert float(cost.group(3)) == pytest.approx(est.memory.total / GIB, abs=0.05)
    step = re.search(r"([\d.]+) s per step at MFU 0.35", head.replace("\n#         ", " "))
    assert step and float(step.group(1)) == pytest.approx(est.step_s, rel=0.03)


def test_the_lora_recipe_trains_a_small_share(release):
    est = estimate([os.path.join(ROOT, "recipes/official/sft_lora.yaml")])
    trainable, frozen = sum(p.trainable for p in est.parts), sum(p.frozen for p in est.parts)
    assert 0 < trainable < 0.01 * frozen
    assert est.shape.gpus == 1 and est.shape.strategy == "single"


def test_full_sft_on_one_gpu_is_refused_with_fsdp2_and_lora_named(release, capsys):
    from kelix.estimate.cli import main

    path = os.path.join(ROOT, "recipes/official/sft.yaml")
    est = estimate([path], gpus=1)
    assert not est.fits
    knobs = dict(est.knobs)
    assert any(k.startswith("FSDP2 over ") for k in knobs)
    assert any(k.startswith("model.init_args.lora: {}") for k in knobs)  # LoRA alone fits one GPU
    assert main(["--config", path, "--gpus", "1"]) == 1
    assert "does not fit" in capsys.readouterr().out


def test_without_the_converted_release_the_estimate_says_what_is_missing(tmp_path, monkeypatch, capsys):
    from kelix.estimate.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["--config", os.path.join(ROOT, "recipes/official/sft_lora.yaml")]) == 2
    err = capsys.readouterr().err
    assert "init_from 'exports/kelix/llm' is not a Kelix LLM directory" in err and "kelix convert official" in err
