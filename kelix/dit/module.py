"""``DiTModule``: trains the Kelix-DiT de-tokenizer with flow matching (paper 3.3, 4.4).

Per batch: target latents (pre-computed, or the frozen VAE encodes the target pixels on the device),
the condition (a frozen provider: pre-computed states, the frozen LLM teacher-forced on the target's
codes, or the smoke-test prompt bytes), one noise level per item from the shifted logit-normal,
``x_t = (1 - sigma) x0 + sigma * noise``, MSE to ``noise - x0``. Conditions are dropped to the learned
null condition with probability ``cond_dropout`` (classifier-free guidance). An EMA of the weights is
kept (sharded like the weights under FSDP2, saved in checkpoints) and used for the sample images.

Logged: ``loss``, the loss per sigma bucket, latent std (checks the VAE scaling), condition length;
validation evaluates every item at each bucket's centre sigma with fixed noise (comparable across runs),
with the EMA weights by default (``val_weights``);
every ``sample_every_n_steps`` a grid (VAE reconstruction of the targets over EMA samples) goes to
TensorBoard.
"""

import copy
import logging
import os
from dataclasses import asdict
from typing import Literal

import torch
from torch import nn

from kelix.dit.conditions import ConditionProvider, PrecomputedConditions
from kelix.dit.data import vae_pixels
from kelix.dit.ema import decay_at, ema_update_, reshard
from kelix.dit.flow import (
    FlowConfig,
    add_noise,
    bucket_centers,
    bucket_names,
    bucket_of,
    sample_sigmas,
    velocity_target,
)
from kelix.dit.model import DiTConfig, KelixDiT
from kelix.dit.sampler import image_grid, sample_latents
from kelix.dit.vae import VAEConfig, load_vae
from kelix.lora.adapters import LoRAConfig
from kelix.training.module import KelixModule
from kelix.training.weights import read_state_dict

log = logging.getLogger("kelix.dit")


class _Frozen:
    """Holds the frozen VAE and condition provider outside the module tree: never optimized, never saved
    in checkpoints (they are rebuilt from the recipe), never sharded."""

    def __init__(self, vae, condition):
        self.vae, self.condition, self.device = vae, condition, torch.device("cpu")

    def to(self, device: torch.device):
        if device != self.device:
            self.vae.to(device)
            self.condition.to(device)
            self.device = device
        return self


def dit_weights(path: str) -> dict[str, torch.Tensor]:
    """DiT weights from an exported directory / ``.safetensors`` / DiTModule ``.ckpt`` (its EMA when present)."""
    sd = read_state_dict(path)
    for prefix in ("ema.", "dit."):
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


