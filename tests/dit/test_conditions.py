"""Condition providers: pre-computed pass-through and the smoke-test prompt-bytes condition."""

import pytest
import torch

from kelix.dit.conditions import PrecomputedConditions, PromptBytesConditions


def test_prompt_bytes_are_table_rows_plus_positions():
    c = PromptBytesConditions(dim=8, max_length=4, seed=0)
    states, mask = c({"prompts": ["ab", "hello"]})
    assert states.shape == (2, 4, 8) and mask.tolist() == [[True, True, False, False], [True] * 4]
    table = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(states[0, 0], table[ord("a")] + torch.tensor([0.0, 1.0] * 4))  # sin 0, cos 0
    again, _ = PromptBytesConditions(dim=8, max_length=4, seed=0)({"prompts": ["ab", "hello"]})
    assert torch.equal(states, again) and c.dim == 8 and c.needs == "prompt"
    assert not any(True for _ in c.parameters())  # nothing to train, nothing saved


def test_precomputed_passes_states_and_mask_through():
    batch = {"cond": torch.ones(2, 3, 4, dtype=torch.float16), "cond_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    states, mask = PrecomputedConditions(dim=4)(batch)
    assert states.dtype == torch.float32 and mask.dtype == torch.bool and mask.sum() == 5
    with pytest.raises(KeyError, match="condition: precomputed"):
        PrecomputedConditions()({"prompts": ["x"]})
    with pytest.raises(ValueError, match="even number"):
        PromptBytesConditions(dim=7)


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    """A tiny Kelix LLM (table mode, N=4, K=32, D=64) and a tiny Kelix tokenizer, saved and loaded back."""
    from kelix.hf import TINY_QWEN3
    from kelix.llm.model import KelixLM, LLMConfig
    from kelix.tokenizer.model import KelixTokenizer, tiny_config

    out = tmp_path_factory.mktemp("llm_cond")
    torch.manual_seed(0)
    tok = KelixTokenizer(tiny_config()).eval()
    tok.save_pretrained(out / "tok")
    lm = KelixLM(LLMConfig(backbone_config=TINY_QWEN3, text_tokenizer="builtin:bytes", N=tok.config.N, K=tok.config.K,
                           decoder_width=32, decoder_layers=1, decoder_heads=2, decoder_ffn=64))
    lm.save_pretrained(out / "lm")
    return str(out / "lm"), str(out / "tok")


def test_llm_conditions_are_the_teacher_forced_image_states(llm_dirs):
    from PIL import Image

    from kelix.data.schema import Image as SImage
    from kelix.data.schema import Part, Sample, Turn
    from kelix.dit.conditions import LLMConditions
    from kelix.dit.data import DiTProcessor
    from kelix.llm.condition import image_condition_states

    lm_dir, tok_dir = llm_dirs
    cond = LLMConditions(lm=lm_dir, tokenizer=tok_dir, dtype="float32")
    assert cond.dim == 64 and cond.needs == "llm" and not any(p.requires_grad for p in cond.parameters())
    pic = Image.new("RGB", (70, 50), (200, 40, 40))
    codes = torch.randint(0, 32, (2, 2, 4), generator=torch.Generator().manual_seed(0))

    def sample(key, codes=None):
        img = SImage("0.jpg", pixels=pic, codes=None if codes is None else codes.numpy())
        return Sample(key, "s.tar", "messages", [Turn("user", [Part("text", text=f"draw {key}")]),
                                                  Turn("assistant", [Part("image", image=img)])], "t2i")

    proc = DiTProcessor(target_size=16, condition_size=56, condition="llm")
    batch = proc.collate([proc(sample("a", codes)), proc(sample("b"))])
    states, mask = cond(batch)
    encoded = cond.tokenizer.encode([pic.resize((56, 56), Image.BICUBIC)])[0]
    assert encoded.shape == (2, 2, 4)  # the 56-px condition image: a 2x2 grid of 28-px tokens
    want, want_mask = image_condition_states(cond.lm, ["draw a", "draw b"], [codes, encoded])
    assert torch.equal(mask, want_mask) and torch.allclose(states, want)
    no_tok = LLMConditions(lm=lm_dir, dtype="float32")
    with pytest.raises(ValueError, match="has no pre-tokenized codes and LLMConditions.tokenizer is not set"):
        no_tok(batch)
