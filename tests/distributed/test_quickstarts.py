"""Every quickstart recipe trains 2 steps under FSDP2 on 2 CPU ranks, with bf16 autocast, activation
checkpointing and gradient accumulation switched on from the command line (only the recipe changes).

The recipes chain as in the quickstart: the tokenizer's export feeds the LLM, whose export feeds stage 2.2.
"""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from kelix.cli import main
from kelix.data.synthetic import SyntheticData
from tests.distributed import launch

pytestmark = pytest.mark.distributed
RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "quickstart")
SCALE = ["--trainer.devices", "2", "--trainer.strategy", "fsdp2", "--trainer.max_steps", "2",
         "--trainer.accumulate_grad_batches", "2", "--trainer.precision", "bf16-mixed",
         "--model.init_args.activation_checkpointing", "true", "--model.init_args.fsdp_param_dtype", "bfloat16",
         "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
         "--data.init_args.synthetic.samples_per_shard", "16"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("quickstarts")


def fit(work, name: str, *extra: str):
    recipe = os.path.abspath(os.path.join(RECIPES, f"{name}.yaml"))
    for f in os.listdir(work):
        if f.endswith(".log"):
            os.remove(os.path.join(work, f))
    assert launch.run(["--config", recipe, *SCALE, *extra], work) == [0, 0], launch.logs(work)
    ckpt = os.path.join(work, "runs", name, "version_0", "checkpoints", "last.ckpt")
    assert sorted(f for f in os.listdir(ckpt) if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert torch.load(os.path.join(ckpt, "meta.pt"), weights_only=True)["global_step"] == 2
    return ckpt


def test_tokenizer(work):
    recipe = os.path.abspath(os.path.join(RECIPES, "tokenizer.yaml"))
    syn = yaml.safe_load(open(recipe))["data"]["init_args"]["synthetic"]
    data = work / "data" / "synthetic"  # the recipe's paths are relative to the run directory
    SyntheticData(**dict(syn, out_dir=str(data), samples_per_shard=16)).ensure()
    assert main(["build-codebook", "--config", recipe, "--feature", "input", "--max-images", "16", "--niter", "5",
                 "--num-workers", "0", "--shards", str(data / "vqa-*.tar"), str(data / "ocr-*.tar"),
                 "--out", str(work / "runs/tokenizer/codebook.safetensors")]) == 0
    ckpt = fit(work, "tokenizer")
    assert main(["export-tokenizer", "--ckpt", ckpt, "--out", str(work / "runs/tokenizer/export"), "--config", recipe]) == 0


def test_llm_stage1_then_stage2_2(work):
    fit(work, "llm")
    assert os.path.isfile(work / "runs/llm/export/config.json")
    fit(work, "llm_stage2_2")


def test_dit(work):
    fit(work, "dit", "--model.init_args.sample_every_n_steps", "0")
