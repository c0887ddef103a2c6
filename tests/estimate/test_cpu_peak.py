"""The estimate's peak memory against the measured peak of real training steps on CPU (fp32): full
fine-tuning, with activation checkpointing, and LoRA. The profiler's allocation events give the peak."""

from __future__ import annotations

import pytest
import torch

from kelix.estimate.memory import LLMRun, llm_memory
from kelix.estimate.models import Part, meta_llm
from kelix.estimate.recipe import RunShape

from .measure import step_peak_bytes

BACKBONE = dict(model_type="qwen3", vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                tie_word_embeddings=True)
LM = dict(N=4, K=256, visual_input="table", decoder_width=64, decoder_heads=2, decoder_ffn=128)
ROWS, LENGTH = 2, 256


def _measure(checkpointing: bool, lora: dict | None) -> int:
    from benchmarks.bench_llm import make_batch
    from kelix.llm.loss import nbp_loss
    from kelix.llm.model import KelixLM, LLMConfig

    torch.manual_seed(0)
    lm = KelixLM(LLMConfig(backbone_config=BACKBONE, text_tokenizer="builtin:bytes", attn_implementation="sdpa", **LM))
    if lora:
        from kelix.lora import LoRAConfig
        from kelix.lora.llm import apply_llm_lora

        apply_llm_lora(lm, LoRAConfig(**lora))
    if checkpointing:
        from kelix.training.parallel import apply_activation_checkpointing

        apply_activation_checkpointing(lm, lm.blocks())
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(lm, ROWS, LENGTH, 0.5, "cpu")

    def step():
        nbp_loss(lm(*batch), lm.vocab.N)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on: the second step is the steady one
    alive = [*lm.parameters(), *lm.buffers(), *(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))]
    return step_peak_bytes(step, alive)


def _estimate(checkpointing: bool, lora: dict | None) -> int:
    lm = meta_llm(dict(LM), BACKBONE, "builtin:bytes")
    if lora:
        from kelix.lora import LoRAConfig
        from kelix.lora.llm import apply_llm_lora

        apply_llm_lora(lm, LoRAConfig(**lora))
    shape = RunShape(1, "single", "32", ROWS, LENGTH, 1, 1)
    return llm_memory(lm, [Part("all", list(lm.parameters()))], shape, LLMRun(checkpointing, None)).total


@pytest.mark.parametrize("checkpointing,lora", [(False, None), (True, None), (False, {"r": 8, "dropout": 0.05})],
                         ids=["full", "checkpointing", "lora"])
def test_the_estimated_peak_is_within_25_percent_of_a_measured_cpu_step(checkpointing, lora):
    measured, estimated = _measure(checkpointing, lora), _estimate(checkpointing, lora)
    assert abs(estimated - measured) / measured < 0.25, (estimated / 2**20, measured / 2**20)
