"""The frozen VAE whose latent space the DiT denoises: diffusers ``AutoencoderDC`` (SANA) or ``AutoencoderKL``.

``pixel`` (:class:`PixelAutoencoder`) is a weightless stand-in for the quickstart, where no pretrained
VAE can be downloaded and a random one cannot reconstruct anything: its latents are the image's
pixels folded into channels (space-to-depth), so decoding is exact and generated images are real.

Latents are ``(z - shift_factor) * scaling_factor``, or per channel ``(z - latents_mean) * scaling_factor /
latents_std`` when the VAE's config has ``latents_mean``/``latents_std`` (diffusers' convention, as its SDXL
pipelines use them), so the DiT sees roughly unit-variance latents; decoding inverts it. The factors are the
VAE's own unless overridden; a saved de-tokenizer's ``vae/kelix_latents.json`` records the ones it was
trained with (``shift_factor`` is not an AutoencoderDC config key).
"""

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

# A tiny AutoencoderDC (3 stages: 4x downsampling, 4 latent channels) for quickstarts and tests.
TINY_DCAE: dict = dict(
    in_channels=3, latent_channels=4, attention_head_dim=8,
    encoder_block_types=["ResBlock"] * 3, decoder_block_types=["ResBlock"] * 3,
    encoder_block_out_channels=[8, 16, 32], decoder_block_out_channels=[8, 16, 32],
    encoder_layers_per_block=[1, 1, 1], decoder_layers_per_block=[1, 1, 1],
    encoder_qkv_multiscales=[[], [], []], decoder_qkv_multiscales=[[], [], []], scaling_factor=1.0,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LATENTS_FILE = "kelix_latents.json"  # the latent scaling a DiT was trained with, beside the VAE's config.json
_WEIGHTS = re.compile(r"diffusion_pytorch_model(?:\.(?P<v>[^.-]+))?(?:-\d+-of-\d+)?\.(?:safetensors|bin)"
                      r"|diffusion_pytorch_model\.(?:safetensors|bin)\.index(?:\.(?P<iv>[^.]+))?\.json")


def has_accelerate() -> bool:
    """diffusers' low-memory loading needs ``accelerate``; without it, ask for the plain path (no warning)."""
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def check_variant(path: str, variant: str | None, key: str) -> None:
    """Fail in one line when the diffusers directory ``path`` has no weights of ``variant`` (None: the plain
    ``diffusion_pytorch_model.safetensors``) but has others, naming the ``key`` to set."""
    found = set()
    for name in os.listdir(path):
        m = _WEIGHTS.fullmatch(name)
        if m:
            found.add(m.group("v") or m.group("iv"))
    if found and variant not in found:
        have = ", ".join(sorted("none" if v is None else repr(v) for v in found))
        raise ValueError(f"{path} has weights of variant {have}, not {variant!r}: set {key}"
                         + (f": {sorted(v for v in found if v)[0]}" if variant is None else ""))


@dataclass
class VAEConfig:
    """Which frozen VAE maps target images to latents and back.

    Args:
        path: local diffusers directory of a pretrained VAE (SANA: DC-AE f32c32); ``AutoencoderDC`` or
            ``AutoencoderKL`` is read from its ``config.json``.
        kind: class of a randomly initialised VAE (used when ``path`` is None): ``dc`` (AutoencoderDC)
            or ``kl`` (AutoencoderKL), or ``pixel`` (:class:`PixelAutoencoder`, exact and weightless).
        config: keyword arguments of that VAE (default: the tiny ``TINY_DCAE``; for ``pixel``:
            ``patch_size``, ``scaling_factor``).
        seed: seed of the random init, so every rank and every run builds the same VAE.
        scaling_factor: override of the VAE's scaling factor (latents = (z - shift) * scale).
        shift_factor: override of the VAE's shift factor (AutoencoderKL configs may set one).
        dtype: dtype of the frozen weights (``float32``, ``bfloat16``, ``float16``).
        variant: weights variant of ``path`` (diffusers' ``from_pretrained(variant=...)``): ``bf16`` reads
            ``diffusion_pytorch_model.bf16.safetensors``.
        sample_posterior: AutoencoderKL only: sample the posterior rather than take its mode.
    """

    path: str | None = None
    kind: Literal["dc", "kl", "pixel"] = "dc"
    config: dict = field(default_factory=lambda: dict(TINY_DCAE))
    seed: int = 0
    scaling_factor: float | None = None
    shift_factor: float | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    variant: str | None = None
    sample_posterior: bool = False

    def __post_init__(self):
        if self.kind not in ("dc", "kl", "pixel"):
            raise ValueError(f"vae.kind {self.kind!r} is not 'dc', 'kl' or 'pixel'")
        if self.dtype not in DTYPES:
            raise ValueError(f"vae.dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")


def _pixel_autoencoder_class():
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class PixelAutoencoder(ModelMixin, ConfigMixin):
        """Space-to-depth "VAE": ``[B, 3, H, W]`` -> ``[B, 3 p^2, H/p, W/p]`` and back, exactly.

        Args:
            patch_size: pixels folded per side (the downsampling factor).
            in_channels: image channels.
            scaling_factor: latents = (pixels - shift_factor) * scaling_factor.
            shift_factor: see ``scaling_factor`` (synthetic images: mean ~0.46, std ~0.5).
        """

        @register_to_config
        def __init__(self, patch_size: int = 4, in_channels: int = 3, scaling_factor: float = 1.0,
                     shift_factor: float | None = None):
            super().__init__()
            # one constant weight, so the diffusers save/load and dtype machinery has a tensor to hold
            self.unit = nn.Parameter(torch.ones(()), requires_grad=False)

        @property
        def latent_channels(self) -> int:
            return self.config.in_channels * self.config.patch_size**2

        def encode(self, x):
            from types import SimpleNamespace

            return SimpleNamespace(latent=nn.functional.pixel_unshuffle(x * self.unit, self.config.patch_size))

        def decode(self, z):
            from types import SimpleNamespace

            return SimpleNamespace(sample=nn.functional.pixel_shuffle(z * self.unit, self.config.patch_size))

    return PixelAutoencoder


class FrozenVAE(nn.Module):
    """A frozen diffusers autoencoder with the DiT's latent scaling: ``encode`` pixels, ``decode`` latents.

    Pixels are ``[B, 3, H, W]`` in ``[-1, 1]``; latents ``[B, latent_channels, H / downsample, W / downsample]``.
    ``scaling_factor``, ``shift_factor``, ``latents_mean``, ``latents_std``: None takes the VAE config's.
    """

    def __init__(self, vae: nn.Module, scaling_factor: float | None = None, shift_factor: float | None = None,
                 sample_posterior: bool = False, latents_mean: list[float] | None = None,
                 latents_std: list[float] | None = None):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else getattr(cfg, "scaling_factor", 1.0))
        shift = shift_factor if shift_factor is not None else getattr(cfg, "shift_factor", None)
        self.shift_factor = float(shift or 0.0)
        self.sample_posterior = sample_posterior
        self.is_pixel = type(vae).__name__ == "PixelAutoencoder"
        self.is_dc = type(vae).__name__ == "AutoencoderDC" or self.is_pixel  # both return .latent
        if self.is_pixel:
            self.downsample, self.latent_channels = int(cfg.patch_size), int(vae.latent_channels)
        else:
            stages = cfg.encoder_block_out_channels if self.is_dc else cfg.block_out_channels
            self.downsample = 2 ** (len(stages) - 1)
            self.latent_channels = int(cfg.latent_channels)
        mean = latents_mean if latents_mean is not None else getattr(cfg, "latents_mean", None)
        std = latents_std if latents_std is not None else getattr(cfg, "latents_std", None)
        name = type(vae).__name__
        if (mean is None) != (std is None):
            raise ValueError(f"{name} config sets only one of latents_mean and latents_std")
        if mean is not None:
            if len(mean) != self.latent_channels or len(std) != self.latent_channels:
                raise ValueError(f"{name} config: latents_mean/latents_std have {len(mean)}/{len(std)} values "
                                 f"for {self.latent_channels} latent channels")
            if self.shift_factor:
                raise ValueError(f"{name}: shift_factor {self.shift_factor} and latents_mean both set; use one")
            if min(std) <= 0:
                raise ValueError(f"{name} config: latents_std must be > 0, got {list(std)}")
        shape = (1, self.latent_channels, 1, 1)
        # (z - offset) * scaling_factor / spread: per channel with latents_mean/std, else scalar shift and 1
        offset = torch.tensor(mean, dtype=torch.float32).view(shape) if mean is not None else torch.full(shape, self.shift_factor)
        spread = torch.tensor(std, dtype=torch.float32).view(shape) if std is not None else torch.ones(shape)
        self.register_buffer("offset", offset, persistent=False)
        self.register_buffer("spread", spread, persistent=False)
        self.latents_mean = None if mean is None else [float(v) for v in mean]
        self.latents_std = None if std is None else [float(v) for v in std]

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always eval (no dropout, fixed norms)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in ``[-1, 1]`` -> scaled latents (float32)."""
        h, w = pixels.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image {h}x{w} is not a multiple of the VAE's downsampling {self.downsample}")
        out = self.vae.encode(pixels.to(self.dtype))
        if self.is_dc:
            z = out.latent
        else:
            dist = out.latent_dist
            z = dist.sample(generator) if self.sample_posterior else dist.mode()
        return (z.float() - self.offset) * self.scaling_factor / self.spread

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in ``[-1, 1]`` (float32)."""
        z = latents.float() * self.spread / self.scaling_factor + self.offset
        return self.vae.decode(z.to(self.dtype)).sample.float().clamp(-1, 1)


