"""Tiny tokenizer artifacts shared by the tokenizer tests (built once per session)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def pil_images():
    """Random RGB images of different sizes and aspect ratios (native-resolution paths)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            for h, w in [(60, 90), (120, 70), (56, 56), (100, 100)]]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from kelix.tokenizer.model import KelixTokenizer, tiny_config

    torch.manual_seed(0)
    return KelixTokenizer(tiny_config()).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    tiny_tokenizer.save_pretrained(out)
    return out
