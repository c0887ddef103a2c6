"""A recipe as ``kelix fit`` reads it (several ``--config`` files merged left to right, ``--key value``
overrides), and the run shape it implies."""

from __future__ import annotations

import os
from dataclasses import dataclass


class RecipeError(ValueError):
    """A recipe the estimate cannot read: the message names the file or key."""


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(paths: list[str], overrides: dict[str, object] | None = None) -> dict:
    """The merged recipe of ``paths``; ``overrides`` maps dotted keys (``data.init_args.batch_size``) to values."""
    import yaml

    recipe: dict = {}
    for path in paths:
        if not os.path.isfile(path):
            raise RecipeError(f"recipe {path!r} does not exist")
        try:
            with open(path) as f:
                part = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(part, dict):
            raise RecipeError(f"{path}: a recipe is a mapping, got {type(part).__name__}")
        recipe = _merge(recipe, part)
    for key, value in (overrides or {}).items():
        node = recipe
        *head, last = key.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return recipe


def get(recipe: dict, key: str, default=None, _depth: int = 0):
    """The value at dotted ``key``; a ``${other.key}`` value (jsonargparse's interpolation) is followed."""
    node = recipe
    for k in key.split("."):
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    if isinstance(node, str) and node.startswith("${") and node.endswith("}") and _depth < 8:
        return get(recipe, node[2:-1], default, _depth + 1)
    return node


@dataclass
class RunShape:
    """How a run is laid out.

    Args:
        gpus: processes (GPUs) in the run.
        strategy: ``fsdp2`` (every GPU holds 1/gpus of the weights, gradients and optimizer state), ``ddp``
            (each holds all of them) or ``single``.
        precision: the trainer's precision (``bf16-mixed``, ``32``...).
        micro_batch: rows per process per forward (``data.init_args.batch_size``).
        row_length: blocks per row (the processor's ``max_blocks``: packed rows are full).
        accumulate: micro-batches per optimizer step (``trainer.accumulate_grad_batches``).
        max_steps: optimizer steps of the run.
    """

    gpus: int
    strategy: str
    precision: str
    micro_batch: int
    row_length: int
    accumulate: int
    max_steps: int | None

    @property
    def mixed(self) -> bool:
        return "mixed" in self.precision or self.precision in ("bf16", "16")


def _strategy(value) -> str:
    name = value.get("class_path", "") if isinstance(value, dict) else str(value or "auto")
    name = name.lower()
    if "fsdp" in name:
        return "fsdp2"
    if "ddp" in name:
        return "ddp"
    return "auto"


def run_shape(recipe: dict, gpus: int | None = None) -> RunShape:
    """The run shape of ``recipe``; ``gpus`` overrides ``trainer.devices x trainer.num_nodes``."""
    devices = get(recipe, "trainer.devices", 1)
    if isinstance(devices, list):
        devices = len(devices)
    if not isinstance(devices, int):
        raise RecipeError(f"trainer.devices {devices!r}: give a number (or pass --gpus)")
    total = gpus or devices * int(get(recipe, "trainer.num_nodes", 1) or 1)
    strategy = _strategy(get(recipe, "trainer.strategy"))
    if strategy == "auto":
        strategy = "ddp" if total > 1 else "single"
    row = get(recipe, "data.init_args.processor.init_args.max_blocks") or 4096
    return RunShape(gpus=total, strategy=strategy, precision=str(get(recipe, "trainer.precision", "32")),
                    micro_batch=int(get(recipe, "data.init_args.batch_size", 1)), row_length=int(row),
                    accumulate=int(get(recipe, "trainer.accumulate_grad_batches", 1) or 1),
                    max_steps=get(recipe, "trainer.max_steps"))
