"""Where a :class:`~kelix.llm.model.KelixLM`'s parts come from and go to, apart from its forward math: the
exported image tokenizer it reads N, K and the quantizer's sizes from, the S = N*K visual rows a plain
backbone's vocabulary is extended by, and its directory (save / load).

A directory holds ``config.json`` (:class:`~kelix.llm.config.LLMConfig`, paths dropped),
``model.safetensors`` (everything but the backbone), ``backbone/`` (transformers ``save_pretrained``:
loadable without the kit) and the extended text tokenizer's files, so one directory is enough to run it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, fields
from typing import TYPE_CHECKING

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from kelix.llm.config import LLMConfig

if TYPE_CHECKING:
    from kelix.llm.model import KelixLM

log = logging.getLogger("kelix.llm")


def fill_legacy(sd: dict) -> dict:
    """``sd`` with the tensors a model exported before they existed lacks, valued as that model ran
    (no slot-0 ``visual_bias``: 0)."""
    if "visual_bias" not in sd and any(k.startswith("decoder.") for k in sd):
        log.info("weights without visual_bias (an older export): using 0, as they were trained")
        sd = {**sd, "visual_bias": torch.zeros(1)}
    return sd


class LMDirectory(PyTorchModelHubMixin):
    """:class:`~kelix.llm.model.KelixLM`'s building from parts and its directory format (a mixin: it uses
    the model's ``config``, ``backbone``, ``text_tokenizer``, ``visual_bias`` and ``state_dict``)."""

    # -- building from parts
    def _read_image_tokenizer(self):
        """The exported image tokenizer of ``lm.image_tokenizer``; its N, K, fusion and quantizer sizes fill
        the config (a continuous tokenizer turns ``projector`` into ``continuous``)."""
        from kelix.tokenizer.model import KelixTokenizer

        cfg = self.config
        if not os.path.isdir(cfg.image_tokenizer):
            raise FileNotFoundError(f"lm.image_tokenizer {cfg.image_tokenizer!r} is not a directory (run kelix export-tokenizer)")
        tok = KelixTokenizer.from_pretrained(cfg.image_tokenizer)
        for name in ("N", "K"):
            have, want = getattr(tok.config, name), getattr(cfg, name)
            if want is not None and want != have:
                raise ValueError(f"lm.{name}={want} but the image tokenizer {cfg.image_tokenizer} has {name}={have}")
        cfg.N, cfg.K, cfg.fusion = tok.config.N, tok.config.K, tok.config.fusion
        cfg.vq_dim, cfg.vq_out_dim = tok.config.d, tok.config.out_dim
        if not tok.has_codes and cfg.visual_input != "continuous":
            if cfg.visual_input == "table":
                raise ValueError(f"lm.image_tokenizer {cfg.image_tokenizer} is continuous (quantizer: none): it has no "
                                 "codes for a visual table; use lm.visual_input projector or continuous")
            log.info("lm.image_tokenizer is continuous (quantizer: none): visual_input projector -> continuous")
            cfg.visual_input = "continuous"
        return tok

    @torch.no_grad()
    def _extend_vocab(self):
        """Append S visual rows to the embedding table and LM head.

        Input rows are drawn per dimension from the text rows' mean and std (a fresh ``table`` is
        Table 7 exp2's random visual input). LM-head rows start at the text rows' mean (plus 1% of
        their spread, to break ties): by Jensen each visual logit is then at most the log-mean-exp of
        the text logits, and with ``visual_bias`` at ``log(m * V / K)`` the K ids slot 0 adds get at most
        about ``m = visual_init_mass`` of a text position's probability (Hewitt 2021, "Initializing
        new word embeddings"; random rows would be as loud as text rows and take a large share).
        """
        bb, cfg = self.backbone, self.config
        emb, head = bb.get_input_embeddings(), bb.get_output_embeddings()
        rows = emb.num_embeddings
        if head is not None and head.weight is emb.weight:  # stage 1 trains the head, not the input table
            bb.config.tie_word_embeddings = False
            head.weight = nn.Parameter(emb.weight.detach().clone())
        cfg.visual_offset = max(rows, len(self.text_tokenizer))
        old = [m.weight[:rows].detach().float().clone() for m in (emb, head)]
        bb.resize_token_embeddings(cfg.visual_offset + cfg.N * cfg.K, mean_resizing=False)
        for m, w, spread in zip((bb.get_input_embeddings(), bb.get_output_embeddings()), old, (1.0, 0.01)):
            new = w.mean(0) + spread * w.std(0) * torch.randn(m.weight.shape[0] - rows, w.shape[1])
            m.weight[rows:] = new.to(m.weight.dtype)
        if getattr(bb.get_output_embeddings(), "bias", None) is not None:
            head_bias = bb.get_output_embeddings().bias
            head_bias[rows:] = head_bias[:rows].float().mean().to(head_bias.dtype)
        text_rows = cfg.visual_offset - 1  # <eob> never competes in slot 0
        self.visual_bias.fill_(math.log(cfg.visual_init_mass * text_rows / cfg.K))
        log.info("vocabulary extended: %d text rows + %d visual ids (N=%d, K=%d)", cfg.visual_offset,
                 cfg.N * cfg.K, cfg.N, cfg.K)

    # -- save / load
    def portable_config(self) -> dict:
        """The config stored in ``config.json``: paths are dropped (the directory holds the parts)."""
        return asdict(self.config) | dict(backbone=None, backbone_config=None, text_tokenizer=None, image_tokenizer=None)

    def save_pretrained(self, save_directory, *, state_dict: dict | None = None, dtype: str | None = None, **kwargs):
        """Write the directory; ``state_dict`` overrides the module's (a gathered FSDP state dict),
        ``dtype`` casts floating tensors (e.g. ``bfloat16`` for a release)."""
        self._export = (state_dict, dtype)
        try:
            kwargs.setdefault("config", self.portable_config())
            return super().save_pretrained(save_directory, **kwargs)
        finally:
            self._export = None

    def _save_pretrained(self, save_directory) -> None:
        from safetensors.torch import save_file

        state_dict, dtype = getattr(self, "_export", None) or (None, None)
        sd = state_dict if state_dict is not None else self.state_dict()
        cast = getattr(torch, dtype) if dtype else None

        def prep(v):
            v = v.detach().cpu()
            return (v.to(cast) if cast is not None and v.is_floating_point() else v).contiguous()

        bb = {k[len("backbone."):]: prep(v) for k, v in sd.items() if k.startswith("backbone.")}
        rest = {k: prep(v) for k, v in sd.items() if not k.startswith("backbone.")}
        self.backbone.save_pretrained(os.path.join(save_directory, "backbone"), state_dict=bb)
        self.text_tokenizer.save_pretrained(save_directory)
        save_file(rest, os.path.join(save_directory, "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> KelixLM:
        path = str(pretrained_model_name_or_path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path!r} is not a Kelix LLM directory (no config.json; nothing is downloaded)")
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, config=None, map_location: str = "cpu", dtype: str | None = None,
                         attn_implementation: str | None = None, **kwargs) -> KelixLM:
        from safetensors.torch import load_file

        if config is None:
            with open(os.path.join(model_id, "config.json")) as f:
                config = json.load(f)
        known = {f.name for f in fields(LLMConfig)}
        cfg = LLMConfig(**{k: v for k, v in (config if isinstance(config, dict) else asdict(config)).items() if k in known}
                        | dict(backbone=os.path.join(model_id, "backbone"), backbone_config=None,
                               text_tokenizer=model_id, image_tokenizer=None))
        if dtype is not None:
            cfg.dtype = dtype
        if attn_implementation is not None:
            cfg.attn_implementation = attn_implementation
        model = cls(cfg)
        sd = fill_legacy(load_file(os.path.join(model_id, "model.safetensors"), device=map_location))
        own = {k for k in model.state_dict() if not k.startswith("backbone.")}
        missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
        if missing or unexpected:
            raise KeyError(f"{model_id}/model.safetensors does not match the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
        model.load_state_dict(sd, strict=False)
        # one dtype for the whole model: the backbone's as loaded (a bf16 release stays bf16 unless dtype says)
        return model.to(model.backbone.dtype).eval()
