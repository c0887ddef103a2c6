"""The released Kelix-DiT (the official ``SanaModel``) <-> this kit's :class:`~kelix.dit.model.KelixDiT`.

The release's DiT computes SANA's function, with its connector, in diffusers' ``SanaTransformer2DModel``
layout once the keys are renamed (no tensor changes shape or layout), plus three things the kit holds
as options: 2D RoPE in cross-attention (``cross_attn_rope``), integer timesteps (``integer_timesteps``)
and a null-condition table of ``model_max_length`` rows (``null_condition_length``, its ``y_embedding``).

:func:`dit_from_official` reads ``config.json`` + safetensors (every ``*.safetensors`` of the directory, as
the official loader), checks every config field and every key and shape, and refuses with one line anything it
cannot reproduce; it never initialises a missing weight at random. :func:`dit_to_official` writes the
official names and config back.

Where the kit computes slightly differently (float32 parity on the official fixture: 3.9e-7):
self-attention's linear-attention denominator gets diffusers' 1e-15, the release 1e-8 (a relative
1e-8 / sum of the token weights); RoPE angles are always float32 (the release forms them in the
activation dtype, bf16 in its demo); a dropped (unconditional) item attends to every null-table row,
as the release's sampler does, while the release's training masked the table to the item's own length.
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch

log = logging.getLogger("kelix.official")

# every SanaConfig field of the official code, with its default there (a field absent from config.json
# takes this value in the official loader, so here too)
OFFICIAL_DEFAULTS = {
    "input_size": 32, "patch_size": 1, "in_channels": 32, "hidden_size": 2240, "depth": 20, "num_heads": 20,
    "mlp_ratio": 2.5, "caption_channels": 2304, "model_max_length": 300, "attn_type": "linear",
    "cross_attn_type": "flash", "linear_head_dim": 32, "qk_norm": False, "cross_norm": False,
    "use_cross_attn_rope": False, "use_position_scale": False, "cross_attn_x_norm": False,
    "ffn_type": "glumbconv", "mlp_acts": ["silu", "silu", None], "pred_sigma": False, "learn_sigma": False,
    "use_pe": False, "pe_interpolation": 1.0, "y_norm": True, "y_norm_scale_factor": 0.01, "norm_eps": 1e-5,
    "class_dropout_prob": 0.1, "drop_path": 0.0, "vae_type": "AutoencoderDC",
    "vae_pretrained": "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers", "vae_downsample_rate": 32,
    "text_encoder_name": "google/gemma-2-2b-it", "y_embedding_init_method": "randn", "use_connector": False,
    "connector_channels": None,
}
# fields the official forward never reads (or reads only when another field, refused below, is on);
# the kit ignores them on purpose and dit_to_official writes them back from ``base_config`` or these defaults
IGNORED = {
    "cross_attn_type": "the official block builds the same cross-attention whatever its value",
    "learn_sigma": "never read by SanaModel (pred_sigma decides the output channels)",
    "pe_interpolation": "used only with use_pe, which must be false",
    "y_norm_scale_factor": "initial value of attention_y_norm.weight; the weight is loaded",
    "y_embedding_init_method": "initial value of y_embedder.y_embedding; the table is loaded",
    "class_dropout_prob": "training-time condition dropout",
    "drop_path": "training-time stochastic depth",
    "vae_type": "the VAE is a separate diffusers directory (kelix convert --vae)",
    "vae_pretrained": "the VAE is a separate diffusers directory (kelix convert --vae)",
    "vae_downsample_rate": "a property of the VAE, read from its directory",
    "text_encoder_name": "Kelix conditions on its LLM, not on a text encoder",
}
# fields whose value must be this (the kit builds nothing else)
REQUIRED = {
    "attn_type": "linear", "ffn_type": "glumbconv", "mlp_acts": ["silu", "silu", None], "pred_sigma": False,
    "use_pe": False, "y_norm": True, "norm_eps": 1e-5, "cross_attn_x_norm": False, "use_position_scale": False,
    "use_connector": True, "patch_size": 1,
}
# fields that set the kit's architecture
USED = ("input_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio", "caption_channels",
        "model_max_length", "linear_head_dim", "qk_norm", "cross_norm", "use_cross_attn_rope", "connector_channels")
META = {"model_class": "SanaModel", "__class__": "SanaConfig"}
assert set(IGNORED) | set(REQUIRED) | set(USED) == set(OFFICIAL_DEFAULTS)

# kit key -> official key (regex, replacement); the layouts agree tensor for tensor
_B = r"^transformer\.transformer_blocks\.(\d+)\."
_RULES = [(re.compile(a), b) for a, b in [
    (r"^connector\.(\d)\.", r"diffusion_connector.\1."),
    (r"^null_condition$", "y_embedder.y_embedding"),
    (r"^transformer\.patch_embed\.proj\.", "x_embedder.proj."),
    (r"^transformer\.time_embed\.emb\.timestep_embedder\.linear_1\.", "t_embedder.mlp.0."),
    (r"^transformer\.time_embed\.emb\.timestep_embedder\.linear_2\.", "t_embedder.mlp.2."),
    (r"^transformer\.time_embed\.linear\.", "t_block.1."),
    (r"^transformer\.caption_projection\.linear_1\.", "y_embedder.y_proj.fc1."),
    (r"^transformer\.caption_projection\.linear_2\.", "y_embedder.y_proj.fc2."),
    (r"^transformer\.caption_norm\.", "attention_y_norm."),
    (_B + r"scale_shift_table$", r"blocks.\1.scale_shift_table"),
    (_B + r"attn1\.to_(q|k|v)\.", r"blocks.\1.attn.to_\2."),
    (_B + r"attn1\.to_out\.0\.", r"blocks.\1.attn.proj."),
    (_B + r"attn1\.norm_(q|k)\.", r"blocks.\1.attn.\2_norm."),
    (_B + r"attn2\.to_q\.", r"blocks.\1.cross_attn.q_linear."),
    (_B + r"attn2\.to_(k|v)\.", r"blocks.\1.cross_attn.to_\2."),
    (_B + r"attn2\.to_out\.0\.", r"blocks.\1.cross_attn.proj."),
    (_B + r"attn2\.norm_(q|k)\.", r"blocks.\1.cross_attn.\2_norm."),
    (_B + r"ff\.conv_inverted\.", r"blocks.\1.mlp.inverted_conv.conv."),
    (_B + r"ff\.conv_depth\.", r"blocks.\1.mlp.depth_conv.conv."),
    (_B + r"ff\.conv_point\.", r"blocks.\1.mlp.point_conv.conv."),
    (r"^transformer\.scale_shift_table$", "final_layer.scale_shift_table"),
    (r"^transformer\.proj_out\.", "final_layer.linear."),
]]
# in the official state dict but never read by its forward while use_pe is false: accepted, not loaded
UNUSED_KEYS = ("pos_embed",)


def official_key(kit_key: str) -> str:
    """The official name of a :class:`KelixDiT` state-dict key."""
    for pattern, repl in _RULES:
        new, n = pattern.subn(repl, kit_key)
        if n:
            return new
    raise KeyError(f"KelixDiT key {kit_key!r} has no official name")


def read_official_config(path: str) -> dict:
    """``config.json`` of an official DiT directory, every field checked, defaults filled in."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} is not an official Kelix-DiT directory (no config.json)")
    with open(file) as f:
        raw = json.load(f)
    for k, v in META.items():
        if raw.get(k, v) != v:
            raise ValueError(f"{file}: {k} is {raw[k]!r}, expected {v!r} (the released Kelix-DiT)")
    unknown = sorted(set(raw) - set(OFFICIAL_DEFAULTS) - set(META))
    if unknown:
        raise ValueError(f"{file}: unknown config field {unknown[0]!r} (known: the official SanaConfig's fields)")
    cfg = {**OFFICIAL_DEFAULTS, **{k: v for k, v in raw.items() if k not in META}}
    for k, want in REQUIRED.items():
        got = list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]
        if got != want:
            raise ValueError(f"{file}: {k}={cfg[k]!r} is not supported (the kit reproduces {k}={want!r})")
    if bool(cfg["qk_norm"]) != bool(cfg["cross_norm"]):
        raise ValueError(f"{file}: qk_norm={cfg['qk_norm']} and cross_norm={cfg['cross_norm']} differ "
                         "(diffusers' SANA has one qk_norm for both attentions)")
    hidden = cfg["hidden_size"]
    for k in ("linear_head_dim", "num_heads"):
        if hidden % cfg[k]:
            raise ValueError(f"{file}: hidden_size {hidden} is not a multiple of {k} {cfg[k]}")
    if not cfg["connector_channels"]:
        raise ValueError(f"{file}: connector_channels is not set (the width of the LLM's hidden states)")
    return cfg


