"""LoRA on the unified LLM: only the adapters (and the parts chosen) change, the loss goes down, checkpoints
hold what trains, and the merged export equals the adapter model."""

from __future__ import annotations

import pytest
import torch

from kelix.lora import LoRAConfig
from kelix.lora.llm import keep_text_rows_
from kelix.training.optim import OptimConfig, build_optimizer

from .conftest import doc_batch


def _module(base_dir, **lora):
    from kelix.llm.module import UnifiedLLMModule

    torch.manual_seed(0)
    return UnifiedLLMModule(init_from=base_dir, lora=LoRAConfig(r=4, alpha=8, dropout=0.0, **lora),
                            optim=OptimConfig(lr=1e-2, schedule="constant", weight_decay=0.1))


def _train(m, steps: int = 6):
    opt = build_optimizer(m, m.optim, steps)["optimizer"]
    losses = []
    for i in range(steps):
        loss = m.step(doc_batch(m.lm, seed=i % 2), "train")["loss"]
        loss.backward()
        if m.lora.train_visual_head:
            keep_text_rows_(m.lm)  # what on_before_optimizer_step does
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_lora_trains_only_the_adapters_and_the_decoder(base_dir):
    m = _module(base_dir)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n or n.startswith("lm.decoder.") for n in names)
    assert any(".q_proj.lora_A." in n for n in names) and any(".down_proj.lora_B." in n for n in names)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    losses = _train(m)
    assert losses[-1] < losses[0]
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == names  # every trainable tensor moved, nothing else did


def test_the_visual_head_rows_train_and_the_text_rows_stay_bit_identical(base_dir):
    m = _module(base_dir, train_decoder=False, train_visual_head=True)
    head = m.lm.lm_head.weight
    vo = m.lm.vocab.visual_offset
    text, visual = head[:vo].detach().clone(), head[vo:].detach().clone()
    dec = {n: p.detach().clone() for n, p in m.lm.decoder.named_parameters()}
    _train(m, 3)
    assert torch.equal(head[:vo], text)  # weight decay 0.1 and lr 1e-2 would move them if they were in the step
    assert not torch.equal(head[vo:], visual)
    assert all(torch.equal(p, dec[n]) for n, p in m.lm.decoder.named_parameters())
    assert "lm.backbone.lm_head.weight" in m.no_weight_decay()


def test_embeddings_train_when_asked(base_dir):
    m = _module(base_dir, train_embeddings=True)
    emb = m.lm.backbone.get_input_embeddings().weight
    assert emb.requires_grad and not m.lm.lm_head.weight.requires_grad


def test_a_checkpoint_holds_the_trainable_tensors_only(base_dir):
    m = _module(base_dir)
    sd = m.state_dict()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable <= set(sd)
    assert not any(k.endswith("base_layer.weight") or k == "lm.backbone.lm_head.weight" for k in sd)
    assert sum(v.numel() for v in sd.values()) < 0.5 * sum(p.numel() for p in m.parameters())


def test_an_unknown_target_module_is_named():
    with pytest.raises(ValueError, match=r"lora.target_modules \['qkv'\] match no linear layer"):
        from kelix.lora import apply_lora

        apply_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoRAConfig(target_modules=["qkv"]))


def test_merged_export_has_the_adapter_models_logits(base_dir, tok_dir, tmp_path):
    from kelix.llm.export import main as export_main
    from kelix.llm.model import KelixLM

    m = _module(base_dir, train_visual_head=True)
    _train(m, 3)
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert ckpt["kelix_llm"]["lora"]["base"] == base_dir
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert export_main(["--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "plain")]) == 2  # no base in it
    assert export_main(["--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    merged, adapter = KelixLM.from_pretrained(tmp_path / "merged"), m.lm.eval()
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    batch = doc_batch(merged, seed=3)
    args = (batch["tokens"], batch["codes"], batch["position_ids"], batch["targets"])
    with torch.no_grad():
        a, b = adapter(*args, return_logits=True), merged(*args, return_logits=True)
        base = KelixLM.from_pretrained(base_dir).eval()(*args, return_logits=True)
    assert a.is_visual.any()
    torch.testing.assert_close(b.logits0, a.logits0, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.code_logits, a.code_logits, atol=1e-5, rtol=0)
    assert (base.code_logits - a.code_logits).abs().max() > 1e-2  # the adapters (and the rows) changed the model
    from kelix.pipeline import KelixPipeline  # the pipeline takes it as any exported LLM

    pipe = KelixPipeline.from_pretrained(tokenizer=tok_dir, llm=str(tmp_path / "merged"), dit=False)
    assert isinstance(pipe.understand([], "hello", max_new_tokens=2), str)


def test_merge_in_place_equals_the_state_dict_merge():
    from kelix.lora import apply_lora, merge_lora_, merge_lora_state_dict

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    apply_lora(net, cfg := LoRAConfig(r=2, alpha=3, dropout=0.0, target_modules=["0", "2"]))
    for n, p in net.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    x = torch.randn(4, 6)
    with torch.no_grad():
        want = net(x)
    by_sd = merge_lora_state_dict(net.state_dict(), cfg.scale)
    merge_lora_(net)
    assert set(by_sd) == set(net.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(torch.equal(by_sd[k], v) for k, v in net.state_dict().items())
    torch.testing.assert_close(net(x), want, atol=1e-6, rtol=0)


def test_activation_checkpointing_under_lora_gives_the_same_gradients(base_dir):
    plain, ckpt = _module(base_dir), _module(base_dir)
    ckpt.activation_checkpointing = True
    ckpt.configure_model()
    batch = doc_batch(plain.lm, seed=1)
    for m in (plain, ckpt):
        m.step(batch, "train")["loss"].backward()
    a = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    b = {n: p.grad for n, p in ckpt.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and all(g is not None for g in a.values())
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-6, rtol=1e-5)
