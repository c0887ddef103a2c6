"""Kelix-DiT: a SANA diffusion transformer conditioned on the unified LLM's hidden states.

The condition is the sequence of the LLM's last hidden states (before its final norm) over an image's
positions, from ``<vision_start>`` up to ``<vision_end>`` (paper 4.4.1). A small connector (Linear,
GELU, Linear, RMSNorm) maps their width ``D`` to the DiT's caption width, where diffusers'
``SanaTransformer2DModel`` takes over (its own caption projection + norm, then cross-attention with a
key mask for the variable condition length).

Classifier-free guidance: the unconditional input is one learned null token in the connector's
output space (the rest of the sequence masked out), so training can drop conditions per item and
sampling builds the unconditional branch from the same parameter.

Everything runs through :meth:`KelixDiT.forward` (FSDP2 gathers a sharded module's parameters only
around ``forward``).
"""

import logging
import os
from dataclasses import dataclass, field

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

log = logging.getLogger("kelix.dit")


@dataclass
class DiTConfig:
    """The de-tokenizer network: connector + SANA transformer.

    Args:
        cond_dim: width ``D`` of the condition states, the unified LLM's hidden size (Qwen3-8B: 4096).
        transformer: keyword arguments of diffusers' ``SanaTransformer2DModel`` (its defaults are
            SANA-1600M at 1024 px: 20 layers, width 2240, caption width 2304, 32 latent channels).
            ``in_channels`` must equal the VAE's latent channels; ``caption_channels`` is the width
            the connector writes.
        transformer_path: local diffusers directory of a pretrained ``SanaTransformer2DModel``
            (``config.json`` + weights) to start from; its config is used (keys given in
            ``transformer`` must agree). Resolved when the model is built: a saved ``KelixDiT``
            holds the full transformer config and no path, so it loads without that directory.
        transformer_variant: weights variant of ``transformer_path`` (diffusers' ``from_pretrained(variant=...)``):
            ``bf16`` reads ``diffusion_pytorch_model.bf16.safetensors``.
        connector_hidden: width of the connector's hidden layer (default: the caption width).
        max_condition_length: condition states beyond this many are cut (the official model: 720).
        cross_attn_rope: rotate the cross-attention queries and keys by 2D positions (the released
            Kelix-DiT's ``use_cross_attn_rope``): latent tokens by their place on the latent grid, condition
            states by the release's rule (:mod:`kelix.dit.rope`). Off: no positions in cross-attention.
        integer_timesteps: truncate the timestep to an integer before embedding it, as the release does
            (737.6 is seen as 737). Off: the exact float timestep (diffusers' SANA).
        null_condition_length: shape of the learned unconditional input for classifier-free guidance.
            None: one token ``[C]``, the rest of a dropped item masked out (this kit's default). An int
            ``M``: a table ``[M, C]`` (the release's ``y_embedding``, ``M = model_max_length``); a dropped
            item attends to its first ``min(L, M)`` rows, zero-padded beyond ``M``.
    """

    cond_dim: int = 4096
    transformer: dict = field(default_factory=dict)
    transformer_path: str | None = None
    transformer_variant: str | None = None
    connector_hidden: int | None = None
    max_condition_length: int = 720
    cross_attn_rope: bool = False
    integer_timesteps: bool = False
    null_condition_length: int | None = None

    def __post_init__(self):
        if self.cond_dim < 1:
            raise ValueError(f"dit.cond_dim must be >= 1, got {self.cond_dim}")
        if self.max_condition_length < 1:
            raise ValueError(f"dit.max_condition_length must be >= 1, got {self.max_condition_length}")
        if self.null_condition_length is not None and self.null_condition_length < 1:
            raise ValueError(f"dit.null_condition_length must be None or >= 1, got {self.null_condition_length}")


class Connector(nn.Sequential):
    """LLM hidden states ``[B, L, D]`` -> caption features ``[B, L, C]``: Linear, GELU, Linear, RMSNorm."""

    def __init__(self, cond_dim: int, out_dim: int, hidden: int | None = None):
        hidden = hidden or out_dim
        super().__init__(nn.Linear(cond_dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, out_dim),
                         nn.RMSNorm(out_dim, eps=1e-5))
        # small first/second layers: the pretrained DiT starts from near-constant captions, not noise
        nn.init.normal_(self[0].weight, std=0.02)
        nn.init.normal_(self[2].weight, std=0.02)
        nn.init.zeros_(self[0].bias)
        nn.init.zeros_(self[2].bias)


