"""``kelix export-tokenizer``: a training checkpoint -> an HF-style tokenizer directory (no aux LM).

The directory holds ``config.json`` (the :class:`~kelix.tokenizer.model.TokenizerConfig`, without
local paths) and ``model.safetensors`` (encoder, merger, quantizer, up-projector);
``KelixTokenizer.from_pretrained(DIR)`` loads it. The quantizer ships its projected codebooks
``LN(C_i W_i + b_i)`` as one table (``codebook_form: table``), all that encoding and embedding need:
33 MB at N=8, K=8192, d=128 instead of the 302 MB centroid table (``--codebook-form simvq`` keeps
the centroids and projections).
"""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("kelix.tokenizer")


def _config_from_recipe(path: str) -> dict:
    from kelix.tokenizer.codebook import _read_config

    return _read_config(path)["tokenizer"]


def load_checkpoint(ckpt: str, config: str | None = None):
    """Build a :class:`KelixTokenizer` with the weights of ``ckpt``.

    Args:
        ckpt: a Lightning ``.ckpt`` file or sharded (FSDP2) checkpoint directory of
            ``TokenizerModule`` (its config travels inside it), or a ``.safetensors`` file /
            HF-style directory of the module's state (e.g. from ``kelix convert-checkpoint``),
            which needs ``config``.
        config: the training recipe (``model.init_args.tokenizer``); overrides the checkpoint's.
    """
    from kelix.tokenizer.model import KelixTokenizer, TokenizerConfig
    from kelix.training.convert import is_sharded_checkpoint, read_checkpoint, run_config
    from kelix.training.weights import read_state_dict

    if not os.path.exists(ckpt):
        raise FileNotFoundError(f"--ckpt {ckpt!r} does not exist")
    cfg = None
    if is_sharded_checkpoint(ckpt) or (os.path.isfile(ckpt) and not ckpt.endswith(".safetensors")):
        sd, meta = read_checkpoint(ckpt)  # weights_only: never unpickled
        cfg = (meta.get("kelix") or {}).get("tokenizer_config")
        if cfg is None:  # the run's saved config.yaml beside checkpoints/
            cfg = (((run_config(ckpt) or {}).get("init_args") or {}).get("tokenizer"))
    else:
        sd = read_state_dict(ckpt)
    if config is not None:
        cfg = _config_from_recipe(config)
    if cfg is None:
        raise ValueError(f"{ckpt}: no tokenizer config inside; pass --config <the training recipe>")
    cfg = dict(cfg, codebook=None)  # the centroids come from the checkpoint
    prefix = "tokenizer."
    tok_sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not tok_sd:
        raise KeyError(f"{ckpt}: no 'tokenizer.*' tensors (is it a TokenizerModule checkpoint?)")
    model = KelixTokenizer(TokenizerConfig(**cfg))
    own = model.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in tok_sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{ckpt}: shape mismatch with the config, e.g. {bad[0]}")
    model.load_state_dict(tok_sd, strict=True)
    return model.eval()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kelix export-tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="TokenizerModule checkpoint (.ckpt, .safetensors or HF-style dir)")
    p.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    p.add_argument("--config", help="the training recipe, if the checkpoint carries no tokenizer config")
    p.add_argument("--codebook-form", choices=["table", "simvq"], default="table",
                   help="table: the projected codebooks only (inference); simvq: centroids + projections")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = load_checkpoint(a.ckpt, a.config)
    if a.codebook_form == "table":
        model = model.for_inference()
    model.save_pretrained(a.out)
    n = sum(t.numel() for t in model.state_dict().values())
    print(f"wrote {a.out}: {n / 1e6:.2f}M values, N={model.config.N} K={model.config.K} d={model.config.d} "
          f"out_dim={model.config.out_dim}")
    return 0
