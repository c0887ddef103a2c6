"""The parts of a run built on the ``meta`` device from configs only (shapes and dtypes, no weights), frozen
or trainable exactly as the run's module would leave them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from kelix.estimate.recipe import RecipeError


@dataclass
class Part:
    """One network of the run, or a named piece of one.

    Args:
        name: what the table shows.
        params: its parameters (on ``meta``).
        on_gpu: it lives on the GPU during training (a frozen tokenizer or VAE does, too).
        note: shown beside it (where a config was missing, what the row holds).
    """

    name: str
    params: list[nn.Parameter] = field(default_factory=list)
    on_gpu: bool = True
    note: str = ""
    factor: int | None = None  # a VAE's spatial compression

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params if p.requires_grad)

    @property
    def frozen(self) -> int:
        return sum(p.numel() for p in self.params if not p.requires_grad)

    def bytes(self, trainable: bool) -> int:
        return sum(p.numel() * p.element_size() for p in self.params if p.requires_grad == trainable)


def is_llm_dir(path: str) -> bool:
    """A Kelix LLM directory (as :func:`kelix.llm.module.is_llm_dir`, without importing Lightning)."""
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "backbone"))


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def llm_config(init_args: dict):
    """``(LLMConfig kwargs, backbone config dict, text tokenizer)`` of a ``UnifiedLLMModule`` recipe: from its
    ``init_from`` Kelix LLM directory (config files only), else from ``lm``."""
    from kelix.llm.config import LLMConfig

    lm = dict(init_args.get("lm") or {})
    known = {f.name for f in fields(LLMConfig)}
    src = init_args.get("init_from")
    if src:
        if not is_llm_dir(src):
            raise RecipeError(f"model.init_args.init_from {src!r} is not a Kelix LLM directory (config.json + backbone/): "
                              "the estimate reads its config files (run kelix convert official, or the earlier stage, first)")
        cfg = {k: v for k, v in _read_json(os.path.join(src, "config.json")).items() if k in known}
        cfg.update({k: lm[k] for k in ("dtype", "attn_implementation", "loss_chunk") if lm.get(k) is not None})
        text = src if os.path.isfile(os.path.join(src, "tokenizer_config.json")) else "builtin:bytes"  # ids only
        return cfg, _read_json(os.path.join(src, "backbone", "config.json")), text
    if lm.get("backbone"):
        bb = _read_json(os.path.join(lm["backbone"], "config.json"))
    elif lm.get("backbone_config"):
        bb = dict(lm["backbone_config"])
    else:
        raise RecipeError("model.init_args: set init_from (a Kelix LLM directory) or lm.backbone / lm.backbone_config")
    cfg = {k: v for k, v in lm.items() if k in known and k not in ("backbone", "backbone_config", "image_tokenizer")}
    if lm.get("image_tokenizer") and (cfg.get("N") is None or cfg.get("K") is None):
        tok = _read_json(os.path.join(lm["image_tokenizer"], "config.json"))
        cfg.setdefault("N", tok.get("N"))
        cfg.setdefault("K", tok.get("K"))
        if cfg.get("visual_input") == "projector":
            cfg.update(vq_dim=tok.get("d"), vq_out_dim=tok.get("out_dim"), fusion=tok.get("fusion", "sum"))
    return cfg, bb, lm.get("text_tokenizer") or lm.get("backbone") or "builtin:bytes"


def meta_llm(cfg: dict, backbone_config: dict, text_tokenizer: str):
    """A :class:`~kelix.llm.model.KelixLM` on ``meta`` (the vocabulary extended as a build would)."""
    from kelix.llm.model import KelixLM, LLMConfig

    bb = {k: v for k, v in backbone_config.items() if k not in ("architectures", "transformers_version")}
    if "dtype" in bb and not cfg.get("dtype"):  # weights load in the directory's dtype when the recipe names none
        cfg = {**cfg, "dtype": bb["dtype"]}
    bb.pop("dtype", None)
    bb.pop("torch_dtype", None)
    args = {**cfg, "backbone": None, "backbone_config": bb, "image_tokenizer": None, "text_tokenizer": text_tokenizer,
            "attn_implementation": "sdpa", "compile_layers": False}
    if args.get("visual_input") == "projector" and not args.get("vq_dim"):
        args["visual_input"] = "table"
    with torch.device("meta"):
        return KelixLM(LLMConfig(**args))


def llm_parts(init_args: dict):
    """``(parts, lm)`` of a ``UnifiedLLMModule`` recipe, frozen as the module freezes them."""
    from kelix.lora.adapters import LoRAConfig
    from kelix.lora.llm import apply_llm_lora

    cfg, bb, text = llm_config(init_args)
    lm = meta_llm(cfg, bb, text)
    if init_args.get("freeze_backbone"):
        lm.body.requires_grad_(False)
    if init_args.get("freeze_lm_head"):
        lm.lm_head.requires_grad_(False)
        lm.visual_bias.requires_grad_(False)
    if init_args.get("lora") is not None:  # {}: LoRA with its defaults
        apply_llm_lora(lm, LoRAConfig(**init_args["lora"]))
    emb, head = lm.backbone.get_input_embeddings(), lm.lm_head
    lora = [p for n, p in lm.named_parameters() if ".lora_" in n]
    seen = {id(p) for p in [*emb.parameters(), *head.parameters(), *lm.decoder.parameters(), *lora, lm.visual_bias]}
    if lm.visual is not None:
        seen |= {id(p) for p in lm.visual.parameters()}
    parts = [Part("backbone layers + final norm", [p for p in lm.parameters() if id(p) not in seen]),
             Part("embedding table", list(emb.parameters()),
                  note=f"{lm.vocab.visual_offset:,} text + {lm.vocab.N * lm.vocab.K:,} visual rows"),
             Part("LM head (+ visual_bias)", [*head.parameters(), lm.visual_bias]),
             Part("block decoder", list(lm.decoder.parameters()))]
    if lm.visual is not None:
        parts.append(Part("visual projector", list(lm.visual.parameters())))
    if lora:
        parts.append(Part("LoRA adapters", lora, note=f"r={LoRAConfig(**init_args['lora']).r}"))
    tok = init_args.get("image_tokenizer") or (init_args.get("lm") or {}).get("image_tokenizer")
    if tok:
        parts.append(tokenizer_part(tok))
    return parts, lm


def tokenizer_part(path: str, name: str = "image tokenizer (frozen)") -> Part:
    from kelix.tokenizer.model import KelixTokenizer, TokenizerConfig

    conf = os.path.join(path, "config.json")
    if not os.path.isfile(conf):
        return Part(name, note=f"{path} not found: not counted")
    known = {f.name for f in fields(TokenizerConfig)}
    raw = _read_json(conf)
    with torch.device("meta"):
        tok = KelixTokenizer(TokenizerConfig(**{k: v for k, v in raw.items() if k in known}))
    return Part(name, [p.requires_grad_(False) for p in tok.parameters()])


def _diffusers_on_meta(cls, path: str, dtype=None):
    import logging

    config = cls.load_config(path)
    with torch.device("meta"):
        model = cls.from_config(config)
    quiet = logging.getLogger("diffusers")
    level, _ = quiet.level, quiet.setLevel(logging.ERROR)  # a cast on meta needs no float32 advice
    model = model.to(dtype) if dtype is not None else model
    quiet.setLevel(level)
    return model


def dit_parts(init_args: dict):
    """``(parts, transformer)`` of a ``DiTModule`` recipe: the trainable DiT (transformer, connector, null
    condition), its EMA copy and the frozen VAE, condition LLM and tokenizer."""
    from kelix.dit.model import DiTConfig, KelixDiT

    dit = dict(init_args.get("dit") or {})
    path = dit.pop("transformer_path", None)
    dit.pop("transformer_variant", None)
    if path:
        from diffusers import SanaTransformer2DModel

        if not os.path.isfile(os.path.join(path, "config.json")):
            raise RecipeError(f"model.init_args.dit.transformer_path {path!r} has no config.json")
        known = {k: v for k, v in SanaTransformer2DModel.load_config(path).items() if not k.startswith("_")}
        dit["transformer"] = {**known, **(dit.get("transformer") or {})}
    with torch.device("meta"):
        model = KelixDiT(DiTConfig(**dit))
    parts = [Part("DiT transformer", list(model.transformer.parameters())),
             Part("connector + null condition", [*model.connector.parameters(), model.null_condition])]
    ema = [torch.nn.Parameter(p.detach().clone(), requires_grad=False) for p in model.parameters()]
    parts.append(Part("EMA of the DiT (frozen)", ema, note="fp32, sharded like the weights"))
    parts.append(_vae_part(init_args.get("vae") or {}))
    cond = init_args.get("condition") or {}
    cargs = cond.get("init_args") or {} if isinstance(cond, dict) else {}
    if "LLMConditions" in str(cond.get("class_path", "") if isinstance(cond, dict) else cond):
        lm_dir = cargs.get("lm")
        if lm_dir and is_llm_dir(lm_dir):
            cfg, bb, text = llm_config({"init_from": lm_dir})
            lm = meta_llm({**cfg, "dtype": cargs.get("dtype", "bfloat16")}, bb, text)
            parts.append(Part("condition LLM (frozen)", [p.requires_grad_(False) for p in lm.parameters()]))
        else:
            parts.append(Part("condition LLM (frozen)", note=f"{lm_dir} not found: not counted"))
        if cargs.get("tokenizer"):
            parts.append(tokenizer_part(cargs["tokenizer"]))
    return parts, model


def _vae_part(vae: dict) -> Part:
    from kelix.dit.vae import DTYPES

    dtype = DTYPES[vae.get("dtype", "float32")]
    path = vae.get("path")
    if path is None:
        from kelix.dit.vae import VAEConfig, load_vae

        with torch.device("meta"):
            model = load_vae(VAEConfig(**vae))
    elif not os.path.isfile(os.path.join(path, "config.json")):
        return Part("VAE (frozen)", note=f"{path} not found: not counted")
    else:
        import diffusers

        name = _read_json(os.path.join(path, "config.json")).get("_class_name", "AutoencoderDC")
        model = _diffusers_on_meta(getattr(diffusers, name), path, dtype)
    cfg = getattr(model, "config", {})
    blocks = cfg.get("encoder_block_out_channels") or cfg.get("block_out_channels") or [0] * 6
    factor = getattr(model, "spatial_compression_ratio", None) or 2 ** (len(blocks) - 1)
    return Part("VAE (frozen)", [p.requires_grad_(False) for p in model.parameters()], factor=int(factor))
