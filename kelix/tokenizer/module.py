"""``TokenizerModule``: trains Kelix-Tok with an auxiliary causal LM (paper 3.1, 4.2.2).

The aux LM reads ``<vision_start>`` + the fused visual embeddings + ``<vision_end>`` + text and is
trained with next-token loss on the text: ``L = L_NTP + L_VQ`` (Eq. 2). Stages (4.2.2):

* ``stage: 1`` (codebook alignment): only the patch merger, quantizer and up-projector train;
  the ViT and the aux LM are frozen;
* ``stage: 2`` (multi-task pretraining) and ``stage: 3`` (annealing): everything trains; stage 3
  differs by its data and its decaying learning-rate schedule (set in the recipe).

Codebook health (usage, perplexity, dead codes per sub-codebook) is logged to TensorBoard over a
window of optimizer steps, summed across ranks.

The aux LM runs in train mode (dropout and activation checkpointing act), and its LM head is applied
only to the positions that have a label: no full-vocabulary logits over image and prompt positions.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kelix.data.images import normalize
from kelix.tokenizer.data import VISION_END, VISION_START, aux_text_tokenizer
from kelix.tokenizer.metrics import CodebookUsage
from kelix.tokenizer.model import KelixTokenizer, TokenizerConfig
from kelix.training.module import KelixModule
from kelix.training.optim import OptimConfig

log = logging.getLogger("kelix.tokenizer")

STAGE_TRAINABLE = {
    1: ["tokenizer.merger.", "tokenizer.quantizer.", "tokenizer.up_projector."],
    2: None,  # everything
    3: None,
}


def _layers(root: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a timm ViT (``blocks``) or a transformers model (``...layers``)."""
    for name, mod in root.named_modules():
        if isinstance(mod, nn.ModuleList) and (name == "blocks" or name.endswith(".blocks") or name.endswith("layers")):
            return list(mod)
    return []


