"""``kelix export-dit``: a DiTModule checkpoint -> an HF-style de-tokenizer directory.

Output: ``{out}/config.json`` + ``{out}/model.safetensors`` (the :class:`~kelix.dit.model.KelixDiT`, EMA
weights by default) and ``{out}/vae/`` (the frozen diffusers VAE with the latent scaling the DiT was
trained with). :func:`load_detokenizer` reads it back; :func:`kelix.dit.sampler.generate` renders images.

Accepted checkpoints: a Lightning ``.ckpt`` file, or a distributed (FSDP2) checkpoint directory as
Lightning's ``ModelParallelStrategy`` writes it (read without a process group).
"""

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("kelix.dit")


def save_vae(vae, out_dir: str) -> None:
    """Save a :class:`~kelix.dit.vae.FrozenVAE` as a diffusers directory plus ``kelix_latents.json``: the
    latent scaling the DiT was trained with, overrides included (``load_vae`` reads it back)."""
    from kelix.dit.vae import LATENTS_FILE

    vae.vae.register_to_config(scaling_factor=vae.scaling_factor)
    if not vae.is_dc or vae.is_pixel:  # AutoencoderDC has no shift_factor option: kept in LATENTS_FILE only
        vae.vae.register_to_config(shift_factor=vae.shift_factor or None)
    vae.vae.save_pretrained(out_dir)
    with open(os.path.join(out_dir, LATENTS_FILE), "w") as f:
        json.dump({"scaling_factor": vae.scaling_factor, "shift_factor": vae.shift_factor,
                   "latents_mean": vae.latents_mean, "latents_std": vae.latents_std}, f, indent=2)


@dataclass
class DeTokenizer:
    """An exported de-tokenizer: the DiT, its VAE and the flow settings it was trained with."""

    dit: "KelixDiT"  # noqa: F821
    vae: "FrozenVAE"  # noqa: F821
    flow: "FlowConfig"  # noqa: F821

    @torch.no_grad()
    def generate(self, states: torch.Tensor, mask: torch.Tensor | None = None, *, image_size=1024, steps: int = 20,
                 cfg_scale: float = 4.5, seed: int = 0, sigma_schedule: str = "default") -> torch.Tensor:
        """Condition states ``[B, L, D]`` (+ mask) -> images ``[B, 3, H, W]`` in ``[-1, 1]``
        (``sigma_schedule``: see :mod:`kelix.dit.sampler`; the release samples with ``linspace``)."""
        from kelix.dit.sampler import generate

        return generate(self.dit, self.vae, states, mask, image_size=image_size, steps=steps, cfg_scale=cfg_scale,
                        shift=self.flow.shift, seed=seed, num_train_timesteps=self.flow.num_train_timesteps,
                        sigma_schedule=sigma_schedule)

    def to(self, device):
        self.dit.to(device)
        self.vae.to(device)
        return self


def load_detokenizer(path: str, device: str | torch.device | None = None) -> DeTokenizer:
    """A :class:`DeTokenizer` from a directory written by ``kelix export-dit``."""
    from kelix.dit.flow import FlowConfig
    from kelix.dit.model import load_dit
    from kelix.dit.vae import VAEConfig, load_vae

    vae_dir = os.path.join(path, "vae")
    if not os.path.isdir(vae_dir):
        raise FileNotFoundError(f"{path!r} has no vae/ directory (was it written by kelix export-dit?)")
    flow_file = os.path.join(path, "flow.json")
    flow = FlowConfig(**json.loads(Path(flow_file).read_text())) if os.path.isfile(flow_file) else FlowConfig()
    out = DeTokenizer(load_dit(path).eval(), load_vae(VAEConfig(path=vae_dir)), flow)
    return out.to(device) if device is not None else out


