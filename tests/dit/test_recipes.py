"""Every DiT recipe parses (`kelix fit --config X --print_config`): paper scale (local paths that do not
exist here: loading happens at instantiation) and the CPU quickstart."""

import pathlib

import pytest
import yaml

from kelix.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes" / "dit").glob("*.yaml")) + [ROOT / "recipes" / "quickstart" / "dit.yaml"]


def test_the_recipes_exist():
    assert {p.name for p in RECIPES} == {"pretrain.yaml", "pretrain_precomputed.yaml", "sft.yaml", "dit.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert e.value.code in (None, 0)
    cfg = yaml.safe_load(capsys.readouterr().out)
    model, proc = cfg["model"]["init_args"], cfg["data"]["init_args"]["processor"]["init_args"]
    assert cfg["model"]["class_path"] == "kelix.dit.module.DiTModule"
    assert proc["max_condition_length"] == model["dit"]["max_condition_length"]  # interpolated
    assert model["flow"]["shift"] == 3.0
    if recipe.parent.name == "dit":
        assert cfg["trainer"]["precision"] == "bf16-mixed"
        assert cfg["trainer"]["strategy"]["class_path"] == "kelix.training.parallel.FSDP2Strategy"
        assert proc["target_size"] == 1024 and model["dit"]["cond_dim"] == 4096
    if recipe.name == "pretrain.yaml":
        assert proc["aspect_range"] == [0.67, 1.5] and proc["condition_size"] == 504
    if recipe.name == "sft.yaml":  # the official SFT's filter (train_sft_sana.json)
        assert proc["aspect_range"] == [0.9090909, 1.1] and (proc["min_source_side"], proc["max_source_side"]) == (512, 1536)
    if recipe.parent.name == "dit":  # as the official runs: no EMA, clipping by value
        assert model["ema_decay"] is None and model["optim"]["grad_clip_algorithm"] == "value"


def test_the_sft_recipe_makes_1024_px_square_targets_of_near_square_sources(capsys):
    """The SFT recipe's processor, as parsed: 1024x1024 targets (paper 4.4.2) from sources of aspect
    1/1.1-1.1 with sides of 512 to 1,536 px (the official SFT's filter), and the 504-px condition image."""
    from PIL import Image as PILImage

    from kelix.data.schema import Image, Part, Sample, SampleError, Turn
    from kelix.dit.data import DiTProcessor

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "recipes/dit/sft.yaml"), "--print_config"])
    proc = DiTProcessor(**yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["processor"]["init_args"])

    def t2i(w, h):
        img = Image("0.jpg", PILImage.new("RGB", (w, h), (200, 30, 30)))
        return Sample(f"{w}x{h}", "s.tar", "messages", [Turn("user", [Part("text", text="a red square")]),
                                                         Turn("assistant", [Part("image", image=img)])], "t2i")

    for w, h in ((1100, 1000), (1024, 1024), (512, 512), (1400, 1536)):
        item = proc(t2i(w, h))
        assert item["pixels"].shape == (3, 1024, 1024) and item["cond_image"].size == (504, 504), (w, h)
    for (w, h), reason in (((1536, 1024), "aspect_ratio"), ((500, 500), "too_small"), ((2048, 2048), "too_large")):
        with pytest.raises(SampleError) as e:
            proc(t2i(w, h))
        assert e.value.reason == reason


def test_the_quickstart_overlay_conditions_on_the_llm(capsys):
    """recipes/quickstart/dit_on_llm.yaml merged over dit.yaml, as its header's Run line does."""
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "recipes/quickstart/dit.yaml"),
              "--config", str(ROOT / "recipes/quickstart/dit_on_llm.yaml"), "--print_config"])
    assert e.value.code in (None, 0)
    cfg = yaml.safe_load(capsys.readouterr().out)
    model, proc = cfg["model"]["init_args"], cfg["data"]["init_args"]["processor"]["init_args"]
    assert model["condition"] == {"class_path": "kelix.dit.conditions.LLMConditions", "init_args": {
        "lm": "runs/llm_stage2_2/export", "tokenizer": "runs/tokenizer/export", "include_markers": True,
        "dtype": "float32", "include_end": False, "pad_to": None}}  # the kit's condition range, not the release's
    assert model["dit"]["cond_dim"] == 128 and (proc["condition"], proc["condition_size"]) == ("llm", 84)
    assert model["vae"]["kind"] == "pixel"  # kept from dit.yaml
