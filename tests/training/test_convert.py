"""convert-checkpoint on a consolidated .ckpt (the sharded case is in tests/distributed/test_convert.py)."""

import json

import pytest
import torch

from kelix.cli import main
from kelix.training.weights import load_weights, read_state_dict


def lightning_ckpt(path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    sd = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": sd, "global_step": 12, "epoch": 0, "optimizer_states": [{"state": {}}],
                "kelix_llm": {"config": {"N": 4}}}, path)
    return net, sd


def test_ckpt_file_to_hf_directory_and_back(tmp_path):
    net, sd = lightning_ckpt(tmp_path / "last.ckpt")
    assert main(["convert-checkpoint", "--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "hf"), "--prefix", "net."]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["kelix_checkpoint"]["global_step"] == 12 and cfg["kelix_llm"] == {"config": {"N": 4}}
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    load_weights(fresh, str(tmp_path / "hf"))
    for k, v in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_ckpt_format_and_dtype(tmp_path):
    _, sd = lightning_ckpt(tmp_path / "last.ckpt")
    out = tmp_path / "w.ckpt"
    assert main(["convert-checkpoint", "--ckpt", str(tmp_path / "last.ckpt"), "--out", str(out), "--format", "ckpt", "--dtype", "bfloat16"]) == 0
    ck = torch.load(out, weights_only=True)
    assert "optimizer_states" not in ck and ck["kelix_llm"] == {"config": {"N": 4}}
    assert all(v.dtype == torch.bfloat16 for v in ck["state_dict"].values())
    assert read_state_dict(str(out)).keys() == sd.keys()


def test_bad_inputs_fail_clearly(tmp_path, capfd):
    with pytest.raises(SystemExit) as e:  # one line, exit 2 (kelix.console.errors)
        main(["convert-checkpoint", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "checkpoint not found" in capfd.readouterr().err
    lightning_ckpt(tmp_path / "last.ckpt")
    with pytest.raises(SystemExit):
        main(["convert-checkpoint", "--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "out"), "--prefix", "lm."])
    assert "no weight starts with --prefix 'lm.'" in capfd.readouterr().err
