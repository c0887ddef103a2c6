import faiss
import numpy as np
import pytest
import torch

from kelix.tokenizer.model import KelixTokenizer, tiny_config
from kelix.tokenizer.quantizer import FSQuantizer, ProductQuantizer, nearest_codes


def test_nearest_codes_equal_brute_force_and_faiss(monkeypatch):
    torch.manual_seed(0)
    z, cb = torch.randn(300, 3, 8), torch.randn(3, 50, 8)
    monkeypatch.setattr("kelix.tokenizer.quantizer.MAX_DIST_ELEMS", 3 * 50 * 7)  # force several chunks
    codes = nearest_codes(z, cb)
    brute = torch.stack([torch.cdist(z[:, n], cb[n]).argmin(-1) for n in range(3)], 1)
    assert torch.equal(codes, brute)
    for n in range(3):
        index = faiss.IndexFlatL2(8)
        index.add(cb[n].numpy())
        _, ids = index.search(np.ascontiguousarray(z[:, n].numpy()), 1)
        assert torch.equal(codes[:, n], torch.from_numpy(ids[:, 0]))


def test_pq_searches_the_projected_codebooks_and_outputs_code_vectors():
    torch.manual_seed(0)
    q = ProductQuantizer(in_dim=24, N=3, K=40, d=8, centroid_dim=12, beta=0.25)
    x = torch.randn(100, 24)
    out = q(x)
    z, cb = q.continuous(x), q.code_vectors()
    assert cb.shape == (3, 40, 8) and q.codebook.centroids.shape == (3, 40, 12)  # only its own K rows
    brute = torch.stack([torch.cdist(z[:, n], cb[n]).argmin(-1) for n in range(3)], 1)
    assert torch.equal(out.codes, brute)
    e = cb[torch.arange(3), out.codes]
    assert torch.equal(out.z_q, e)  # the value is exactly the code vector
    mse = ((e - z) ** 2).mean()
    torch.testing.assert_close(out.loss, 1.25 * mse)  # codebook + beta * commitment (Eq. 3)
    torch.testing.assert_close(out.terms["codebook"], mse)
    # the codebook really is LN(C W + b)
    c = q.codebook
    manual = torch.nn.functional.layer_norm(c.centroids[1] @ c.weight[1] + c.bias[1], (8,)) * c.norm.weight[1] + c.norm.bias[1]
    torch.testing.assert_close(cb[1], manual)


def test_frozen_centroids_unchanged_after_a_step_while_simvq_projection_changes():
    torch.manual_seed(0)
    tok = KelixTokenizer(tiny_config())
    names = [n for n, _ in tok.named_parameters()]
    assert not any("centroids" in n for n in names)  # a buffer: the optimizer never sees it
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-2)
    before_c = tok.quantizer.codebook.centroids.clone()
    before_w = tok.quantizer.codebook.weight.detach().clone()
    out = tok([torch.randn(3, 56, 84), torch.randn(3, 112, 56)])
    (out.embeds.pow(2).mean() + out.loss).backward()
    opt.step()
    assert torch.equal(tok.quantizer.codebook.centroids, before_c)
    assert (tok.quantizer.codebook.weight - before_w).abs().max() > 0
    assert "quantizer.codebook.centroids" in tok.state_dict()  # saved with the model


