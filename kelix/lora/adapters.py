"""LoRA adapters on any ``nn.Module`` through ``peft.inject_adapter_in_model`` (the module keeps its class and
names; each targeted ``nn.Linear`` becomes a peft ``LoraLayer`` whose frozen weight is ``<name>.base_layer.weight``
and whose adapters are ``<name>.lora_A.default.weight`` / ``lora_B``), and their merge into plain weights,
``W + (alpha / r) B A``, either in place or on a (gathered) state dict."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

ADAPTER = "default"  # peft's adapter name; one adapter per model
LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRAConfig:
    """LoRA adapters (peft) on the backbone's linear layers; everything else is frozen unless named here.

    Args:
        r: adapter rank.
        alpha: scale numerator: an adapter adds ``(alpha / r) B A x`` (``alpha / sqrt(r)`` with ``rslora``).
        dropout: dropout on the adapters' input (training only).
        target_modules: names of the linear layers that get adapters (the last part of their module name,
            as peft matches them). Default: every attention and MLP projection of a Qwen3/Llama backbone.
        rslora: rank-stabilised scale ``alpha / sqrt(r)``.
        train_decoder: (LLM) the block decoder trains in full (about 5M weights at the release's size).
        train_visual_head: (LLM) the LM head's S = N*K visual rows and the slot-0 ``visual_bias`` train; its
            text rows stay bit-identical (their gradient is zeroed, and the head gets no weight decay).
        train_embeddings: (LLM) the input embedding table (text and visual rows, and a stage-1 projector) trains.
        train_connector: (DiT) the condition connector and the learned null condition train in full. For the
            DiT name its SANA layers in ``target_modules``, e.g. ``[to_q, to_k, to_v, to_out.0]``.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLM_TARGETS))
    rslora: bool = False
    train_decoder: bool = True
    train_visual_head: bool = False
    train_embeddings: bool = False
    train_connector: bool = True

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"lora.r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty: name the linear layers that get adapters")

    @property
    def scale(self) -> float:
        return self.alpha / (self.r ** 0.5 if self.rslora else self.r)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Inject adapters into ``model`` in place and freeze everything of ``model`` but them. The adapters are
    kept in float32 whatever the base's dtype (a bfloat16 base under bf16-mixed still updates fp32 adapters).
    A target that matches nothing is an error naming it."""
    from peft import LoraConfig, inject_adapter_in_model

    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in cfg.target_modules if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:  # peft matches a target against the end of a module's name
        names = sorted({n.split(".", 2)[-1] if n.count(".") > 1 else n for n in linear})
        raise ValueError(f"lora.target_modules {missing} match no linear layer of {type(model).__name__} "
                         f"(its linear layers end in: {names[:12]})")
    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                          use_rslora=cfg.rslora, bias="none")
    inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data = p.data.float()
    return model


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def merge_lora_(model: nn.Module) -> nn.Module:
    """Fold every adapter of ``model`` into its base weight (computed in float32, stored in the base's dtype)
    and put the plain base layer back in its place: the model has its original classes and names again."""
    for name, layer in _lora_layers(model):
        base = layer.get_base_layer()
        A, B = layer.lora_A[ADAPTER].weight.float(), layer.lora_B[ADAPTER].weight.float()
        base.weight.copy_((base.weight.float() + layer.scaling[ADAPTER] * (B @ A)).to(base.weight.dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, base)
    return model


def merge_lora_state_dict(sd: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A state dict with adapters (peft names) -> the plain model's: ``<m>.base_layer.<t>`` becomes ``<m>.<t>``,
    with ``<m>.weight = base + scale * B @ A`` (float32 math, the base's dtype), and the adapters dropped. For a
    state dict gathered from FSDP2 shards, where the modules cannot be merged in place."""
    out: dict[str, torch.Tensor] = {}
    suffix = f".lora_A.{ADAPTER}.weight"
    for k, v in sd.items():
        if ".lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    for k in sd:
        if k.endswith(suffix):
            m = k[: -len(suffix)]
            A, B = sd[k].float(), sd[f"{m}.lora_B.{ADAPTER}.weight"].float()
            w = out[f"{m}.weight"]
            out[f"{m}.weight"] = (w.float() + scale * (B.to(A.device) @ A)).to(w.dtype)
    return out
