"""Kelix-Tok (paper 3.1): vision encoder -> 2x2 patch merge -> product quantizer -> up-projector -> fuse.

``KelixTokenizer`` is a plain ``nn.Module`` saved and loaded in HF layout (``config.json`` +
``model.safetensors``) through ``PyTorchModelHubMixin``. Interfaces other components use:

* ``encode(images) -> list[LongTensor [h, w, N]]``: code grids, row-major merged tokens;
* ``code_vectors() -> [N, K, d]``: the exact vector each code stands for;
* ``embed_codes(codes [..., N]) -> [..., out_dim]``: ``fuse_j U_j code_vectors[j, c_j]``, the visual
  embedding the aux LM reads (``U_j`` the up-projection of slot j, see ``up_projection``);
* ``slot_projection() -> (W [out_dim, N*d], b [out_dim])``: that map as one linear map of the
  concatenated slot vectors (what the LLM folds into its embedding table), ``config.fusion``,
  ``image_config``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from kelix.data.images import ImageConfig, resize_image, to_tensor
from kelix.tokenizer.encoder import EncoderConfig, PatchMerger, VisionEncoder
from kelix.tokenizer.quantizer import FSQuantizer, ProductQuantizer, QuantOutput

log = logging.getLogger("kelix.tokenizer")


@dataclass
class TokenizerConfig:
    """Kelix-Tok architecture (paper defaults: N=8, K=8192, d=128, beta=0.25, sum fusion).

    Args:
        N: sub-codebooks (codes per visual token).
        K: entries per sub-codebook; S = N*K codes in all.
        d: dimension of each sub-vector and code vector.
        beta: commitment weight in L_VQ (Eq. 3).
        fusion: how the N up-projected slot vectors become one token: ``sum`` (paper default) or ``mean``.
        out_dim: width of the up-projector output (the aux LM's hidden size: 1024 for Qwen3-0.6B).
        up_projection: ``per_slot`` (default, as the official code): each slot has its own bias-free
            ``d -> out_dim`` matrix and the projected slots are fused, so visual embeddings span up
            to ``N*d`` dimensions; ``shared`` (ablation): the slots are fused in d dims, then one
            ``Linear(d, out_dim)``, so every embedding lies in a d-dim affine subspace.
        quantizer: ``pq`` (independent sub-codebooks), ``shared`` (one codebook for all N slots),
            ``rvq`` (residual, N levels), ``fsq`` (finite scalar, ``prod(fsq_levels) == K``) or
            ``none`` (continuous baseline, Table 6a: the merger's output goes straight to a
            ``Linear(merger_dim, out_dim)``; N, K, d and norm are unused). N=1 with ``pq`` is plain VQ.
        codebook_form: how ``pq``/``shared``/``rvq`` store their codebooks: ``simvq`` (training:
            frozen centroids ``C_i`` and learned projections) or ``table`` (the projected codebooks
            ``LN(C_i W_i + b_i)`` as one frozen table: what ``export-tokenizer`` writes, all that
            encoding and embedding need, and far smaller than the centroids; not trainable further).
        fsq_levels: levels per FSQ dimension (``quantizer: fsq`` only).
        norm: normalisation of the sub-vectors and of the projected codebooks: ``layernorm`` with a
            learned affine per sub-codebook (as in the official code), ``fixed`` (LayerNorm without
            affine: both sides keep a fixed scale, so L_VQ cannot shrink to zero by scaling) or ``none``.
        centroid_dim: width ``d_in`` of the frozen centroids (default: the encoder width D, i.e.
            k-means over ViT patch embeddings; ``merge^2 * D`` for merged features).
        codebook: centroids file written by ``kelix build-codebook`` (safetensors, ``centroids
            [N, K, d_in]``), read by :meth:`KelixTokenizer.load_init_weights`. None: random
            Gaussian centroids (SimVQ's default), with a warning.
        merger: use the 2x2 patch-merge MLP (False: the concatenated patches feed the quantizer).
        merger_hidden: patch-merge MLP hidden width (default ``merge^2 * D``).
        merger_dim: patch-merge MLP output width (default ``merge^2 * D``).
        merger_norm: the merger's LayerNorm on each ``patch`` before concatenation (default) or on the
            ``concat``-enated ``merge^2 * D`` features (the released Kelix's, ``kelix convert official``).
        init_seed: seed of the random initialisation (None: the global RNG's state). With a seed every
            process building this config gets the same random weights, so ``kelix build-codebook
            --feature input`` clusters the features of exactly the tokenizer ``kelix fit`` trains (the
            quickstart's, which has no pretrained encoder).
        encoder: the vision encoder (see :class:`~kelix.tokenizer.encoder.EncoderConfig`).
        image: how images are resized (patch size, merge size, pixel budget); see
            :class:`~kelix.data.images.ImageConfig`.
    """

    N: int = 8
    K: int = 8192
    d: int = 128
    beta: float = 0.25
    fusion: Literal["sum", "mean"] = "sum"
    out_dim: int = 1024
    up_projection: Literal["per_slot", "shared"] = "per_slot"
    quantizer: Literal["pq", "shared", "rvq", "fsq", "none"] = "pq"
    codebook_form: Literal["simvq", "table"] = "simvq"
    fsq_levels: list[int] = field(default_factory=lambda: [8, 8, 8, 4, 4])
    norm: Literal["layernorm", "fixed", "none"] = "layernorm"
    centroid_dim: int | None = None
    codebook: str | None = None
    merger: bool = True
    merger_hidden: int | None = None
    merger_dim: int | None = None
    merger_norm: Literal["patch", "concat"] = "patch"
    init_seed: int | None = None
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    image: ImageConfig = field(default_factory=ImageConfig)

    def __post_init__(self):
        # config.json holds nested dicts; LightningCLI gives dataclasses
        if isinstance(self.encoder, dict):
            self.encoder = EncoderConfig(**self.encoder)
        if isinstance(self.image, dict):
            img = dict(self.image)
            for k in ("mean", "std", "aspect_range"):
                if img.get(k) is not None:
                    img[k] = tuple(img[k])
            self.image = ImageConfig(**img)
        for name in ("N", "K", "d", "out_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"tokenizer.{name} must be >= 1, got {getattr(self, name)}")
        if self.fusion not in ("sum", "mean"):
            raise ValueError(f"tokenizer.fusion {self.fusion!r} is not sum or mean")
        if self.up_projection not in ("per_slot", "shared"):
            raise ValueError(f"tokenizer.up_projection {self.up_projection!r} is not per_slot or shared")
        if self.codebook_form not in ("simvq", "table"):
            raise ValueError(f"tokenizer.codebook_form {self.codebook_form!r} is not simvq or table")
        if self.quantizer == "fsq":
            prod = 1
            for v in self.fsq_levels:
                prod *= int(v)
            if prod != self.K:
                raise ValueError(f"tokenizer.fsq_levels {list(self.fsq_levels)} give {prod} codes, but K is {self.K}")

    def to_dict(self) -> dict:
        return asdict(self)


# The named tiny configuration of tests and the quickstart (beside the paper's, in recipes/tokenizer/).
TINY_TOKENIZER: dict = dict(
    N=4, K=32, d=16, out_dim=64, merger_hidden=128, merger_dim=64,
    encoder=dict(kind="naflexvit", name="naflexvit_base_patch16_gap",
                 kwargs=dict(patch_size=14, embed_dim=32, depth=2, num_heads=2, reg_tokens=0,
                             pos_embed_grid_size=[8, 8])),
    image=dict(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=112 * 112),
)


def tiny_config(**overrides) -> TokenizerConfig:
    """:data:`TINY_TOKENIZER` as a :class:`TokenizerConfig`, with fields replaced by ``overrides``."""
    return TokenizerConfig(**{**TINY_TOKENIZER, **overrides})


@dataclass
class TokenizerOutput:
    """Forward result for a batch of images (tokens packed image after image, row-major).

    Args:
        embeds: ``[T, out_dim]`` visual token embeddings (up-projected, fused).
        codes: ``[T, N]`` codes (None for the continuous baseline).
        grids: ``(h, w)`` merged-token grid of each image (``sum(h*w) == T``).
        loss: ``L_VQ``.
        terms: loss terms to log.
    """

    embeds: torch.Tensor
    codes: torch.Tensor | None
    grids: list[tuple[int, int]]
    loss: torch.Tensor
    terms: dict


class KelixTokenizer(nn.Module, PyTorchModelHubMixin):
    """Kelix-Tok: images -> N codes per merged patch -> fused visual embeddings.

    Args:
        config: see :class:`TokenizerConfig`. Construction reads no weight files; call
            :meth:`load_init_weights` for the pretrained encoder and k-means centroids.
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        if isinstance(config, dict):
            config = TokenizerConfig(**config)
        self.config = config
        if config.init_seed is None:
            self._build(config)
        else:
            with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
                torch.manual_seed(config.init_seed)
                self._build(config)

    def _build(self, config: TokenizerConfig) -> None:
        img = config.image
        self.encoder = VisionEncoder(config.encoder, img.patch_size)
        self.merger = PatchMerger(self.encoder.width, img.merge_size, config.merger_hidden, config.merger_dim,
                                  mlp=config.merger, norm=config.merger_norm)
        in_dim = self.merger.out_dim
        N, d = config.N, config.d
        if config.quantizer in ("pq", "shared", "rvq"):
            self.quantizer = ProductQuantizer(in_dim, N, config.K, d, self.centroid_dim, config.beta,
                                              mode=config.quantizer, norm=config.norm,
                                              codebook_form=config.codebook_form)
        elif config.quantizer == "fsq":
            self.quantizer = FSQuantizer(in_dim, N, list(config.fsq_levels), d)
        elif config.quantizer == "none":
            self.quantizer = nn.Identity()  # the continuous baseline has nothing between merger and up-projector
        else:
            raise ValueError(f"tokenizer.quantizer {config.quantizer!r} is not pq, shared, rvq, fsq or none")
        # linear in the code vectors, so the LLM can fold it into an embedding table
        if config.quantizer == "none":
            self.up_projector = nn.Linear(in_dim, config.out_dim)
        elif config.up_projection == "shared":
            self.up_projector = nn.Linear(d, config.out_dim)
        else:
            # sum_j U_j z_j == [U_1 .. U_N] @ concat_j z_j: one bias-free Linear on the concatenated slots
            self.up_projector = nn.Linear(N * d, config.out_dim, bias=False)
            nn.init.uniform_(self.up_projector.weight, -d ** -0.5, d ** -0.5)  # each U_j as nn.Linear(d, out)

    @property
    def centroid_dim(self) -> int:
        return self.config.centroid_dim or self.encoder.width

    @property
    def image_config(self) -> ImageConfig:
        return self.config.image

    @property
    def has_codes(self) -> bool:
        return self.config.quantizer != "none"

    # -- weights
    def load_init_weights(self) -> None:
        """Load the pretrained encoder (``encoder.path``) and the k-means centroids (``codebook``)."""
        self.encoder.load_weights()
        if self.config.quantizer not in ("pq", "shared", "rvq") or self.config.codebook_form == "table":
            return
        if self.config.codebook is None:
            log.warning("tokenizer.codebook is not set: the frozen centroids stay random Gaussian (SimVQ "
                        "default); run `kelix build-codebook` for the paper's k-means init")
            return
        self.load_codebook(self.config.codebook)

    def load_codebook(self, path: str) -> None:
        """Copy ``centroids [N, K, d_in]`` from a ``kelix build-codebook`` file into the frozen tables."""
        from safetensors import safe_open

        if self.config.codebook_form != "simvq" or self.config.quantizer not in ("pq", "shared", "rvq"):
            raise ValueError(f"tokenizer.codebook {path!r}: only the simvq codebook form of pq/shared/rvq has centroids")
        buf = self.quantizer.codebook.centroids
        try:
            with safe_open(path, framework="pt") as f:
                if "centroids" not in f.keys():
                    raise KeyError(f"{path}: no 'centroids' tensor (has {list(f.keys())})")
                c = f.get_tensor("centroids")
                feature = (f.metadata() or {}).get("feature")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"tokenizer.codebook {path!r} does not exist (run kelix build-codebook)") from e
        if tuple(c.shape) != tuple(buf.shape):
            raise ValueError(f"{path}: centroids {tuple(c.shape)} do not match the quantizer's {tuple(buf.shape)} "
                             f"(books, K, centroid_dim)")
        with torch.no_grad():
            buf.copy_(c.to(buf.dtype))
        if feature == "input":  # clustered in the quantizer's own input space: start W_i where they land
            self.quantizer.project_like_input()
        log.info("codebook: loaded %s centroids %s from %s", feature or "", tuple(c.shape), path)

    def portable_config(self) -> TokenizerConfig:
        """The config without file paths: what an exported tokenizer stores in ``config.json``."""
        return replace(self.config, codebook=None, centroid_dim=self.centroid_dim,
                       encoder=self.encoder.portable_config())

    def save_pretrained(self, save_directory, **kwargs):
        kwargs.setdefault("config", self.portable_config())
        return super().save_pretrained(save_directory, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", strict: bool = True, **kwargs):
        import os

        from safetensors.torch import load_model

        path = os.path.join(model_id, "model.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_id!r} is not a tokenizer directory (no model.safetensors; "
                                    f"nothing is downloaded)")
        config = kwargs["config"]
        if isinstance(config, dict) and "up_projection" not in config:  # written before per-slot projections
            config = dict(config, up_projection="shared")
        model = cls(config)
        missing, unexpected = load_model(model, path, strict=False, device=map_location)
        # older exports carry SigLIP's pooling head, which the encoder no longer builds
        unexpected = [k for k in unexpected if not k.startswith("encoder.model.head.")]
        if missing or unexpected:
            raise KeyError(f"{path}: tensors do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model.eval()

    def for_inference(self) -> KelixTokenizer:
        """A copy with the projected codebooks stored as one frozen table (``codebook_form: table``):
        the same codes and embeddings, without the centroid table (what ``export-tokenizer`` writes)."""
        cfg = self.portable_config()
        if cfg.quantizer not in ("pq", "shared", "rvq") or cfg.codebook_form == "table":
            out = KelixTokenizer(cfg)
            out.load_state_dict(self.state_dict(), strict=True)
            return out.eval()
        out = KelixTokenizer(replace(cfg, codebook_form="table"))
        sd = {k: v for k, v in self.state_dict().items() if not k.startswith("quantizer.codebook.")}
        with torch.no_grad():
            sd["quantizer.codebook.vectors"] = self.quantizer.codebook().detach().float()
        out.load_state_dict(sd, strict=True)
        return out.eval()

    # -- forward
    def preprocess(self, images: list) -> list[torch.Tensor]:
        """PIL images -> normalised ``[3, H, W]`` tensors resized per :attr:`image_config`."""
        cfg = self.image_config
        return [to_tensor(resize_image(im.convert("RGB"), cfg, where=f"image {i}"), cfg) for i, im in enumerate(images)]

    def up_project(self, z_q: torch.Tensor) -> torch.Tensor:
        """N slot vectors ``[..., N, d]`` -> one token embedding ``[..., out_dim]`` (see ``up_projection``)."""
        w = self.up_projector.weight
        scale = 1.0 if self.config.fusion == "sum" else 1.0 / self.config.N
        if self.config.up_projection == "shared":
            fused = z_q.sum(-2) * scale
            return self.up_projector(fused.to(w.dtype))
        return self.up_projector(z_q.flatten(-2).to(w.dtype)) * scale

    def slot_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W [out_dim, N*d], b [out_dim])`` with ``embed_codes(c) = s * W @ concat_j v_{j,c_j} + b``
        (``s`` = 1 for sum fusion, 1/N for mean): slot j's matrix is ``W[:, j*d:(j+1)*d]``."""
        if not self.has_codes:
            raise RuntimeError("the continuous baseline (quantizer: none) has no code vectors to project")
        lin, N = self.up_projector, self.config.N
        if self.config.up_projection == "shared":  # the same matrix for every slot, the bias once
            return lin.weight.repeat(1, N), lin.bias
        return lin.weight, lin.weight.new_zeros(lin.out_features)

    def quantize(self, pixels: list[torch.Tensor]) -> tuple[QuantOutput, list[tuple[int, int]]]:
        """Images -> the quantizer's output for all their merged tokens, and the token grids."""
        if not self.has_codes:
            raise RuntimeError("the continuous baseline (quantizer: none) has no quantizer")
        feats, grids = self.merger(self.encoder(pixels))
        return self.quantizer(feats), grids

    def forward(self, pixels: list[torch.Tensor]) -> TokenizerOutput:
        """Normalised images ``[3, H, W]`` (sides multiples of patch*merge) -> :class:`TokenizerOutput`."""
        if not self.has_codes:  # continuous baseline: merger -> up-projector
            feats, grids = self.merger(self.encoder(pixels))
            embeds = self.up_projector(feats)
            return TokenizerOutput(embeds, None, grids, embeds.new_zeros((), dtype=torch.float32), {})
        q, grids = self.quantize(pixels)
        return TokenizerOutput(self.up_project(q.z_q), q.codes, grids, q.loss, q.terms)

    # -- the interface of the LLM and DiT
    @torch.no_grad()
    def encode(self, images: list, batch_size: int = 16) -> list[torch.LongTensor]:
        """PIL images -> code grids ``[h, w, N]`` (values in ``0..K-1`` per sub-codebook)."""
        if not self.has_codes:
            raise RuntimeError("the continuous baseline (quantizer: none) has no codes to encode")
        p = next(self.encoder.parameters())
        out = []
        for s in range(0, len(images), batch_size):
            pixels = [x.to(p.device, p.dtype) for x in self.preprocess(images[s : s + batch_size])]
            q, grids = self.quantize(pixels)
            for codes, (h, w) in zip(q.codes.split([h * w for h, w in grids]), grids):
                out.append(codes.view(h, w, self.config.N))
        return out

    @torch.no_grad()
    def features(self, images: list, batch_size: int = 16) -> list[torch.Tensor]:
        """PIL images -> the continuous baseline's features ``[h, w, out_dim]`` (what ``encode`` is for codes)."""
        if self.has_codes:
            raise RuntimeError("features() is the continuous baseline's (quantizer: none); use encode()")
        p = next(self.encoder.parameters())
        out = []
        for s in range(0, len(images), batch_size):
            res = self([x.to(p.device, p.dtype) for x in self.preprocess(images[s : s + batch_size])])
            for e, (h, w) in zip(res.embeds.split([h * w for h, w in res.grids]), res.grids):
                out.append(e.view(h, w, -1))
        return out

    def code_vectors(self) -> torch.Tensor:
        """``[N, K, d]``: the quantized vector ``z_q`` each code stands for (cached in eval mode)."""
        if not self.has_codes:
            raise RuntimeError("the continuous baseline (quantizer: none) has no codes")
        return self.quantizer.code_vectors()

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., N]`` -> visual embeddings ``[..., out_dim]``, as fed to the aux LM."""
        if not self.has_codes:
            raise RuntimeError("the continuous baseline (quantizer: none) has no codes to embed")
        if codes.shape[-1] != self.config.N:
            raise ValueError(f"codes must end in N={self.config.N} slots, got shape {tuple(codes.shape)}")
        return self.up_project(self.quantizer.lookup(codes.long()))
