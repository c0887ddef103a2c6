"""``kelix convert to-official``: a kit pipeline converted from a release (and perhaps fine-tuned in the kit)
back into the release's layout, so that the official code loads it with every key present.

Everything the official forward pass reads comes back byte-identical (same dtype). What the kit does
not keep is written as follows (docs/official.md):

* each slot's centroid table: slot j's rows ``[jK, (j+1)K)`` are its own, exactly; the other rows are
  the other slots' own rows (the release stores one table in all slots; the official forward reads
  only slot j's rows of slot j's table);
* the block decoder's position rows past N + 1: zeros (never read);
* ``packing_position_embedding``, the block decoder's ``final_norm``, ``lm_head.weight``: see
  :data:`kelix.official.keys.DROPPED`.
"""

from __future__ import annotations

import json
import os
import time

import torch

from kelix.official.config import ReleaseError
from kelix.official.convert import OFFICIAL_FILE, copy_text_tokenizer
from kelix.official.io import ShardWriter, shard_files
from kelix.official.keys import POSITIONS, official_key, official_slot_keys

_OUT_LM_HEAD = "model.model.output.weight"


def _split(op: str, t: torch.Tensor, N: int):
    """Slot j's official tensor, one at a time (copies: safetensors stores no shared memory)."""
    for j in range(N):
        if op == "rows":  # the whole table (every slot's own rows), stored again in each slot
            yield t.reshape(-1, t.shape[-1]).clone()
        elif op == "T":
            yield t[j].t().clone()
        elif op == "cols":
            yield t.chunk(N, 1)[j].clone()
        else:
            yield t[j].clone()


def _dit_to_official(pipeline: str, meta: dict, out: str) -> int:
    """The pipeline's DiT as a Kelix-DiT (``SanaModel``) directory; bytes written."""
    from safetensors.torch import save_file

    from kelix.dit.export import load_detokenizer
    from kelix.official.dit import dit_to_official

    src = os.path.join(pipeline, "dit")
    if not os.path.isdir(src):
        raise ReleaseError(f"{pipeline}: no dit/ to write (--dit-out): convert the release with --dit and --vae")
    config, state = dit_to_official(load_detokenizer(src).dit, meta.get("dit_config"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return sum(v.numel() * v.element_size() for v in state.values())


def to_official(pipeline: str, out: str, dtype: str | None = None, shard_bytes: int = 4 << 30,
                progress: bool = True, dit_out: str | None = None, llm: str | None = None) -> dict:
    """Write ``pipeline`` (a directory from ``kelix convert official``) as a release in ``out`` (and its DiT
    as a Kelix-DiT directory in ``dit_out``). ``llm``: an LLM directory to write instead of the pipeline's
    ``llm/`` (a fine-tuned export, e.g. ``kelix export-llm --merge-lora``'s)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from kelix.official.convert import DTYPES

    t0 = time.time()
    meta_file = os.path.join(pipeline, OFFICIAL_FILE)
    if not os.path.isfile(meta_file):
        raise ReleaseError(f"{pipeline}: no {OFFICIAL_FILE}: only a pipeline made by `kelix convert official` "
                           f"(then fine-tuned in the kit) has the release's layout to go back to")
    with open(meta_file) as f:
        meta = json.load(f)
    raw = meta["release_config"]
    N = raw["qwen_config"]["n_q_tokens"]
    llm_dir = llm or os.path.join(pipeline, "llm")
    if not os.path.isfile(os.path.join(llm_dir, "config.json")):
        raise ReleaseError(f"{llm_dir}: not a Kelix LLM directory (no config.json)")
    with open(os.path.join(llm_dir, "config.json")) as f:
        llm_cfg = json.load(f)
    if llm_cfg.get("decoder_kind") != "release":
        raise ReleaseError(f"{llm_dir}/config.json: decoder_kind {llm_cfg.get('decoder_kind')!r}: only the "
                           f"release's block decoder has an official layout")
    cast = DTYPES[dtype] if dtype else None
    writer = ShardWriter(out, shard_bytes, cast)
    llm_rest = load_file(os.path.join(llm_dir, "model.safetensors"))
    vb = llm_rest.pop("visual_bias", torch.zeros(1))
    if float(vb.float().abs().max()) != 0.0:
        raise ReleaseError(f"{llm_dir}: visual_bias = {float(vb.float().max()):.4g}: the official model has no "
                           f"slot-0 visual prior, so it cannot hold this (freeze visual_bias when fine-tuning a release)")
    tok = load_file(os.path.join(pipeline, "tokenizer", "model.safetensors"))
    n_out = 0
    for key, t in tok.items():
        name = official_key("tokenizer", key)
        if name is not None:
            writer.add(name, t)
            continue
        slots = official_slot_keys(key, N)
        if slots is None:
            raise ReleaseError(f"{pipeline}/tokenizer: tensor {key} has no official place")
        for (name, _), piece in zip(slots, _split(slots[0][1], t, N)):
            writer.add(name, piece)
    del tok
    for key, t in llm_rest.items():
        if key == POSITIONS[1]:
            rows = torch.zeros(meta["positions_rows"], t.shape[1], dtype=t.dtype)
            rows[: t.shape[0]] = t
            writer.add(POSITIONS[0], rows)
            continue
        name = official_key("llm", key)
        if name is None:
            raise ReleaseError(f"{llm_dir}: tensor {key} has no official place")
        writer.add(name, t)
    bb_dir = os.path.join(llm_dir, "backbone")
    files, _ = shard_files(bb_dir)
    like = None
    head = None
    for fname in tqdm(files, desc="to-official", unit="shard", disable=not progress):
        with safe_open(os.path.join(bb_dir, fname), "pt") as f:
            for key in f.keys():
                name = official_key("backbone", key)
                if name is None:
                    raise ReleaseError(f"{bb_dir}/{fname}: tensor {key} has no official place")
                t = f.get_tensor(key)
                writer.add(name, t)
                like = t
                if name == _OUT_LM_HEAD:
                    head = t
    if head is None:
        raise ReleaseError(f"{bb_dir}: no lm_head.weight")
    dt = like.dtype if cast is None else cast
    for key, shape in meta["dropped"].items():
        if key == "lm_head.weight":
            writer.add(key, head.clone())
        elif key.endswith("final_norm.weight"):
            writer.add(key, torch.ones(shape, dtype=dt))
        else:
            writer.add(key, torch.zeros(shape, dtype=dt))
    n_out = writer.close()
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    copy_text_tokenizer(llm_dir, out)
    if dit_out is not None:
        n_out += _dit_to_official(pipeline, meta, dit_out)
    return {"out": out, "bytes": n_out, "seconds": time.time() - t0}
