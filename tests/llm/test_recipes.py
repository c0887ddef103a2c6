"""Every LLM recipe parses with the command its header documents, and the quickstart chain runs:
stage 1 (tokenizer encodes pixels in the module) -> export -> stage 2.2 (unify, completion-only) ->
export, then ``kelix export-llm`` on the checkpoint."""

import glob
import os
import re
import shlex

import pytest
import torch

from kelix.training.cli import run_lightning_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes/llm/**/*.yaml"), recursive=True)
                 + glob.glob(os.path.join(ROOT, "recipes/quickstart/llm*.yaml")))


def documented_configs(path: str) -> list[str]:
    """The ``--config`` files of the recipe header's ``# Run:`` line."""
    head = [ln for ln in open(path) if ln.startswith("#")]
    run = next((ln for ln in head if ln.startswith("# Run:")), None)
    assert run is not None, f"{path}: the header has no '# Run:' line"
    words = shlex.split(run[len("# Run:"):])
    assert words[:2] == ["kelix", "fit"], run
    configs = [words[i + 1] for i, w in enumerate(words) if w == "--config"]
    assert os.path.relpath(path, ROOT) in configs, f"{path}: its Run line does not use it"
    assert any(re.match(r"# (Reads|Writes):", ln) for ln in head), f"{path}: header says nothing of its inputs/outputs"
    return configs


def printed_config(path: str, monkeypatch, capsys) -> str:
    """``kelix fit --print_config`` of the recipe's documented command (from the repository root): its output."""
    monkeypatch.chdir(ROOT)
    args = ["fit"] + [a for c in documented_configs(path) for a in ("--config", c)] + ["--print_config"]
    with pytest.raises(SystemExit) as e:
        run_lightning_cli(args)
    assert e.value.code in (0, None)
    return capsys.readouterr().out


def test_there_are_recipes_for_every_stage():
    names = {os.path.relpath(p, ROOT) for p in RECIPES}
    for stage in ("stage1_align", "stage2_1_interleaved", "stage2_2_multitask", "stage3_anneal", "stage4_sft"):
        assert f"recipes/llm/{stage}.yaml" in names
    assert "recipes/quickstart/llm.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.relpath(p, ROOT) for p in RECIPES])
def test_recipe_parses(path, monkeypatch, capsys):
    out = printed_config(path, monkeypatch, capsys)
    assert "class_path: kelix.llm.module.UnifiedLLMModule" in out
    assert "class_path: kelix.llm.data.LLMProcessor" in out
    if "recipes/llm/stage" in path:
        assert "precision: bf16-mixed" in out and "kelix.training.parallel.FSDP2Strategy" in out
        import yaml

        cfg = yaml.safe_load(out)  # the budget stop reaches the DataBudget callback (Table 5's tokens)
        assert cfg["budget"]["max_tokens"] > 0 and cfg["model"]["init_args"]["optim"]["grad_clip_algorithm"] == "value"


def _fit(recipe, *extra):
    small = ["--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
             "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
             "--data.init_args.shuffle_buffer", "8", "--data.init_args.synthetic.samples_per_shard", "8",
             "--model.init_args.sample_every_n_steps", "2"]
    run_lightning_cli(["fit", "--config", os.path.join(ROOT, recipe), *small, *extra])


def test_quickstart_chain(tmp_path, monkeypatch, image_tokenizer):
    from kelix.llm.export import main as export_main
    from kelix.llm.model import KelixLM

    monkeypatch.chdir(tmp_path)
    image_tokenizer.save_pretrained("runs/tokenizer/export")  # what the tokenizer quickstart exports
    k = ["--data.init_args.processor.init_args.K", str(image_tokenizer.config.K)]  # this tiny tokenizer's K
    _fit("recipes/quickstart/llm.yaml", *k)
    s1 = KelixLM.from_pretrained("runs/llm/export")
    assert s1.visual is not None and s1.config.visual_input == "projector"
    # in this process, not the recipe's 2 CPU processes (a DDP launch would start pytest again)
    _fit("recipes/quickstart/llm_stage2_2.yaml", *k, "--trainer.devices", "1", "--trainer.strategy", "auto")
    s2 = KelixLM.from_pretrained("runs/llm_stage2_2/export")
    assert s2.visual is None and s2.vocab == s1.vocab
    # stage 2.2 trained every part: the backbone's layers moved away from stage 1's
    a, b = s1.backbone.state_dict(), s2.backbone.state_dict()
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])
    events = glob.glob("runs/llm_stage2_2/version_0/events.out.tfevents.*")
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(events[0])
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/nll_text", "train/nll_visual", "perf/tokens_per_s", "val/loss"} <= scalars
    # the run's cumulative samples and tokens (LLM positions), Table 5's units
    assert {"data/samples", "data/tokens"} <= scalars
    tokens = [e.value for e in ea.Scalars("data/tokens")]
    assert tokens == sorted(tokens) and tokens[-1] > 0
    assert "train/sample/text_summary" in ea.Tags()["tensors"]
    # the checkpoint converts to the same directory
    ckpt = glob.glob("runs/llm_stage2_2/version_0/checkpoints/last*.ckpt")
    assert ckpt, os.listdir("runs/llm_stage2_2/version_0")
    assert export_main(["--ckpt", ckpt[0], "--out", "exported"]) == 0
    s3 = KelixLM.from_pretrained("exported")
    sd2, sd3 = s2.state_dict(), s3.state_dict()
    assert sd2.keys() == sd3.keys() and all(torch.equal(sd2[k], sd3[k]) for k in sd2)
    # a next stage may also start from the checkpoint itself: it carries the model's config
    from kelix.llm.module import UnifiedLLMModule

    sd4 = UnifiedLLMModule(init_from=ckpt[0]).lm.state_dict()
    assert all(torch.equal(sd2[k], sd4[k]) for k in sd2)
