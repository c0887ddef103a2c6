"""The fast image-generation path against the eager KV-cached one and against teacher forcing: greedy
codes token for token, condition states to float tolerance, sampled codes as Gumbel-max of the
teacher-forced logits with the path's own noise, generator reuse, and (on CUDA) graphs without host
syncs. The fixtures' weights are conftest.stand_in_training's, so every input of the decoder matters."""

import warnings

import pytest
import torch

from kelix.llm.fast_generate import FastImageGenerator, fast_generate_image, gumbel_noise
from kelix.llm.generate import Sampling, _left_pad, generate_image, masked_logits, prompt_doc
from kelix.llm.layout import t2i_doc

from .test_generate import _teacher_forced, _visual_logits

PROMPTS = ["a", "a much longer prompt than the first one, with a comma", "mid length"]


@pytest.fixture(params=["table", "projector", "parallel"])
def any_lm(request, lm_table, lm_projector, lm_parallel):
    return {"table": lm_table, "projector": lm_projector, "parallel": lm_parallel}[request.param]


def _both(lm, prompts, grid, s, **kw):
    return generate_image(lm, prompts, grid, s, **kw), generate_image(lm, prompts, grid, s, fast=True, **kw)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_greedy_fast_path_equals_the_eager_path(any_lm, cfg):
    """Prompts of three lengths (left padding), CFG off and on: the same codes, and the condition
    states (markers included) to float tolerance."""
    (c_e, s_e, m_e), (c_f, s_f, m_f) = _both(any_lm, PROMPTS, (3, 4), Sampling(temperature=0.0, cfg_scale=cfg))
    assert c_f.shape == (3, 3, 4, any_lm.vocab.N) and len(set(c_e.flatten().tolist())) > 8  # codes vary
    assert torch.equal(c_f, c_e)
    assert s_f.shape == s_e.shape and m_f.all() and m_f.shape == m_e.shape
    assert torch.allclose(s_f, s_e, atol=1e-4, rtol=1e-5)


