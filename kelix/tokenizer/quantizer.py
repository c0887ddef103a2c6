"""Quantizers of Kelix-Tok (paper 3.1, Eq. 1-3) and the ablation variants of Table 6 / section 6.1.

All map packed features ``[T, in_dim]`` to N slot vectors ``[T, N, d]`` (fused downstream) and codes
``[T, N]`` (each in ``0..K-1`` of its own sub-codebook):

* ``pq`` (default): product quantization. One Linear to ``N*d``, split in N sub-vectors; sub-codebook
  i is a frozen centroid table ``C_i [K, d_in]`` (only its own K rows) times a learned SimVQ
  projection ``W_i``; LayerNorm on sub-vectors and projected codebooks; squared-L2 nearest neighbour.
* ``shared``: the same, but one codebook (one ``C``, one ``W``) serves all N slots.
* ``rvq``: residual quantization: slot i quantizes what slots ``< i`` left of one d-dim vector.
* ``fsq``: finite scalar quantization per slot (``prod(fsq_levels) == K``), projected back to d.

(``none``, the continuous baseline, has no quantizer: the merger's output goes straight to the
up-projector, see :class:`~kelix.tokenizer.model.KelixTokenizer`.)

Quantizers run in float32 (autocast is off inside them) and declare ``fsdp_param_dtype =
"float32"``: under FSDP2 they are their own unit, gathered in float32 even when the rest of the
model is gathered in bf16, so training-time codes are the float32 codes of the exported model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# tokens per chunk of the nearest-neighbour search: bounds the [N, t, K] distance block to 2**25 floats
MAX_DIST_ELEMS = 2**25
# on CPU: 256 tokens per chunk, the GEMM's fastest row count here (fewer starve it, more spill the cache)
CPU_CHUNK_TOKENS = 256
# on CPU numpy's SIMD argmin is ~3x torch's per thread (single-threaded, though); the same first-minimum rule
CPU_NUMPY_ARGMIN = True


@dataclass
class QuantOutput:
    """What a quantizer returns for ``T`` packed tokens.

    Args:
        z_q: slot vectors ``[T, N, d]``; their values are the code vectors, their gradient goes
            straight through to the continuous features.
        codes: ``[T, N]`` code of each slot in its sub-codebook (None for the continuous baseline).
        loss: ``L_VQ`` of Eq. 3 (0 when the variant has none).
        terms: scalars to log (``codebook``, ``commitment``).
    """

    z_q: torch.Tensor
    codes: torch.Tensor | None
    loss: torch.Tensor
    terms: dict = field(default_factory=dict)


def nearest_codes(z: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row (squared L2) of ``codebooks[n]`` for each ``z[:, n]``.

    ``z`` is ``[T, N, d]``, ``codebooks`` ``[N, K, d]``; returns ``[T, N]``. Uses
    ``||c||^2 - 2 z.c`` (``||z||^2`` is constant per row): one batched GEMM per chunk of tokens
    into a reused distance block, then an argmin, so no ``[T, K, d]`` tensor is ever built. The
    codes are those of :func:`nearest_codes_reference` token for token (same GEMM, same argmin
    tie rule: the first minimum).
    """
    z, cb = z.detach().float(), codebooks.detach().float()
    n, k, _ = cb.shape
    t = z.shape[0]
    if t == 0:
        return torch.zeros(0, n, dtype=torch.long, device=z.device)
    cpu = z.device.type == "cpu"
    c2 = cb.pow(2).sum(-1).unsqueeze(1)  # [N, 1, K]
    zt = z.transpose(0, 1)  # [N, T, d], a view: each slot's rows are a strided matrix BLAS reads as is
    cbt = cb.transpose(1, 2)
    step = max(1, MAX_DIST_ELEMS // (n * k))
    step = min(t, step, CPU_CHUNK_TOKENS) if cpu else min(t, step)
    dist = torch.empty(n, step, k, device=z.device)  # reused: no fresh allocation (page faults on CPU) per chunk
    out = torch.empty(n, t, dtype=torch.long, device=z.device)
    for s in range(0, t, step):
        e = min(t, s + step)
        block = dist.view(-1)[: n * (e - s) * k].view(n, e - s, k)  # contiguous also for the last, shorter chunk
        # ||c||^2 first, then the GEMM accumulates -2 z.c onto it in place (BLAS beta = 1): the
        # arithmetic of baddbmm(c2, ...), without its slower out= path on CPU
        block.copy_(c2.expand_as(block)).baddbmm_(zt[:, s:e], cbt, beta=1.0, alpha=-2.0)
        if cpu and CPU_NUMPY_ARGMIN:
            out[:, s:e] = torch.from_numpy(block.numpy().argmin(-1))
        else:
            torch.argmin(block, -1, out=out[:, s:e])
    return out.transpose(0, 1)


def nearest_codes_reference(z: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """The eager search :func:`nearest_codes` must match: a fresh distance block per chunk, torch argmin."""
    z, cb = z.detach().float(), codebooks.detach().float()
    n, k, _ = cb.shape
    c2 = cb.pow(2).sum(-1).unsqueeze(1)  # [N, 1, K]
    zt = z.transpose(0, 1)  # [N, T, d]
    step = max(1, MAX_DIST_ELEMS // (n * k))
    out = []
    for s in range(0, zt.shape[1], step):
        dist = torch.baddbmm(c2, zt[:, s : s + step], cb.transpose(1, 2), beta=1.0, alpha=-2.0)
        out.append(dist.argmin(-1))
    if not out:
        return torch.zeros(0, n, dtype=torch.long, device=z.device)
    return torch.cat(out, 1).transpose(0, 1)


NORMS = ("layernorm", "fixed", "none")


def _layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """LayerNorm over the last dim, with a separate affine per slot (``weight``/``bias`` ``[N, d]``) if given."""
    x = F.layer_norm(x, x.shape[-1:])
    return x if weight is None else x * weight + bias


class _SlotNorm(nn.Module):
    """LayerNorm of each slot's vectors: ``layernorm`` (learned affine per slot), ``fixed`` (no affine), ``none``."""

    def __init__(self, kind: str, slots: int, d: int):
        super().__init__()
        if kind not in NORMS:
            raise ValueError(f"norm {kind!r} is not one of {', '.join(NORMS)}")
        self.kind = kind
        if kind == "layernorm":
            self.weight = nn.Parameter(torch.ones(slots, d))
            self.bias = nn.Parameter(torch.zeros(slots, d))

    def forward(self, x: torch.Tensor, slot_dim: int = -2) -> torch.Tensor:
        """``x`` has its slots at ``slot_dim`` and features last."""
        if self.kind == "none":
            return x
        if self.kind == "fixed":
            return _layer_norm(x, None, None)
        shape = [1] * x.ndim
        shape[slot_dim], shape[-1] = self.weight.shape
        return _layer_norm(x, self.weight.float().view(shape), self.bias.float().view(shape))


class _CachedCodeVectors(nn.Module):
    """``code_vectors()`` computed once in eval mode and reused until a weight changes.

    The key holds each source tensor's identity, storage and in-place version counter, so an
    optimizer step, ``load_state_dict`` or ``.to()`` recomputes it; train mode, gradients that
    need the graph, and FSDP-managed modules never use the cache.
    """

    _cache: tuple | None = None

    def _code_vector_sources(self) -> list[torch.Tensor]:
        return list(self.parameters()) + list(self.buffers())

    def _compute_code_vectors(self) -> torch.Tensor:
        raise NotImplementedError

    def code_vectors(self) -> torch.Tensor:
        """``[N, K, d]``: the vector each code stands for (what the quantizer outputs for it)."""
        from torch.distributed.fsdp import FSDPModule

        src = self._code_vector_sources()
        if self.training or isinstance(self, FSDPModule) or any(t.is_inference() for t in src) or (
                torch.is_grad_enabled() and any(t.requires_grad for t in src)):
            self._cache = None
            return self._compute_code_vectors()
        key = tuple((id(t), t.data_ptr(), t._version) for t in src)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._compute_code_vectors())
        return self._cache[1]

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)


class CodeTable(nn.Module):
    """Frozen projected codebooks ``[num_books, K, d]``: the exported (inference) form of :class:`SimVQ`.

    ``LN(C_i W_i + b_i)`` computed once in float32 and stored as a buffer: all that search and
    lookup need, ``d / d_in`` of the centroid table's size (33 MB instead of 302 MB at N=8,
    K=8192, d=128, d_in=1152). It cannot be trained further.
    """

    def __init__(self, num_books: int, K: int, d: int):
        super().__init__()
        self.register_buffer("vectors", torch.zeros(num_books, K, d))

    def forward(self) -> torch.Tensor:
        return self.vectors.float()


class SimVQ(nn.Module):
    """Frozen centroids, learned per-sub-codebook projection: the codebooks ``LN(C_i W_i + b_i)``.

    Args:
        num_books: sub-codebooks holding their own table (N, or 1 when shared).
        K: entries per sub-codebook.
        centroid_dim: ``d_in``, the width of the k-means centroids.
        d: code vector width.
        norm: ``layernorm`` (learned affine per sub-codebook), ``fixed`` (no affine) or ``none``
            on the projected codebooks.
    """

    def __init__(self, num_books: int, K: int, centroid_dim: int, d: int, norm: str = "layernorm"):
        super().__init__()
        # a buffer, not a parameter: frozen (SimVQ), saved, never seen by the optimizer
        self.register_buffer("centroids", torch.randn(num_books, K, centroid_dim))
        bound = 1 / math.sqrt(centroid_dim)  # nn.Linear's default init
        self.weight = nn.Parameter(torch.empty(num_books, centroid_dim, d).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_books, d).uniform_(-bound, bound))
        self.norm = _SlotNorm(norm, num_books, d)

    def forward(self) -> torch.Tensor:
        """The searched codebooks ``[num_books, K, d]`` (float32)."""
        cb = torch.baddbmm(self.bias.float().unsqueeze(1), self.centroids.float(), self.weight.float())
        return self.norm(cb, slot_dim=0)


