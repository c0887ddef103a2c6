"""A tiny saved pipeline and a real server on a loopback port (uvicorn in a thread), shared per module."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import pytest

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server on a thread: ``url``, ``app``, and ``stop()``."""

    def __init__(self, pipe, cfg):
        import uvicorn

        from kelix.serve.app import build_app

        self.app = build_app(pipe, cfg)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def data_url(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"
