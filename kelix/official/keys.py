"""Key layout of the release (``KeyeARModel``) against the kit's parts, in both directions.

Each official key is one of:

* a rename (``RENAMES``): one tensor, the same values, in one kit part (``tokenizer``, ``backbone``
  = the transformers Qwen3 in ``llm/backbone/``, ``llm`` = the rest of the kit LLM: block decoder);
* a slot piece (``SLOTS``): slot j's share of one stacked kit tensor (the quantizer's N sub-codebooks,
  the N per-slot up-projectors). The release stores the whole S-row centroid table in every slot and
  uses rows ``[jK, (j+1)K)`` of slot j's: only those rows are kept;
* the block decoder's position table (``POSITIONS``): only the first N + 1 rows are ever read;
* unused by the official forward pass (``DROPPED``), with what ``to-official`` writes back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# official template <-> kit template; {i} a layer, {p} a parameter name
_VIT = "visual_tokenizer.visual."
_HFV = "encoder.model.vision_model."
_LLM = "model.model."
_DEC = "model.model.token_head."
RENAMES: list[tuple[str, str, str]] = [
    ("tokenizer", _VIT + "embeddings.patch_embedding.{p}", _HFV + "embeddings.patch_embedding.{p}"),
    ("tokenizer", _VIT + "embeddings.position_embedding.weight", _HFV + "embeddings.position_embedding.weight"),
    *[("tokenizer", _VIT + "encoder.layers.{i}.attn.X_proj.{p}".replace("X", x), _HFV + "encoder.layers.{i}.self_attn.X_proj.{p}".replace("X", x))
      for x in "qkv"],
    ("tokenizer", _VIT + "encoder.layers.{i}.attn.output_proj.{p}", _HFV + "encoder.layers.{i}.self_attn.out_proj.{p}"),
    ("tokenizer", _VIT + "encoder.layers.{i}.mlp.w1.{p}", _HFV + "encoder.layers.{i}.mlp.fc1.{p}"),
    ("tokenizer", _VIT + "encoder.layers.{i}.mlp.w2.{p}", _HFV + "encoder.layers.{i}.mlp.fc2.{p}"),
    ("tokenizer", _VIT + "encoder.layers.{i}.sa_norm.{p}", _HFV + "encoder.layers.{i}.layer_norm1.{p}"),
    ("tokenizer", _VIT + "encoder.layers.{i}.mlp_norm.{p}", _HFV + "encoder.layers.{i}.layer_norm2.{p}"),
    ("tokenizer", _VIT + "ln_post.{p}", _HFV + "post_layernorm.{p}"),
    ("tokenizer", "visual_tokenizer.mlp_AR.pre_norm.{p}", "merger.norm.{p}"),
    ("tokenizer", "visual_tokenizer.mlp_AR.linear_1.{p}", "merger.mlp.0.{p}"),
    ("tokenizer", "visual_tokenizer.mlp_AR.linear_2.{p}", "merger.mlp.2.{p}"),
    ("tokenizer", "visual_tokenizer.encoder.{p}", "quantizer.proj_in.{p}"),
    ("backbone", _LLM + "tok_embeddings.embed_tokens.weight", "model.embed_tokens.weight"),
    *[("backbone", _LLM + "layers.{i}.attn.X_proj.weight".replace("X", x), "model.layers.{i}.self_attn.X_proj.weight".replace("X", x))
      for x in "qkv"],
    ("backbone", _LLM + "layers.{i}.attn.output_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("backbone", _LLM + "layers.{i}.attn.q_norm.scale", "model.layers.{i}.self_attn.q_norm.weight"),
    ("backbone", _LLM + "layers.{i}.attn.k_norm.scale", "model.layers.{i}.self_attn.k_norm.weight"),
    ("backbone", _LLM + "layers.{i}.mlp.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("backbone", _LLM + "layers.{i}.mlp.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("backbone", _LLM + "layers.{i}.mlp.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("backbone", _LLM + "layers.{i}.sa_norm.scale", "model.layers.{i}.input_layernorm.weight"),
    ("backbone", _LLM + "layers.{i}.mlp_norm.scale", "model.layers.{i}.post_attention_layernorm.weight"),
    ("backbone", _LLM + "norm.scale", "model.norm.weight"),
    ("backbone", _LLM + "output.weight", "lm_head.weight"),  # the head forward and generate use
    ("llm", _DEC + "input_linear.{p}", "decoder.proj_in.{p}"),
    ("llm", _DEC + "output_linear.{p}", "decoder.proj_out.{p}"),
    *[("llm", _DEC + "transformer.layers.{i}.attn.X_proj.{p}".replace("X", x), "decoder.layers.{i}.X_proj.{p}".replace("X", x)) for x in "qkv"],
    ("llm", _DEC + "transformer.layers.{i}.attn.output_proj.{p}", "decoder.layers.{i}.o_proj.{p}"),
    ("llm", _DEC + "transformer.layers.{i}.mlp.w1.weight", "decoder.layers.{i}.gate_proj.weight"),
    ("llm", _DEC + "transformer.layers.{i}.mlp.w3.weight", "decoder.layers.{i}.up_proj.weight"),
    ("llm", _DEC + "transformer.layers.{i}.mlp.w2.weight", "decoder.layers.{i}.down_proj.weight"),
    ("llm", _DEC + "transformer.layers.{i}.sa_norm.{p}", "decoder.layers.{i}.sa_norm.{p}"),
    ("llm", _DEC + "transformer.layers.{i}.mlp_norm.{p}", "decoder.layers.{i}.mlp_norm.{p}"),
]
# slot j's piece of a stacked kit tensor: how it is placed ("rows": slot j's K rows of the centroid
# table, stacked; "T": transposed, stacked; "stack": stacked; "cols": columns [j*d, (j+1)*d))
_Q = "visual_tokenizer.quantizer.{j}."
SLOTS: list[tuple[str, str, str]] = [
    (_Q + "embedding.weight", "quantizer.codebook.centroids", "rows"),
    (_Q + "embedding_proj.weight", "quantizer.codebook.weight", "T"),
    (_Q + "embedding_proj.bias", "quantizer.codebook.bias", "stack"),
    (_Q + "q_norm.{p}", "quantizer.codebook.norm.{p}", "stack"),
    (_Q + "z_norm.{p}", "quantizer.z_norm.{p}", "stack"),
    ("visual_tokenizer.up_projectors.{j}.weight", "up_projector.weight", "cols"),
]
POSITIONS = (_DEC + "position_embedding.weight", "decoder.slot_embed.weight")
# unused by the official forward pass -> what to-official writes (docs/official.md)
DROPPED = {
    _VIT + "embeddings.packing_position_embedding.weight": "zeros (never read by the official ViT)",
    _DEC + "final_norm.weight": "ones (built but never applied by the official block decoder)",
    _DEC + "final_norm.bias": "zeros (built but never applied by the official block decoder)",
    "lm_head.weight": "a copy of model.model.output.weight (only the official training loss reads lm_head)",
}


def _regex(template: str) -> re.Pattern:
    out = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile("^" + out.replace(r"\{p\}", r"(?P<p>weight|bias)") + "$")


_RENAME_RE = [(part, _regex(o), k) for part, o, k in RENAMES]
_SLOT_RE = [(_regex(o), k, op) for o, k, op in SLOTS]


@dataclass(frozen=True)
class Target:
    """Where one official tensor goes: ``part`` / ``key``; ``op`` ``copy``, a slot op (``rows``, ``T``,
    ``stack``, ``cols``) with ``slot`` j, ``positions`` (first rows), or ``drop``."""

    part: str
    key: str
    op: str = "copy"
    slot: int = -1


def target(key: str) -> Target | None:
    """The kit place of an official key, or None for a key the kit does not know."""
    if key in DROPPED:
        return Target("", "", "drop")
    if key == POSITIONS[0]:
        return Target("llm", POSITIONS[1], "positions")
    for part, rx, tmpl in _RENAME_RE:
        m = rx.match(key)
        if m:
            return Target(part, tmpl.format(**m.groupdict()))
    for rx, tmpl, op in _SLOT_RE:
        m = rx.match(key)
        if m:
            g = m.groupdict()
            return Target("tokenizer", tmpl.format(**{k: v for k, v in g.items() if k != "j"}), op, int(g["j"]))
    return None


def official_key(part: str, key: str) -> str | None:
    """The official name of a kit tensor that is a plain rename (None for slot-stacked and other keys)."""
    for p, o, k in RENAMES:
        if p != part:
            continue
        m = _regex(k).match(key)
        if m:
            return o.format(**m.groupdict())
    return None


def official_slot_keys(key: str, N: int) -> list[tuple[str, str]] | None:
    """``[(official key of slot j, op)]`` for a slot-stacked kit tensor of the tokenizer, else None."""
    for o, k, op in SLOTS:
        m = _regex(k).match(key)
        if m:
            return [(o.format(j=j, **m.groupdict()), op) for j in range(N)]
    return None
