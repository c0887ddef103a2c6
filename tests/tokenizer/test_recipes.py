"""Every tokenizer recipe parses with its documented command; the quickstart trains a few steps, then
its checkpoint exports, loads, and pre-tokenizes shards."""

import glob
import os
import shlex

import numpy as np
import pytest
import torch
import yaml

from kelix.training.cli import run_lightning_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes/tokenizer/*.yaml"))) + [
    os.path.join(ROOT, "recipes/quickstart/tokenizer.yaml")]


def test_there_is_a_recipe_for_every_stage():
    names = {os.path.relpath(p, ROOT) for p in RECIPES}
    assert {f"recipes/tokenizer/{s}.yaml" for s in ("stage1_align", "stage2_pretrain", "stage3_anneal")} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.relpath(p, ROOT) for p in RECIPES])
def test_recipe_parses(path, monkeypatch, capsys):
    head = [ln for ln in open(path) if ln.startswith("#")]
    assert any(ln.startswith("# Reads:") for ln in head) and any(ln.startswith("# Writes:") for ln in head)
    assert any(ln.startswith("# Run:") for ln in head)
    header = " ".join(w for ln in head for w in shlex.split(ln.lstrip("#")))
    assert f"kelix fit --config {os.path.relpath(path, ROOT)}" in header  # the documented command
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        run_lightning_cli(["fit", "--config", path, "--print_config"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: kelix.tokenizer.module.TokenizerModule" in out
    assert "class_path: kelix.tokenizer.data.TokenizerProcessor" in out
    if "recipes/tokenizer/" in path:
        assert "SigLIP-so400m (patch 14, width 1152) STANDS IN for the vision encoder of the paper" in header
        assert "NaViT" in header
        assert "precision: bf16-mixed" in out and "kelix.training.parallel.FSDP2Strategy" in out
        assert "N: 8" in out and "K: 8192" in out and "d: 128" in out


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    ea.Reload()
    return {t: [e.value for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def test_quickstart_trains_exports_and_pretokenizes(tmp_path, monkeypatch):
    from kelix.data.stream import ShardStream
    from kelix.data.synthetic import SyntheticData
    from kelix.tokenizer.codebook import main as codebook_main
    from kelix.tokenizer.export import main as export_main
    from kelix.tokenizer.model import KelixTokenizer
    from kelix.tokenizer.pretokenize import main as tokenize_main

    monkeypatch.chdir(tmp_path)
    recipe = os.path.join(ROOT, "recipes/quickstart/tokenizer.yaml")
    syn = yaml.safe_load(open(recipe))["data"]["init_args"]["synthetic"]
    SyntheticData(**dict(syn, samples_per_shard=8)).ensure()
    # paper 4.2.1, as the quickstart runs it: k-means of the tokenizer's own features first
    assert codebook_main(["--config", recipe, "--feature", "input", "--max-images", "16", "--niter", "5",
                          "--num-workers", "0"]) == 0
    run_lightning_cli([
        "fit", "--config", recipe,
        "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "6",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--model.init_args.usage_window", "3",
        "--model.init_args.histogram_every", "3", "--data.init_args.batch_size", "4",
        "--data.init_args.num_workers", "0", "--data.init_args.shuffle_buffer", "8",
        "--data.init_args.synthetic.samples_per_shard", "8"])
    s = _scalars("runs/tokenizer/version_0")
    for tag in ("train/loss", "train/ntp", "train/vq", "train/vq_commitment", "val/loss", "codebook/usage_0",
                "codebook/perplexity_3", "codebook/dead_mean", "val_codebook/usage_min"):
        assert tag in s, tag
    assert all(0 < u <= 1 for u in s["codebook/usage_0"])

    # the checkpoint exports to the same tokenizer that fit wrote at its end (export_dir)
    ckpt = glob.glob("runs/tokenizer/version_0/checkpoints/last*.ckpt")[0]
    assert export_main(["--ckpt", ckpt, "--out", "exported"]) == 0
    a, b = KelixTokenizer.from_pretrained("exported"), KelixTokenizer.from_pretrained("runs/tokenizer/export")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(k.startswith("aux_lm") for k in sa)
    assert "quantizer.codebook.vectors" in sa and not any("centroids" in k for k in sa)  # the projected codebook

    # pre-tokenized shards carry codes equal to encode() of the same pixels
    assert tokenize_main(["--tokenizer", "exported", "--shards", "data/synthetic/caption-00000.tar",
                          "data/synthetic/ocr-00000.tar", "--out", "tok", "--batch-size", "3"]) == 0
    samples = list(ShardStream(["tok/caption-00000.tar", "tok/ocr-00000.tar"], shuffle_buffer=1, repeat=False))
    assert len(samples) == 16
    for smp in samples[:4] + samples[-2:]:
        img = smp.images[0]
        assert img.pixels is not None and img.codes.dtype == np.int16
        assert np.array_equal(img.codes, a.encode([img.pixels])[0].numpy())
    assert tokenize_main(["--tokenizer", "exported", "--shards", "data/synthetic/caption-00000.tar", "--out", "tok2",
                          "--drop-pixels"]) == 0
    dropped = list(ShardStream(["tok2/caption-00000.tar"], shuffle_buffer=1, repeat=False))
    assert dropped[0].images[0].pixels is None and dropped[0].images[0].codes.shape[-1] == 4
