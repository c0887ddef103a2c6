"""Each paper-scale LLM recipe's budget: its header's arithmetic is the config's, and it meets Table 5."""

import re

import pytest

from tests import recipe_headers as rh

# paper Table 5 (samples, tokens) per LLM stage
TABLE5 = {"stage1_align": (191e6, 108e9), "stage2_1_interleaved": (173e6, 191e9), "stage2_2_multitask": (593e6, 679e9),
          "stage3_anneal": (40e6, 70e9), "stage4_sft": (4e6, 8e9)}
LLM = [f"recipes/llm/{s}.yaml" for s in TABLE5]
SAMPLES = re.compile(r"samples = max_steps ([\d,]+) x batch (\d+) x (\d+) GPUs(?: x accumulate (\d+))? = ([\d.]+)M "
                     r"\(Table 5: ([\d.]+)M\)")
TOKENS = re.compile(r"tokens\s+= ([\d.]+)M samples x ([\d.]+) tokens per sample = ([\d.]+)B \(Table 5: ([\d.]+)B\)")


def budget_lines(path):
    text = " ".join(ln.lstrip("#").strip() for ln in rh.header(path))
    s, t = SAMPLES.search(text), TOKENS.search(text)
    assert s and t, f"{path}: the header has no 'samples = max_steps ...' / 'tokens = ...' budget lines"
    return text, s, t


@pytest.mark.parametrize("path", LLM)
def test_header_arithmetic_is_the_configs_and_meets_table5(path):
    samples5, tokens5 = TABLE5[path.split("/")[-1][:-5]]
    cfg = rh.config(path)
    text, s, t = budget_lines(path)
    steps, batch, gpus = int(s[1].replace(",", "")), int(s[2]), int(s[3])
    accumulate = int(s[4] or 1)
    trainer = cfg["trainer"]
    assert steps == trainer["max_steps"], f"{path}: header max_steps {steps}, config {trainer['max_steps']}"
    assert batch == cfg["data"]["init_args"]["batch_size"]
    assert gpus == trainer.get("num_nodes", 1) * trainer["devices"]
    assert accumulate == trainer.get("accumulate_grad_batches", 1)
    samples = steps * batch * gpus * accumulate
    assert float(s[5]) == pytest.approx(samples / 1e6, abs=0.005), f"{path}: {s[0]} is {samples / 1e6:.2f}M"
    assert float(s[6]) * 1e6 == samples5, f"{path}: Table 5 says {samples5 / 1e6:g}M samples"
    per = float(t[2])
    assert float(t[1]) == pytest.approx(samples / 1e6, abs=0.005)
    assert per == pytest.approx(tokens5 / samples5, abs=0.05), f"{path}: tokens per sample is Table 5's mean"
    assert float(t[3]) == pytest.approx(samples * per / 1e9, abs=0.005) and float(t[4]) * 1e9 == tokens5
    # within 10% of Table 5, or the header says why not
    for got, want, what in ((samples, samples5, "samples"), (samples * per, tokens5, "tokens")):
        assert abs(got / want - 1) <= 0.10 or "Not Table 5" in text, f"{path}: {what} {got:.3g} vs Table 5's {want:.3g}"
    # the run stops at Table 5's tokens; a token is said to be one LLM position
    assert cfg["budget"]["max_tokens"] == tokens5
    assert "A token is one LLM position" in text

