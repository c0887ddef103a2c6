"""Codebook usage is logged once per window of optimizer steps, counting every micro-batch of it."""

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import Logger

from kelix.data.schema import Image, Part, Sample, Turn
from kelix.hf import TINY_QWEN3
from kelix.tokenizer.data import TokenizerProcessor
from kelix.tokenizer.model import tiny_config
from kelix.tokenizer.module import TokenizerModule


class Capture(Logger):
    def __init__(self):
        super().__init__()
        self.records = []

    @property
    def name(self):
        return "capture"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))


def _batches(n: int) -> list[dict]:
    from PIL import Image as PILImage

    proc = TokenizerProcessor("builtin:bytes", tiny_config().image)
    rng = np.random.default_rng(0)
    sizes = [(56, 56), (60, 90), (112, 84), (100, 100)]
    out = []
    for b in range(n):
        items = []
        for i in range(1 + b % 2):  # 1 or 2 images of different sizes: token counts differ per batch
            h, w = sizes[(b + i) % len(sizes)]
            im = PILImage.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            items.append(proc(Sample(f"k{b}_{i}", "s.tar", "segments",
                                     [Turn(None, [Part("image", image=Image("0.jpg", im)), Part("text", text="a b")])])))
        out.append(proc.collate(items))
    return out


def test_usage_logged_once_per_window_of_optimizer_steps_under_accumulation(tmp_path):
    torch.manual_seed(0)
    m = TokenizerModule(tiny_config(), aux_lm_config=TINY_QWEN3, usage_window=2, histogram_every=0)
    batches = _batches(8)  # 4 optimizer steps of 2 micro-batches
    cap = Capture()
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, accumulate_grad_batches=2, logger=cap,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, log_every_n_steps=1, default_root_dir=tmp_path)
    trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    logged = [(step, rec["codebook/tokens"]) for step, rec in cap.records if "codebook/tokens" in rec]
    tokens = [int(b["image_mask"].sum()) for b in batches]
    # steps 2 and 4 only, once each, each counting its window's 4 micro-batches
    assert logged == [(2, float(sum(tokens[:4]))), (4, float(sum(tokens[4:])))]
