import pytest
import torch
from safetensors.torch import save_file

from kelix.data.schema import Image, Part, Sample, Turn
from kelix.hf import TINY_QWEN3
from kelix.tokenizer.data import TokenizerProcessor
from kelix.tokenizer.model import tiny_config
from kelix.tokenizer.module import TokenizerModule


def _module(**kw):
    torch.manual_seed(0)
    return TokenizerModule(tiny_config(), aux_lm_config=TINY_QWEN3, **kw)


@pytest.fixture(scope="module")
def batch(pil_images):
    proc = TokenizerProcessor("builtin:bytes", tiny_config().image)
    items = [proc(Sample(f"k{i}", "s.tar", "segments", [Turn(None, [Part("image", image=Image("0.jpg", im)),
                                                                      Part("text", text=f"picture {i}")])]))
             for i, im in enumerate(pil_images[:3])]
    return proc.collate(items)


def test_stage1_trains_only_merger_quantizer_and_up_projector():
    m = _module(stage=1)
    trained = {n.split(".")[1] for n, p in m.named_parameters() if p.requires_grad and n.startswith("tokenizer.")}
    assert trained == {"merger", "quantizer", "up_projector"}
    assert not any(p.requires_grad for p in m.aux_lm.parameters())
    assert not any(p.requires_grad for p in m.tokenizer.encoder.parameters())
    assert all(p.requires_grad for p in _module(stage=2).parameters())


def test_bad_options_fail_early():
    with pytest.raises(ValueError, match="no parameter name starts with 'tokenizer.quantiser.'"):
        _module(trainable=["tokenizer.quantiser."])
    with pytest.raises(ValueError, match="out_dim is 32"):
        TokenizerModule(tiny_config(out_dim=32), aux_lm_config=TINY_QWEN3)
    with pytest.raises(ValueError, match="aux_lm"):
        TokenizerModule(tiny_config())


def test_step_is_ntp_plus_vq_and_the_lm_sees_the_images(batch):
    m = _module(vq_weight=0.5)
    out = m.step(batch, "train")
    torch.testing.assert_close(out["loss"], out["ntp"] + 0.5 * out["vq"])
    assert {"vq_codebook", "vq_commitment"} <= set(out)
    assert int(m.usage.counts.sum()) == int(batch["image_mask"].sum()) * 4  # every token's N codes counted
    other = dict(batch, pixels=[torch.zeros_like(p) for p in batch["pixels"]])
    assert m.step(other, "val")["ntp"] != out["ntp"]  # the visual embeddings reach the aux LM
    # the loss is the aux LM's next-token loss on the caption tokens only
    labels = batch["labels"]
    assert (labels[batch["image_mask"]] == -100).all() and (labels != -100).sum() > 0


def test_stage1_gradients_reach_the_quantizer_not_the_frozen_parts(batch):
    m = _module(stage=1)
    m.step(batch, "train")["loss"].backward()
    assert m.tokenizer.quantizer.proj_in.weight.grad.abs().sum() > 0
    assert m.tokenizer.quantizer.codebook.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.aux_lm.parameters())


def test_init_from_loads_a_previous_stage(tmp_path):
    a = _module()
    with torch.no_grad():
        a.tokenizer.up_projector.weight.add_(1.0)
    path = tmp_path / "stage1.safetensors"
    sd = a.state_dict()
    sd.pop("aux_lm.lm_head.weight")  # tied to the embeddings: stored once, as safetensors writers do
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    b = TokenizerModule(tiny_config(), aux_lm_config=TINY_QWEN3, init_from=str(path), stage=2)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_saved_aux_lm_trains_in_train_mode_with_dropout_and_checkpointing(tmp_path, batch):
    """from_pretrained returns an eval-mode model: the module must switch it to train mode."""
    from kelix.hf import load_causal_lm

    torch.manual_seed(0)
    load_causal_lm(config=dict(TINY_QWEN3, attention_dropout=0.5)).save_pretrained(tmp_path / "aux")
    torch.manual_seed(0)
    m = TokenizerModule(tiny_config(), aux_lm=str(tmp_path / "aux"), activation_checkpointing=True)
    assert all(mod.training for mod in m.aux_lm.modules())
    a, b = m.step(batch, "train")["ntp"], m.step(batch, "train")["ntp"]
    assert a != b  # dropout acts
    m.configure_model()  # the kit's activation checkpointing of parallel_blocks (HF layers: their own switch)
    calls = []
    m.aux_lm.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # recompute stops early
    m.step(batch, "train")["loss"].backward()
    assert len(calls) == 2  # forward, then recomputed in backward: checkpointing acts
    m.eval()
    assert m.step(batch, "val")["ntp"] == m.step(batch, "val")["ntp"]


def test_aux_lm_head_runs_on_labelled_positions_only_and_gives_the_full_logits_loss(batch):
    m = _module()
    rows = []
    m.aux_lm.get_output_embeddings().register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[:-1].numel()))
    ntp = m.step(batch, "train")["ntp"]
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert sum(rows) == labelled < batch["labels"].numel() - 20  # not every position: only those with a label
    # the reference: Hugging Face's own loss over full-vocabulary logits at every position
    with torch.no_grad():
        out = m.tokenizer(m.pixels(batch))
        emb = m.aux_lm.get_input_embeddings()(batch["input_ids"])
        emb = emb.masked_scatter(batch["image_mask"].unsqueeze(-1), out.embeds)
        ref = m.aux_lm(inputs_embeds=emb, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(ntp.detach(), ref, rtol=1e-6, atol=1e-6)


def test_simvq_projections_train_without_weight_decay():
    from kelix.training.optim import OptimConfig, param_groups

    m = _module()
    groups = {n: g["weight_decay"] for g in param_groups(m, OptimConfig(weight_decay=0.1)) for n in g["names"]}
    assert groups["tokenizer.quantizer.codebook.weight"] == 0 and groups["tokenizer.quantizer.codebook.bias"] == 0
    assert groups["tokenizer.up_projector.weight"] == 0.1 and groups["tokenizer.quantizer.proj_in.weight"] == 0.1


def test_stage1_of_the_continuous_baseline_trains_merger_and_up_projector():
    torch.manual_seed(0)
    m = TokenizerModule(tiny_config(quantizer="none"), aux_lm_config=TINY_QWEN3, stage=1)
    trained = {n.split(".")[1] for n, p in m.named_parameters() if p.requires_grad}
    assert trained == {"merger", "up_projector"} and m.usage is None


def test_validation_padding_batches_do_not_count_in_codebook_usage(batch):
    """A rank out of validation batches repeats its last one (marked padding): its codes must not count twice."""
    m = _module().eval()
    with torch.no_grad():
        m.step(batch, "val")
        once = m.val_usage.counts.clone()
        m.padding_batch = True
        m.step(batch, "val")
    assert once.sum() > 0 and torch.equal(m.val_usage.counts, once)
