"""A training callback: every N steps, answer a few synthetic-benchmark items and log ``eval/<benchmark>/<metric>``.

A recipe adds it under ``trainer.callbacks``::

    trainer:
      callbacks:
        - class_path: kelix.eval.callback.EvalCallback
          init_args: {data: data/synthetic/benchmarks, benchmarks: [synthetic-vqa, synthetic-ocr],
                      every_n_steps: 200, limit: 32}

It works with any module that has ``lm`` (a :class:`kelix.llm.model.KelixLM`) and an image tokenizer
(``image_tokenizer`` property, ``image_tokenizer_path``, or the LLM config's ``image_tokenizer``), as
:class:`kelix.llm.module.UnifiedLLMModule` does. Every rank runs the same items (sharded models need
all ranks in each forward); rank 0 logs. The model is put back in training mode afterwards.
"""

from __future__ import annotations

import os
import types

import lightning.pytorch as pl
import torch

from kelix.eval import get_benchmark
from kelix.eval.runner import PipelineModel, _load, score


class EvalCallback(pl.Callback):
    """Synthetic-benchmark scores during training.

    Args:
        data: folder with the benchmarks (``kelix make-synthetic --benchmarks N`` writes
            ``<out>/benchmarks``); written here (``limit`` items each) when missing.
        benchmarks: understanding benchmarks to run (``synthetic-vqa``, ``synthetic-ocr``, or any other
            whose files are under ``data``).
        every_n_steps: run every this many optimizer steps (0: never).
        limit: items per benchmark (the first ones, the same every time).
        batch_size: questions answered together.
        max_new_tokens: answer length cap (default: each benchmark's).
    """

    def __init__(self, data: str = "data/synthetic/benchmarks", benchmarks: list[str] | None = None,
                 every_n_steps: int = 500, limit: int = 32, batch_size: int = 8, max_new_tokens: int | None = None):
        self.data, self.every_n_steps, self.limit = data, every_n_steps, limit
        self.names = list(benchmarks or ["synthetic-vqa", "synthetic-ocr"])
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self._benches = None
        self._tok = None
        self._last = -1
        for n in self.names:
            if get_benchmark(n).kind != "understand":
                raise ValueError(f"EvalCallback runs understanding benchmarks; {n!r} generates images")

    def _items(self):
        if self._benches is None:
            from kelix.eval.synthetic import SYNTHETIC, write_benchmark

            out = []
            for n in self.names:
                if n in SYNTHETIC and not os.path.isdir(os.path.join(self.data, n)):
                    write_benchmark(n, self.data, self.limit)
                bench = get_benchmark(n)
                items = bench.limit(bench.read(self.data), self.limit)
                bench.check_images(items, self.data)
                out.append((bench, items, [(_load(it, self.data), it.prompt) for it in items]))
            self._benches = out
        return self._benches

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._items()  # a broken benchmark file stops the run before training starts

    def _tokenizer(self, pl_module):
        tok = getattr(pl_module, "image_tokenizer", None) if hasattr(type(pl_module), "image_tokenizer") else None
        if tok is None:
            if self._tok is None:
                from kelix.tokenizer.model import KelixTokenizer

                path = getattr(pl_module, "image_tokenizer_path", None) or pl_module.lm.config.image_tokenizer
                if not path:
                    raise ValueError("EvalCallback: the module has no image tokenizer (set image_tokenizer)")
                self._tok = KelixTokenizer.from_pretrained(path).eval().requires_grad_(False)
            tok = self._tok
        return tok.to(next(pl_module.lm.parameters()).device)

    def evaluate(self, pl_module) -> dict[str, float]:
        """``{"eval/<benchmark>/<metric>": value}`` of the module's current weights."""
        lm = pl_module.lm
        was_training = lm.training
        model = PipelineModel(types.SimpleNamespace(lm=lm, tokenizer=self._tokenizer(pl_module)))
        metrics = {}
        try:
            lm.eval()
            with torch.no_grad():
                for bench, items, requests in self._items():
                    preds = {}
                    for b in range(0, len(items), self.batch_size):
                        answers = model.answer(requests[b:b + self.batch_size], self.max_new_tokens or bench.max_new_tokens)
                        preds.update({it.key: a for it, a in zip(items[b:b + self.batch_size], answers)})
                    result = score(bench, items, preds)
                    metrics.update({f"eval/{bench.name}/{k}": float(v) for k, v in result["overall"].items()})
        finally:
            lm.train(was_training)
        return metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step == 0 or step % self.every_n_steps or step == self._last:
            return  # (global_step repeats over accumulated micro-batches: once per optimizer step)
        self._last = step
        metrics = self.evaluate(pl_module)
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=step)