def _vae_class(kind: str):
    from diffusers import AutoencoderDC, AutoencoderKL

    pixel = _pixel_autoencoder_class()
    return {"dc": AutoencoderDC, "kl": AutoencoderKL, "pixel": pixel, "AutoencoderDC": AutoencoderDC,
            "AutoencoderKL": AutoencoderKL, "PixelAutoencoder": pixel}[kind]


def load_vae(cfg: VAEConfig) -> FrozenVAE:
    """Build the frozen VAE of ``cfg``: pretrained from a local directory, or random from a config."""
    dtype = DTYPES[cfg.dtype]
    if cfg.path is not None:
        conf = os.path.join(cfg.path, "config.json")
        if not os.path.isfile(conf):
            raise FileNotFoundError(f"vae.path {cfg.path!r} is not a local diffusers VAE directory (no config.json)")
        name = json.loads(Path(conf).read_text()).get("_class_name")
        if name not in ("AutoencoderDC", "AutoencoderKL", "PixelAutoencoder"):
            raise ValueError(f"{conf}: _class_name {name!r} is not AutoencoderDC, AutoencoderKL or PixelAutoencoder")
        check_variant(cfg.path, cfg.variant, "vae.variant")
        from kelix.console.quiet import quiet_loading

        with quiet_loading():
            vae = _vae_class(name).from_pretrained(cfg.path, local_files_only=True, torch_dtype=dtype,
                                                   low_cpu_mem_usage=has_accelerate(), variant=cfg.variant)
        saved = os.path.join(cfg.path, LATENTS_FILE)  # an export's record of the scaling its DiT trained with
        if os.path.isfile(saved):
            rec = json.loads(Path(saved).read_text())
            return FrozenVAE(vae, cfg.scaling_factor if cfg.scaling_factor is not None else rec.get("scaling_factor"),
                             cfg.shift_factor if cfg.shift_factor is not None else rec.get("shift_factor"),
                             cfg.sample_posterior, rec.get("latents_mean"), rec.get("latents_std"))
    else:
        cls = _vae_class(cfg.kind)
        if cfg.kind == "pixel" and "encoder_block_types" in cfg.config:  # the dataclass default is DC-AE's
            cfg = replace(cfg, config={})
        fork = torch.random.fork_rng(devices=[])  # a seeded init that leaves the global RNG alone
        with fork:
            torch.manual_seed(cfg.seed)
            try:
                vae = cls(**cfg.config)
            except TypeError as e:
                raise ValueError(f"vae.config is not a valid {cls.__name__} config: {e}") from e
        if dtype != torch.float32:
            vae = vae.to(dtype)
    return FrozenVAE(vae, cfg.scaling_factor, cfg.shift_factor, cfg.sample_posterior)
