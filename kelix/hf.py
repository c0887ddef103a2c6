"""Hugging Face causal LMs from a local path or a config (never from a hub).

``TINY_QWEN3`` is the named tiny config of the quickstarts and tests, beside the paper's real models,
which are loaded from local directories (Qwen3-0.6B for the tokenizer's aux LM, Qwen3-8B for the LLM).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from typing import Any

TINY_QWEN3: dict[str, Any] = dict(
    model_type="qwen3",
    vocab_size=320,  # the 256 bytes + specials of the builtin byte tokenizer, rounded up
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)


def attention_backend(requested: str | None = None) -> str:
    """``flash_attention_2`` when installed and on a GPU, else PyTorch SDPA (or what was asked)."""
    if requested:
        return requested
    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(path: str | None = None, config: dict | None = None, dtype: str | None = None,
                   attn_implementation: str | None = None):
    """A causal LM from a local directory, or randomly initialised from a config dict.

    Args:
        path: local directory of a transformers model (``config.json`` + weights).
        config: a config dict with ``model_type`` (e.g. :data:`TINY_QWEN3`), used when ``path`` is None.
        dtype: ``float32`` / ``bfloat16`` / ``float16`` for the weights (default: the checkpoint's or float32).
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (default: see :func:`attention_backend`).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = attention_backend(attn_implementation)
    torch_dtype = getattr(torch, dtype) if dtype else None
    if path is not None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"causal LM path {path!r} is not a local directory (nothing is downloaded)")
        from kelix.console.quiet import quiet_loading

        with quiet_loading():  # no "Loading weights" bar on every start
            return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype,
                                                        attn_implementation=attn)
    if config is None:
        raise ValueError("give either a local path or a config dict for the causal LM")
    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ValueError("the causal LM config needs a 'model_type' (e.g. 'qwen3')")
    hf_cfg = AutoConfig.for_model(model_type, **cfg)
    hf_cfg._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch_dtype or torch.float32)
    return model


@functools.cache
def _cache_name(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for ``model.forward``: transformers renamed ``past_key_values`` to ``cache``
    (the old name warns on every call, then goes away); older releases only know the old one."""
    return {_cache_name(type(model)): cache}


def output_cache(model, out):
    """The KV cache of ``model``'s output ``out`` (the field follows the same rename)."""
    return getattr(out, _cache_name(type(model)), None)