def kit_config(cfg: dict, null_rows: int):
    """The :class:`~kelix.dit.model.DiTConfig` of an official config (``read_official_config``).

    ``null_rows``: rows of the release's ``y_embedding``; they set ``max_condition_length`` (the released
    config.json says 300 but its weights, and its demo, use 720).
    """
    from kelix.dit.model import DiTConfig

    hidden = cfg["hidden_size"]
    transformer = dict(
        in_channels=cfg["in_channels"], out_channels=cfg["in_channels"], num_layers=cfg["depth"],
        num_attention_heads=hidden // cfg["linear_head_dim"], attention_head_dim=cfg["linear_head_dim"],
        num_cross_attention_heads=cfg["num_heads"], cross_attention_head_dim=hidden // cfg["num_heads"],
        cross_attention_dim=hidden, caption_channels=cfg["caption_channels"], mlp_ratio=cfg["mlp_ratio"],
        attention_bias=False, sample_size=cfg["input_size"], patch_size=1, norm_elementwise_affine=False,
        norm_eps=1e-6, interpolation_scale=None, guidance_embeds=False,
        qk_norm="rms_norm_across_heads" if cfg["qk_norm"] else None, timestep_scale=1.0, dropout=0.0)
    return DiTConfig(cond_dim=cfg["connector_channels"], transformer=transformer, connector_hidden=None,
                     max_condition_length=null_rows, cross_attn_rope=bool(cfg["use_cross_attn_rope"]),
                     integer_timesteps=True, null_condition_length=null_rows)


