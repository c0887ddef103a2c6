"""The end-to-end pipeline from exported directories: round trip, understanding, generation, verbs."""

import json

import pytest
import torch
from PIL import Image

from kelix.cli import main
from kelix.pipeline import KelixPipeline, PipelineConfig
from tests.dit.conftest import TINY_SANA


def build_parts(root) -> dict[str, str]:
    """Tiny random tokenizer, LLM and DiT under ``root``, exported as their verbs would write them."""
    from kelix.dit.export import save_vae
    from kelix.dit.model import DiTConfig, KelixDiT
    from kelix.dit.vae import VAEConfig, load_vae
    from kelix.hf import TINY_QWEN3
    from kelix.llm.model import KelixLM, LLMConfig
    from kelix.tokenizer.model import KelixTokenizer, tiny_config

    torch.manual_seed(0)
    KelixTokenizer(tiny_config()).save_pretrained(root / "tokenizer")
    KelixLM(LLMConfig(backbone_config=TINY_QWEN3, text_tokenizer="builtin:bytes", image_tokenizer=str(root / "tokenizer"),
                      decoder_width=32, decoder_heads=2, decoder_ffn=64)).save_pretrained(root / "llm")
    KelixDiT(DiTConfig(cond_dim=TINY_QWEN3["hidden_size"], transformer=dict(TINY_SANA))).save_pretrained(root / "dit")
    save_vae(load_vae(VAEConfig()), str(root / "dit" / "vae"))
    (root / "dit" / "flow.json").write_text(json.dumps({"shift": 3.0}))
    return {k: str(root / k) for k in ("tokenizer", "llm", "dit")}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_parts(tmp_path_factory.mktemp("parts"))


@pytest.fixture(scope="module")
def pipe(parts):
    cfg = dict(condition_size=56, image_size=32, steps=2, dit_cfg_scale=2.0)
    return KelixPipeline.from_pretrained(**parts, **cfg)


@pytest.fixture
def picture():
    img = Image.new("RGB", (70, 50), "white")
    img.paste((200, 30, 30), (10, 10, 40, 40))
    return img


def test_understand_matches_the_parts_run_by_hand(pipe, picture):
    from kelix.llm.generate import Sampling, generate_text, understanding_doc

    answer = pipe.understand(picture, "What color is the square?", max_new_tokens=8)
    codes = pipe.tokenizer.encode([picture])
    ids = generate_text(pipe.lm, [understanding_doc(pipe.lm, "What color is the square?", codes)], 8,
                        Sampling(temperature=0))[0]
    assert answer == pipe.lm.text_tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_generate_is_deterministic_and_sized(pipe):
    a = pipe.generate("a red circle", seed=3)
    b = pipe.generate("a red circle", seed=3)
    assert isinstance(a, Image.Image) and a.size == (32, 32)
    assert list(a.getdata()) == list(b.getdata())
    two = pipe.generate(["a red circle", "a blue square"], size=16, seed=3)
    assert [im.size for im in two] == [(16, 16), (16, 16)]
    assert pipe.grid == (2, 2)  # 56 px / (patch 14 * merge 2)


def test_round_trip_through_a_pipeline_directory(pipe, picture, tmp_path):
    pipe.save_pretrained(str(tmp_path / "pipe"))
    again = KelixPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert again.config == pipe.config
    assert again.understand(picture, "Describe.", max_new_tokens=6) == pipe.understand(picture, "Describe.", max_new_tokens=6)
    assert list(again.generate("x", seed=1).getdata()) == list(pipe.generate("x", seed=1).getdata())


def test_chat_and_generate_verbs(pipe, picture, tmp_path, capsys):
    pipe.save_pretrained(str(tmp_path / "pipe"))
    picture.save(tmp_path / "in.png")
    assert main(["chat", "--pipeline", str(tmp_path / "pipe"), "--image", str(tmp_path / "in.png"),
                 "--max-new-tokens", "6", "Describe."]) == 0
    assert capsys.readouterr().out.strip() == pipe.understand(picture, "Describe.", max_new_tokens=6)
    assert main(["generate", "--pipeline", str(tmp_path / "pipe"), "--out", str(tmp_path / "o.png"), "--size", "16",
                 "a cat"]) == 0
    assert Image.open(tmp_path / "o.png").size == (16, 16)


