"""A sharded FSDP2 checkpoint -> HF-style directory loads back identical weights."""

import json

import pytest
import torch

from kelix.cli import main
from kelix.hf import TINY_QWEN3, load_causal_lm
from kelix.training.convert import read_sharded
from kelix.training.weights import load_weights, read_state_dict
from tests.distributed.conftest import STEPS
from tests.distributed.toy import ToyLM

pytestmark = pytest.mark.distributed


def test_sharded_checkpoint_to_hf_directory_loads_identical_weights(reference, tmp_path):
    saved = read_sharded(reference["ckpt"])  # what the 2 ranks wrote, gathered on one process
    assert main(["convert-checkpoint", "--ckpt", reference["ckpt"], "--out", str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["kelix_checkpoint"]["global_step"] == STEPS
    assert cfg["model"]["class_path"] == "tests.distributed.toy.ToyLM"  # from the run's config.yaml
    module = ToyLM()
    load_weights(module, str(tmp_path / "hf"))
    for k, v in module.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # a submodule alone: the Qwen3 backbone, loadable without the kit's module
    assert main(["convert-checkpoint", "--ckpt", reference["ckpt"], "--out", str(tmp_path / "lm"), "--prefix", "lm."]) == 0
    lm = load_causal_lm(config=TINY_QWEN3)
    load_weights(lm, str(tmp_path / "lm"))
    for k, v in lm.state_dict().items():
        assert torch.equal(v, saved["lm." + k]), k
    # init_from can read the sharded directory directly
    assert read_state_dict(reference["ckpt"]).keys() == saved.keys()