class ProductQuantizer(_CachedCodeVectors):
    """Product (``pq``), shared-codebook (``shared``) or residual (``rvq``) quantization, SimVQ codebooks.

    Args:
        in_dim: width of the merged patch features.
        N: slots (sub-codebooks) per token.
        K: entries per sub-codebook.
        d: sub-vector / code width.
        centroid_dim: width of the frozen centroids (``d_in``).
        beta: commitment weight of Eq. 3.
        mode: ``pq``, ``shared`` or ``rvq``.
        norm: ``layernorm``, ``fixed`` or ``none`` on sub-vectors and codebooks (``rvq``: on the
            input vector only).
        codebook_form: ``simvq`` (frozen centroids and learned projections, for training) or
            ``table`` (the projected codebooks as one frozen table, see :class:`CodeTable`).
    """

    fsdp_param_dtype = "float32"  # its own FSDP2 unit, gathered in float32 (kelix.training.parallel)

    def __init__(self, in_dim: int, N: int, K: int, d: int, centroid_dim: int, beta: float = 0.25,
                 mode: str = "pq", norm: str = "layernorm", codebook_form: str = "simvq"):
        super().__init__()
        if mode not in ("pq", "shared", "rvq"):
            raise ValueError(f"ProductQuantizer mode {mode!r} is not pq, shared or rvq")
        self.N, self.K, self.d, self.beta, self.mode = N, K, d, beta, mode
        self.proj_in = nn.Linear(in_dim, d if mode == "rvq" else N * d)
        books = 1 if mode == "shared" else N
        if codebook_form == "simvq":
            self.codebook = SimVQ(books, K, centroid_dim, d, norm="none" if mode == "rvq" else norm)
        elif codebook_form == "table":
            self.codebook = CodeTable(books, K, d)
        else:
            raise ValueError(f"codebook_form {codebook_form!r} is not simvq or table")
        self.z_norm = _SlotNorm(norm, 1 if mode == "rvq" else N, d)

    def _code_vector_sources(self) -> list[torch.Tensor]:
        return list(self.codebook.parameters()) + list(self.codebook.buffers())

    def _compute_code_vectors(self) -> torch.Tensor:
        return self.codebook().expand(self.N, -1, -1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., N]`` -> code vectors ``[..., N, d]``."""
        cb = self.code_vectors()
        return cb[torch.arange(self.N, device=codes.device), codes]

    def continuous(self, x: torch.Tensor) -> torch.Tensor:
        """The continuous sub-vectors z ``[T, N, d]`` (``[T, 1, d]`` for rvq) before quantization."""
        x = x.to(self.proj_in.weight.dtype)  # autocast is off here: match the layer (bf16 input, fp32 weights)
        return self.z_norm(self.proj_in(x).float().view(x.shape[0], -1, self.d))

    def forward(self, x: torch.Tensor) -> QuantOutput:
        with torch.autocast(x.device.type, enabled=False):  # distances and losses in float32
            z = self.continuous(x)
            cb = self.code_vectors()
            if self.mode == "rvq":
                return self._residual(z[:, 0], cb)
            codes = nearest_codes(z, cb)
            e = cb[torch.arange(self.N, device=x.device), codes]  # [T, N, d]
            codebook_loss = F.mse_loss(e, z.detach())
            commitment = F.mse_loss(z, e.detach())
            # value exactly e (z - z.detach() is exactly 0), gradient straight through to z
            z_q = e.detach() + (z - z.detach())
        return QuantOutput(z_q, codes, codebook_loss + self.beta * commitment,
                           {"codebook": codebook_loss.detach(), "commitment": commitment.detach()})

    @torch.no_grad()
    def project_like_input(self) -> None:
        """Start each ``W_i, b_i`` as the input projection of slot i, for centroids clustered in this
        quantizer's input space (``kelix build-codebook --feature input``, paper 4.2.1 on the tokenizer's
        own features): a centroid's code vector is then ``LN(P_i c + p_i)``, exactly where that feature
        lands, so the first codes are the k-means assignment; the projections then train (SimVQ)."""
        if not isinstance(self.codebook, SimVQ) or self.mode == "rvq":
            raise ValueError("project_like_input needs the simvq codebook form of a pq or shared quantizer")
        books, _, d_in = self.codebook.centroids.shape
        if d_in != self.proj_in.in_features:
            raise ValueError(f"centroid_dim {d_in} is not the quantizer input width {self.proj_in.in_features}: "
                             "input-space centroids need tokenizer.centroid_dim = merger_dim")
        w = self.proj_in.weight.float().view(-1, self.d, d_in)  # [N (pq) or 1 (shared), d, d_in]
        self.codebook.weight.copy_(w[:books].transpose(1, 2))
        self.codebook.bias.copy_(self.proj_in.bias.float().view(-1, self.d)[:books])

    @torch.no_grad()
    def fit_codebook(self, x: torch.Tensor, niter: int = 20, seed: int = 0) -> None:
        """Data-dependent start of the SimVQ projections: k-means (faiss) of the sub-vectors of
        ``x [T, in_dim]``, then ``W_i, b_i`` solved by least squares so that each frozen centroid
        projects onto a cluster centre (exact when ``K <= d_in + 1``). The centroids stay frozen.
        """
        import faiss

        if not isinstance(self.codebook, SimVQ):
            raise ValueError("fit_codebook needs the simvq codebook form (this quantizer holds a fixed table)")
        if self.mode == "rvq":
            raise ValueError("fit_codebook supports pq and shared quantizers, not rvq")
        z = self.continuous(x).float()
        books = self.codebook.centroids.shape[0]
        if books == 1:
            z = z.reshape(-1, 1, self.d)
        if z.shape[0] < self.K:
            raise ValueError(f"fit_codebook needs at least K={self.K} vectors per sub-codebook, got {z.shape[0]}")
        norm = self.codebook.norm
        for i in range(books):
            # one batch is all there is: do not ask faiss for its usual 39 points per centroid
            km = faiss.Kmeans(self.d, self.K, niter=niter, seed=seed + i, verbose=False, min_points_per_centroid=1)
            km.train(np.ascontiguousarray(z[:, i].cpu().numpy(), dtype=np.float32))
            target = torch.from_numpy(km.centroids).to(z)
            if norm.kind == "layernorm":  # undo the affine, so LN(C W + b) lands on the centres
                target = (target - norm.bias[i].float()) / norm.weight[i].float().clamp(min=1e-6)
            c = self.codebook.centroids[i].float()
            a = torch.cat([c, torch.ones(len(c), 1, device=c.device)], 1)
            sol = torch.linalg.lstsq(a.cpu().double(), target.cpu().double()).solution.to(c)
            self.codebook.weight[i].copy_(sol[:-1])
            self.codebook.bias[i].copy_(sol[-1])

    def _residual(self, z: torch.Tensor, cb: torch.Tensor) -> QuantOutput:
        residual, codes, picked = z, [], []
        cb_loss = commit = z.new_zeros(())
        for i in range(self.N):
            c = nearest_codes(residual.detach()[:, None], cb[i : i + 1])[:, 0]
            e = cb[i, c]
            cb_loss = cb_loss + F.mse_loss(e, residual.detach()) / self.N
            commit = commit + F.mse_loss(residual, e.detach()) / self.N
            codes.append(c)
            picked.append(e.detach())
            residual = residual - e.detach()
        # slot 0 carries the straight-through gradient; the slots sum to the reconstruction
        picked[0] = picked[0] + (z - z.detach())
        return QuantOutput(torch.stack(picked, 1), torch.stack(codes, 1), cb_loss + self.beta * commit,
                           {"codebook": cb_loss.detach(), "commitment": commit.detach()})


class FSQuantizer(_CachedCodeVectors):
    """Finite scalar quantization (Mentzer et al. 2023) per slot; ``prod(levels)`` codes per slot.

    Args:
        in_dim: width of the merged patch features.
        N: slots per token.
        levels: quantization levels per FSQ dimension, e.g. ``[16, 16, 16, 16]`` (K = 65536).
        d: width of the slot vectors (each slot's FSQ point is projected back to d).
    """

    fsdp_param_dtype = "float32"

    def __init__(self, in_dim: int, N: int, levels: list[int], d: int):
        super().__init__()
        self.N, self.d = N, d
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]], dtype=torch.long), 0)
        self.register_buffer("basis", basis, persistent=False)
        self.K = int(torch.tensor(levels).prod())
        self.proj_in = nn.Linear(in_dim, N * len(levels))
        self.proj_out = nn.Parameter(torch.randn(N, len(levels), d) / math.sqrt(len(levels)))
        self.proj_out_bias = nn.Parameter(torch.zeros(N, d))

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        lv = self.levels.float()
        half = (lv - 1) * (1 - 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        return torch.tanh(z + torch.atanh(offset / half)) * half - offset

    def _points(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> normalised grid points in [-1, 1] per FSQ dimension."""
        digits = (codes.unsqueeze(-1) // self.basis) % self.levels
        half = self.levels // 2
        return (digits - half).float() / half.float()

    def _project(self, pts: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...nl,nld->...nd", pts, self.proj_out.float()) + self.proj_out_bias.float()

    def _code_vector_sources(self) -> list[torch.Tensor]:
        return [self.proj_out, self.proj_out_bias]

    def _compute_code_vectors(self) -> torch.Tensor:
        codes = torch.arange(self.K, device=self.proj_out.device)
        pts = self._points(codes).unsqueeze(0).expand(self.N, -1, -1)  # [N, K, L]
        return torch.einsum("nkl,nld->nkd", pts, self.proj_out.float()) + self.proj_out_bias.float()[:, None]

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return self._project(self._points(codes))

    def forward(self, x: torch.Tensor) -> QuantOutput:
        with torch.autocast(x.device.type, enabled=False):
            z = self._bound(self.proj_in(x.to(self.proj_in.weight.dtype)).float().view(x.shape[0], self.N, -1))
            q = z.round()
            half = self.levels // 2
            codes = ((q.long() + half) * self.basis).sum(-1)
            pts = (q.detach() + (z - z.detach())) / half.float()  # round with a straight-through gradient
            z_q = self._project(pts)
        return QuantOutput(z_q, codes, z.new_zeros(()), {})
