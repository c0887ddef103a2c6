"""``kelix convert official``: a Kelix release directory -> a kit pipeline directory, shard by shard.

Two passes over the release: the first reads only the safetensors headers and checks every key and
shape against the kit parts the config describes (built on the ``meta`` device: no memory), so a
missing key, an unexpected key or a wrong shape is refused, named, before any tensor is read; the
second streams the tensors one at a time into the kit's files. The backbone's shards are written as
they fill, so peak memory is about one shard plus the tokenizer's tensors (which it writes last).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict

import torch

from kelix.official.config import Release, ReleaseError, read_release
from kelix.official.io import ShardWriter, header_shapes, shard_files
from kelix.official.keys import DROPPED, POSITIONS, official_key, official_slot_keys, target

OFFICIAL_FILE = "official.json"  # what to-official needs: the release config and the dropped tensors' shapes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
# how the release generates (its demo: 1024 px, 50 steps, guidance 1, sigmas linspace(1, 1/50, 50), the
# condition to <|vision_end|> inclusive); 504 px of condition = the paper's 18 x 18 grid
RELEASE_PIPELINE = dict(condition_size=504, include_markers=True, image_size=1024, steps=50, dit_cfg_scale=1.0,
                        condition_include_end=True, dit_sigma_schedule="linspace")


def shape_numel(shape_dtype) -> int:
    n = 1
    for d in shape_dtype[0]:
        n *= d
    return n


def expected_shapes(rel: Release) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{part: {kit key: shape}}`` of the kit parts this release becomes (meta tensors: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kelix.llm.decoder_release import ReleaseBlockDecoder
    from kelix.tokenizer.model import KelixTokenizer, TokenizerConfig

    with torch.device("meta"):
        tok = KelixTokenizer(TokenizerConfig(**rel.tokenizer_config()))
        bb = dict(rel.backbone_config())
        backbone = AutoModelForCausalLM.from_config(AutoConfig.for_model(bb.pop("model_type"), **bb))
        d = rel.dec
        dec = ReleaseBlockDecoder(rel.qwen["embed_dim"], rel.slots, d["d_model"], d["num_layers"], d["nhead"],
                                  d["dim_feedforward"])
    llm = {"decoder." + k: tuple(v.shape) for k, v in dec.state_dict().items()}
    return {"tokenizer": {k: tuple(v.shape) for k, v in tok.state_dict().items()},
            "backbone": {k: tuple(v.shape) for k, v in backbone.state_dict().items()},
            "llm": llm}


def _piece_shape(op: str, full: tuple[int, ...], N: int, K: int) -> tuple[int, ...]:
    """Shape of slot j's official tensor for a stacked kit tensor of shape ``full``."""
    if op == "rows":
        return (N * K, full[2])  # the whole table, stored again in each slot
    if op == "T":
        return (full[2], full[1])
    if op == "stack":
        return tuple(full[1:])
    if op == "cols":
        return (full[0], full[1] // N)
    raise ValueError(op)


def check_release(sft_dir: str, rel: Release) -> tuple[dict, dict]:
    """Match every official key and shape to the kit (headers only); returns (plan, dropped shapes)."""
    shapes = header_shapes(sft_dir)
    want = expected_shapes(rel)
    covered: dict[tuple[str, str], set[int]] = {}
    dropped = {}
    where = f"{sft_dir}"
    for key, (shape, _) in shapes.items():
        t = target(key)
        if t is None:
            raise ReleaseError(f"{where}: unexpected key {key} {list(shape)} (not part of the Kelix release layout)")
        if t.op == "drop":
            dropped[key] = list(shape)
            continue
        full = want[t.part].get(t.key)
        if full is None:
            raise ReleaseError(f"{where}: unexpected key {key}: it would be {t.part} {t.key}, which config.json's "
                               f"sizes do not have")
        if t.op == "copy":
            exp = full
        elif t.op == "positions":
            exp = (max(shape[0], full[0]), full[1])
            if shape[0] < full[0]:
                raise ReleaseError(f"{where}: {key} has {shape[0]} rows, fewer than the {full[0]} slots read")
        else:
            if not 0 <= t.slot < rel.N:
                raise ReleaseError(f"{where}: unexpected key {key}: slot {t.slot} is outside 0..{rel.N - 1}")
            exp = _piece_shape(t.op, full, rel.N, rel.K)
        if tuple(shape) != tuple(exp):
            raise ReleaseError(f"{where}: {key} has shape {list(shape)}, expected {list(exp)} from config.json")
        covered.setdefault((t.part, t.key), set()).add(t.slot)
    for part, keys in want.items():
        for k in keys:
            got = covered.get((part, k))
            if got is None or (official_slot_keys(k, rel.N) and len(got) != rel.N):
                name = official_key(part, k) or (POSITIONS[0] if k == POSITIONS[1] else None)
                if name is None:
                    slots = official_slot_keys(k, rel.N) or []
                    name = next((o for j, (o, _) in enumerate(slots) if j not in (got or set())), k)
                raise ReleaseError(f"{where}: missing key {name} (the kit's {part} {k} would be left at random)")
    for k in DROPPED:
        if k not in dropped:
            raise ReleaseError(f"{where}: missing key {k} (a complete release has it; to-official writes it back)")
    return want, dropped


def _place(op: str, t: torch.Tensor, j: int, K: int) -> torch.Tensor:
    if op == "rows":
        return t[j * K:(j + 1) * K]
    if op == "T":
        return t.t()
    return t  # stack, cols: joined when every slot is in


def _join(op: str, pieces: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(pieces, 1) if op == "cols" else torch.stack(pieces)


def _write_config(path: str, config: dict) -> None:
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def copy_text_tokenizer(src: str, dst: str) -> list[str]:
    """Copy the text tokenizer's files (data files only: a release's remote-code ``.py`` is never copied)."""
    copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    if "tokenizer.json" not in copied and "vocab.json" not in copied:
        raise ReleaseError(f"{src}: no tokenizer.json or vocab.json (give the text tokenizer with --tokenizer DIR)")
    for n in copied:
        shutil.copy2(os.path.join(src, n), os.path.join(dst, n))
    return copied


def convert_official(sft: str, out: str, dit: str | None = None, vae: str | None = None,
                     tokenizer: str | None = None, dtype: str = "bf16", row_marker: str = "{row},{cols}",
                     shard_bytes: int = 4 << 30, progress: bool = True) -> dict:
    """Convert a release (``sft`` = Kelix-SFT, optionally ``dit`` = Kelix-DiT and its ``vae``) into the
    kit pipeline directory ``out``; returns a summary (parameters per part, bytes, seconds)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from kelix.llm.config import LLMConfig
    from kelix.tokenizer.model import TokenizerConfig

    t0 = time.time()
    if dtype not in DTYPES:
        raise ReleaseError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    cast = DTYPES[dtype]
    rel = read_release(sft)
    text_tok = tokenizer or sft
    if not os.path.isdir(text_tok):
        raise ReleaseError(f"--tokenizer {text_tok!r} is not a directory")
    for name, p in (("--dit", dit), ("--vae", vae)):
        if p is not None and not os.path.isdir(p):
            raise ReleaseError(f"{name} {p!r} is not a directory")
    if dit is not None and vae is None:
        raise ReleaseError("--dit needs --vae: the DiT's VAE (SANA 1.5's DC-AE, a diffusers AutoencoderDC directory)")
    want, dropped = check_release(sft, rel)
    summary = {}
    pipeline = {"tokenizer": "tokenizer", "llm": "llm", "config": dict(RELEASE_PIPELINE)}
    if dit is not None:  # checked and written first: a refused DiT leaves no half-written pipeline behind
        from kelix.official.dit import export_official_dit, read_official_config

        export_official_dit(dit, vae, os.path.join(out, "dit"), dtype=str(cast).split(".")[-1])
        summary["dit"] = sum(shape_numel(x) for x in header_shapes(dit).values())
        pipeline["dit"] = "dit"
    files, _ = shard_files(sft)
    tok_dir, llm_dir = os.path.join(out, "tokenizer"), os.path.join(out, "llm")
    os.makedirs(tok_dir, exist_ok=True)
    os.makedirs(llm_dir, exist_ok=True)
    backbone = ShardWriter(os.path.join(llm_dir, "backbone"), shard_bytes, cast)
    parts: dict[str, dict[str, torch.Tensor]] = {"tokenizer": {}, "llm": {}}
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    counts = {"tokenizer": 0, "backbone": 0, "llm": 0}
    for name in tqdm(files, desc="convert", unit="shard", disable=not progress):
        with safe_open(os.path.join(sft, name), "pt") as f:
            for key in f.keys():
                t = target(key)
                if t.op == "drop":
                    continue
                x = f.get_tensor(key)
                if t.op == "positions":
                    x = x[: want["llm"][t.key][0]]
                x = x.to(cast) if x.is_floating_point() else x
                if t.part == "backbone":
                    backbone.add(t.key, x)
                elif t.op in ("copy", "positions"):
                    parts[t.part][t.key] = x.contiguous()
                else:
                    got = pieces.setdefault(t.key, {})
                    got[t.slot] = _place(t.op, x, t.slot, rel.K).clone()
                    if len(got) == rel.N:
                        op = t.op if t.op in ("cols",) else "stack"
                        parts["tokenizer"][t.key] = _join(op, [got[j] for j in range(rel.N)]).contiguous()
                        del pieces[t.key]
                counts[t.part] += x.numel()
                del x
    parts["llm"]["visual_bias"] = torch.zeros(1, dtype=cast)  # the release has no slot-0 visual prior
    written = backbone.close()
    bb = rel.backbone_config()
    from transformers import AutoConfig

    AutoConfig.for_model(bb.pop("model_type"), **bb, dtype=str(cast).split(".")[-1]).save_pretrained(backbone.dir)
    save_file(parts["tokenizer"], os.path.join(tok_dir, "model.safetensors"), metadata={"format": "pt"})
    _write_config(tok_dir, asdict(TokenizerConfig(**rel.tokenizer_config())))
    save_file(parts["llm"], os.path.join(llm_dir, "model.safetensors"), metadata={"format": "pt"})
    llm_cfg = asdict(LLMConfig(**rel.llm_config(row_marker)))
    _write_config(llm_dir, llm_cfg)
    copy_text_tokenizer(text_tok, llm_dir)
    written += sum(v.numel() * v.element_size() for p in parts.values() for v in p.values())
    summary.update(tokenizer=counts["tokenizer"], llm=counts["backbone"] + counts["llm"], dtype=dtype)
    meta = {"release_config": rel.raw, "dropped": dropped, "positions_rows": rel.dec["max_pos_length"],
            "row_marker": row_marker}
    if dit is not None:
        meta["dit_config"] = read_official_config(dit)
        written += sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(out, "dit")) for f in fs)
    with open(os.path.join(out, OFFICIAL_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    with open(os.path.join(out, "pipeline.json"), "w") as f:
        json.dump(pipeline, f, indent=2)
    summary.update(bytes=written, seconds=time.time() - t0, out=out)
    return summary


def official_shapes(rel: Release, packing_rows: int = 32768) -> dict[str, tuple[int, ...]]:
    """The release's full key/shape table for ``rel``'s config (what a complete release holds), derived
    from the kit parts: what benchmarks and tests build release-shaped files from."""
    want = expected_shapes(rel)
    out: dict[str, tuple[int, ...]] = {}
    for part, keys in want.items():
        for k, shape in keys.items():
            if k == POSITIONS[1]:
                out[POSITIONS[0]] = (rel.dec["max_pos_length"], shape[1])
                continue
            name = official_key(part, k)
            if name is not None:
                out[name] = shape
                continue
            for name, op in official_slot_keys(k, rel.N) or []:
                out[name] = _piece_shape(op, shape, rel.N, rel.K)
    width, dec = rel.vision["hidden_size"], rel.dec["d_model"]
    out["visual_tokenizer.visual.embeddings.packing_position_embedding.weight"] = (packing_rows, width)
    out["model.model.token_head.final_norm.weight"] = (dec,)
    out["model.model.token_head.final_norm.bias"] = (dec,)
    out["lm_head.weight"] = out["model.model.output.weight"]
    return out