class DiTModule(KelixModule):
    """Flow-matching training of the DiT de-tokenizer on frozen VAE latents and frozen conditions.

    Args:
        dit: the network (connector + SANA transformer). Unset with ``init_from`` an exported DiT (or a
            pipeline directory): that directory's ``config.json`` (e.g. a converted release's options).
        vae: the frozen VAE: target pixels -> latents on the device; decodes the sample images.
        condition: the frozen condition provider, by ``class_path``: ``kelix.dit.conditions.PrecomputedConditions``
            (``cond.npy`` in shards), ``LLMConditions`` (the frozen Kelix LLM on the target's codes),
            ``PromptBytesConditions`` (smoke test only). Default: pre-computed.
        flow: training timestep distribution (shift 3, logit-normal).
        init_from: starting weights: an exported DiT directory, a pipeline directory (its ``dit/``: e.g.
            ``kelix convert official``'s output), a ``.safetensors``, or a DiTModule ``.ckpt``
            (its EMA weights when present). Applied to both the weights and the EMA.
        cond_dropout: probability of replacing an item's condition by the learned null condition (CFG).
        ema_decay: EMA decay per optimizer step; None: no EMA (the official runs keep none): no second copy of
            the weights, and validation, samples and the export use the live weights.
        ema_warmup: decay ``min(ema_decay, (1 + n) / (10 + n))`` at step ``n``, so the EMA follows early training.
        sample_every_n_steps: log a grid of EMA samples every this many optimizer steps (0: never); also at the end.
        num_samples: images in the grid (the first items of the first training batch, then fixed).
        sample_steps: Euler steps of those samples.
        sample_cfg: classifier-free guidance scale of those samples.
        val_weights: which weights the validation (and test) loss is computed with: ``ema`` (default, the
            weights the samples and the export use) or ``live`` (the weights being trained).
        export_dir: when fit ends, write the de-tokenizer here (EMA weights, ``vae/``, ``flow.json``;
            what ``kelix export-dit`` writes from a checkpoint); with an EMA, the live weights go to
            ``<export_dir>_live`` beside it, so both can be evaluated.
        lora: LoRA adapters (peft) on the SANA transformer's layers named in ``lora.target_modules`` instead
            of training every weight (the connector trains with ``lora.train_connector``). Checkpoints then hold
            the adapters, the trainable rest and their EMA, not the frozen base (``init_from``); the export (here
            or ``kelix export-dit --merge-lora``) folds the adapters into the weights.
        **kwargs: :class:`~kelix.training.module.KelixModule` options (``optim``, ``nonfinite``...).
    """

    def __init__(self, dit: DiTConfig | None = None, vae: VAEConfig | None = None,
                 condition: ConditionProvider | None = None, flow: FlowConfig | None = None,
                 init_from: str | None = None, cond_dropout: float = 0.1, ema_decay: float | None = 0.9999,
                 ema_warmup: bool = True, sample_every_n_steps: int = 1000, num_samples: int = 4,
                 sample_steps: int = 20, sample_cfg: float = 4.5, val_weights: Literal["ema", "live"] = "ema",
                 export_dir: str | None = None, lora: LoRAConfig | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        if ema_decay is not None:
            decay_at(0, ema_decay)  # validates the decay
        if val_weights not in ("ema", "live"):
            raise ValueError(f"val_weights {val_weights!r} is not 'ema' or 'live'")
        self.flow = flow or FlowConfig()
        self.vae_config = vae or VAEConfig()
        if init_from is not None:
            from kelix.training.weights import pipeline_part

            init_from = pipeline_part(init_from, "dit")  # a pipeline directory: its DiT
            if dit is None and os.path.isfile(os.path.join(init_from, "config.json")):
                import json

                with open(os.path.join(init_from, "config.json")) as f:  # the architecture comes with the weights
                    dit = DiTConfig(**json.load(f))
        self.dit = KelixDiT(copy.deepcopy(dit or DiTConfig()))
        if init_from is not None:
            missing, unexpected = self.dit.load_state_dict(dit_weights(init_from), strict=False)
            if missing or unexpected:
                raise ValueError(f"init_from {init_from}: {len(missing)} DiT tensor(s) missing (e.g. {missing[:2]}), "
                                 f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
            log.info("DiT weights loaded from %s", init_from)
        self.lora, self.init_from = lora, os.path.abspath(init_from) if init_from else None
        if lora is not None:
            from kelix.lora.adapters import apply_lora

            apply_lora(self.dit.transformer, lora)
            self.dit.connector.requires_grad_(lora.train_connector)
            self.dit.null_condition.requires_grad_(lora.train_connector)
            self.strict_loading = False  # checkpoints lack the frozen base: it comes from init_from
        self.ema = copy.deepcopy(self.dit).requires_grad_(False) if ema_decay is not None else None
        condition = condition if condition is not None else PrecomputedConditions()
        vae_model = load_vae(self.vae_config)
        if vae_model.latent_channels != self.dit.latent_channels:
            raise ValueError(f"dit.transformer.in_channels={self.dit.latent_channels} but the VAE has "
                             f"{vae_model.latent_channels} latent channels")
        if condition.dim is not None and condition.dim != self.dit.config.cond_dim:
            raise ValueError(f"dit.cond_dim={self.dit.config.cond_dim} but the condition provider "
                             f"{type(condition).__name__} gives width {condition.dim}")
        self.frozen = _Frozen(vae_model, condition.requires_grad_(False).eval())
        self.cond_dropout, self.ema_decay, self.ema_warmup = cond_dropout, ema_decay, ema_warmup
        self.sample_every_n_steps, self.num_samples = sample_every_n_steps, num_samples
        self.sample_steps, self.sample_cfg, self.export_dir = sample_steps, sample_cfg, export_dir
        self.val_weights = val_weights
        self._gen: torch.Generator | None = None
        self._ema_step = 0
        self._sample_ref: tuple | None = None
        self._sampled_at = -1

    # -- parallelism: both copies sharded block by block, identically (the EMA update is shard-local)
    def parallel_blocks(self) -> list[nn.Module]:
        return self.dit.blocks() + (self.ema.blocks() if self.ema is not None else [])

    @property
    def averaged(self) -> KelixDiT:
        """The weights samples and the export use: the EMA, or the live weights without one."""
        return self.ema if self.ema is not None else self.dit

    # -- randomness: its own stream per rank (seed_everything gives every rank the same global seed)
    def _rng(self) -> torch.Generator:
        if self._gen is None:
            rank = self.trainer.global_rank if self._trainer is not None else 0
            self._gen = torch.Generator().manual_seed(torch.initial_seed() + 1_000_003 * rank)
        return self._gen

    def condition_of(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        cond = self.frozen.to(self.device).condition
        states, mask = cond(batch)
        if states.shape[-1] != self.dit.config.cond_dim:
            raise ValueError(f"condition width {states.shape[-1]} != dit.cond_dim {self.dit.config.cond_dim}")
        return states.to(self.device), mask.to(self.device)

    def latents_of(self, batch: dict) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"].float()
        if "pixels" not in batch:
            raise KeyError("the batch has neither 'latents' nor 'pixels' (DiTProcessor.target)")
        # the processor's uint8 pixels are normalised here, on the device
        return self.frozen.to(self.device).vae.encode(vae_pixels(batch["pixels"].to(self.device)))

    def step(self, batch, split: str) -> dict[str, torch.Tensor]:
        x0 = self.latents_of(batch)
        states, mask = self.condition_of(batch)
        b, cfg = x0.shape[0], self.flow
        drop = None
        if split == "train":
            g = self._rng()
            sigma = sample_sigmas(b, cfg, generator=g).to(self.device)
            noise = torch.randn(x0.shape, generator=g).to(self.device)
            if self.cond_dropout > 0:
                drop = (torch.rand(b, generator=g) < self.cond_dropout).to(self.device)
            if self._sample_ref is None and self.num_samples > 0:
                n = min(self.num_samples, b)
                self._sample_ref = (states[:n].detach().clone(), mask[:n].clone(), x0[:n].detach().clone())
        else:  # every item at every bucket centre, fixed noise: a low-variance, comparable validation loss
            k = cfg.buckets
            sigma = bucket_centers(k).repeat_interleave(b).to(self.device)
            g = torch.Generator().manual_seed(0)
            noise = torch.randn((k * b, *x0.shape[1:]), generator=g).to(self.device)
            x0, states, mask = x0.repeat(k, 1, 1, 1), states.repeat(k, 1, 1), mask.repeat(k, 1)
        x_t = add_noise(x0, noise, sigma)
        net = self.averaged if split != "train" and self.val_weights == "ema" else self.dit
        v = net(x_t, sigma * cfg.num_train_timesteps, states, mask, drop)
        per_item = (v.float() - velocity_target(x0, noise)).pow(2).mean(dim=tuple(range(1, x0.ndim)))
        out = {"loss": per_item.mean()}
        bucket = bucket_of(sigma, cfg.buckets)
        for i, name in enumerate(bucket_names(cfg.buckets)):
            sel = bucket == i
            if sel.any():
                out[name] = per_item[sel].mean().detach()
        out["latent_std"] = x0.detach().float().std()
        out["cond_len"] = mask.sum(1).float().mean()
        if drop is not None:
            out["cond_dropped"] = drop.float().mean()
        return out

    # -- EMA: updated where the optimizer steps, so every checkpoint of step n (periodic, SIGTERM) already
    # holds the EMA of step n; Lightning calls this hook once per optimizer step (not per accumulated batch)
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        step = self.global_step + 1  # the trainer counts this step only after the hook returns
        if self.ema is not None:
            ema_update_(self.ema, self.dit, decay_at(step - 1, self.ema_decay, self.ema_warmup))
        self._ema_step = step

    # -- sample images, after each optimizer step
    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.global_step
        if (self.sample_every_n_steps > 0 and step > 0 and step % self.sample_every_n_steps == 0
                and step != self._sampled_at):  # step 0: inside the first accumulation window
            self.log_samples()

    def on_train_end(self):
        if self.sample_every_n_steps > 0 and self.global_step != self._sampled_at:
            self.log_samples()
        if self.export_dir:
            self.export(self.export_dir)
            if self.ema is not None:
                self.export(self.export_dir.rstrip("/\\") + "_live", weights="live")

    @torch.no_grad()
    def log_samples(self) -> torch.Tensor | None:
        """Sample the fixed conditions with the EMA weights; log [VAE reconstructions; samples] to TensorBoard.

        Every rank samples (FSDP2 gathers parameters collectively); rank 0 logs. Returns the grid.
        """
        if self._sample_ref is None:
            return None
        self._sampled_at = self.global_step
        states, mask, x0 = self._sample_ref
        net = self.averaged
        was_training = net.training
        net.eval()
        ctx = self.trainer.precision_plugin.forward_context() if self._trainer is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            lat = sample_latents(net, states, mask, latent_size=tuple(x0.shape[-2:]), steps=self.sample_steps,
                                 cfg_scale=self.sample_cfg, shift=self.flow.shift, seed=0,
                                 num_train_timesteps=self.flow.num_train_timesteps)
        reshard(net)
        net.train(was_training)
        vae = self.frozen.to(self.device).vae
        grid = image_grid([vae.decode(x0), vae.decode(lat)])
        logger = self.logger if self._trainer is not None else None
        if logger is not None and self.trainer.is_global_zero and hasattr(logger.experiment, "add_image"):
            logger.experiment.add_image(f"samples/ema_cfg{self.sample_cfg:g}_steps{self.sample_steps}", grid,
                                        self.global_step)
        return grid

    # -- checkpoints: weights + EMA in the state dict; the configs beside them, for export-dit
    def state_dict(self, *args, **kwargs):
        """Under LoRA without the frozen base (in ``dit.`` and its copy in ``ema.``): the adapters, the trainable
        rest and their EMA, which is what a resume loads."""
        sd = super().state_dict(*args, **kwargs)
        if self.lora is None:
            return sd
        prefix = kwargs.get("prefix", "")
        base = {n for n, p in self.dit.named_parameters() if not p.requires_grad}
        drop = {f"{prefix}{net}.{n}" for n in base for net in ("dit", "ema")}
        for k in [k for k in sd if k in drop]:
            del sd[k]
        return sd

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["kelix_dit"] = {"dit": asdict(self.dit.config), "vae": asdict(self.vae_config),
                                   "flow": asdict(self.flow), "ema_step": self._ema_step}
        if self.lora is not None:  # what `kelix export-dit --merge-lora` rebuilds the DiT from
            checkpoint["kelix_dit"]["lora"] = {"config": asdict(self.lora), "base": self.init_from}

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        self._ema_step = checkpoint.get("kelix_dit", {}).get("ema_step", 0)

    def export(self, out_dir: str, weights: str = "ema") -> str:
        """Write the de-tokenizer (``ema`` or ``live`` weights) to ``out_dir``: ``config.json`` +
        ``model.safetensors``, ``vae/``, ``flow.json``. Under FSDP2 every rank must call it (the
        weights are gathered); rank 0 writes."""
        from kelix.dit.export import write_export

        net = self.averaged if weights == "ema" else self.dit
        sd = None
        if self.device_mesh is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.lora is not None:  # the adapters folded into the weights: a plain DiT directory
            from kelix.lora.adapters import merge_lora_state_dict

            sd = merge_lora_state_dict(net.state_dict() if sd is None else sd, self.lora.scale)
        if self._trainer is None or self.global_rank == 0:
            write_export(net, self.frozen.vae, asdict(self.flow), out_dir, state_dict=sd)
            log.info("exported the DiT (%s weights) to %s", weights, out_dir)
        return out_dir
