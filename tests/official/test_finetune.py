"""Fine-tuning the converted release: LoRA on it trains the adapters (and the block decoder) only, and the
result still has an official layout (visual_bias stays 0)."""

from __future__ import annotations

import torch

from kelix.llm.config import LLMConfig
from kelix.lora import LoRAConfig
from kelix.training.optim import OptimConfig
from tests.lora.test_llm_lora import _train


def test_lora_on_the_converted_release_trains_only_the_adapters(converted):
    from kelix.llm.module import UnifiedLLMModule

    torch.manual_seed(0)
    # a pipeline directory (its llm/), the bf16 release read into fp32 master weights as the recipes do
    m = UnifiedLLMModule(init_from=str(converted), lm=LLMConfig(dtype="float32"),
                         lora=LoRAConfig(r=4, alpha=8, dropout=0.0),
                         optim=OptimConfig(lr=1e-2, schedule="constant", weight_decay=0.1))
    assert m.lm.config.decoder_kind == "release"
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n or n.startswith("lm.decoder.") for n in names)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    losses = _train(m)
    assert losses[-1] < losses[0]
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == names
    assert float(m.lm.visual_bias.abs().max()) == 0.0  # to-official can still write it
