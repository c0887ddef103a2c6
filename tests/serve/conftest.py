"""A tiny saved pipeline (one per session) and real servers on loopback ports (uvicorn in a thread)."""

from __future__ import annotations

import base64
import io

import pytest

from kelix.serve.background import BackgroundServer as Running  # noqa: F401 - the tests' name
from tests.test_pipeline import build_parts

KEY = "sk-kelix-test"
TINY = dict(condition_size=56, image_size=32, steps=2, dit_cfg_scale=2.0)


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    """The tiny pipeline saved, its LLM as after some training (greedy answers vary with the input)."""
    from kelix.llm.model import KelixLM
    from kelix.pipeline import KelixPipeline
    from tests.llm.conftest import stand_in_training

    root = tmp_path_factory.mktemp("pipe")
    parts = build_parts(root)
    lm = KelixLM.from_pretrained(parts["llm"])
    stand_in_training(lm)
    lm.save_pretrained(str(root / "trained_llm"))
    out = str(root / "pipe")
    KelixPipeline.from_pretrained(**{**parts, "llm": str(root / "trained_llm")}, **TINY).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def pipe(pipeline_dir):
    from kelix.pipeline import KelixPipeline

    return KelixPipeline.from_pretrained(pipeline_dir)


def data_url(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"