def _weight_files(path: str) -> dict[str, str]:
    """Official key -> safetensors file holding it, over every ``*.safetensors`` of the directory (as the
    official loader reads them; a shard index, if any, is not needed)."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path!r} holds no *.safetensors weights")
    where = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for k in f.keys():
                if k in where:
                    raise ValueError(f"{path}: key {k!r} is in both {where[k]} and {name}")
                where[k] = os.path.join(path, name)
    return where


def _shapes(where: dict[str, str]) -> dict[str, list[int]]:
    """Shape of every key, read from the files' headers (no tensor is loaded)."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(set(where.values())):
        with safe_open(file, framework="pt") as f:
            shapes.update({k: list(f.get_slice(k).get_shape()) for k in f.keys() if where.get(k) == file})
    return shapes


def dit_from_official(official_dir: str, dtype: torch.dtype | str = torch.float32):
    """A :class:`~kelix.dit.model.KelixDiT` holding an official Kelix-DiT directory's weights.

    Every official key must map to a kit key and back (``pos_embed``, unused without ``use_pe``, may be
    there or not); a missing key, an unexpected key, a wrong shape or an unknown config field is refused
    with one line naming it, before any weight is read. The model is built on the meta device and takes
    the file's tensors (cast to ``dtype``), so memory peaks at about one copy of the weights.
    """
    from safetensors import safe_open

    from kelix.dit.model import KelixDiT

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    cfg = read_official_config(official_dir)
    where = _weight_files(official_dir)
    shapes = _shapes(where)
    null_key = "y_embedder.y_embedding"
    if null_key not in shapes:
        raise KeyError(f"{official_dir}: missing key {null_key!r}")
    null_rows = shapes[null_key][0]
    if null_rows != cfg["model_max_length"]:
        log.info("%s: y_embedding has %d rows, config.json model_max_length %d: the weights' %d is used "
                 "(as the official demo overrides it)", official_dir, null_rows, cfg["model_max_length"], null_rows)
    with torch.device("meta"):
        dit = KelixDiT(kit_config(cfg, null_rows))
    names = {official_key(k): k for k in dit.state_dict()}
    missing = sorted(set(names) - set(shapes))
    if missing:
        raise KeyError(f"{official_dir}: missing key {missing[0]!r} ({len(missing)} missing)")
    extra = sorted(set(shapes) - set(names) - set(UNUSED_KEYS))
    if extra:
        raise KeyError(f"{official_dir}: unexpected key {extra[0]!r} ({len(extra)} unexpected)")
    want = {k: list(v.shape) for k, v in dit.state_dict().items()}
    for off, kit in names.items():
        got = shapes[off]
        if got != want[kit]:
            raise ValueError(f"{official_dir}: key {off!r} has shape {got}, the config gives {want[kit]}")
    state = {}
    for file in sorted(set(where[k] for k in names)):
        with safe_open(file, framework="pt") as f:
            for off in f.keys():
                if off in names:
                    state[names[off]] = f.get_tensor(off).to(dtype)
    dit.load_state_dict(state, strict=True, assign=True)
    return dit.eval()


