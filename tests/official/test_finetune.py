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


def test_a_fine_tuned_release_goes_back_to_the_official_layout(converted, fixture_dir, tmp_path):
    """LoRA-train the converted fixture, merge, save, and write it back with to-official --llm: every key of the
    release, the trained tensors changed, the rest byte-identical to the release."""
    from kelix.llm.module import UnifiedLLMModule
    from kelix.lora.adapters import merge_lora_
    from kelix.official.to_official import to_official
    from tests.official.test_convert import _release_tensors

    torch.manual_seed(0)
    m = UnifiedLLMModule(init_from=str(converted), lm=LLMConfig(dtype="float32"),
                         lora=LoRAConfig(r=4, alpha=8, dropout=0.0, train_decoder=False),
                         optim=OptimConfig(lr=1e-2, schedule="constant", weight_decay=0.1))
    _train(m, steps=2)
    lm = merge_lora_(m.lm)
    lm.save_pretrained(tmp_path / "llm", dtype="bfloat16")
    to_official(str(converted), str(tmp_path / "official"), llm=str(tmp_path / "llm"), progress=False)
    orig, back = _release_tensors(fixture_dir / "sft"), _release_tensors(tmp_path / "official")
    assert sorted(back) == sorted(orig)
    # what the official forward reads of the parts LoRA left alone is the release's, byte for byte
    same = [k for k in orig if k.startswith(("visual_tokenizer.visual.encoder.", "visual_tokenizer.mlp_AR.",
                                             "model.model.token_head.transformer.", "model.model.norm",
                                             "model.model.output", "model.model.tok_embeddings"))]
    assert same and all(torch.equal(orig[k], back[k]) for k in same)
    trained = [k for k in orig if k.startswith("model.model.layers.") and k.endswith("_proj.weight")]
    assert trained and all(not torch.equal(orig[k], back[k]) for k in trained)  # the merged adapters