def read_checkpoint(path: str, weights: str = "ema") -> tuple[dict, dict[str, torch.Tensor]]:
    """``(kelix_dit metadata, DiT state dict)`` of a DiTModule checkpoint (``.ckpt`` or sharded directory)."""
    from kelix.training.convert import read_checkpoint as read_any

    prefix = {"ema": "ema.", "live": "dit."}[weights]
    sd, meta = read_any(path)
    if "kelix_dit" not in meta:
        raise ValueError(f"{path} is not a DiTModule checkpoint (no 'kelix_dit' entry in its metadata)")
    if weights == "ema" and not any(k.startswith(prefix) for k in sd):
        prefix = "dit."  # trained without an EMA (ema_decay: null): the live weights are the result
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(f"{path}: no '{prefix}*' tensors in the state dict")
    return meta["kelix_dit"], sd


def write_export(net, vae, flow: dict, out: str, state_dict: dict | None = None) -> str:
    """Write a de-tokenizer directory: the DiT (``state_dict`` overrides its own), ``vae/``, ``flow.json``."""
    net.save_pretrained(out, state_dict=state_dict)
    if vae is not None:
        save_vae(vae, os.path.join(out, "vae"))
    with open(os.path.join(out, "flow.json"), "w") as f:  # the sampling shift must match training
        json.dump(flow, f, indent=2)
    return out


def export(ckpt: str, out: str, weights: str = "ema", with_vae: bool = True, merge_lora: bool = False,
           base: str | None = None) -> str:
    """Write ``out`` from ``ckpt`` (see module docstring); returns ``out``. A LoRA run's checkpoint needs
    ``merge_lora``: its base (``base``, default the run's ``init_from``) is loaded, the adapters injected and
    folded into the weights."""
    from kelix.dit.model import DiTConfig, KelixDiT
    from kelix.dit.vae import VAEConfig, load_vae

    meta, sd = read_checkpoint(ckpt, weights)
    net = KelixDiT(DiTConfig(**meta["dit"]))
    lora = meta.get("lora")
    if bool(lora) != merge_lora:
        raise ValueError(f"{ckpt} holds LoRA adapters, not a whole DiT: add --merge-lora" if lora
                         else f"{ckpt} is not a LoRA checkpoint: drop --merge-lora")
    if lora:
        from kelix.dit.model import load_dit
        from kelix.lora.adapters import LoRAConfig, apply_lora, merge_lora_

        base = base or lora.get("base")
        if not base or not os.path.isfile(os.path.join(base, "config.json")):
            raise FileNotFoundError(f"{ckpt}: its base {base!r} is not an exported DiT directory: pass --base DIR "
                                    "(the run's init_from)")
        net.load_state_dict(load_dit(base).state_dict(), strict=True)
        apply_lora(net.transformer, LoRAConfig(**lora["config"]))
        missing, unexpected = net.load_state_dict(sd, strict=False)
        if unexpected or any(".lora_" in k for k in missing):
            raise KeyError(f"{ckpt} does not match {base} with its LoRA options: unexpected {unexpected[:3]}")
        merge_lora_(net.transformer)
    else:
        net.load_state_dict(sd, strict=True)
    vae = load_vae(VAEConfig(**meta["vae"])) if with_vae else None
    return write_export(net, vae, meta.get("flow", {}), out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kelix export-dit", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="DiTModule checkpoint: a .ckpt file or a distributed checkpoint directory")
    p.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, vae/, flow.json)")
    p.add_argument("--weights", choices=["ema", "live"], default="ema",
                   help="export the EMA weights (default, used for sampling) or the live training weights")
    p.add_argument("--no-vae", action="store_true", help="do not write vae/ (e.g. a large pretrained VAE kept elsewhere)")
    p.add_argument("--merge-lora", action="store_true", help="a LoRA run's checkpoint: fold its adapters into its base")
    p.add_argument("--base", default=None, help="with --merge-lora: the base DiT, if it moved (default: the run's init_from)")
    a = p.parse_args(argv)
    if not os.path.exists(a.ckpt):
        p.error(f"checkpoint {a.ckpt!r} does not exist")
    try:
        export(a.ckpt, a.out, a.weights, not a.no_vae, a.merge_lora, a.base)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"kelix export-dit: {e}", file=sys.stderr)
        return 2
    print(f"DiT ({a.weights} weights) written to {a.out}")
    return 0
