"""Per-rank state a checkpoint must carry for an exact resume: random generators and data positions.

Lightning writes a checkpoint's metadata from rank 0 only, so anything that differs between ranks
(each rank's RNG, each rank's data stream position) is gathered to rank 0 at save time and every
rank picks its own entry back at load time. Everything is stored as plain lists, ints and tensors
so a checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def _dist_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (``None`` elsewhere); ``[obj]`` without a process group.

    A collective: every rank must call it (checkpoint hooks run on every rank).
    """
    rank, world = _dist_world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def collect_rng_state(owner: object | None = None) -> dict:
    """This process's torch (CPU and CUDA), numpy and Python random states, weights_only-loadable.

    With ``owner``, its ``torch.Generator`` attributes (a module's private noise stream) are included.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    gens = {k: g for k, g in vars(owner).items() if isinstance(g, torch.Generator)} if owner is not None else {}
    state["generators"] = {k: {"device": str(g.device), "state": g.get_state()} for k, g in gens.items()}
    return state


def set_rng_state(state: dict, owner: object | None = None) -> None:
    """Restore what :func:`collect_rng_state` returned (``owner``'s generators are created if missing)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in state.get("generators", {}).items() if owner is not None else ():
        gen = getattr(owner, name, None)
        if not isinstance(gen, torch.Generator):
            gen = torch.Generator(device=g["device"])
            setattr(owner, name, gen)
        gen.set_state(g["state"])


def pick_rank_state(states: list | None, what: str, *, strict: bool) -> Any:
    """This rank's entry of a gathered list; ``None`` (or an error if ``strict``) if the world size changed."""
    if not states:
        return None
    rank, world = _dist_world()
    if len(states) != world:
        if strict:
            raise ValueError(f"{what} was saved by {len(states)} process(es) but is resumed by {world}")
        return None
    return states[rank]
