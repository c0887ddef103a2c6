"""``kelix convert-checkpoint``: a training checkpoint -> an HF-style directory (or one ``.ckpt`` file).

A sharded checkpoint (``FSDP2Strategy(save_distributed_checkpoint=True)``: a directory with
``.metadata``, one ``__<rank>_0.distcp`` per rank and ``meta.pt``) is read on one CPU process,
whatever the number of ranks that wrote it; a consolidated ``.ckpt`` file works too.

Output (``--format hf``, the default): ``model.safetensors`` with the module's weights (all of
them, or only those under ``--prefix``, which is stripped) and ``config.json`` recording where they
come from (step, epoch, the run's model ``class_path``/``init_args`` and the components' own
checkpoint metadata such as ``kelix_llm``). ``kelix.training.weights.load_weights(module, out)``
and every ``init_from:`` read it. ``--format ckpt`` writes a single weights-only Lightning
checkpoint (``state_dict`` + metadata, no optimizer), which the components' ``export-*`` verbs read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings

import torch

log = logging.getLogger("kelix.training")
META = "meta.pt"


def is_sharded_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


def read_sharded(path: str, prefix: str = "state_dict.") -> dict[str, torch.Tensor]:
    """Every tensor of a distributed checkpoint whose flat key starts with ``prefix`` (prefix removed).

    ``prefix="state_dict."`` gives the module's weights; ``""`` gives everything (optimizer
    states included, keyed ``optimizer_0.state.<param>.<exp_avg|exp_avg_sq|step>``).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path!r} is not a distributed checkpoint directory (no .metadata file)")
    reader = dcp.FileSystemReader(path)
    meta = reader.read_metadata().state_dict_metadata
    # DCP fills a template: allocate each wanted tensor with its saved full shape and dtype
    template = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
                if isinstance(m, TensorStorageMetadata) and k.startswith(prefix)}
    if not template:
        raise ValueError(f"{path}: no tensor under {prefix!r}")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process.*")
        dcp.load(template, storage_reader=reader, no_dist=True)
    return {k[len(prefix):]: v for k, v in template.items()}


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``(module weights, metadata)`` of a sharded directory or a ``.ckpt`` file (weights_only)."""
    if is_sharded_checkpoint(path):
        meta_file = os.path.join(path, META)
        meta = torch.load(meta_file, map_location="cpu", weights_only=True) if os.path.isfile(meta_file) else {}
        return read_sharded(path), meta
    if os.path.isfile(path):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ValueError(f"{path!r} is not a Lightning checkpoint (no 'state_dict')")
        sd = ckpt.pop("state_dict")
        ckpt.pop("optimizer_states", None)
        return sd, ckpt
    raise FileNotFoundError(f"checkpoint not found (neither a .ckpt file nor a sharded directory): {path!r}")


def _jsonable(x, depth: int = 0):
    if isinstance(x, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v, depth + 1) for v in x]
    if isinstance(x, bool | int | float | str) or x is None:
        return x
    if torch.is_tensor(x) and x.numel() <= 16:
        return x.tolist()
    return str(type(x).__name__)


def run_config(path: str) -> dict | None:
    """The ``model`` section of the run's saved ``config.yaml`` (``<run>/checkpoints/<ckpt>`` layout)."""
    import yaml

    cfg_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.yaml")
    if not os.path.isfile(cfg_file):
        return None
    with open(cfg_file) as f:
        return (yaml.safe_load(f) or {}).get("model")


def convert(path: str, out: str, prefix: str = "", fmt: str = "hf", dtype: str | None = None) -> str:
    """Write ``out`` from the checkpoint at ``path`` (see module docstring); returns ``out``."""
    from safetensors.torch import save_file

    sd, meta = read_checkpoint(path)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise ValueError(f"{path}: no weight starts with --prefix {prefix!r}")
    if dtype:
        cast = getattr(torch, dtype)
        sd = {k: v.to(cast) if v.is_floating_point() else v for k, v in sd.items()}
    info = {"source": os.path.abspath(path), "global_step": meta.get("global_step"), "epoch": meta.get("epoch"),
            "prefix": prefix}
    component_meta = {k: v for k, v in meta.items() if k.startswith("kelix_")}
    if fmt == "ckpt":
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        torch.save({"state_dict": sd, "global_step": info["global_step"], "epoch": info["epoch"], **component_meta},
                   out + ".tmp")
        os.replace(out + ".tmp", out)
        return out
    os.makedirs(out, exist_ok=True)
    seen: set[int] = set()
    tensors = {}
    for k, v in sd.items():  # safetensors refuses shared storage (tied embeddings): copy the repeats
        v = v.detach().contiguous()
        tensors[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config = {"kelix_checkpoint": info, "model": run_config(path), **_jsonable(component_meta)}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    log.info("wrote %d tensor(s) to %s", len(tensors), out)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kelix convert-checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True,
                   help="sharded checkpoint directory (e.g. runs/x/version_0/checkpoints/last.ckpt) or .ckpt file")
    p.add_argument("--out", required=True, help="output directory (--format hf) or file (--format ckpt)")
    p.add_argument("--prefix", default="", help="keep only weights under this prefix and strip it (e.g. 'lm.')")
    p.add_argument("--format", default="hf", choices=["hf", "ckpt"], dest="fmt",
                   help="hf: config.json + model.safetensors; ckpt: one weights-only Lightning checkpoint")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast floating-point weights (default: as saved)")
    args = p.parse_args(argv)
    out = convert(args.ckpt, args.out, prefix=args.prefix, fmt=args.fmt, dtype=args.dtype)
    print(out)
    return 0
