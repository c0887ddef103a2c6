"""LoRA under FSDP2 on 2 gloo CPU ranks through ``kelix fit``: the sharded checkpoint holds the adapters and the
trainable rest only, ``--ckpt_path last`` resumes, and the merged export keeps the LM head's text rows and the
embedding table bit-identical while the visual rows and the adapted weights moved."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import text_records, write_shard

pytestmark = [pytest.mark.slow, pytest.mark.distributed]  # two 2-process fits: about two minutes on 2 cores


def _fit(tmp_path, base_dir, steps: int, *extra):
    recipe = {
        "name": "run", "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 2, "precision": "32", "max_steps": steps, "log_every_n_steps": 1,
                    "strategy": {"class_path": "kelix.training.parallel.FSDP2Strategy"},
                    "enable_progress_bar": False, "enable_model_summary": False},
        "checkpoint": {"every_n_train_steps": 2},
        "model": {"class_path": "kelix.llm.module.UnifiedLLMModule", "init_args": {
            "init_from": base_dir, "export_dir": str(tmp_path / "export"),
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "train_visual_head": True},
            "optim": {"lr": 1e-2, "warmup_steps": 1, "weight_decay": 0.1}}},
        "data": {"class_path": "kelix.data.datamodule.ShardDataModule", "init_args": {
            "train": str(tmp_path / "t-{0..1}.tar"), "batch_size": 2, "num_workers": 0, "shuffle_buffer": 8,
            "processor": {"class_path": "kelix.llm.data.LLMProcessor",
                          "init_args": {"text_tokenizer": base_dir, "N": 4, "K": 32, "max_blocks": 48}}}},
    }
    path = tmp_path / f"r{steps}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "kelix.cli", "fit", "--config", str(path), *extra], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_lora_under_fsdp2_checkpoints_resumes_and_exports(base_dir, tmp_path):
    from kelix.llm.model import KelixLM
    from kelix.training.convert import read_sharded

    for i in range(2):
        write_shard(tmp_path / f"t-{i}.tar", text_records(f"t{i}_", 24))
    _fit(tmp_path, base_dir, 4)
    last = tmp_path / "runs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    keys = list(read_sharded(str(last), "state_dict."))
    assert any(".lora_A." in k for k in keys) and "lm.backbone.lm_head.weight" in keys
    assert not any("base_layer" in k or "embed_tokens" in k for k in keys)
    _fit(tmp_path, base_dir, 6, "--ckpt_path", "last")
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 6
    base, out = KelixLM.from_pretrained(base_dir), KelixLM.from_pretrained(tmp_path / "export")
    vo = base.vocab.visual_offset
    assert torch.equal(base.lm_head.weight[:vo], out.lm_head.weight[:vo])
    assert not torch.equal(base.lm_head.weight[vo:], out.lm_head.weight[vo:])
    assert torch.equal(base.backbone.get_input_embeddings().weight, out.backbone.get_input_embeddings().weight)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base.backbone.state_dict()[q], out.backbone.state_dict()[q])
