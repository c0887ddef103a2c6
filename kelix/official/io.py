"""Sharded safetensors in and out, one tensor at a time: conversions never hold a model twice."""

from __future__ import annotations

import json
import os

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def shard_files(directory: str) -> tuple[list[str], dict[str, str]]:
    """The safetensors files of a model directory (index or one file) and ``{key: file}``."""
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(directory, name)):
                raise FileNotFoundError(f"{index} names {name}, which is not in {directory}")
        return files, weight_map
    if os.path.isfile(os.path.join(directory, SINGLE)):
        from safetensors import safe_open

        with safe_open(os.path.join(directory, SINGLE), "pt") as f:
            return [SINGLE], dict.fromkeys(f.keys(), SINGLE)
    raise FileNotFoundError(f"{directory}: no {INDEX} or {SINGLE}")


def header_shapes(directory: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype)}`` read from the safetensors headers only (no tensor data)."""
    from safetensors import safe_open

    files, weight_map = shard_files(directory)
    out = {}
    for name in files:
        with safe_open(os.path.join(directory, name), "pt") as f:
            for k in f.keys():
                if weight_map.get(k) != name:
                    raise ValueError(f"{directory}/{name}: tensor {k} is not where {INDEX} says ({weight_map.get(k)})")
                s = f.get_slice(k)
                out[k] = (tuple(s.get_shape()), s.get_dtype())
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise KeyError(f"{directory}/{INDEX} lists {missing[0]}, which no shard holds")
    return out


class ShardWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` files of about ``shard_bytes`` each, plus
    the index: each shard leaves memory once written."""

    def __init__(self, directory: str, shard_bytes: int = 4 << 30, dtype: torch.dtype | None = None):
        os.makedirs(directory, exist_ok=True)
        self.dir, self.shard_bytes, self.dtype = directory, shard_bytes, dtype
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[list[str]] = []
        self.total = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        t = t.contiguous()
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.shard_bytes:
            self.flush()
        self.pending[key] = t
        self.pending_bytes += n
        self.total += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        save_file(self.pending, os.path.join(self.dir, f"part-{len(self.parts):05d}.tmp"), metadata={"format": "pt"})
        self.parts.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> int:
        """Name the shards ``model-...-of-...`` (or ``model.safetensors`` alone) and write the index; bytes written."""
        self.flush()
        n = len(self.parts)
        weight_map = {}
        for i, keys in enumerate(self.parts):
            name = SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.dir, f"part-{i:05d}.tmp"), os.path.join(self.dir, name))
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            with open(os.path.join(self.dir, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
        return self.total
