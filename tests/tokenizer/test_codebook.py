import faiss
import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from kelix.tokenizer.codebook import Reservoir, kmeans_codebook, main
from kelix.tokenizer.model import TINY_TOKENIZER, KelixTokenizer, tiny_config


def test_reservoir_keeps_everything_until_full_then_a_uniform_sample():
    r = Reservoir(size=5, dim=1, seed=0)
    r.add(np.arange(3, dtype=np.float32)[:, None])
    assert r.rows[:, 0].tolist() == [0, 1, 2]
    # over many seeds, each of 20 rows is kept with probability 5/20
    hits = np.zeros(20)
    for seed in range(400):
        r = Reservoir(size=5, dim=1, seed=seed)
        for chunk in np.array_split(np.arange(20, dtype=np.float32)[:, None], 3):
            r.add(chunk)
        assert len(np.unique(r.rows)) == 5 and r.seen == 20
        hits[r.rows[:, 0].astype(int)] += 1
    assert np.allclose(hits / 400, 0.25, atol=0.08)


def test_kmeans_codebook_is_a_random_partition_of_faiss_centroids():
    x = np.random.default_rng(0).normal(size=(2000, 8)).astype(np.float32)
    cb = kmeans_codebook(x, books=4, K=16, niter=10, seed=3)
    assert cb.shape == (4, 16, 8)
    ref = faiss.Kmeans(8, 64, niter=10, seed=3)
    ref.train(x)
    ours = cb.reshape(64, 8)
    assert not np.array_equal(ours, ref.centroids)  # shuffled ...
    key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(key(ours), key(ref.centroids))  # ... but the same set
    with pytest.raises(ValueError, match="at least S = 64"):
        kmeans_codebook(x[:10], books=4, K=16)


def test_build_codebook_verb_writes_centroids_the_tokenizer_loads(synthetic_dir, tmp_path):
    out = tmp_path / "cb.safetensors"
    cfg = {"tokenizer": {**TINY_TOKENIZER, "codebook": str(out)},
           "shards": [str(synthetic_dir / "caption-*.tar"), str(synthetic_dir / "ocr-*.tar")]}
    path = tmp_path / "cb.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(path), "--samples", "5000", "--niter", "5", "--num-workers", "0"]) == 0
    c = load_file(str(out))["centroids"]
    assert c.shape == (4, 32, 32)  # N, K, d_in = encoder width
    tok = KelixTokenizer(tiny_config(codebook=str(out)))
    tok.load_init_weights()
    assert torch.equal(tok.quantizer.codebook.centroids, torch.from_numpy(c))


def test_codebook_shape_mismatch_is_named(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"centroids": torch.zeros(4, 16, 32)}, str(bad))
    tok = KelixTokenizer(tiny_config(codebook=str(bad)))
    with pytest.raises(ValueError, match="do not match"):
        tok.load_init_weights()


def test_default_sample_count_gives_faiss_enough_points_per_centroid(synthetic_dir, tmp_path, monkeypatch, caplog):
    import kelix.tokenizer.codebook as cbmod

    sizes = []

    class Recording(Reservoir):
        def __init__(self, size, dim, seed=0):
            sizes.append(size)
            super().__init__(size, dim, seed)

    monkeypatch.setattr(cbmod, "Reservoir", Recording)
    monkeypatch.setattr(cbmod, "kmeans_codebook", lambda x, books, K, **kw: np.zeros((books, K, x.shape[1])))
    cfg = {"tokenizer": TINY_TOKENIZER, "shards": [str(synthetic_dir / "caption-*.tar")], "out": str(tmp_path / "c.st")}
    (tmp_path / "cb.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "cb.yaml"), "--max-images", "2", "--num-workers", "0"]) == 0
    assert sizes == [cbmod.POINTS_PER_CENTROID * 4 * 32] and cbmod.POINTS_PER_CENTROID >= 39  # S = N*K = 128
    assert "k-means wants >= 39" in caplog.text  # two images are far too few: said plainly


def test_init_seed_builds_the_same_random_tokenizer_in_any_rng_state():
    torch.manual_seed(1)
    a = KelixTokenizer(tiny_config(init_seed=7))
    torch.randn(100)  # the caller's stream moved on
    b = KelixTokenizer(tiny_config(init_seed=7))
    state = torch.random.get_rng_state()
    c = KelixTokenizer(tiny_config(init_seed=8))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's stream is left as it was
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["quantizer.proj_in.weight"], sc["quantizer.proj_in.weight"])


def test_input_space_centroids_start_where_their_features_land(synthetic_dir, tmp_path):
    """--feature input (paper 4.2.1 on the tokenizer's own merged features): k-means of the quantizer's
    input, and each slot's SimVQ projection starts as that slot's input projection, so a centroid's code
    vector is exactly the quantizer's view of that feature and a centroid is coded as itself."""
    out = tmp_path / "cb.safetensors"
    tok_cfg = {**TINY_TOKENIZER, "K": 8, "codebook": str(out), "init_seed": 3, "centroid_dim": TINY_TOKENIZER["merger_dim"]}
    path = tmp_path / "cb.yaml"
    path.write_text(yaml.safe_dump({"tokenizer": tok_cfg, "shards": [str(synthetic_dir / "*.tar")]}))
    assert main(["--config", str(path), "--feature", "input", "--samples", "3000", "--niter", "5",
                 "--num-workers", "0"]) == 0
    c = load_file(str(out))["centroids"]
    assert c.shape == (4, 8, 64)  # N, K, the merger's output width
    tok = KelixTokenizer(tiny_config(K=8, codebook=str(out), init_seed=3, centroid_dim=64))
    tok.load_init_weights()
    q = tok.quantizer
    with torch.no_grad():
        for i in range(4):
            seen = q.continuous(q.codebook.centroids[i])[:, i]  # slot i's sub-vector of each centroid of book i
            torch.testing.assert_close(q.codebook()[i], seen, atol=1e-5, rtol=1e-5)
            assert torch.equal(q(q.codebook.centroids[i]).codes[:, i], torch.arange(8))
        # and the features' codes are k-means assignments in each slot: every code is used
        x = torch.from_numpy(c.reshape(-1, 64))
        assert all(len(q(x).codes[:, i].unique()) == 8 for i in range(4))


def test_input_space_centroids_need_the_input_width(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "cb.safetensors"
    save_file({"centroids": torch.zeros(4, 32, 32)}, str(path), metadata={"feature": "input"})
    tok = KelixTokenizer(tiny_config(codebook=str(path)))
    with pytest.raises(ValueError, match="centroid_dim 32 is not the quantizer input width 64"):
        tok.load_init_weights()


def test_the_default_image_budget_is_the_papers():
    """Paper 4.2.1 clusters features of more than 10,000,000 images: build-codebook stops there by default."""
    import inspect

    from kelix.tokenizer.codebook import PAPER_IMAGES, build

    assert PAPER_IMAGES == 10_000_000 and inspect.signature(build).parameters["max_images"].default == PAPER_IMAGES
