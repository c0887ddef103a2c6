"""The unified LLM's config (:class:`LLMConfig`) and its teacher-forced output (:class:`BlockPrediction`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class LLMConfig:
    """The unified LLM.

    Args:
        backbone: local directory of a transformers causal LM (e.g. ``/models/Qwen3-8B``).
        backbone_config: config dict of a randomly initialised backbone (e.g. ``kelix.hf.TINY_QWEN3``)
            when ``backbone`` is not set.
        text_tokenizer: local tokenizer directory or ``builtin:bytes`` (default: ``backbone``).
        image_tokenizer: exported Kelix-Tok directory: gives N and K, and in ``projector`` mode the
            frozen code vectors and up-projector.
        N: sub-codebooks (default: the image tokenizer's).
        K: entries per sub-codebook (default: the image tokenizer's).
        visual_input: ``projector`` (stage 1: frozen tokenizer embeddings through a trainable linear
            up-projector) or ``table`` (visual rows of the embedding table: stage 2 on after
            ``kelix unify-embeddings``; built fresh it is Table 7 exp2, a random visual table) or
            ``continuous`` (Table 6a's continuous baseline, a tokenizer with ``quantizer: none``: each
            visual position reads the tokenizer's continuous features through a trainable linear
            up-projector, kept in every stage; no visual ids are predicted, so understanding only).
            ``projector`` with a continuous tokenizer becomes ``continuous``.
        predictor: ``block_decoder`` (Eq. 6) or ``parallel`` (Table 7 exp3: N+1 linear heads on h_i,
            one for a text block's token and one per code of a visual block).
        decoder_width: block decoder width (official 512).
        decoder_layers: block decoder layers (official 1).
        decoder_heads: block decoder attention heads (official 4).
        decoder_kind: ``qwen3`` (the kit's default: a transformers Qwen3 block, RMSNorm, RoPE over the
            slots) or ``release`` (the released Kelix's: LayerNorm pre-LN, attention with biases,
            learned slot positions for N+1 slots; :mod:`kelix.llm.decoder_release`). Choose ``release``
            to hold or fine-tune the released weights (``kelix convert official`` sets it).
        eob_token_id: use this existing text id as ``<eob>`` instead of adding a ``<|eob|>`` token (the
            release's ``q_eos_token``, a trained row; a new token's row would start untrained).
        decoder_ffn: block decoder SwiGLU intermediate size (the official release: 2048).
        eob_scoring: ``implied`` (Eq. 6 as the paper writes it: each slot scored over the ids legal in it,
            ``<eob>`` given by the block kind, NLL 0) or ``full`` (the official loss: every slot scored over
            the whole vocabulary, and ``<eob>`` predicted by one more block-decoder position, after a text
            block's token or a visual block's N codes; the decoder then has N+1 positions). Generation is
            the same either way. ``full`` costs a vocabulary-wide head per slot.
        dtype: backbone weight dtype when loading (``float32`` for training with bf16-mixed).
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (default: flash when
            installed on a GPU, else sdpa).
        packed_attention: how the documents of a packed row are kept apart (see
            :mod:`kelix.llm.attention`): ``varlen`` flattens the rows into one sequence and attends
            within each document (PyTorch's flash varlen kernel on CUDA in bf16/fp16; causal SDPA per
            document elsewhere, the same result); ``mask`` is transformers' block-diagonal mask (a dense
            ``[B, 1, L, L]`` one under SDPA, which loses SDPA's fast kernels); ``auto`` is varlen where the
            CUDA kernel runs, else mask. Only SDPA backbones change: flash_attention_2 has its own varlen
            path, flex_attention gets transformers' BlockMask, eager the mask.
        compile_layers: ``torch.compile`` each backbone layer in place (names and checkpoints unchanged);
            for GPU runs: the first steps compile (minutes), and on CPU inductor needs a C++ compiler.
        row_marker: text of each image row's marker (see :class:`~kelix.llm.layout.Layout`).
        loss_chunk: target positions whose vocabulary-wide logits exist at once in the loss, in
            training (the rest are recomputed in backward) and in validation alike; bounds the
            ``[P, visual_offset + K]`` memory.
        visual_init_mass: when the vocabulary is extended, the new LM-head rows start at the mean of
            the text rows and the slot-0 visual logit offset (``visual_bias``) at
            ``log(visual_init_mass * text rows / K)``: a text position then gives all visual ids together
            at most about this probability, so the pretrained LM's text predictions are unchanged.
        visual_init: how stage 1's trainable visual up-projector starts (``projector`` mode, built from
            the image tokenizer): ``standardized`` (the codebook's average block embeds to zero, a block's
            embedding has the text rows' mean norm; see :meth:`~kelix.llm.embed.VisualProjector.standardize`)
            or ``default`` (``nn.Linear``'s init).
        visual_offset: first visual id; set when the vocabulary is extended (do not set by hand).
        vq_dim: tokenizer code-vector width d (``projector`` mode; set from the image tokenizer).
        vq_out_dim: tokenizer up-projector width (``projector`` mode; set from the image tokenizer).
        fusion: tokenizer fusion, ``sum`` or ``mean`` (set from the image tokenizer).
    """

    backbone: str | None = None
    backbone_config: dict | None = None
    text_tokenizer: str | None = None
    image_tokenizer: str | None = None
    N: int | None = None
    K: int | None = None
    visual_input: Literal["projector", "table", "continuous"] = "table"
    predictor: Literal["block_decoder", "parallel"] = "block_decoder"
    decoder_width: int = 512
    decoder_layers: int = 1
    decoder_heads: int = 4
    decoder_ffn: int = 1536
    decoder_kind: Literal["qwen3", "release"] = "qwen3"
    eob_token_id: int | None = None
    eob_scoring: Literal["implied", "full"] = "implied"
    dtype: str | None = None
    attn_implementation: str | None = None
    packed_attention: Literal["auto", "mask", "varlen"] = "auto"
    compile_layers: bool = False
    row_marker: str = "{row},{cols}"
    loss_chunk: int = 2048
    visual_init_mass: float = 1e-4
    visual_init: Literal["standardized", "default"] = "standardized"
    visual_offset: int | None = None
    vq_dim: int | None = None
    vq_out_dim: int | None = None
    fusion: str = "sum"

    def __post_init__(self):
        if self.visual_input not in ("projector", "table", "continuous"):
            raise ValueError(f"lm.visual_input {self.visual_input!r} is not projector, table or continuous")
        if self.decoder_kind not in ("qwen3", "release"):
            raise ValueError(f"lm.decoder_kind {self.decoder_kind!r} is not qwen3 or release")
        if self.predictor not in ("block_decoder", "parallel"):
            raise ValueError(f"lm.predictor {self.predictor!r} is not block_decoder or parallel")
        if self.visual_init not in ("standardized", "default"):
            raise ValueError(f"lm.visual_init {self.visual_init!r} is not standardized or default")
        if not 0 < self.visual_init_mass < 1:
            raise ValueError(f"lm.visual_init_mass {self.visual_init_mass} is not in (0, 1)")
        if self.packed_attention not in ("auto", "mask", "varlen"):
            raise ValueError(f"lm.packed_attention {self.packed_attention!r} is not auto, mask or varlen")
        if self.eob_scoring not in ("implied", "full"):
            raise ValueError(f"lm.eob_scoring {self.eob_scoring!r} is not implied or full")
        if self.eob_scoring == "full" and self.predictor != "block_decoder":
            raise ValueError("lm.eob_scoring full needs predictor: block_decoder (the heads have no <eob> position)")
        if self.loss_chunk < 1:
            raise ValueError(f"lm.loss_chunk {self.loss_chunk} must be at least 1")


@dataclass
class BlockPrediction:
    """Teacher-forced next-block predictions for the target blocks of a batch (P targets, Pv visual).

    Args:
        nll0: ``[P]`` negative log-likelihood of slot 0 (a text id or a code of sub-codebook 0).
        hit0: ``[P]`` the slot-0 argmax is right.
        argmax0: ``[P]`` the slot-0 argmax id.
        labels0: ``[P]`` slot-0 ids.
        is_visual: ``[P]`` the target block is visual.
        nll_codes: ``[Pv, N-1]`` NLL of slots 1..N-1 of visual targets.
        hit_codes: ``[Pv, N-1]`` their argmax is right.
        code_labels: ``[Pv, N-1]`` their codes (0..K-1).
        nll_eob: ``[P]`` NLL of each target block's ``<eob>`` (``eob_scoring: full``; else None). With
            ``full``, ``nll0`` and ``nll_codes`` are over the whole vocabulary too and ``argmax0`` is an id.
        where: ``(row, position)`` of each target's predicting hidden state.
        hidden: ``[B, L, D]`` pre-norm hidden states (``return_hidden``).
        logits0: ``[P, visual_offset + K]`` slot-0 logits (``return_logits``; never kept in training).
        code_logits: ``[Pv, N-1, K]`` logits of slots 1..N-1 (``return_logits``).
        plan: the step plan these targets were selected by (:mod:`kelix.llm.plan`; None: by boolean
            masks), which the loss reads its counts and index lists from.
    """

    nll0: torch.Tensor
    hit0: torch.Tensor
    argmax0: torch.Tensor
    labels0: torch.Tensor
    is_visual: torch.Tensor
    nll_codes: torch.Tensor
    hit_codes: torch.Tensor
    code_labels: torch.Tensor
    where: tuple[torch.Tensor, torch.Tensor]
    hidden: torch.Tensor | None = None
    logits0: torch.Tensor | None = None
    code_logits: torch.Tensor | None = None
    plan: dict | None = None
    nll_eob: torch.Tensor | None = None