def dit_to_official(dit, base_config: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json dict, state dict)`` of a :class:`KelixDiT` under the official names.

    official -> kit -> official gives back every tensor the official forward (and its guidance) reads,
    byte for byte. Not round-tripped: ``pos_embed`` (unread without ``use_pe``) becomes zeros of the
    official buffer's shape; the config fields in :data:`IGNORED` come from ``base_config`` (e.g. the
    release's own config.json) or else the official defaults. A kit model the official code cannot
    compute (no integer timesteps, a one-token null condition, options diffusers-only) is refused with
    the field named.
    """
    c, t = dit.config, dict(dit.config.transformer)
    checks = {"integer_timesteps": (c.integer_timesteps, True),
              "connector_hidden": (c.connector_hidden in (None, t["caption_channels"]), True),
              "transformer.patch_size": (t["patch_size"], 1),
              "transformer.attention_bias": (t["attention_bias"], False),
              "transformer.interpolation_scale": (t["interpolation_scale"], None),
              "transformer.guidance_embeds": (t["guidance_embeds"], False),
              "transformer.norm_eps": (t["norm_eps"], 1e-6),
              "transformer.norm_elementwise_affine": (t["norm_elementwise_affine"], False),
              "transformer.timestep_scale": (t["timestep_scale"], 1.0),
              "transformer.out_channels": (t["out_channels"] in (None, t["in_channels"]), True),
              "transformer.qk_norm": (t["qk_norm"] in (None, "rms_norm_across_heads"), True)}
    hidden = t["num_attention_heads"] * t["attention_head_dim"]
    checks["transformer.cross_attention_dim"] = (t["cross_attention_dim"], hidden)
    checks["transformer.num_cross_attention_heads"] = (t["num_cross_attention_heads"] * t["cross_attention_head_dim"],
                                                       hidden)
    for name, (got, want) in checks.items():
        if got != want:
            raise ValueError(f"dit.{name} does not fit the official SanaModel (needs {want!r}, has {got!r})")
    if c.null_condition_length is None:
        raise ValueError("dit.null_condition_length is None: the official SanaModel needs a null-condition table "
                         "(y_embedding) of model_max_length rows")
    base = {k: v for k, v in (base_config or {}).items() if k in IGNORED}
    config = {**META, **{k: OFFICIAL_DEFAULTS[k] for k in IGNORED}, **base,
              **{k: v for k, v in REQUIRED.items()},
              "input_size": t["sample_size"], "in_channels": t["in_channels"], "hidden_size": hidden,
              "depth": t["num_layers"], "num_heads": t["num_cross_attention_heads"], "mlp_ratio": t["mlp_ratio"],
              "caption_channels": t["caption_channels"], "model_max_length": c.null_condition_length,
              "linear_head_dim": t["attention_head_dim"], "qk_norm": t["qk_norm"] is not None,
              "cross_norm": t["qk_norm"] is not None, "use_cross_attn_rope": c.cross_attn_rope,
              "connector_channels": c.cond_dim}
    state = {official_key(k): v for k, v in dit.state_dict().items()}
    state["pos_embed"] = torch.zeros(1, t["sample_size"] ** 2, hidden, dtype=dit.null_condition.dtype)
    return config, state


# the release trains and samples its flow with shift 3 over 1000 timesteps (kelix_utils.py FLOW_SHIFT)
RELEASE_FLOW = {"shift": 3.0, "num_train_timesteps": 1000}


def export_official_dit(official_dir: str, vae_dir: str, out: str, dtype: str = "float32") -> str:
    """Write a kit de-tokenizer directory (``kelix.dit.export`` format: the DiT, ``vae/``, ``flow.json``)
    from an official Kelix-DiT directory and the diffusers VAE it decodes with (SANA 1.5's DC-AE).

    ``load_detokenizer(out)`` reads it back; sample it with :data:`kelix.dit.sampler.RELEASE_SAMPLING`.
    The VAE's latent channels must be the DiT's input channels (checked before anything is written).
    """
    from kelix.dit.export import write_export
    from kelix.dit.vae import VAEConfig, load_vae

    dit = dit_from_official(official_dir, dtype)
    vae = load_vae(VAEConfig(path=vae_dir, dtype=dtype))
    if vae.latent_channels != dit.latent_channels:
        raise ValueError(f"{vae_dir}: the VAE has {vae.latent_channels} latent channels, the DiT in {official_dir} "
                         f"takes {dit.latent_channels}")
    return write_export(dit, vae, RELEASE_FLOW, out)
