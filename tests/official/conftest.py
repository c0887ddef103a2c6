"""The official-release fixture: ``KELIX_OFFICIAL_FIXTURE`` (default: tests/fixtures/official), converted
once per session. Nothing here knows the fixture's sizes: they come from its config and reference files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

DEFAULT = Path(__file__).resolve().parents[1] / "fixtures" / "official"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    d = Path(os.environ.get("KELIX_OFFICIAL_FIXTURE", DEFAULT))
    if not (d / "sft" / "config.json").is_file():
        raise FileNotFoundError(f"KELIX_OFFICIAL_FIXTURE {d} is not an official-release fixture (no sft/config.json)")
    return d


@pytest.fixture(scope="session")
def reference(fixture_dir):
    """(reference.json, reference.safetensors as float32 tensors)."""
    from safetensors.torch import load_file

    with open(fixture_dir / "reference.json") as f:
        meta = json.load(f)
    return meta, {k: v.float() if v.is_floating_point() else v
                  for k, v in load_file(fixture_dir / "reference.safetensors").items()}


@pytest.fixture(scope="session")
def converted(fixture_dir, tmp_path_factory) -> Path:
    """The fixture's SFT release converted into a kit pipeline directory (bf16, as released)."""
    from kelix.official.convert import convert_official

    out = tmp_path_factory.mktemp("converted") / "pipe"
    convert_official(str(fixture_dir / "sft"), str(out), progress=False)
    return out


@pytest.fixture(scope="session")
def kit_tokenizer(converted):
    from kelix.tokenizer.model import KelixTokenizer

    return KelixTokenizer.from_pretrained(str(converted / "tokenizer")).float().eval()


@pytest.fixture(scope="session")
def kit_lm(converted):
    from kelix.llm.model import KelixLM

    torch.manual_seed(0)
    return KelixLM.from_pretrained(str(converted / "llm"), dtype="float32", attn_implementation="eager").eval()
