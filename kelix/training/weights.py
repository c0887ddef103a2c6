"""Reading weights from the artifacts one stage hands to the next (``init_from:`` in a recipe).

Accepted: an HF-style directory (``model.safetensors``, possibly sharded with an index), a
``.safetensors`` file, a Lightning ``.ckpt`` (read with ``weights_only=True``: never unpickled), or a
sharded (distributed) checkpoint directory written by ``FSDP2Strategy`` (read on one process).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("kelix.training")


def pipeline_part(path: str, part: str) -> str:
    """``path`` itself, or, for a pipeline directory (``pipeline.json``: ``kelix convert official``,
    ``KelixPipeline.save_pretrained``), its ``part`` (``tokenizer``, ``llm`` or ``dit``) directory."""
    file = os.path.join(path, "pipeline.json")
    if not os.path.isfile(file):
        return path
    sub = json.loads(Path(file).read_text()).get(part)
    if not sub:
        raise FileNotFoundError(f"init_from {path!r} is a pipeline directory without a {part} part")
    return os.path.join(path, sub)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors stored at ``path`` (directory, ``.safetensors`` or ``.ckpt``)."""
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"weights not found: {path!r}")
    if os.path.isdir(path):
        from kelix.training.convert import is_sharded_checkpoint, read_sharded

        if is_sharded_checkpoint(path):
            return read_sharded(path)
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            files = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
            out = {}
            for f in files:
                out.update(load_file(os.path.join(path, f)))
            return out
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(single):
            return load_file(single)
        raise FileNotFoundError(f"{path!r} holds neither model.safetensors nor model.safetensors.index.json "
                                "nor a distributed checkpoint")
    if path.endswith(".safetensors"):
        return load_file(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path!r} is not a checkpoint dict")
    return ckpt.get("state_dict", ckpt)


def load_weights(module: nn.Module, path: str, prefix: str = "", strip: str = "", strict: bool = True) -> None:
    """Load the tensors at ``path`` into ``module``.

    Args:
        prefix: keep only keys starting with ``prefix`` and drop it (``"model."`` takes a
            submodule's weights out of a Lightning checkpoint).
        strip: drop this leading string from keys after ``prefix`` handling (rarely needed).
        strict: every parameter of ``module`` must be found, with the same shape.
    """
    sd = read_state_dict(path)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if strip:
        sd = {k[len(strip):] if k.startswith(strip) else k: v for k, v in sd.items()}
    own = module.state_dict()
    bad = [f"{k}: {tuple(v.shape)} in file, {tuple(own[k].shape)} in model" for k, v in sd.items()
           if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: shape mismatch for {len(bad)} tensor(s), e.g. {bad[0]}")
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if strict and missing:
        raise KeyError(f"{path}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    if unexpected:
        log.warning("%s: %d tensor(s) not used, e.g. %s", path, len(unexpected), unexpected[:3])
    log.info("loaded %d tensor(s) from %s", len(sd) - len(unexpected), path)
