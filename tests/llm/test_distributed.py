"""The stage-1 recipe under FSDP2 on 2 CPU ranks (bf16 autocast, activation checkpointing): the frozen
backbone stays bit-identical, the trained parts move, and export_dir gathers the sharded weights."""

import json
import os

import pytest
import torch
import yaml

from tests.distributed import launch

from .test_recipes import ROOT

pytestmark = pytest.mark.distributed


def test_stage1_under_fsdp2_exports_gathered_weights(tmp_path, tok_dir, backbone_dir, plain_lm):
    from kelix.llm.model import KelixLM

    cfg = yaml.safe_load(open(os.path.join(ROOT, "recipes/quickstart/llm.yaml")))
    lm = cfg["model"]["init_args"]["lm"]
    lm.pop("backbone_config")
    lm.update(backbone=backbone_dir, image_tokenizer=tok_dir)
    cfg["model"]["init_args"].update(activation_checkpointing=True, fsdp_param_dtype="bfloat16",
                                     export_dir=str(tmp_path / "export"), sample_every_n_steps=0)
    cfg["trainer"].update(devices=2, precision="bf16-mixed", max_steps=2, log_every_n_steps=1, limit_val_batches=0,
                          enable_progress_bar=False, enable_model_summary=False,
                          strategy={"class_path": "kelix.training.parallel.FSDP2Strategy"})
    data = cfg["data"]["init_args"]
    data.update(batch_size=4, num_workers=0, shuffle_buffer=8)
    with open(os.path.join(tok_dir, "config.json")) as f:
        data["processor"]["init_args"]["K"] = json.load(f)["K"]  # this test's tiny tokenizer, not the recipe's
    tasks = sorted({s["name"] for s in data["train"]})  # the recipe's own mixture
    data["synthetic"].update(out_dir=str(tmp_path / "syn"), samples_per_shard=8, tasks=tasks)
    data["train"] = [dict(s, shards=str(tmp_path / "syn" / os.path.basename(s["shards"]))) for s in data["train"]]
    data["val"] = None
    path = tmp_path / "llm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert launch.run(["--config", str(path)], tmp_path, timeout=400) == [0, 0], launch.logs(tmp_path)

    out = KelixLM.from_pretrained(tmp_path / "export")
    got, plain = out.backbone.state_dict(), plain_lm.state_dict()
    layers = [k for k in plain if k.startswith("model.layers.") or k == "model.norm.weight"]
    assert layers and all(torch.equal(got[k], plain[k]) for k in layers)  # frozen: bit-identical
    text = plain["model.embed_tokens.weight"]
    assert torch.equal(got["model.embed_tokens.weight"][: text.shape[0]], text)
    assert not torch.equal(got["lm_head.weight"][: text.shape[0]], plain["lm_head.weight"])  # trained
    assert out.visual is not None and out.config.visual_input == "projector"
    assert not torch.equal(out.decoder.proj_out.weight, torch.zeros_like(out.decoder.proj_out.weight))
    # the sharded checkpoint (one file per rank) converts to the same model
    from kelix.llm.export import main as export_main

    sharded = tmp_path / "runs/llm/version_0/checkpoints/last.ckpt"
    assert (sharded / ".metadata").is_file()
    assert export_main(["--ckpt", str(sharded), "--out", str(tmp_path / "from_ckpt")]) == 0
    again = KelixLM.from_pretrained(tmp_path / "from_ckpt").state_dict()
    want = out.state_dict()
    assert again.keys() == want.keys() and all(torch.equal(again[k], want[k]) for k in want)