def test_gradients_reach_the_encoder_through_the_straight_through_estimator():
    torch.manual_seed(0)
    tok = KelixTokenizer(tiny_config())
    out = tok([torch.randn(3, 56, 56)])
    out.embeds.sum().backward()  # NTP-like loss only: no VQ term, so gradient must pass the STE
    for name, p in [("encoder", tok.encoder.model.blocks[0].attn.qkv.weight), ("merger", tok.merger.mlp[0].weight),
                    ("proj_in", tok.quantizer.proj_in.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the SimVQ projection learns only from the codebook loss (as in VQ-VAE)
    assert tok.quantizer.codebook.weight.grad is None


def test_shared_codebook_is_one_table_for_all_slots():
    torch.manual_seed(0)
    q = ProductQuantizer(16, N=4, K=10, d=8, centroid_dim=6, mode="shared")
    assert q.codebook.centroids.shape == (1, 10, 6)
    cb = q.code_vectors()
    assert cb.shape == (4, 10, 8) and all(torch.equal(cb[0], cb[j]) for j in range(4))
    out = q(torch.randn(20, 16))
    assert out.codes.shape == (20, 4)


def test_residual_quantizer_slots_sum_to_the_reconstruction():
    torch.manual_seed(0)
    q = ProductQuantizer(16, N=3, K=10, d=8, centroid_dim=6, mode="rvq")
    x = torch.randn(30, 16)
    out = q(x)
    z, cb = q.continuous(x)[:, 0], q.code_vectors()
    # stage by stage: each slot is the nearest code to what the previous slots left
    r = z
    for i in range(3):
        c = torch.cdist(r, cb[i]).argmin(-1)
        assert torch.equal(out.codes[:, i], c)
        r = r - cb[i, c]
    torch.testing.assert_close(out.z_q.sum(1), z - r)
    torch.testing.assert_close(q.lookup(out.codes), out.z_q)


def test_fsq_codes_index_the_grid():
    torch.manual_seed(0)
    q = FSQuantizer(16, N=2, levels=[4, 3, 5], d=8)
    assert q.K == 60
    x = torch.randn(50, 16) * 3
    out = q(x)
    assert out.codes.shape == (50, 2) and int(out.codes.min()) >= 0 and int(out.codes.max()) < 60
    torch.testing.assert_close(q.lookup(out.codes), out.z_q)
    cv = q.code_vectors()
    torch.testing.assert_close(cv[torch.arange(2), out.codes], out.z_q)
    assert len(torch.unique(q._points(torch.arange(60)), dim=0)) == 60  # every code is its own grid point


@pytest.mark.parametrize("variant", ["shared", "rvq", "fsq", "none"])
def test_ablation_variants_build_and_train(variant):
    torch.manual_seed(0)
    extra = dict(K=64, fsq_levels=[4, 4, 4]) if variant == "fsq" else {}
    tok = KelixTokenizer(tiny_config(quantizer=variant, **extra))
    out = tok([torch.randn(3, 56, 84)])
    assert out.embeds.shape == (6, 64)
    (out.embeds.sum() + out.loss).backward()
    assert tok.merger.mlp[0].weight.grad.abs().sum() > 0
    if variant == "none":
        assert out.codes is None
        with pytest.raises(RuntimeError, match="continuous"):
            tok.code_vectors()
    else:
        torch.testing.assert_close(tok.embed_codes(out.codes), out.embeds, atol=1e-5, rtol=0)


def test_plain_vq_is_n_equals_one():
    tok = KelixTokenizer(tiny_config(N=1))
    out = tok([torch.randn(3, 56, 56)])
    assert out.codes.shape == (4, 1)  # a 2x2 grid of merged tokens, one code each


def test_fit_codebook_projects_the_frozen_centroids_onto_kmeans_centres():
    torch.manual_seed(0)
    q = ProductQuantizer(in_dim=24, N=2, K=10, d=8, centroid_dim=12)  # K <= d_in + 1: an exact solve
    x = torch.randn(400, 24)
    frozen = q.codebook.centroids.clone()
    q.fit_codebook(x, niter=10, seed=5)
    assert torch.equal(q.codebook.centroids, frozen)
    z = q.continuous(x)
    for i in range(2):
        km = faiss.Kmeans(8, 10, niter=10, seed=5 + i)
        km.train(np.ascontiguousarray(z[:, i].detach().numpy()))
        expected = torch.nn.functional.layer_norm(torch.from_numpy(km.centroids), (8,))
        torch.testing.assert_close(q.code_vectors()[i].detach(), expected, atol=1e-4, rtol=1e-4)
    assert (torch.bincount(q(x).codes[:, 0], minlength=10) > 0).all()  # every code in use


@pytest.mark.parametrize("beta", [0.25, 0.0])
def test_eq3_gradient_routing_by_hand(beta, monkeypatch):
    """L_VQ = ||sg(z) - e||^2 + beta ||z - sg(e)||^2: the codebook term moves only the SimVQ projection
    (W, b), the commitment term only z, scaled by beta. Gradients against a hand computation."""
    torch.manual_seed(0)
    q = ProductQuantizer(in_dim=24, N=3, K=40, d=8, centroid_dim=12, beta=beta, norm="none")  # e = C_i W_i + b_i
    z = torch.randn(50, 3, 8, requires_grad=True)  # the encoder output, a leaf so its gradient is visible
    monkeypatch.setattr(q, "continuous", lambda x: z)
    out = q(torch.zeros(50, 24))
    out.loss.backward()
    c, codes = q.codebook, out.codes
    e = (torch.einsum("nkc,ncd->nkd", c.centroids, c.weight) + c.bias[:, None])[torch.arange(3), codes].detach()
    numel = z.numel()
    # commitment only, times beta, on z
    torch.testing.assert_close(z.grad, beta * 2 * (z.detach() - e) / numel, rtol=1e-6, atol=1e-9)
    # codebook term only, on W_i and b_i: dL/de = 2 (e - z) / numel, scattered to the chosen rows of C_i W_i + b_i
    g = torch.zeros(3, 40, 8)
    for n in range(3):
        g[n].index_add_(0, codes[:, n], 2 * (e[:, n] - z.detach()[:, n]) / numel)
    torch.testing.assert_close(c.weight.grad, torch.einsum("nkc,nkd->ncd", c.centroids, g), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(c.bias.grad, g.sum(1), rtol=1e-5, atol=1e-8)
    assert q.proj_in.weight.grad is None  # z is the leaf here: nothing else sees L_VQ


def test_code_vectors_are_cached_in_eval_and_recomputed_when_weights_change():
    torch.manual_seed(0)
    q = ProductQuantizer(in_dim=24, N=3, K=40, d=8, centroid_dim=12).eval()
    calls = []
    real = q.codebook.forward
    q.codebook.forward = lambda: calls.append(1) or real()
    with torch.no_grad():
        a = q.code_vectors()
        q(torch.randn(10, 24))
        q.lookup(torch.zeros(2, 3, dtype=torch.long))
        assert len(calls) == 1 and q.code_vectors() is a  # once for every eval call
        q.codebook.weight.add_(0.5)  # an optimizer step, load_state_dict: in-place on the weights
        b = q.code_vectors()
    assert len(calls) == 2 and not torch.equal(a, b)
    torch.testing.assert_close(b, real().expand(3, -1, -1))
    q.train()
    q.code_vectors()
    q.code_vectors()
    assert len(calls) == 4  # never cached in train mode
    q.eval()
    out = q.code_vectors()  # grad enabled and trainable weights: the graph is kept, nothing cached
    assert out.requires_grad and len(calls) == 5


@pytest.mark.parametrize("mode", ["pq", "shared", "rvq"])
def test_straight_through_passes_the_gradient_of_z_q_to_z_unchanged(mode, monkeypatch):
    """dL/dz = dL/dz_q exactly (the identity, sign included); in rvq slot 0 carries it for the whole vector."""
    torch.manual_seed(0)
    q = ProductQuantizer(in_dim=24, N=3, K=40, d=8, centroid_dim=12, mode=mode)
    z = torch.randn(50, 1 if mode == "rvq" else 3, 8, requires_grad=True)
    monkeypatch.setattr(q, "continuous", lambda x: z)
    out = q(torch.zeros(50, 24))
    w = torch.randn(out.z_q.shape)
    (out.z_q * w).sum().backward()
    assert torch.equal(z.grad, w[:, :1] if mode == "rvq" else w)
