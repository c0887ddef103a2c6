"""``KelixLM``: a transformers causal LM extended by S = N*K visual ids and next-block prediction.

* Block encoder (Eq. 4): a block's input is the sum of its tokens' embeddings, ``<eob>`` excluded.
  Text ids read the backbone's embedding table; visual ids read the same table (``visual_input:
  table``) or, in stage 1, :class:`~kelix.llm.embed.VisualProjector` rows (``projector``).
* Backbone (Eq. 5): the causal LM body on ``inputs_embeds``; ``h_i`` is its last hidden state
  *before* the final norm (as the official code, and what the DiT reads).
* Block decoder (Eq. 6): ``[h_i, e(t_0), ...]`` -> one vector per slot, then the backbone's final
  norm and only the LM-head rows legal for that slot (:meth:`KelixLM.slot_logits`): slot 0 scores
  text ids and sub-codebook 0 (``visual_offset + K`` rows), slot j > 0 sub-codebook j (K rows),
  ``<eob>`` is implied by the block kind.

Saved as a directory: ``config.json`` (:class:`LLMConfig`), ``model.safetensors`` (everything but the
backbone), ``backbone/`` (transformers ``save_pretrained``: loadable without the kit) and the
extended text tokenizer's files, so one directory is enough to run it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from kelix.llm.decoder import BlockDecoder, ParallelHeads
from kelix.llm.embed import VisualProjector
from kelix.llm.layout import Layout
from kelix.llm.vocab import Vocab, extend_text_tokenizer

log = logging.getLogger("kelix.llm")
FINAL_NORMS = ("norm", "final_layernorm", "final_layer_norm", "ln_f")


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
            ``kelix unify-embeddings``; built fresh it is Table 7 exp2, a random visual table).
        predictor: ``block_decoder`` (Eq. 6) or ``parallel`` (Table 7 exp3: a linear head per slot).
        decoder_width: block decoder width (official 512).
        decoder_layers: block decoder layers (official 1).
        decoder_heads: block decoder attention heads (official 4).
        decoder_ffn: block decoder SwiGLU intermediate size.
        dtype: backbone weight dtype when loading (``float32`` for training with bf16-mixed).
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (default: flash when
            installed on a GPU, else sdpa).
        row_marker: text of each image row's marker (see :class:`~kelix.llm.layout.Layout`).
        loss_chunk: target positions whose vocabulary-wide logits exist at once in the loss (the
            rest are recomputed in backward); bounds the ``[P, visual_offset + K]`` memory.
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
    visual_input: Literal["projector", "table"] = "table"
    predictor: Literal["block_decoder", "parallel"] = "block_decoder"
    decoder_width: int = 512
    decoder_layers: int = 1
    decoder_heads: int = 4
    decoder_ffn: int = 1536
    dtype: str | None = None
    attn_implementation: str | None = None
    row_marker: str = "{row},{cols}"
    loss_chunk: int = 2048
    visual_offset: int | None = None
    vq_dim: int | None = None
    vq_out_dim: int | None = None
    fusion: str = "sum"

    def __post_init__(self):
        if self.visual_input not in ("projector", "table"):
            raise ValueError(f"lm.visual_input {self.visual_input!r} is not projector or table")
        if self.predictor not in ("block_decoder", "parallel"):
            raise ValueError(f"lm.predictor {self.predictor!r} is not block_decoder or parallel")


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
        where: ``(row, position)`` of each target's predicting hidden state.
        hidden: ``[B, L, D]`` pre-norm hidden states (``return_hidden``).
        logits0: ``[P, visual_offset + K]`` slot-0 logits (``return_logits``; never kept in training).
        code_logits: ``[Pv, N-1, K]`` logits of slots 1..N-1 (``return_logits``).
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


def _final_norm(backbone) -> nn.Module:
    body = backbone.get_decoder()
    for name in FINAL_NORMS:
        if isinstance(getattr(body, name, None), nn.Module):
            return getattr(body, name)
    raise ValueError(f"{type(backbone).__name__}: no final norm found (looked for {', '.join(FINAL_NORMS)})")


def _sample(logits: torch.Tensor, temperature: float, top_k: int, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[..., 0]


class KelixLM(nn.Module, PyTorchModelHubMixin):
    """The unified LLM with next-block prediction (see module docstring).

    Args:
        config: an :class:`LLMConfig` (or its dict). Building from a backbone extends its vocabulary
            (unties the LM head from the input table) and records ``visual_offset`` in the config.
    """

    def __init__(self, config: LLMConfig):
        super().__init__()
        from kelix.data.text import load_text_tokenizer
        from kelix.hf import load_causal_lm

        cfg = LLMConfig(**config) if isinstance(config, dict) else replace(config)
        self.config = cfg
        if cfg.backbone is None and cfg.backbone_config is None:
            raise ValueError("lm: set backbone (a local model directory) or backbone_config (e.g. TINY_QWEN3)")
        self.text_tokenizer = extend_text_tokenizer(load_text_tokenizer(cfg.text_tokenizer or cfg.backbone))
        image_tok = self._read_image_tokenizer() if cfg.image_tokenizer else None
        if cfg.N is None or cfg.K is None:
            raise ValueError("lm: N and K are unknown: set lm.image_tokenizer (an exported tokenizer) or lm.N and lm.K")
        self.backbone = load_causal_lm(cfg.backbone, cfg.backbone_config, cfg.dtype, cfg.attn_implementation)
        self.backbone.config.tie_last_hidden_states = False  # hidden_states[-1] is then the pre-norm h
        if cfg.visual_offset is None:
            self._extend_vocab()
        rows = self.backbone.get_input_embeddings().num_embeddings
        if rows != cfg.visual_offset + cfg.N * cfg.K:
            raise ValueError(f"backbone has {rows} embedding rows, expected visual_offset {cfg.visual_offset} + "
                             f"N*K {cfg.N * cfg.K}")
        self.vocab = Vocab.build(self.text_tokenizer, cfg.visual_offset, cfg.N, cfg.K)
        D = self.hidden_size
        self.visual = None
        if cfg.visual_input == "projector":
            if image_tok is not None:
                self.visual = VisualProjector.from_tokenizer(image_tok, D)
            elif cfg.vq_dim and cfg.vq_out_dim:  # loading: tensors come from model.safetensors
                self.visual = VisualProjector(cfg.N, cfg.K, cfg.vq_dim, cfg.vq_out_dim, D, cfg.fusion)
            else:
                raise ValueError("lm.visual_input=projector needs lm.image_tokenizer (the exported tokenizer directory)")
        if cfg.predictor == "parallel":
            self.decoder = ParallelHeads(D, cfg.N)
        else:
            attn = self.backbone.config._attn_implementation
            self.decoder = BlockDecoder(D, cfg.N, cfg.decoder_width, cfg.decoder_layers, cfg.decoder_heads,
                                        cfg.decoder_ffn, attn_implementation=attn if attn != "eager" else "sdpa")
        self.layout = Layout(self.text_tokenizer, cfg.row_marker)

    def _read_image_tokenizer(self):
        from kelix.tokenizer.model import KelixTokenizer

        cfg = self.config
        if not os.path.isdir(cfg.image_tokenizer):
            raise FileNotFoundError(f"lm.image_tokenizer {cfg.image_tokenizer!r} is not a directory (run kelix export-tokenizer)")
        tok = KelixTokenizer.from_pretrained(cfg.image_tokenizer)
        for name in ("N", "K"):
            have, want = getattr(tok.config, name), getattr(cfg, name)
            if want is not None and want != have:
                raise ValueError(f"lm.{name}={want} but the image tokenizer {cfg.image_tokenizer} has {name}={have}")
        cfg.N, cfg.K, cfg.fusion = tok.config.N, tok.config.K, tok.config.fusion
        cfg.vq_dim, cfg.vq_out_dim = tok.config.d, tok.config.out_dim
        return tok

    @torch.no_grad()
    def _extend_vocab(self):
        """Append S visual rows to the embedding table and LM head (new rows drawn per dimension
        from the old rows' mean and std: a cheap form of transformers' ``mean_resizing``)."""
        bb, cfg = self.backbone, self.config
        emb, head = bb.get_input_embeddings(), bb.get_output_embeddings()
        rows = emb.num_embeddings
        if head is not None and head.weight is emb.weight:  # stage 1 trains the head, not the input table
            bb.config.tie_word_embeddings = False
            head.weight = nn.Parameter(emb.weight.detach().clone())
        cfg.visual_offset = max(rows, len(self.text_tokenizer))
        old = [m.weight[:rows].detach().float().clone() for m in (emb, head)]
        bb.resize_token_embeddings(cfg.visual_offset + cfg.N * cfg.K, mean_resizing=False)
        for m, w in zip((bb.get_input_embeddings(), bb.get_output_embeddings()), old):
            new = w.mean(0) + w.std(0) * torch.randn(m.weight.shape[0] - rows, w.shape[1])
            m.weight[rows:] = new.to(m.weight.dtype)
        log.info("vocabulary extended: %d text rows + %d visual ids (N=%d, K=%d)", cfg.visual_offset,
                 cfg.N * cfg.K, cfg.N, cfg.K)

    # -- parts
    @property
    def hidden_size(self) -> int:
        return self.backbone.get_input_embeddings().embedding_dim

    @property
    def body(self) -> nn.Module:
        """The backbone without its LM head (embeddings, layers, final norm)."""
        return self.backbone.get_decoder()

    @property
    def final_norm(self) -> nn.Module:
        """The backbone's final norm (applied to the block decoder's outputs, as to h for plain LMs)."""
        return _final_norm(self.backbone)

    @property
    def lm_head(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def blocks(self) -> list[nn.Module]:
        """The backbone's transformer layers (FSDP2 units, activation checkpointing)."""
        return list(self.body.layers)

    def slot_ranges(self, kind: str) -> list[tuple[int, int]]:
        """Per-slot legal id ranges of a ``text``/``visual``/``any`` block (see :class:`Vocab`)."""
        return self.vocab.slot_ranges(kind)

    # -- block encoder (Eq. 4)
    def code_embed(self, slot: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Embedding of code ``code`` of sub-codebook ``slot`` (broadcast shapes) -> ``[..., D]``."""
        if self.visual is not None:
            return self.visual.rows(slot, code)
        return self.backbone.get_input_embeddings()(self.vocab.visual_offset + slot * self.vocab.K + code)

    def embed_blocks(self, tokens: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``tokens [B, L]`` (text id, or -1 for a visual block) and ``codes [B, L, N]`` -> ``[B, L, D]``."""
        emb = self.backbone.get_input_embeddings()
        is_vis = tokens < 0
        x = emb(tokens.clamp(min=0))
        if bool(is_vis.any()):
            vc = codes[is_vis]
            bad = (vc < 0) | (vc >= self.vocab.K)
            if bool(bad.any()):
                raise ValueError(f"codes outside 0..{self.vocab.K - 1} in visual blocks")
            if self.visual is None:  # one gather-and-sum, no [Nv, N, D] intermediate
                blocks = nn.functional.embedding_bag(self.vocab.code_to_id(vc), emb.weight, mode="sum")
            else:
                blocks = self.visual.block(vc)
            x = x.masked_scatter(is_vis[..., None], blocks.to(x.dtype))
        return x

    # -- backbone (Eq. 5)
    def hidden(self, embeds: torch.Tensor, position_ids: torch.Tensor | None = None, past_key_values=None,
               use_cache: bool = False):
        """Backbone on ``inputs_embeds`` -> ``(h [B, L, D] before the final norm, cache)``.

        Packed rows: position ids restart at 0 for each document; with ``use_cache=False`` and no
        attention mask transformers then isolates the documents (block-diagonal mask for SDPA; for
        flash attention the rows are flattened into one, the only packed layout it recognises).
        """
        B, L, D = embeds.shape
        flat = (self.backbone.config._attn_implementation.startswith("flash") and B > 1 and position_ids is not None
                and past_key_values is None)
        if flat:
            embeds, position_ids = embeds.reshape(1, B * L, D), position_ids.reshape(1, B * L)
        out = self.body(inputs_embeds=embeds, position_ids=position_ids, past_key_values=past_key_values,
                        use_cache=use_cache, output_hidden_states=[-1])
        h = out.hidden_states[-1]
        return (h.reshape(B, L, D) if flat else h), out.past_key_values

    # -- block decoder heads (Eq. 6)
    def slot_logits(self, out: torch.Tensor, slot: int, kind: str | None = None) -> torch.Tensor:
        """Decoder outputs ``[..., D]`` -> logits over the ids legal in ``slot`` only ``[..., hi - lo]``.

        ``kind`` defaults to ``any`` for slot 0 (text ids and sub-codebook 0; ``<eob>`` gets -inf)
        and ``visual`` after; the logits' column c is id ``lo + c`` of ``slot_ranges(kind)[slot]``.
        """
        kind = kind or ("any" if slot == 0 else "visual")
        lo, hi = self.vocab.slot_ranges(kind)[slot]
        head = self.lm_head
        bias = head.bias[lo:hi] if getattr(head, "bias", None) is not None else None
        logits = nn.functional.linear(self.final_norm(out), head.weight[lo:hi], bias)
        if slot == 0:
            for banned in self.vocab.slot0_banned():
                if lo <= banned < hi:
                    logits[..., banned - lo] = float("-inf")
        return logits

    def slot_nll(self, out: torch.Tensor, slot: int, target: torch.Tensor, chunk: int | None = None):
        """NLL ``[P]``, hit ``[P]`` and argmax ``[P]`` (a column of ``slot_logits``) of ``target`` (also a
        column index). Logits exist one chunk of rows at a time, recomputed in backward: a vocabulary-
        wide ``[P, V]`` tensor is never kept."""
        chunk = chunk or self.config.loss_chunk

        def f(o, t):
            logits = self.slot_logits(o, slot).float()
            best = logits.argmax(-1)
            return nn.functional.cross_entropy(logits, t, reduction="none"), best == t, best

        if out.shape[0] <= chunk or not torch.is_grad_enabled():
            return f(out, target)
        from torch.utils.checkpoint import checkpoint

        parts = [checkpoint(f, out[s:s + chunk], target[s:s + chunk], use_reentrant=False)
                 for s in range(0, out.shape[0], chunk)]
        return tuple(torch.cat(x) for x in zip(*parts))

    def forward(self, tokens: torch.Tensor, codes: torch.Tensor, position_ids: torch.Tensor | None,
                targets: torch.Tensor, return_hidden: bool = False, return_logits: bool = False) -> BlockPrediction:
        """Teacher-forced next-block prediction: block i+1 is predicted from h_i where ``targets[:, i+1]``."""
        N, K, vo = self.vocab.N, self.vocab.K, self.vocab.visual_offset
        h, _ = self.hidden(self.embed_blocks(tokens, codes), position_ids)
        rows, pos = targets[:, 1:].nonzero(as_tuple=True)
        hs = h[rows, pos]
        nxt, nxt_codes = tokens[rows, pos + 1], codes[rows, pos + 1]
        is_vis = nxt < 0
        labels0 = torch.where(is_vis, vo + nxt_codes[:, 0].clamp(min=0), nxt)
        out0 = hs.new_zeros(hs.shape)
        if bool((~is_vis).any()):
            out0[~is_vis] = self.decoder(hs[~is_vis][:, None])[:, 0].to(out0.dtype)
        vis_codes = nxt_codes[is_vis]
        vout = hs.new_zeros(0, N, hs.shape[-1])
        if bool(is_vis.any()):
            x = hs[is_vis][:, None]
            if N > 1:  # teacher forcing: e(c_0..c_{N-2}) after h
                j = torch.arange(N - 1, device=hs.device).expand(x.shape[0], -1)
                x = torch.cat([x, self.code_embed(j, vis_codes[:, : N - 1]).to(x.dtype)], 1)
            vout = self.decoder(x)
            out0[is_vis] = vout[:, 0].to(out0.dtype)
        nll0, hit0, arg0 = self.slot_nll(out0, 0, labels0)
        per_slot = [self.slot_nll(vout[:, j], j, vis_codes[:, j]) for j in range(1, N)]
        if per_slot:
            nll_c, hit_c = torch.stack([p[0] for p in per_slot], 1), torch.stack([p[1] for p in per_slot], 1)
        else:
            nll_c, hit_c = nll0.new_zeros(vout.shape[0], 0), hit0.new_zeros(vout.shape[0], 0)
        pred = BlockPrediction(nll0, hit0, arg0, labels0, is_vis, nll_c, hit_c, vis_codes[:, 1:], (rows, pos),
                               h if return_hidden else None)
        if return_logits:
            pred.logits0 = self.slot_logits(out0, 0)
            pred.code_logits = (torch.stack([self.slot_logits(vout[:, j], j) for j in range(1, N)], 1) if N > 1
                                else hs.new_zeros(vout.shape[0], 0, K))
        return pred

    # -- generation helpers (the KV-cached generator builds on these)
    def new_decoder_cache(self):
        return self.decoder.new_cache()

    def decoder_step(self, x: torch.Tensor, slot: int, cache) -> torch.Tensor:
        """One block-decoder position: ``x [P, D]`` (h_i at slot 0, else e(previous token)) -> ``[P, D]``."""
        return self.decoder.step(x, slot, cache)

    @torch.no_grad()
    def sample_block(self, h: torch.Tensor, temperature: float = 1.0, top_k: int = 0, kind: str = "any",
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample block i+1 from ``h [P, D]``: ids ``[P, N]`` (text blocks: ``[t, -1, ...]``) and
        ``is_visual [P]``. Each slot is sampled among its legal ids only; ``<eob>`` is implied."""
        N, K, vo = self.vocab.N, self.vocab.K, self.vocab.visual_offset
        cache = self.new_decoder_cache()
        lo = self.vocab.slot_ranges(kind)[0][0]
        first = _sample(self.slot_logits(self.decoder_step(h, 0, cache), 0, kind), temperature, top_k, generator) + lo
        is_vis = first >= vo
        ids = torch.full((h.shape[0], N), -1, dtype=torch.long, device=h.device)
        ids[:, 0] = first
        prev = (first - vo).clamp(0, K - 1)  # text rows carry a dummy code: their continuation is dropped
        if N > 1 and bool(is_vis.any()):
            for j in range(1, N):
                e = self.code_embed(torch.full_like(prev, j - 1), prev).to(h.dtype)
                c = _sample(self.slot_logits(self.decoder_step(e, j, cache), j), temperature, top_k, generator)
                ids[:, j] = torch.where(is_vis, vo + j * K + c, -1)
                prev = c
        return ids, is_vis

    # -- save / load
    def portable_config(self) -> dict:
        """The config stored in ``config.json``: paths are dropped (the directory holds the parts)."""
        return asdict(self.config) | dict(backbone=None, backbone_config=None, text_tokenizer=None, image_tokenizer=None)

    def save_pretrained(self, save_directory, *, state_dict: dict | None = None, dtype: str | None = None, **kwargs):
        """Write the directory; ``state_dict`` overrides the module's (a gathered FSDP state dict),
        ``dtype`` casts floating tensors (e.g. ``bfloat16`` for a release)."""
        self._export = (state_dict, dtype)
        try:
            kwargs.setdefault("config", self.portable_config())
            return super().save_pretrained(save_directory, **kwargs)
        finally:
            self._export = None

    def _save_pretrained(self, save_directory) -> None:
        from safetensors.torch import save_file

        state_dict, dtype = getattr(self, "_export", None) or (None, None)
        sd = state_dict if state_dict is not None else self.state_dict()
        cast = getattr(torch, dtype) if dtype else None

        def prep(v):
            v = v.detach().cpu()
            return (v.to(cast) if cast is not None and v.is_floating_point() else v).contiguous()

        bb = {k[len("backbone."):]: prep(v) for k, v in sd.items() if k.startswith("backbone.")}
        rest = {k: prep(v) for k, v in sd.items() if not k.startswith("backbone.")}
        self.backbone.save_pretrained(os.path.join(save_directory, "backbone"), state_dict=bb)
        self.text_tokenizer.save_pretrained(save_directory)
        save_file(rest, os.path.join(save_directory, "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> KelixLM:
        path = str(pretrained_model_name_or_path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path!r} is not a Kelix LLM directory (no config.json; nothing is downloaded)")
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, config=None, map_location: str = "cpu", dtype: str | None = None,
                         attn_implementation: str | None = None, **kwargs) -> KelixLM:
        from safetensors.torch import load_file

        if config is None:
            config = json.load(open(os.path.join(model_id, "config.json")))
        known = {f.name for f in fields(LLMConfig)}
        cfg = LLMConfig(**{k: v for k, v in (config if isinstance(config, dict) else asdict(config)).items() if k in known}
                        | dict(backbone=os.path.join(model_id, "backbone"), backbone_config=None,
                               text_tokenizer=model_id, image_tokenizer=None))
        if dtype is not None:
            cfg.dtype = dtype
        if attn_implementation is not None:
            cfg.attn_implementation = attn_implementation
        model = cls(cfg)
        sd = load_file(os.path.join(model_id, "model.safetensors"), device=map_location)
        own = {k for k in model.state_dict() if not k.startswith("backbone.")}
        missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
        if missing or unexpected:
            raise KeyError(f"{model_id}/model.safetensors does not match the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
        model.load_state_dict(sd, strict=False)
        return model.eval()
