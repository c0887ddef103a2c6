"""``UnifiedLLMModule``: next-block prediction training for every LLM stage (paper 4.3).

One module, the stage is the recipe: stage 1 builds the model from a backbone with
``lm.visual_input: projector`` and ``freeze_backbone: true``; stage 2.1 on start from the previous
stage's export (``init_from``; ``unify: true`` folds a stage-1 model's up-projectors into the table
first) with everything trainable; 2.2 on add ``completion_only`` in the processor.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from typing import Literal

import torch

from kelix.data.images import normalize
from kelix.llm.loss import nbp_loss
from kelix.llm.model import KelixLM, LLMConfig, fill_legacy
from kelix.lora.adapters import LoRAConfig
from kelix.training.module import KelixModule

log = logging.getLogger("kelix.llm")


def is_llm_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) and \
        os.path.isdir(os.path.join(path, "backbone"))


class UnifiedLLMModule(KelixModule):
    """Train the unified LLM with next-block prediction.

    Args:
        lm: the model to build (stage 1, ablations). With ``init_from`` a Kelix LLM directory, only
            its ``dtype`` and ``attn_implementation`` are used.
        init_from: earlier weights: a Kelix LLM directory (``export_dir`` of the previous stage,
            ``kelix export-llm`` or ``kelix unify-embeddings`` output), or a ``UnifiedLLMModule``
            checkpoint (``.ckpt``, sharded directory, ``kelix convert-checkpoint`` output); both carry
            their config. A pipeline directory (``kelix convert official``'s output) means its ``llm/``. Weights without one are loaded into the model ``lm`` builds.
        unify: if the model reads visual inputs through the stage-1 projector, switch it to the
            embedding table now (paper 4.3.3; same as ``kelix unify-embeddings``).
        visual_table: how ``unify`` fills the visual rows: ``fold`` the projectors (paper) or keep
            ``random`` rows (Table 7 exp2: no alignment).
        image_tokenizer: exported Kelix-Tok directory that encodes the batch's pixel images on the
            device (default: ``lm.image_tokenizer``); not needed when shards hold codes.
        freeze_backbone: freeze the backbone's embeddings, layers and final norm (stage 1).
        freeze_lm_head: freeze the LM head (and its slot-0 ``visual_bias``) too.
        lora: fine-tune with LoRA adapters (peft) on the backbone instead of all weights; what else trains
            (block decoder, the head's visual rows, the embedding table) is set there. Checkpoints then hold
            the adapters and the trainable rest, not the frozen base (``init_from``, recorded in them);
            ``kelix export-llm --merge-lora`` and ``export_dir`` write the merged model.
        block_loss: ``sum`` (Eq. 6) or ``equal_block`` (every block the same total; official code).
        export_dir: write the trained model here (a Kelix LLM directory) when fit ends.
        export_dtype: dtype of exported floating tensors (e.g. ``bfloat16``; default: as trained).
        sample_every_n_steps: every this many training steps (and on the first validation batch),
            log the teacher-forced predictions of one document as text to TensorBoard (0: never).
        **kwargs: :class:`~kelix.training.module.KelixModule` options (``optim``, ``nonfinite``,
            ``activation_checkpointing`` of each backbone layer, ``fsdp_param_dtype``...).
    """

    def __init__(
        self,
        lm: LLMConfig | None = None,
        init_from: str | None = None,
        unify: bool = False,
        visual_table: Literal["fold", "random"] = "fold",
        image_tokenizer: str | None = None,
        freeze_backbone: bool = False,
        freeze_lm_head: bool = False,
        lora: LoRAConfig | None = None,
        block_loss: Literal["sum", "equal_block"] = "sum",
        export_dir: str | None = None,
        export_dtype: str | None = None,
        sample_every_n_steps: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if block_loss not in ("sum", "equal_block"):
            raise ValueError(f"block_loss {block_loss!r} is not sum or equal_block")
        if visual_table not in ("fold", "random"):
            raise ValueError(f"visual_table {visual_table!r} is not fold or random")
        if init_from is not None and not os.path.exists(init_from):
            raise FileNotFoundError(f"init_from {init_from!r} does not exist")
        if init_from is not None:  # a pipeline directory (e.g. a converted release): its LLM
            from kelix.training.weights import pipeline_part

            init_from = pipeline_part(init_from, "llm")
        tok_path = image_tokenizer or (lm.image_tokenizer if lm is not None else None)
        if tok_path is not None and not os.path.isdir(tok_path):
            raise FileNotFoundError(f"image_tokenizer {tok_path!r} is not a directory (run kelix export-tokenizer)")
        if init_from is not None and is_llm_dir(init_from):
            self.lm = KelixLM.from_pretrained(init_from, dtype=lm.dtype if lm else None,
                                              attn_implementation=lm.attn_implementation if lm else None).train()
        elif init_from is not None:
            from kelix.llm.export import lm_from_weights, read_llm_checkpoint

            sd, meta = read_llm_checkpoint(init_from)
            if meta is not None:  # the checkpoint knows its architecture
                self.lm = lm_from_weights(sd, meta, where=init_from)
            elif lm is None:
                raise ValueError(f"init_from {init_from!r} holds no Kelix LLM config: set model.init_args.lm too")
            else:
                self.lm = KelixLM(lm)
                missing, unexpected = self.lm.load_state_dict(fill_legacy(sd), strict=False)
                if missing or unexpected:
                    raise KeyError(f"init_from {init_from}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        elif lm is None:
            raise ValueError("set model.init_args.lm (the architecture) or init_from (a Kelix LLM directory)")
        else:
            self.lm = KelixLM(lm)
        if unify and self.lm.continuous:
            log.info("unify: a continuous-feature model has no codes to fold; it keeps its projector")
        elif unify and self.lm.visual is not None:
            from kelix.llm.unify import unify_embeddings

            unify_embeddings(self.lm, visual_table)
        self.block_loss, self.export_dir, self.export_dtype = block_loss, export_dir, export_dtype
        self.sample_every_n_steps = sample_every_n_steps
        self.image_tokenizer_path = tok_path
        self.__dict__["_image_tok"] = None  # frozen and loaded from its own directory: kept out of checkpoints
        if freeze_backbone:
            self.lm.body.requires_grad_(False)
        if freeze_lm_head:
            self.lm.lm_head.requires_grad_(False)
            self.lm.visual_bias.requires_grad_(False)  # the head's slot-0 visual offset
        self.lora, self.init_from = lora, os.path.abspath(init_from) if init_from else None
        if lora is not None:
            from kelix.lora.llm import apply_llm_lora

            apply_llm_lora(self.lm, lora)
            self.strict_loading = False  # checkpoints lack the frozen base: it comes from init_from
        n_train = sum(p.numel() for p in self.lm.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.lm.parameters())
        log.info("unified LLM: %.1fM of %.1fM parameters trainable", n_train / 1e6, n_all / 1e6)

    # -- parallelism
    def parallel_blocks(self):
        return self.lm.blocks()

    def parallel_roots(self):
        return [self.lm]

    # -- data checks, before the first step
    def setup(self, stage: str):
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        proc = getattr(dm, "processor", None)
        from kelix.llm.data import LLMProcessor

        if isinstance(proc, LLMProcessor):
            self.check_processor(proc)

    def check_processor(self, proc) -> None:
        """Fail early (one line) when the processor's vocabulary or layout differs from the model's."""
        v = self.lm.vocab
        if (proc.N, proc.K) != (v.N, v.K):
            raise ValueError(f"data.processor has N={proc.N}, K={proc.K} but the model N={v.N}, K={v.K}")
        theirs, ours = proc.layout.ids, {k: getattr(v, k) for k in proc.layout.ids}
        if theirs != ours:
            raise ValueError(f"data.processor.text_tokenizer gives special ids {theirs}, the model {ours}: "
                             f"use the model's tokenizer (lm.text_tokenizer or the init_from directory)")
        if proc.row_marker != self.lm.config.row_marker:
            raise ValueError(f"data.processor.row_marker {proc.row_marker!r} != lm.row_marker {self.lm.config.row_marker!r}")
        if self.image_tokenizer_path:
            factor = self.image_tokenizer.image_config.factor
            if proc.image.factor != factor or proc.gen_image.factor != factor:
                raise ValueError(f"data.processor image patch*merge ({proc.image.factor}, {proc.gen_image.factor}) "
                                 f"!= the image tokenizer's {factor}")

    # -- images given as pixels: encoded here, batched, by the frozen tokenizer
    @property
    def image_tokenizer(self):
        if self.__dict__["_image_tok"] is None:
            if not self.image_tokenizer_path:
                raise ValueError("the batch holds pixel images but no image_tokenizer is set "
                                 "(set model.init_args.image_tokenizer, or pre-tokenize the shards with kelix tokenize)")
            from kelix.tokenizer.model import KelixTokenizer

            tok = KelixTokenizer.from_pretrained(self.image_tokenizer_path).eval().requires_grad_(False)
            if tok.has_codes == self.lm.continuous:
                raise ValueError(f"image tokenizer {self.image_tokenizer_path} is {'discrete' if tok.has_codes else 'continuous'}"
                                 f" but the model's visual_input is {self.lm.config.visual_input}")
            if (tok.config.N, tok.config.K) != (self.lm.vocab.N, self.lm.vocab.K):
                raise ValueError(f"image tokenizer {self.image_tokenizer_path} has N={tok.config.N}, K={tok.config.K}; "
                                 f"the model N={self.lm.vocab.N}, K={self.lm.vocab.K}")
            self.__dict__["_image_tok"] = tok
        return self.__dict__["_image_tok"]

    @torch.no_grad()
    def encode_images(self, batch: dict) -> torch.Tensor:
        """The batch's codes with every pixel image's codes filled in."""
        return self.visual_inputs(batch)[0]

    @torch.no_grad()
    def visual_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(codes, visual_embeds)``: the batch's codes with every pixel image's codes filled in, or for a
        continuous model the placeholder codes and the tokenizer's features of every visual block, in
        row-major order of the batch's blocks (what :meth:`KelixLM.embed_blocks` reads)."""
        pixels, plan = batch.get("image_pixels") or [], batch.get("plan")
        if not pixels:
            any_visual = plan["n_visual_blocks"] > 0 if plan is not None else bool((batch["tokens"] < 0).any())
            if self.lm.continuous and any_visual:
                raise ValueError("a continuous model reads pixel images: the batch's images are pre-tokenized codes")
            return batch["codes"], None
        tok = self.image_tokenizer.to(self.device)
        # the processor's uint8 pixels are normalised here, on the device, by the tokenizer's own mean/std
        # (float ones are taken as normalised already: KelixTokenizer.preprocess output)
        pixels = [normalize(p.to(self.device), tok.image_config) if p.dtype == torch.uint8
                  else p.to(self.device, torch.float32) for p in pixels]
        # in the tokenizer's own precision, not the run's autocast: the same codes as `kelix tokenize`
        with torch.autocast(self.device.type, enabled=False):
            if self.lm.continuous:
                out = tok(pixels)
                q, grids = None, out.grids
            else:
                q, grids = tok.quantize(pixels)
        # the plan's host copy: the device tensor's .tolist() would sync every step
        want = plan["image_grids"] if plan is not None else [tuple(g) for g in batch["image_grids"].tolist()]
        if [tuple(g) for g in grids] != want:
            raise ValueError(f"image tokenizer grids {grids[:3]} differ from the processor's {want[:3]}: "
                             f"data.processor.image must match the tokenizer's image config")
        where = torch.cat(list(batch["image_index"])).to(self.device)
        if q is None:  # features in the image order of image_index -> row-major order of the blocks
            feats = out.embeds.float()[where.argsort()]
            if self.training and not self._standardized_seen:  # read the buffer once, not every step (a sync)
                if not bool(self.lm.visual.standardized):
                    self._standardize(feats)
                self._standardized_seen = True
            return batch["codes"], feats
        codes = batch["codes"].clone()
        N = codes.shape[-1]
        codes.view(-1, N)[where.to(codes.device)] = q.codes.long()
        return codes, None

    def _standardize(self, feats: torch.Tensor) -> None:
        """The continuous projector's data-dependent start (lm.visual_init: standardized), on the first
        training batch; rank 0's is broadcast so every rank starts alike."""
        if self.lm.config.visual_init == "standardized":
            self.lm.visual.standardize(feats, self.lm.text_row_norm())
            if self._trainer is not None and self.trainer.world_size > 1:
                for t in (self.lm.visual.up_projector.weight, self.lm.visual.up_projector.bias):
                    t.data.copy_(self.trainer.strategy.broadcast(t.data, src=0))
        self.lm.visual.standardized.fill_(True)

    # -- training
    def step(self, batch, split):
        codes, feats = self.visual_inputs(batch)
        pred = self.lm(batch["tokens"], codes, batch["position_ids"], batch["targets"], visual_embeds=feats,
                       plan=batch.get("plan"))
        out = nbp_loss(pred, self.lm.vocab.N, self.block_loss)
        n = self.sample_every_n_steps
        if n and ((split == "train" and self.global_step % n == 0) or (split == "val" and not self._val_sampled)):
            self._val_sampled = split == "val"
            self._log_sample(batch, pred, split)
        return out

    _val_sampled = False
    _standardized_seen = False  # the continuous projector's standardized flag was read (it is set once, never unset)

    def on_validation_epoch_start(self):
        self._val_sampled = False

    def _describe(self, ids: list[int]) -> str:
        vo, tok = self.lm.vocab.visual_offset, self.lm.text_tokenizer
        out, run = [], []
        for i in ids:
            if i >= vo:
                if run:
                    out.append(tok.decode(run))
                    run = []
                out.append("▣")
            else:
                run.append(i)
        if run:
            out.append(tok.decode(run))
        return "".join(out)

    @torch.no_grad()
    def _log_sample(self, batch, pred, split):
        from lightning.pytorch.loggers import TensorBoardLogger

        if not isinstance(self.logger, TensorBoardLogger) or self.global_rank != 0:
            return
        starts = (batch["position_ids"][0, 1:] == 0).nonzero()
        end = int(starts[0]) + 1 if len(starts) else batch["position_ids"].shape[1]  # the first document of row 0
        row = (pred.where[0] == 0) & (pred.where[1] + 1 < end)
        truth = pred.labels0[row].tolist()
        guess = pred.argmax0[row].tolist()
        text = (f"**target** (▣ = visual block): {self._describe(truth)}\n\n"
                f"**predicted** (teacher forced, slot 0 argmax): {self._describe(guess)}")
        self.logger.experiment.add_text(f"{split}/sample", text, self.global_step)

    # -- LoRA: checkpoints of what trains, the head's text rows kept
    def _frozen_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if not p.requires_grad}

    def state_dict(self, *args, **kwargs):
        """Under LoRA only the trainable parameters (and buffers): what a checkpoint holds and a resume
        loads (FSDP2's sharded checkpoints read the keys from here too); the frozen base is ``init_from``."""
        sd = super().state_dict(*args, **kwargs)
        if self.lora is None:
            return sd
        prefix, frozen = kwargs.get("prefix", ""), self._frozen_names()
        for k in [k for k in sd if k[len(prefix):] in frozen]:
            del sd[k]
        return sd

    def no_weight_decay(self) -> list[str]:
        if self.lora is None or not self.lora.train_visual_head:
            return []
        return [n for n, p in self.named_parameters() if p is self.lm.lm_head.weight]

    def on_before_optimizer_step(self, optimizer):
        if self.lora is not None and self.lora.train_visual_head:
            from kelix.lora.llm import keep_text_rows_

            keep_text_rows_(self.lm)
        super().on_before_optimizer_step(optimizer)

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        sd = checkpoint.get("state_dict")
        if self.lora is not None and sd is not None:
            missing = sorted(n for n, p in self.named_parameters() if p.requires_grad and n not in sd)
            if missing:
                raise KeyError(f"the checkpoint lacks {len(missing)} trainable tensor(s) of this LoRA run, e.g. "
                               f"{missing[:2]}: was it saved with the same lora options?")

    # -- hand-off to the next stage
    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["kelix_llm"] = {"config": asdict(self.lm.config),
                                   "backbone_config": self.lm.backbone.config.to_dict()}
        if self.lora is not None:  # what `kelix export-llm --merge-lora` rebuilds the model from
            checkpoint["kelix_llm"]["lora"] = {"config": asdict(self.lora), "base": self.init_from}

    def on_train_end(self):
        if not self.export_dir:
            return
        sd = None
        if self.device_mesh is not None:  # FSDP2: gather full tensors (on every rank), write on rank 0
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.lora is not None:  # the adapters folded into the base: a plain Kelix LLM directory
            from kelix.lora.adapters import merge_lora_state_dict

            sd = merge_lora_state_dict(self.lm.state_dict() if sd is None else sd, self.lora.scale)
        if self.global_rank == 0:
            self.lm.save_pretrained(self.export_dir, state_dict=sd, dtype=self.export_dtype)
            log.info("exported the unified LLM to %s", self.export_dir)