def test_rows_whose_markers_differ_in_length(lm_table):
    """Rows 0..10: marker text "9,2" and "10,2" differ in length, so the padded marker step must
    move the cursor by each row's own count; states of visual blocks only."""
    s = Sampling(temperature=0.0, cfg_scale=2.0)
    (c_e, s_e, _), (c_f, s_f, _) = _both(lm_table, PROMPTS[:2], (11, 2), s, include_markers=False)
    assert s_f.shape == (2, 22, lm_table.hidden_size)
    assert torch.equal(c_f, c_e) and torch.allclose(s_f, s_e, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_sampled_codes_are_gumbel_max_of_the_teacher_forced_logits(lm_table, cfg):
    """Each sampled code is ``argmax(masked_logits(l) + g)``: l the teacher-forced logits (CFG-mixed),
    g the noise :func:`gumbel_noise` draws from the seed, block k, slot j, row b at ``[k, j, b]``."""
    lm, prompts, grid = lm_table, PROMPTS[:2], (2, 3)
    s = Sampling(temperature=1.5, top_k=12, top_p=0.9, cfg_scale=cfg, seed=7)
    codes, _, _ = fast_generate_image(lm, prompts, grid, s)
    l_c = _visual_logits(lm, _teacher_forced(lm, [t2i_doc(lm.layout, p, c)[0] for p, c in zip(prompts, codes)]))
    logits = l_c
    if cfg != 1.0:
        l_u = _visual_logits(lm, _teacher_forced(lm, [t2i_doc(lm.layout, "", c)[0] for c in codes]))
        logits = l_u + cfg * (l_c - l_u)
    N, K, n = lm.vocab.N, lm.vocab.K, grid[0] * grid[1]
    g = gumbel_noise(n, N, len(prompts), K, 7, "cpu").permute(2, 0, 1, 3).reshape(-1, N, K)  # [B*n, N, K]
    want = (masked_logits(logits, s) + g).argmax(-1)
    assert torch.equal(codes.reshape(-1, N), want)
    greedy = fast_generate_image(lm, prompts, grid, Sampling(temperature=0.0, cfg_scale=cfg))[0]
    assert not torch.equal(codes, greedy)  # the noise mattered
    assert torch.equal(fast_generate_image(lm, prompts, grid, s)[0], codes)  # reproducible from the seed
    other = Sampling(temperature=1.5, top_k=12, top_p=0.9, cfg_scale=cfg, seed=8)
    assert not torch.equal(fast_generate_image(lm, prompts, grid, other)[0], codes)


def test_a_reused_generator_equals_a_fresh_one(lm_table):
    """Calls of one shape share a generator (its buffers are reset per call): prompts A, then B, then
    A again give what fresh generators give, these first warmed up as before a CUDA-graph capture
    (steps run and undone: no trace may remain)."""
    lm, grid, s = lm_table, (2, 3), Sampling(temperature=0.0, cfg_scale=2.0)
    a, b = ["red", "a blue square"], ["green circle", "x"]

    def fresh(prompts):
        docs = [prompt_doc(lm, p) for p in prompts] + [prompt_doc(lm, "") for _ in prompts]
        embeds, mask = _left_pad(lm, docs)
        gen = FastImageGenerator(lm, 2, 32, grid, s, graphs=False)
        gen._warm_up()
        return gen.run(embeds, mask, None)

    first, second, again = (fast_generate_image(lm, p, grid, s) for p in (a, b, a))
    for got, prompts in ((first, a), (second, b), (again, a)):
        codes, states = fresh(prompts)
        assert torch.equal(got[0].reshape(codes.shape), codes) and torch.allclose(got[1], states, atol=1e-5)
    assert not torch.equal(first[0], second[0])


def test_fast_path_refuses_what_it_does_not_do_and_warns_nothing(lm_table):
    with pytest.raises(ValueError, match="use_cache and decoder_cache"):
        generate_image(lm_table, ["a"], (1, 1), Sampling(temperature=0), use_cache=False, fast=True)
    with pytest.raises(ValueError, match="graphs=True needs a CUDA model"):
        fast_generate_image(lm_table, ["a"], (1, 1), Sampling(temperature=0), graphs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast_generate_image(lm_table, ["a cat"], (1, 2), Sampling(cfg_scale=2.0, top_k=5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_equal_the_eager_steps_without_a_host_sync(lm_table):
    import copy

    lm = copy.deepcopy(lm_table).cuda()
    grid, s = (3, 4), Sampling(temperature=1.0, top_k=10, cfg_scale=2.0, seed=3)
    docs = [prompt_doc(lm, p) for p in PROMPTS] + [prompt_doc(lm, "") for _ in PROMPTS]
    embeds, mask = _left_pad(lm, docs)
    out = []
    for graphs in (False, True):
        gen = FastImageGenerator(lm, 3, 32, grid, s, graphs=graphs)
        gen.prepare(embeds, mask, 3)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            gen.decode()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        out.append(gen.result(True))
    assert torch.equal(out[0][0], out[1][0]) and torch.allclose(out[0][1], out[1][1], atol=1e-4)
    greedy = Sampling(temperature=0.0, cfg_scale=2.0)
    assert torch.equal(generate_image(lm, PROMPTS, grid, greedy)[0].cpu(),
                       fast_generate_image(lm, PROMPTS, grid, greedy, graphs=True)[0].cpu())


def test_fast_path_feeds_vision_end_like_the_eager_path(lm_table):
    """include_end: one more step after the image; its state equals the eager path's."""
    (c_e, s_e, _), (c_f, s_f, _) = _both(lm_table, PROMPTS, (3, 4), Sampling(temperature=0.0), include_end=True)
    (_, short, _) = generate_image(lm_table, PROMPTS, (3, 4), Sampling(temperature=0.0), fast=True)
    assert torch.equal(c_f, c_e) and s_f.shape == s_e.shape and s_f.shape[1] == short.shape[1] + 1
    assert torch.allclose(s_f, s_e, atol=1e-4, rtol=1e-5)