class TokenizerModule(KelixModule):
    """Kelix-Tok training: tokenizer + auxiliary causal LM, ``loss = ntp + vq_weight * vq``.

    Args:
        tokenizer: the Kelix-Tok architecture; its ``encoder.path`` and ``codebook`` are loaded
            at construction unless ``init_from`` is set.
        aux_lm: local directory of the aux causal LM (Qwen3-0.6B in the paper).
        aux_lm_config: used when ``aux_lm`` is None: a config dict with ``model_type`` for a
            randomly initialised LM (tests and quickstart: ``kelix.hf.TINY_QWEN3``'s fields).
        aux_lm_dtype: dtype of the aux LM weights (``float32``, ``bfloat16``); default float32.
        text_tokenizer: the aux LM's tokenizer (``builtin:bytes`` or a local dir); must be the
            processor's.
        vision_start: token before each image (added as a special token if missing).
        vision_end: token after each image.
        stage: 1 trains only merger, quantizer and up-projector; 2 and 3 train everything.
        trainable: parameter-name prefixes to train (overrides ``stage``), e.g.
            ``["tokenizer.quantizer.", "tokenizer.up_projector."]``.
        vq_weight: weight of ``L_VQ`` in the total loss (1 in the paper).
        init_from: weights of a previous stage (a ``.ckpt``, ``.safetensors`` or HF-style directory
            of this module's state: ``tokenizer.*`` and ``aux_lm.*``), loaded instead of the
            pretrained encoder, codebook and aux LM files. The optimizer starts afresh.
        usage_window: optimizer steps over which codebook usage is counted (every micro-batch of
            them, on every rank) before it is logged and reset.
        histogram_every: log per-sub-codebook code histograms (summed over ranks) every this many
            optimizer steps (0: never).
        fit_codebook: at the first training batch, start the SimVQ projections W_i from k-means of
            that batch's features (see ``ProductQuantizer.fit_codebook``): every code starts where
            features are. For single-process runs (quickstart, random encoders); the paper's
            k-means centroids come from ``kelix build-codebook`` (``tokenizer.codebook``).
        export_dir: when training ends, write the tokenizer here without the aux LM (what
            ``kelix export-tokenizer`` writes from a checkpoint).
        optim: optimizer, per-group learning rates (``group_lr`` prefixes such as
            ``tokenizer.encoder.``, ``tokenizer.quantizer.``, ``aux_lm.``) and schedule.
        **kwargs: :class:`~kelix.training.module.KelixModule` options (``nonfinite``,
            ``activation_checkpointing`` of the ViT and aux-LM blocks, ``fsdp_param_dtype``...).
    """

    def __init__(
        self,
        tokenizer: TokenizerConfig,
        aux_lm: str | None = None,
        aux_lm_config: dict | None = None,
        aux_lm_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        text_tokenizer: str = "builtin:bytes",
        vision_start: str = VISION_START,
        vision_end: str = VISION_END,
        stage: Literal[1, 2, 3] | None = None,
        trainable: list[str] | None = None,
        vq_weight: float = 1.0,
        init_from: str | None = None,
        usage_window: int = 50,
        histogram_every: int = 500,
        fit_codebook: bool = False,
        export_dir: str | None = None,
        optim: OptimConfig | None = None,
        **kwargs,
    ):
        super().__init__(optim=optim, **kwargs)
        from kelix.hf import load_causal_lm

        if aux_lm is None and aux_lm_config is None:
            raise ValueError("model.init_args: set aux_lm (a local causal LM directory) or aux_lm_config")
        if stage not in STAGE_TRAINABLE and stage is not None:
            raise ValueError(f"model.init_args.stage must be 1, 2 or 3, got {stage!r}")
        if usage_window < 1:
            raise ValueError(f"model.init_args.usage_window must be >= 1, got {usage_window}")
        self.vq_weight, self.usage_window, self.histogram_every = vq_weight, usage_window, histogram_every
        self.export_dir, self.fit_codebook = export_dir, fit_codebook
        if fit_codebook and tokenizer.quantizer not in ("pq", "shared"):
            raise ValueError(f"fit_codebook needs quantizer pq or shared, not {tokenizer.quantizer!r}")
        self.tokenizer = KelixTokenizer(tokenizer)
        # from_pretrained returns an eval-mode model; Lightning keeps each submodule's mode, so without
        # this the aux LM would train without dropout and without HF activation checkpointing
        self.aux_lm = load_causal_lm(path=aux_lm, config=aux_lm_config, dtype=aux_lm_dtype).train()
        if self.aux_lm.base_model is self.aux_lm or self.aux_lm.get_output_embeddings() is None:
            raise ValueError(f"aux_lm {aux_lm!r}: expected a causal LM with a base model and an LM head")
        for key in ("final_logit_softcapping", "logit_scale"):  # the head is applied here as lm_head alone
            if getattr(self.aux_lm.config, key, None) is not None:
                raise ValueError(f"aux_lm {aux_lm!r}: {key} is set; the aux LM loss supports plain LM heads only")
        hidden = self.aux_lm.get_input_embeddings().embedding_dim
        if hidden != tokenizer.out_dim:
            raise ValueError(f"model.init_args.tokenizer.out_dim is {tokenizer.out_dim}, but the aux LM's hidden size "
                             f"is {hidden}: they must match")
        text = aux_text_tokenizer(text_tokenizer, vision_start, vision_end)
        if len(text) > self.aux_lm.get_input_embeddings().num_embeddings:
            self.aux_lm.resize_token_embeddings(len(text))
        if init_from is not None:
            self._load_previous_stage(init_from)
        else:
            self.tokenizer.load_init_weights()
        self.trainable = trainable
        if trainable is None and STAGE_TRAINABLE.get(stage) is not None:  # e.g. quantizer: none has no quantizer
            names = [n for n, _ in self.named_parameters()]
            self.trainable = [t for t in STAGE_TRAINABLE[stage] if any(n.startswith(t) for n in names)]
        self._freeze()
        N, K = tokenizer.N, tokenizer.K
        self.usage = CodebookUsage(N, K) if self.tokenizer.has_codes else None
        self.val_usage = CodebookUsage(N, K) if self.tokenizer.has_codes else None
        self._step_at_batch_start = 0

    def _load_previous_stage(self, path: str):
        """Load ``tokenizer.*`` and ``aux_lm.*`` from a previous stage; tied weights may be stored once."""
        from kelix.training.weights import read_state_dict

        sd = read_state_dict(path)
        own = self.state_dict()
        bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
        if bad:
            raise ValueError(f"init_from {path}: shape mismatch, e.g. {bad[0]}")
        missing, unexpected = self.load_state_dict(sd, strict=False)
        loaded = {own[k].data_ptr() for k in sd if k in own}
        missing = [k for k in missing if own[k].data_ptr() not in loaded]  # e.g. a tied lm_head
        if missing:
            raise KeyError(f"init_from {path}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
        if unexpected:
            log.warning("init_from %s: %d tensor(s) not used, e.g. %s", path, len(unexpected), unexpected[:3])
        log.info("init_from: loaded %d tensors from %s", len(sd) - len(unexpected), path)

    def _freeze(self):
        if self.trainable is None:
            return
        names = [n for n, _ in self.named_parameters()]
        for prefix in self.trainable:
            if not any(n.startswith(prefix) for n in names):
                raise ValueError(f"model.init_args.trainable: no parameter name starts with {prefix!r}")
        n_train = 0
        for name, p in self.named_parameters():
            p.requires_grad_(any(name.startswith(t) for t in self.trainable))
            n_train += p.numel() if p.requires_grad else 0
        log.info("trainable: %s (%.2fM parameters)", self.trainable, n_train / 1e6)

    # -- parallelism
    def parallel_blocks(self) -> list[nn.Module]:
        return _layers(self.tokenizer.encoder.model) + _layers(self.aux_lm)

    def parallel_roots(self) -> list[nn.Module]:
        # the quantizer first: its own FSDP2 unit, gathered in float32 (its fsdp_param_dtype)
        q = self.tokenizer.quantizer
        return ([q] if any(True for _ in q.parameters()) else []) + super().parallel_roots()

    def no_weight_decay(self) -> set[str]:
        """The SimVQ projections are the codebook (like an embedding table): weight decay would pull
        every code vector towards the shared bias, so they train without it."""
        return {n for n, _ in self.named_parameters() if n.startswith("tokenizer.quantizer.codebook.")}

    # -- the step
    def pixels(self, batch) -> list[torch.Tensor]:
        """The batch's images as the encoder takes them: the processor's ``uint8`` pixels normalised
        here, on the device (a quarter of the bytes through the loader); float ones as they are."""
        cfg = self.tokenizer.image_config
        return [normalize(p.to(self.device), cfg) if p.dtype == torch.uint8 else p for p in batch["pixels"]]

    def step(self, batch, split: str) -> dict[str, torch.Tensor]:
        out = self.tokenizer(self.pixels(batch))
        mask = batch["image_mask"]
        if int(mask.sum()) != out.embeds.shape[0]:
            raise ValueError(f"the batch marks {int(mask.sum())} visual positions but its images give "
                             f"{out.embeds.shape[0]} tokens: processor image config differs from the tokenizer's")
        ntp = self._ntp(batch["input_ids"], mask, out.embeds, batch["attention_mask"], batch["labels"])
        terms = {"loss": ntp + self.vq_weight * out.loss, "ntp": ntp, "vq": out.loss.detach()}
        terms.update({f"vq_{k}": v for k, v in out.terms.items()})
        if out.codes is not None and not self.padding_batch:  # padding repeats a batch
            (self.usage if split == "train" else self.val_usage).update(out.codes.detach())
        return terms

    def _ntp(self, input_ids: torch.Tensor, image_mask: torch.Tensor, visual: torch.Tensor,
             attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token loss of the aux LM on ``input_ids`` with ``visual`` embeddings at ``image_mask``,
        its head applied only where a label is (mean over the labels).

        Both the visual embeddings and the head go in through hooks, inside the aux LM's own
        forward: every use of its (tied) embedding table falls inside that FSDP2 unit's forward,
        so its gradient is complete before FSDP2 reduces it.
        """
        target = labels[:, 1:]
        where = target != -100
        got = {}

        def insert(module, args, output):  # the input embeddings, visual positions replaced
            return output.masked_scatter(image_mask.unsqueeze(-1), visual.to(output.dtype))

        def head(module, args, output):  # the LM head on the labelled positions only
            h = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            got["logits"] = self.aux_lm.get_output_embeddings()(h[:, :-1][where])

        hooks = [self.aux_lm.get_input_embeddings().register_forward_hook(insert),
                 self.aux_lm.base_model.register_forward_hook(head)]
        try:  # no logits from the LM's own head, no KV cache
            self.aux_lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                        logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device))
        finally:
            for h in hooks:
                h.remove()
        return F.cross_entropy(got["logits"].float(), target[where], reduction="sum") / where.sum().clamp(min=1)

    # -- codebook health
    def _log_usage(self, metric: CodebookUsage, prefix: str, histogram: bool):
        """Every rank calls this at the same point: ``compute`` is a collective (counts summed over ranks)."""
        if metric.update_count == 0:  # this rank saw no codes: join the sync with zero counts, no warning
            metric.update(torch.zeros(0, metric.N, dtype=torch.long, device=metric.counts.device))
        stats = metric.compute()
        counts = stats.pop("counts")  # summed over ranks (metric.counts is this rank's again after compute)
        metric.reset()
        tokens = int(counts[0].sum())
        if tokens == 0:  # no rank saw a code: nothing to log
            return stats
        logs = {f"{prefix}/tokens": float(tokens)}
        for name, values in stats.items():
            values = values.reshape(-1)  # torchmetrics squeezes a one-element result (N = 1) to a scalar
            for j, v in enumerate(values.tolist()):
                logs[f"{prefix}/{name}_{j}"] = v
            logs[f"{prefix}/{name}_mean"] = float(values.mean())
            logs[f"{prefix}/{name}_min"] = float(values.min())
        if self.global_rank == 0:  # already summed over ranks; logged once, at this step only
            for logger in self.loggers:
                logger.log_metrics(logs, step=self.global_step)
            if histogram:
                self._histograms(counts, prefix)
        return stats

    def _histograms(self, counts: torch.Tensor, prefix: str):
        from lightning.pytorch.loggers import TensorBoardLogger

        if not isinstance(self.logger, TensorBoardLogger):
            return
        counts = counts.detach().double().cpu()
        K = counts.shape[1]
        idx = torch.arange(K, dtype=torch.float64)
        for j, c in enumerate(counts):
            n = float(c.sum())
            if n == 0:
                continue
            used = idx[c > 0]
            self.logger.experiment.add_histogram_raw(
                f"{prefix}/codes_{j}", min=float(used.min()), max=float(used.max()), num=n,
                sum=float((idx * c).sum()), sum_squares=float((idx * idx * c).sum()),
                bucket_limits=(idx + 0.5).tolist(), bucket_counts=c.tolist(), global_step=self.global_step)

    def on_train_batch_start(self, batch, batch_idx):
        self._step_at_batch_start = self.global_step
        if not self.fit_codebook or self.global_step != 0 or batch_idx != 0:
            return
        if self.trainer.world_size > 1:
            raise RuntimeError("fit_codebook runs in a single process; for distributed runs initialise the "
                               "codebook with kelix build-codebook (tokenizer.codebook)")
        with torch.no_grad():
            feats, _ = self.tokenizer.merger(self.tokenizer.encoder(self.pixels(batch)))
            self.tokenizer.quantizer.fit_codebook(feats)
        log.info("fit_codebook: SimVQ projections started from k-means of %d features", len(feats))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.usage is None:
            return
        step = self.global_step  # advanced past this batch's optimizer step, if it made one
        if step == self._step_at_batch_start:  # inside a gradient-accumulation window
            return
        if step % self.usage_window == 0:
            hist = self.histogram_every > 0 and step % self.histogram_every < self.usage_window
            self._log_usage(self.usage, "codebook", hist)

    def on_validation_epoch_end(self):
        if self.val_usage is not None:  # on every rank, even one that saw no validation codes
            self._log_usage(self.val_usage, "val_codebook", histogram=self.histogram_every > 0)

    # -- checkpoints carry the tokenizer's config, so export needs nothing else
    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["kelix"]["tokenizer_config"] = asdict(self.tokenizer.portable_config())

    # -- export
    def on_train_end(self):
        if self.export_dir:
            self.export(self.export_dir)

    def export(self, out_dir: str) -> str:
        """Write the tokenizer (no aux LM, projected codebooks: ``codebook_form: table``) to ``out_dir``.
        Under FSDP2 every rank must call it (the weights are gathered); rank 0 writes."""
        if self.device_mesh is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.tokenizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.global_rank == 0:
                tok = KelixTokenizer(self.tokenizer.portable_config())
                tok.load_state_dict(sd, strict=True)
                tok.for_inference().save_pretrained(out_dir)
        elif self._trainer is None or self.global_rank == 0:
            self.tokenizer.for_inference().save_pretrained(out_dir)
        log.info("exported the tokenizer to %s", out_dir)
        return out_dir
