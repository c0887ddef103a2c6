"""FSDP2 with bf16 parameters on 2 gloo ranks: the quantizer is its own unit gathered in float32, so
training-time codes are the float32 codes of the exported tokenizer."""

import pytest

from tests.distributed.tokenizer_ranks import spawn

pytestmark = pytest.mark.distributed


def test_quantizer_is_gathered_in_float32_and_its_codes_equal_the_fp32_reference(tmp_path):
    for r in spawn("fsdp_body", tmp_path):
        assert r["block_dtype"] == "torch.bfloat16"  # the rest of the model is gathered in bf16
        assert r["quantizer_dtypes"] == ["torch.float32"]
        assert r["codes_equal"] and r["tokens"] == 96, r  # 96 tokens x 4 slots, K=256: bf16 flips some


def test_fsdp2_gradients_equal_one_process_including_the_tied_aux_lm_embedding(tmp_path):
    """The aux LM's tied embedding table is used for the inputs and as the head: both uses sit inside the
    aux LM's forward, so FSDP2 reduces its complete gradient (it got none when they were outside)."""
    for r in spawn("fsdp_grad_body", tmp_path):
        assert r["missing"] == [] and r["checked"] == 70
        assert r["worst"] < 1e-5, r  # max |g - g_ref| / max |g_ref| over every parameter