def test_bad_inputs_are_named(parts, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no pipeline.json"):
        KelixPipeline.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="llm directory '/nope' does not exist"):
        KelixPipeline.from_pretrained(tokenizer=parts["tokenizer"], llm="/nope")
    with pytest.raises(ValueError, match="condition_size 50 is not a multiple of patch\\*merge 28"):
        KelixPipeline.from_pretrained(**parts, condition_size=50)
    no_dit = KelixPipeline.from_pretrained(tokenizer=parts["tokenizer"], llm=parts["llm"])
    with pytest.raises(ValueError, match="no DiT"):
        no_dit.generate("x")
    assert isinstance(no_dit.config, PipelineConfig)


def test_chat_and_generate_reach_the_terminal_without_warnings(pipe, picture, tmp_path, capfd):
    """No Python warning (errors here) and nothing on stderr from the libraries but progress bars."""
    import warnings

    from transformers.utils import logging as hf_logging

    pipe.save_pretrained(str(tmp_path / "pipe"))
    picture.save(tmp_path / "in.png")
    hf_logging.warning_once.cache_clear()
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["chat", "--pipeline", str(tmp_path / "pipe"), "--image", str(tmp_path / "in.png"),
                     "--max-new-tokens", "4", "Describe."]) == 0
        assert main(["generate", "--pipeline", str(tmp_path / "pipe"), "--out", str(tmp_path / "o.png"),
                     "--size", "16", "--llm-cfg-scale", "2", "a cat"]) == 0
    err = capfd.readouterr().err
    # transformers 5 draws "Loading weights" on every from_pretrained: off by its own switch (kelix.console.quiet)
    assert not any(k in err for k in ("Loading", "Warning", "deprecated")), err
    noise = [line for line in err.replace("\r", "\n").splitlines()
             if line.strip() and not any(k in line for k in ("blocks", "rendering"))]
    assert noise == []  # the kit's own bars only


def test_chat_leaves_the_pipelines_dit_unloaded(pipe, picture, tmp_path, monkeypatch, capsys):
    """Understanding never touches the DiT: `kelix chat` and ``dit=False`` do not load it (nor diffusers)."""
    import kelix.dit.export

    pipe.save_pretrained(str(tmp_path / "pipe"))
    picture.save(tmp_path / "in.png")

    def refuse(*args, **kwargs):
        raise AssertionError("the DiT was loaded")

    monkeypatch.setattr(kelix.dit.export, "load_detokenizer", refuse)
    assert KelixPipeline.from_pretrained(str(tmp_path / "pipe"), dit=False).detokenizer is None
    capsys.readouterr()
    assert main(["chat", "--pipeline", str(tmp_path / "pipe"), "--image", str(tmp_path / "in.png"),
                 "--max-new-tokens", "6", "Describe."]) == 0
    assert capsys.readouterr().out.strip() == pipe.understand(picture, "Describe.", max_new_tokens=6)
    with pytest.raises(AssertionError, match="the DiT was loaded"):  # generate still loads it
        main(["generate", "--pipeline", str(tmp_path / "pipe"), "--out", str(tmp_path / "o.png"), "a cat"])


def test_modules_are_hidden_only_while_loading():
    import importlib
    import sys

    from kelix.pipeline_cli import _without

    name = "tabnanny"  # a stdlib module nothing here imports
    sys.modules.pop(name, None)
    with _without(name, "json"):
        with pytest.raises(ImportError):
            importlib.import_module(name)
        import json  # already imported: not hidden

        assert json.loads("1") == 1
    assert importlib.import_module(name).__name__ == name
