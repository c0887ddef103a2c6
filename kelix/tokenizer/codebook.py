"""Codebook initialisation (paper 4.2.1): k-means over ViT patch embeddings -> N sub-codebooks.

``kelix build-codebook --config recipes/tokenizer/stage1_align.yaml`` streams the recipe's training
shards through its (pretrained) vision encoder, keeps a uniform reservoir sample of patch
embeddings, clusters them with faiss into S = N*K centroids (on GPU when faiss has one), splits the
centroids into N sub-codebooks by a random permutation, and writes ``centroids [N, K, d_in]`` as
safetensors to the recipe's ``tokenizer.codebook`` path (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np
import torch

from kelix.data.images import ImageConfig, resize_image, to_tensor
from kelix.data.processor import Processor
from kelix.data.schema import Sample, SampleError

log = logging.getLogger("kelix.tokenizer")

# faiss warns below 39 training points per centroid: the default reservoir keeps 40 * S embeddings
# (2.6M at S = 65,536: 12 GB of float32 at d_in = 1152)
POINTS_PER_CENTROID = 40
# paper 4.2.1: the centroids come from "more than 10,000,000 images": the default image budget
PAPER_IMAGES = 10_000_000


class Reservoir:
    """A uniform sample of at most ``size`` rows from a stream (Algorithm R, vectorised per batch).

    Args:
        size: rows kept.
        dim: row width.
        seed: the sample is a function of the seed and the stream.
    """

    def __init__(self, size: int, dim: int, seed: int = 0):
        self.buf = np.empty((size, dim), dtype=np.float32)
        self.seen, self.size = 0, size
        self.rng = np.random.default_rng(seed)

    def add(self, rows: np.ndarray) -> None:
        n = len(rows)
        take = min(n, max(0, self.size - self.seen))  # filling phase
        if take:
            self.buf[self.seen : self.seen + take] = rows[:take]
        rest = rows[take:]
        if len(rest):
            # row t (0-based in the stream) replaces a random slot with probability size / (t + 1)
            t = self.seen + take + np.arange(len(rest))
            j = (self.rng.random(len(rest)) * (t + 1)).astype(np.int64)
            keep = j < self.size
            slots, src = j[keep], rest[keep]
            # a later row wins a slot drawn twice in one batch, as in the sequential algorithm
            last = len(slots) - 1 - np.unique(slots[::-1], return_index=True)[1]
            self.buf[slots[last]] = src[last]
        self.seen += n

    @property
    def rows(self) -> np.ndarray:
        return self.buf[: min(self.seen, self.size)]


def kmeans_codebook(x: np.ndarray, books: int, K: int, niter: int = 20, seed: int = 0,
                    gpu: bool | None = None, verbose: bool = False) -> np.ndarray:
    """k-means (faiss) of ``x [n, d]`` into ``books*K`` centroids, randomly split into ``[books, K, d]``."""
    import faiss

    S = books * K
    if len(x) < S:
        raise ValueError(f"k-means needs at least S = {S} samples, got {len(x)} (stream more images or use a smaller K)")
    if gpu is None:
        gpu = faiss.get_num_gpus() > 0 if hasattr(faiss, "get_num_gpus") else False
    km = faiss.Kmeans(x.shape[1], S, niter=niter, seed=seed, gpu=gpu, verbose=verbose)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    perm = np.random.default_rng(seed).permutation(S)  # random, non-overlapping partition (paper 4.2.1)
    return km.centroids[perm].reshape(books, K, x.shape[1])


class _Pixels(Processor):
    """A sample -> its images as normalised tensors (for the encoder); samples without pixels are skipped."""

    def __init__(self, image: ImageConfig):
        self.image = image

    def __call__(self, sample: Sample):
        out = [to_tensor(resize_image(im.pixels, self.image, f"{sample.shard}:{sample.key}"), self.image)
               for im in sample.images if im.pixels is not None]
        if not out:
            raise SampleError("no_image", f"{sample.shard}:{sample.key}: no image pixels")
        return out

    def collate(self, items):
        return items


def _read_config(path: str) -> dict:
    from omegaconf import OmegaConf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path!r} does not exist")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    # resolve ${...} against the whole file (recipes interpolate model/data fields)
    cfg = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    model = (cfg.get("model") or {}).get("init_args") or {}
    data = (cfg.get("data") or {}).get("init_args") or {}
    tok = model.get("tokenizer", cfg.get("tokenizer"))
    if tok is None:
        raise KeyError(f"{path}: no model.init_args.tokenizer (recipe) or tokenizer (standalone) section")
    return {"tokenizer": tok, "shards": cfg.get("shards", data.get("train")), "synthetic": data.get("synthetic"), **{
        k: cfg[k] for k in ("out", "samples", "max_images", "niter", "feature", "batch_size", "seed") if k in cfg}}


def build(tokenizer: dict, shards, out: str, samples: int | None = None, max_images: int | None = PAPER_IMAGES,
          niter: int = 20, feature: str | None = None, batch_size: int = 32, seed: int = 0, num_workers: int = 2,
          device: str | None = None, gpu: bool | None = None, before_read=None) -> np.ndarray:
    """Stream ``shards`` through the tokenizer's encoder and write the k-means codebook to ``out``.

    ``samples``: embeddings kept for k-means (default ``POINTS_PER_CENTROID * S``). ``before_read``: called
    once the configuration is checked, before anything is loaded or read (e.g. making synthetic shards), so
    that a wrong option costs one line, not a data build."""
    from safetensors.numpy import save_file
    from tqdm import tqdm

    from kelix.data.stream import ShardStream
    from kelix.tokenizer.encoder import VisionEncoder
    from kelix.tokenizer.model import TokenizerConfig

    cfg = tokenizer if isinstance(tokenizer, TokenizerConfig) else TokenizerConfig(**tokenizer)
    if cfg.quantizer not in ("pq", "shared", "rvq"):
        raise ValueError(f"tokenizer.quantizer {cfg.quantizer!r} has no centroid table to initialise")
    if shards is None:
        raise ValueError("no shards: give --shards or a recipe with data.init_args.train")
    books = 1 if cfg.quantizer == "shared" else cfg.N
    S = books * cfg.K
    samples = samples or POINTS_PER_CENTROID * S
    if samples < S:
        raise ValueError(f"--samples {samples} < S = {S} centroids")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = None
    if feature == "input":  # the whole tokenizer's encoder + merger: the quantizer's own input space
        from kelix.tokenizer.model import KelixTokenizer

        if cfg.init_seed is None and cfg.encoder.path is None:
            log.warning("build-codebook --feature input: tokenizer.init_seed is not set, so the random merger "
                        "(and encoder) kelix fit builds will not be the one clustered here")
        tok = KelixTokenizer(cfg)
        encoder = tok.encoder
        tok.to(device).eval()
    else:
        encoder = VisionEncoder(cfg.encoder, cfg.image.patch_size)
        encoder.to(device).eval()
    m = cfg.image.merge_size
    widths = {"patch": encoder.width, "merged": m * m * encoder.width}
    if tok is not None:
        widths["input"] = tok.merger.out_dim
    if feature is None:  # follow the configured centroid width
        want = cfg.centroid_dim or encoder.width
        feature = next((f for f, w in widths.items() if w == want), None)
        if feature is None:
            raise ValueError(f"tokenizer.centroid_dim {want} is neither the patch width {widths['patch']} "
                             f"nor the merged width {widths['merged']}")
    if feature not in widths:
        raise ValueError(f"--feature {feature!r} is not patch, merged or input")
    if cfg.centroid_dim not in (None, widths[feature]):
        raise ValueError(f"--feature {feature} gives {widths[feature]}-d centroids but tokenizer.centroid_dim "
                         f"is {cfg.centroid_dim}")
    encoder.load_weights()  # after the checks: its notice must not come before a one-line input error
    if before_read is not None:
        before_read()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    stream = ShardStream(shards, processor=_Pixels(cfg.image), seed=seed, shuffle_buffer=1, shuffle_shards=False,
                         repeat=False)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    res = Reservoir(samples, widths[feature], seed=seed)
    pending: list[torch.Tensor] = []
    n_images = 0
    bar = tqdm(total=max_images, desc="patch embeddings", unit="img")

    def flush():
        with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            grids = encoder([p.to(device) for p in pending])
            merged = tok.merger(grids)[0] if tok is not None else None  # under the encoder's autocast
        from kelix.tokenizer.encoder import _merge_order

        if merged is not None:
            rows = [merged]
        else:
            rows = [g.reshape(-1, g.shape[-1]) if feature == "patch" else _merge_order(g, m) for g in grids]
        res.add(torch.cat(rows).float().cpu().numpy())
        bar.update(len(pending))
        pending.clear()

    for images in loader:
        for px in images:
            if max_images is not None and n_images >= max_images:
                break
            pending.append(px)
            n_images += 1
            if len(pending) >= batch_size:
                flush()
        if max_images is not None and n_images >= max_images:
            break
    if pending:
        flush()
    bar.close()
    log.info("build-codebook: %d images, %d %s embeddings seen, %d kept", n_images, res.seen, feature, len(res.rows))
    if len(res.rows) < 39 * S:
        log.warning("build-codebook: %d embeddings for %d centroids (%.1f per centroid; k-means wants >= 39): "
                    "stream more images or raise --samples", len(res.rows), S, len(res.rows) / S)
    centroids = kmeans_codebook(res.rows, books, cfg.K, niter=niter, seed=seed, gpu=gpu, verbose=True)
    meta = {"N": str(books), "K": str(cfg.K), "centroid_dim": str(widths[feature]), "feature": feature,
            "images": str(n_images), "embeddings_seen": str(res.seen), "samples": str(len(res.rows)),
            "niter": str(niter), "seed": str(seed), "encoder": json.dumps({"kind": cfg.encoder.kind,
            "name": cfg.encoder.name, "path": cfg.encoder.path})}
    save_file({"centroids": np.ascontiguousarray(centroids, dtype=np.float32)}, out, metadata=meta)
    log.info("build-codebook: wrote centroids %s to %s", centroids.shape, out)
    return centroids


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kelix build-codebook", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a tokenizer recipe (model.init_args.tokenizer, data.init_args."
                   "train) or a standalone YAML with tokenizer/shards/out and the options below")
    p.add_argument("--shards", nargs="+", help="shard patterns (default: the recipe's training shards)")
    p.add_argument("--out", help="output .safetensors (default: the recipe's tokenizer.codebook)")
    p.add_argument("--samples", type=int, help=f"patch embeddings kept for k-means (reservoir; default "
                   f"{POINTS_PER_CENTROID} x S, e.g. 2,621,440 at S = 65,536)")
    p.add_argument("--max-images", type=int, help=f"stop after this many images (default {PAPER_IMAGES:,}, the "
                   "paper's count; smaller shard sets are read once)")
    p.add_argument("--niter", type=int, help="k-means iterations (default 20)")
    p.add_argument("--feature", choices=["patch", "merged", "input"],
                   help="cluster ViT patch embeddings (D-d), merged m*m groups, or the quantizer's input (the "
                        "merger's output; the projections then start where the centroids land; needs "
                        "tokenizer.init_seed for a random tokenizer) (default: match centroid_dim)")
    p.add_argument("--batch-size", type=int, help="images per encoder batch (default 32)")
    p.add_argument("--num-workers", type=int, default=2, help="dataloader workers decoding images")
    p.add_argument("--seed", type=int, help="seed of the reservoir, k-means and partition (default 0)")
    p.add_argument("--device", help="encoder device (default: cuda if available)")
    p.add_argument("--cpu-kmeans", action="store_true", help="run k-means on CPU even if faiss sees a GPU")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = _read_config(a.config)
    for k in ("shards", "out", "samples", "max_images", "niter", "feature", "batch_size", "seed"):
        if getattr(a, k) is not None:
            cfg[k] = getattr(a, k)
    out = cfg.pop("out", None) or cfg["tokenizer"].get("codebook")
    if not out:
        p.error("no output path: set --out or tokenizer.codebook in the config")
    synthetic = cfg.pop("synthetic", None)
    make_shards = None
    if synthetic and not a.shards:  # a recipe on synthetic shards: make them first, as kelix fit would
        from kelix.data.synthetic import SyntheticData

        make_shards = SyntheticData(**synthetic).ensure
    build(cfg.pop("tokenizer"), cfg.pop("shards"), out, num_workers=a.num_workers, device=a.device,
          gpu=False if a.cpu_kmeans else None, before_read=make_shards, **cfg)
    print(f"wrote {out}")
    return 0