def _build_transformer(cfg: DiTConfig):
    from diffusers import SanaTransformer2DModel

    if cfg.transformer_path is None:
        return SanaTransformer2DModel(**cfg.transformer)
    path = cfg.transformer_path
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"dit.transformer_path {path!r} is not a local diffusers directory with config.json")
    from kelix.dit.vae import check_variant, has_accelerate

    check_variant(path, cfg.transformer_variant, "dit.transformer_variant")
    from kelix.console.quiet import quiet_loading

    with quiet_loading():
        model = SanaTransformer2DModel.from_pretrained(path, local_files_only=True, variant=cfg.transformer_variant,
                                                       low_cpu_mem_usage=has_accelerate())
    loaded = {k: v for k, v in model.config.items() if not k.startswith("_")}
    for k, v in cfg.transformer.items():
        if k not in loaded:
            raise ValueError(f"dit.transformer.{k} is not a SanaTransformer2DModel option (in {path})")
        if (list(v) if isinstance(v, tuple) else v) != (list(loaded[k]) if isinstance(loaded[k], tuple) else loaded[k]):
            raise ValueError(f"dit.transformer.{k}={v!r} disagrees with {path}/config.json ({loaded[k]!r})")
    log.info("DiT transformer initialised from %s", path)
    return model


class KelixDiT(nn.Module, PyTorchModelHubMixin):
    """Connector + null condition + ``SanaTransformer2DModel``; saved as ``config.json`` + ``model.safetensors``."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        if isinstance(config, dict):  # from_pretrained hands the JSON dict
            config = DiTConfig(**config)
        self.transformer = _build_transformer(config)
        # the saved config describes the built network, never a path it came from
        config.transformer = {k: (list(v) if isinstance(v, tuple) else v)
                              for k, v in self.transformer.config.items() if not k.startswith("_")}
        config.transformer_path = config.transformer_variant = None
        self.config = config
        self._hub_mixin_config = config
        width = self.transformer.config.caption_channels
        self.connector = Connector(config.cond_dim, width, config.connector_hidden)
        null_shape = (width,) if config.null_condition_length is None else (config.null_condition_length, width)
        self.null_condition = nn.Parameter(torch.randn(null_shape) / width**0.5)
        if config.cross_attn_rope:
            from kelix.dit.rope import CrossAttnRoPEProcessor

            attn = self.transformer.transformer_blocks[0].attn2 if self.transformer.transformer_blocks else None
            if attn is not None and (attn.inner_dim // attn.heads) % 4:
                raise ValueError("dit.cross_attn_rope needs a cross-attention head size divisible by 4, got "
                                 f"{attn.inner_dim // attn.heads}")
            for block in self.transformer.transformer_blocks:
                block.attn2.set_processor(CrossAttnRoPEProcessor())

    @property
    def caption_channels(self) -> int:
        return self.transformer.config.caption_channels

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def encode_condition(self, states: torch.Tensor, mask: torch.Tensor | None = None,
                         drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Connector output ``[B, L, C]`` and key mask ``[B, L]`` (True = attend).

        Args:
            states: condition states ``[B, L, D]`` (cut to ``max_condition_length``).
            mask: ``[B, L]`` bool, True where a state is real (None: all real).
            drop: ``[B]`` bool, True where the item gets the null condition instead (CFG). With a null
                table (``null_condition_length``), a shorter condition is first zero-padded (masked) to the
                table's rows, as the release pads every condition to them.
        """
        if states.ndim != 3 or states.shape[-1] != self.config.cond_dim:
            raise ValueError(f"condition states must be [B, L, {self.config.cond_dim}], got {tuple(states.shape)}")
        if states.shape[1] < 1:
            raise ValueError("condition states are empty (L = 0)")
        b, n = states.shape[0], min(states.shape[1], self.config.max_condition_length)
        states = states[:, :n]
        mask = torch.ones(b, n, dtype=torch.bool, device=states.device) if mask is None else mask[:, :n].bool()
        param = self.connector[0].weight
        enc = self.connector(states.to(param.dtype))
        if drop is not None:
            drop = drop.to(device=enc.device, dtype=torch.bool)
            rows = min(self.null_condition.shape[0], self.config.max_condition_length)
            if self.null_condition.ndim == 2 and n < rows:  # a table: its rows count even past short conditions
                enc = torch.nn.functional.pad(enc, (0, 0, 0, rows - n))
                mask = torch.nn.functional.pad(mask, (0, rows - n), value=False)
                n = rows
            null, null_mask = self._null_input(n, enc)
            enc = torch.where(drop[:, None, None], null.expand(b, n, -1), enc)
            mask = torch.where(drop[:, None], null_mask.expand(b, n), mask)
        return enc, mask

    def _null_input(self, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional input ``[1, n, C]`` and its mask ``[1, n]`` (see ``null_condition_length``)."""
        table = self.null_condition.to(like.dtype)
        if table.ndim == 1:  # one token; the rest masked (their values never count)
            table = table[None]
        m = min(n, table.shape[0])
        null = like.new_zeros(1, n, table.shape[-1])
        null[0, :m] = table[:m]
        return null, (torch.arange(n, device=like.device) < m)[None]

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor,
                mask: torch.Tensor | None = None, drop: torch.Tensor | None = None,
                cond_grid: torch.Tensor | tuple[int, int] | None = None) -> torch.Tensor:
        """Velocity ``[B, C, h, w]`` at noisy latents ``x`` ``[B, C, h, w]``.

        Args:
            timestep: ``[B]`` or scalar, ``sigma * num_train_timesteps`` (the scheduler's timesteps); the
                transformer sees it times its config's ``timestep_scale``, as diffusers' ``SanaPipeline``
                feeds it, so training and every sampler share one mapping (``integer_timesteps``: truncated first).
            states, mask, drop: see :meth:`encode_condition`.
            cond_grid: with ``cross_attn_rope``, the ``(h, w)`` grid (or ``[B, 2]``) the condition positions are
                laid on (:func:`kelix.dit.rope.condition_positions`; None: the release's sampling grid). A
                dropped item keeps the positions of its real condition, as the release's guidance batch does.
        """
        enc, enc_mask = self.encode_condition(states, mask, drop)
        if self.config.cross_attn_rope:  # from the mask before dropping: a dropped item keeps its positions
            self._set_positions(x, enc.shape[1], states, mask, cond_grid)
        if timestep.ndim == 0:
            timestep = timestep.expand(x.shape[0])
        if self.config.integer_timesteps:
            timestep = timestep.trunc()
        timestep = timestep * self.transformer.config.timestep_scale
        return self.transformer(x, encoder_hidden_states=enc, timestep=timestep,
                                encoder_attention_mask=enc_mask.to(enc.dtype), return_dict=False)[0]

    def _set_positions(self, x, width: int, states, mask, cond_grid) -> None:
        from kelix.dit.rope import condition_positions, latent_positions, rope_cos_sin

        n = min(states.shape[1], self.config.max_condition_length)
        lengths = (torch.full((states.shape[0],), n, device=states.device) if mask is None
                   else mask[:, :n].bool().sum(1))
        p = self.transformer.config.patch_size
        attn = self.transformer.transformer_blocks[0].attn2
        head_dim = attn.inner_dim // attn.heads
        q = rope_cos_sin(latent_positions(x.shape[-2] // p, x.shape[-1] // p, x.device)[None], head_dim)
        k = rope_cos_sin(condition_positions(lengths, width, self.config.max_condition_length, cond_grid), head_dim)
        for block in self.transformer.transformer_blocks:
            block.attn2.processor.set_positions(q, k)

    def save_pretrained(self, save_directory, *, state_dict: dict | None = None, **kwargs):
        """Write ``config.json`` + ``model.safetensors``; ``state_dict`` replaces the module's own
        (the full weights gathered from an FSDP2-sharded copy)."""
        self._export_state = state_dict
        try:
            return super().save_pretrained(save_directory, **kwargs)
        finally:
            self._export_state = None

    def _save_pretrained(self, save_directory) -> None:
        from safetensors.torch import save_file

        sd = getattr(self, "_export_state", None)
        sd = self.state_dict() if sd is None else sd
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()},
                  os.path.join(save_directory, "model.safetensors"), metadata={"format": "pt"})

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks (one FSDP2 / activation-checkpointing unit each)."""
        return list(self.transformer.transformer_blocks)


def load_dit(path: str, device: str | torch.device | None = None) -> KelixDiT:
    """A saved :class:`KelixDiT` (``config.json`` + ``model.safetensors``) from a local directory, strictly."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} is not a saved KelixDiT directory (no config.json)")
    import json

    from safetensors.torch import load_file

    # not KelixDiT.from_pretrained: huggingface_hub prints "Loading weights from local directory" on stdout
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    try:
        config = DiTConfig(**saved)
    except TypeError as e:
        raise ValueError(f"{path}/config.json is not a KelixDiT config: {e}") from e
    model = KelixDiT(config)
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=True)
    return model.to(device) if device is not None else model
