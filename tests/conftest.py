"""Shared fixtures: small synthetic shards and a writer for hand-made (possibly broken) shards."""

from __future__ import annotations

import io
import json
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_shard(path, records: list[dict]) -> str:
    """Write a tar shard from records of ``{"__key__": ..., "<ext>": bytes|str|dict}`` exactly as given."""
    from webdataset import TarWriter

    with TarWriter(str(path), encoder=False) as sink:
        for r in records:
            out = {}
            for k, v in r.items():
                if k == "__key__":
                    out[k] = v
                elif isinstance(v, dict | list):
                    out[k] = json.dumps(v).encode()
                elif isinstance(v, str):
                    out[k] = v.encode()
                else:
                    out[k] = v
            sink.write(out)
    return str(path)


def jpeg_bytes(size=(32, 24), color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def text_records(prefix: str, n: int) -> list[dict]:
    return [{"__key__": f"{prefix}{i:05d}", "json": {"segments": [{"type": "text", "text": f"{prefix} {i}"}]}}
            for i in range(n)]


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """Two small shards of every synthetic task type."""
    from kelix.data.synthetic import TASKS, SyntheticData

    out = tmp_path_factory.mktemp("synthetic")
    SyntheticData(str(out), list(TASKS), shards_per_task=2, samples_per_shard=8, image_size=(40, 90), seed=1).ensure()
    return out
