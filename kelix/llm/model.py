"""``KelixLM``: a transformers causal LM extended by S = N*K visual ids and next-block prediction.

* Block encoder (Eq. 4): a block's input is the sum of its tokens' embeddings, ``<eob>`` excluded.
  Text ids read the backbone's embedding table; visual ids read the same table (``visual_input:
  table``) or, in stage 1, :class:`~kelix.llm.embed.VisualProjector` rows (``projector``).
* Backbone (Eq. 5): the causal LM body on ``inputs_embeds``; ``h_i`` is its last hidden state
  *before* the final norm (as the official code, and what the DiT reads).
* Block decoder (Eq. 6): ``[h_i, e(t_0), ...]`` -> one vector per slot, then the backbone's final
  norm and only the LM-head rows legal for that slot (:meth:`KelixLM.slot_logits`): slot 0 scores
  text ids and sub-codebook 0 (``visual_offset + K`` rows; the visual ones offset by the learned
  ``visual_bias``), slot j > 0 sub-codebook j (K rows), ``<eob>`` is implied by the block kind.

Reading the image tokenizer, extending a plain backbone's vocabulary (how the visual rows and
``visual_bias`` start) and the directory format (save / load): :mod:`kelix.llm.model_io`.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from kelix.llm.attention import HOST_BOUNDS, VARLEN, doc_bounds, packed_causal_mask, use_varlen, varlen_kernel
from kelix.llm.config import BlockPrediction, LLMConfig
from kelix.llm.decoder import BlockDecoder, ParallelHeads
from kelix.llm.decoder_release import ReleaseBlockDecoder
from kelix.llm.embed import ContinuousProjector, VisualProjector
from kelix.llm.eob import code_ids, vocab_logits
from kelix.llm.flops import train_flops
from kelix.llm.layout import Layout
from kelix.llm.model_io import LMDirectory, fill_legacy
from kelix.llm.plan import scatter_rows, text_only
from kelix.llm.vocab import Vocab, extend_text_tokenizer

__all__ = ["BlockPrediction", "KelixLM", "LLMConfig", "fill_legacy"]
log = logging.getLogger("kelix.llm")
FINAL_NORMS = ("norm", "final_layernorm", "final_layer_norm", "ln_f")


def _final_norm(backbone) -> nn.Module:
    body = backbone.get_decoder()
    for name in FINAL_NORMS:
        if isinstance(getattr(body, name, None), nn.Module):
            return getattr(body, name)
    raise ValueError(f"{type(backbone).__name__}: no final norm found (looked for {', '.join(FINAL_NORMS)})")


class KelixLM(nn.Module, LMDirectory):
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
        self.text_tokenizer = extend_text_tokenizer(load_text_tokenizer(cfg.text_tokenizer or cfg.backbone),
                                                    eob_id=cfg.eob_token_id)
        image_tok = self._read_image_tokenizer() if cfg.image_tokenizer else None
        if cfg.N is None or cfg.K is None:
            raise ValueError("lm: N and K are unknown: set lm.image_tokenizer (an exported tokenizer) or lm.N and lm.K")
        self.backbone = load_causal_lm(cfg.backbone, cfg.backbone_config, cfg.dtype, cfg.attn_implementation)
        attn = self.backbone.config._attn_implementation
        if cfg.packed_attention != "mask" and not use_varlen(self.backbone) and cfg.packed_attention == "varlen":
            raise ValueError(f"lm.packed_attention=varlen needs an sdpa backbone without sliding-window layers "
                             f"(attn_implementation is {attn}): use auto or mask")
        if cfg.compile_layers:  # in place: parameter names and state dicts stay the model's own
            for layer in self.body.layers:
                layer.compile()
        # slot 0's log-prior of a visual block against a text one (a constant within any other slot)
        self.visual_bias = nn.Parameter(torch.zeros(1))
        if cfg.visual_offset is None:
            self._extend_vocab()
        rows = self.backbone.get_input_embeddings().num_embeddings
        if rows != cfg.visual_offset + cfg.N * cfg.K:
            raise ValueError(f"backbone has {rows} embedding rows, expected visual_offset {cfg.visual_offset} + "
                             f"N*K {cfg.N * cfg.K}")
        self.vocab = Vocab.build(self.text_tokenizer, cfg.visual_offset, cfg.N, cfg.K, eob_id=cfg.eob_token_id)
        D = self.hidden_size
        self.visual = None
        if cfg.visual_input == "continuous":  # Table 6a's continuous baseline: features, not codes
            if not cfg.vq_out_dim:
                raise ValueError("lm.visual_input=continuous needs lm.image_tokenizer (a quantizer: none tokenizer)")
            self.visual = ContinuousProjector(cfg.vq_out_dim, D)
        elif cfg.visual_input == "projector":
            if image_tok is not None:
                self.visual = VisualProjector.from_tokenizer(image_tok, D)
                if cfg.visual_init == "standardized":
                    self.visual.standardize(self.text_row_norm())
            elif cfg.vq_dim and cfg.vq_out_dim:  # loading: tensors come from model.safetensors
                self.visual = VisualProjector(cfg.N, cfg.K, cfg.vq_dim, cfg.vq_out_dim, D, cfg.fusion)
            else:
                raise ValueError("lm.visual_input=projector needs lm.image_tokenizer (the exported tokenizer directory)")
        if cfg.predictor == "parallel":
            self.decoder = ParallelHeads(D, cfg.N)
        elif cfg.decoder_kind == "release":  # N code slots + the end-of-block slot, as the release
            self.decoder = ReleaseBlockDecoder(D, cfg.N + 1, cfg.decoder_width, cfg.decoder_layers,
                                               cfg.decoder_heads, cfg.decoder_ffn)
        else:
            slots = cfg.N + (cfg.eob_scoring == "full")  # full: one more position, predicting <eob>
            self.decoder = BlockDecoder(D, slots, cfg.decoder_width, cfg.decoder_layers, cfg.decoder_heads,
                                        cfg.decoder_ffn, attn_implementation=attn if attn != "eager" else "sdpa")
        self.layout = Layout(self.text_tokenizer, cfg.row_marker, eob_id=cfg.eob_token_id)

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
    @property
    def continuous(self) -> bool:
        """Visual positions read continuous features (``visual_input: continuous``), not codes."""
        return self.config.visual_input == "continuous"

    def text_row_norm(self) -> float:
        """Mean norm of the text rows of the input table (what standardized visual inputs are scaled to)."""
        text = self.backbone.get_input_embeddings().weight[: len(self.text_tokenizer)]
        return float(text.detach().float().norm(dim=-1).mean())

    def code_embed(self, slot: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Embedding of code ``code`` of sub-codebook ``slot`` (broadcast shapes) -> ``[..., D]``."""
        if self.continuous:
            raise RuntimeError("a continuous-feature model (visual_input: continuous) has no code embeddings")
        if self.visual is not None:
            return self.visual.rows(slot, code)
        return self.backbone.get_input_embeddings()(self.vocab.visual_offset + slot * self.vocab.K + code)

    def embed_blocks(self, tokens: torch.Tensor, codes: torch.Tensor,
                     visual_embeds: torch.Tensor | None = None, plan: dict | None = None) -> torch.Tensor:
        """``tokens [B, L]`` (text id, or -1 for a visual block) and ``codes [B, L, N]`` -> ``[B, L, D]``.
        A continuous model reads ``visual_embeds [Nv, out_dim]`` instead of codes: the tokenizer's features
        of the visual blocks in row-major order of ``tokens``. ``plan`` (:mod:`kelix.llm.plan`): the
        visual blocks are gathered by its indices, without a host sync (codes were range-checked by the
        processor, or come from the tokenizer)."""
        emb = self.backbone.get_input_embeddings()
        x = emb(tokens.clamp(min=0))
        if plan is not None:
            return self._embed_planned(x, codes, visual_embeds, plan)
        is_vis = tokens < 0
        if self.continuous and bool(is_vis.any()):
            self._check_features(visual_embeds, int(is_vis.sum()))
            return x.masked_scatter(is_vis[..., None], self.visual(visual_embeds).to(x.dtype))
        if bool(is_vis.any()):
            vc = codes[is_vis]
            bad = (vc < 0) | (vc >= self.vocab.K)
            if bool(bad.any()):
                raise ValueError(f"codes outside 0..{self.vocab.K - 1} in visual blocks")
            x = x.masked_scatter(is_vis[..., None], self._code_blocks(vc).to(x.dtype))
        return x

    @staticmethod
    def _check_features(visual_embeds: torch.Tensor | None, n: int) -> torch.Tensor:
        if visual_embeds is None or visual_embeds.shape[0] != n:
            got = None if visual_embeds is None else tuple(visual_embeds.shape)
            raise ValueError(f"a continuous model needs visual_embeds for its {n} visual blocks, got {got}")
        return visual_embeds

    def _code_blocks(self, vc: torch.Tensor) -> torch.Tensor:
        """Block embeddings ``[Nv, D]`` of visual blocks' codes ``[Nv, N]`` (Eq. 4)."""
        if self.visual is None:  # one gather-and-sum, no [Nv, N, D] intermediate
            return nn.functional.embedding_bag(self.vocab.code_to_id(vc), self.backbone.get_input_embeddings().weight,
                                               mode="sum")
        return self.visual.block(vc)

    def _embed_planned(self, x: torch.Tensor, codes: torch.Tensor, visual_embeds, plan: dict) -> torch.Tensor:
        n, where = plan["n_visual_blocks"], plan["visual_blocks"]
        if not n:
            return x
        if self.continuous:
            blocks = self.visual(self._check_features(visual_embeds, n))
        else:
            blocks = self._code_blocks(codes.reshape(-1, codes.shape[-1]).index_select(0, where))
        return x.reshape(-1, x.shape[-1]).index_copy(0, where, blocks.to(x.dtype)).view(x.shape)

    # -- backbone (Eq. 5)
    def hidden(self, embeds: torch.Tensor, position_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, cache=None, plan: dict | None = None):
        """Backbone on ``inputs_embeds`` -> ``(h [B, L, D] before the final norm, cache)``.

        ``cache``: a transformers ``DynamicCache`` to read and extend (generation), else none is
        built. Packed rows: position ids restart at 0 for each document; without a cache or an
        attention mask the documents are isolated: by ``kelix_varlen`` attention over the rows
        flattened into one (``lm.packed_attention``, see :mod:`kelix.llm.attention`), by flash
        attention's own varlen path (rows flattened too: the only packed layout it recognises), or
        by transformers' block-diagonal mask (SDPA, eager; a BlockMask for flex_attention). ``plan``
        (:mod:`kelix.llm.plan`) gives the varlen documents, counted on the host (no sync).
        """
        from kelix.hf import cache_kwargs, output_cache

        B, L, D = embeds.shape
        attn = self.backbone.config._attn_implementation
        packed = position_ids is not None and cache is None and attention_mask is None
        extra = {}
        if packed and attn == VARLEN and self._varlen_now(embeds):
            cu = doc_bounds(position_ids) if plan is None else plan["cu_seqlens"]
            # a prepared mask mapping skips transformers' mask building; a document never spans rows,
            # so L bounds its length without reading the lengths back to the host
            extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=L, max_length_k=L)
            if plan is not None:  # the eager fallback's per-document loop, without a .tolist()
                extra[HOST_BOUNDS] = plan["doc_bounds"]
            attention_mask = dict.fromkeys(("full_attention", "sliding_attention"))
        elif packed and plan is not None and attn in ("sdpa", VARLEN) and not self._sliding:
            attention_mask = {"full_attention": packed_causal_mask(position_ids)}  # transformers' mask, no sync
        flat = bool(extra) or (attn.startswith("flash") and B > 1 and packed)
        if flat:
            embeds, position_ids = embeds.reshape(1, B * L, D), position_ids.reshape(1, B * L)
        # h is the final norm's input: read there, since whether hidden_states[-1] is taken before or
        # after the norm differs between transformers releases
        seen = []
        hook = self.final_norm.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
        try:
            out = self.body(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                            use_cache=cache is not None, **cache_kwargs(self.body, cache), **extra)
        finally:
            hook.remove()
        if not seen:
            raise RuntimeError(f"{type(self.body).__name__} never called its final norm: h cannot be read")
        h = seen[-1]
        return (h.reshape(B, L, D) if flat else h), output_cache(self.body, out)

    @property
    def _sliding(self) -> bool:
        return "sliding_attention" in (getattr(self.backbone.config, "layer_types", None) or [])

    def _varlen_now(self, embeds: torch.Tensor) -> bool:
        """``varlen``: always (the eager fallback off CUDA); ``auto``: where the CUDA kernel runs."""
        if self.config.packed_attention == "varlen":
            return True
        half = embeds.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cuda")
        return embeds.is_cuda and half and varlen_kernel() is not None

    def train_flops(self, rows: int, length: int, square_sum=None, visual_blocks=None):
        """Model FLOPs of one training step on ``rows x length`` blocks: :func:`kelix.llm.flops.train_flops`."""
        return train_flops(self, rows, length, square_sum, visual_blocks)

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
            vis = max(self.vocab.visual_offset, lo) - lo
            if vis < hi - lo:
                logits[..., vis:] = logits[..., vis:] + self.visual_bias.to(logits.dtype)
            for banned in self.vocab.slot0_banned():
                if lo <= banned < hi:
                    logits[..., banned - lo] = float("-inf")
        return logits

    def slot_nll(self, out: torch.Tensor, slot: int, target: torch.Tensor, chunk: int | None = None,
                 full: bool = False):
        """NLL ``[P]``, hit ``[P]`` and argmax ``[P]`` (a column of ``slot_logits``, or with ``full`` of
        :func:`~kelix.llm.eob.vocab_logits`: an id) of ``target`` (also a column index). Logits exist one
        chunk of rows at a time (recomputed in backward when training; validation under ``no_grad`` is
        chunked alike): a vocabulary-wide ``[P, V]`` tensor never is."""
        chunk = chunk or self.config.loss_chunk

        def f(o, t):
            logits = (vocab_logits(self, o, slot) if full else self.slot_logits(o, slot)).float()
            best = logits.argmax(-1)
            return nn.functional.cross_entropy(logits, t, reduction="none"), best == t, best

        if out.shape[0] <= chunk:
            return f(out, target)
        if torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            def run(o, t):
                return checkpoint(f, o, t, use_reentrant=False)
        else:
            run = f
        parts = [run(out[s:s + chunk], target[s:s + chunk]) for s in range(0, out.shape[0], chunk)]
        return tuple(torch.cat(x) for x in zip(*parts))

    def forward(self, tokens: torch.Tensor, codes: torch.Tensor, position_ids: torch.Tensor | None,
                targets: torch.Tensor, return_hidden: bool = False, return_logits: bool = False,
                visual_embeds: torch.Tensor | None = None, plan: dict | None = None) -> BlockPrediction:
        """Teacher-forced next-block prediction: block i+1 is predicted from h_i where ``targets[:, i+1]``.
        A continuous model (``visual_embeds``, see :meth:`embed_blocks`) predicts text blocks only.
        ``plan``: the batch's step plan (:mod:`kelix.llm.plan`, from ``collate_docs``): the same
        prediction with every block selected by precomputed indices, no host sync; without one, boolean
        masks select them."""
        N, vo = self.vocab.N, self.vocab.visual_offset
        h, _ = self.hidden(self.embed_blocks(tokens, codes, visual_embeds, plan), position_ids, plan=plan)
        if plan is not None:
            return self._predict_planned(h, tokens, codes, plan, return_hidden, return_logits)
        if self.continuous:  # no visual ids to predict: visual targets are dropped
            targets = targets & (tokens >= 0)
        rows, pos = targets[:, 1:].nonzero(as_tuple=True)
        hs = h[rows, pos]
        nxt, nxt_codes = tokens[rows, pos + 1], codes[rows, pos + 1]
        is_vis = nxt < 0
        labels0 = torch.where(is_vis, vo + nxt_codes[:, 0].clamp(min=0), nxt)
        out0 = hs.new_zeros(hs.shape)
        eout = hs.new_zeros(hs.shape) if self.config.eob_scoring == "full" else None
        if bool((~is_vis).any()):
            tout = self._text_slots(hs[~is_vis], nxt[~is_vis])
            out0[~is_vis] = tout[:, 0].to(out0.dtype)
            if eout is not None:
                eout[~is_vis] = tout[:, 1].to(eout.dtype)
        vis_codes = nxt_codes[is_vis]
        vout = hs.new_zeros(0, N, hs.shape[-1])
        if bool(is_vis.any()):
            vout = self._visual_slots(hs[is_vis], vis_codes)
            out0[is_vis] = vout[:, 0].to(out0.dtype)
            if eout is not None:
                eout[is_vis], vout = vout[:, N].to(eout.dtype), vout[:, :N]
        return self._slot_predictions(out0, vout, labels0, is_vis, vis_codes, (rows, pos),
                                      h if return_hidden else None, return_logits, eout)

    def _predict_planned(self, h, tokens, codes, plan: dict, return_hidden: bool, return_logits: bool):
        """:meth:`forward`'s selection by the plan's indices (index_select / index_copy only)."""
        if self.continuous:
            plan = text_only(plan)
        N, vo, D = self.vocab.N, self.vocab.visual_offset, h.shape[-1]
        rows, pos, text, vis = plan["rows"], plan["pos"], plan["text"], plan["visual"]
        src = rows * tokens.shape[1] + pos  # flat index of h_i; its target is the next block
        hs = h.reshape(-1, D).index_select(0, src)
        nxt, nxt_codes = tokens.reshape(-1).index_select(0, src + 1), codes.reshape(-1, N).index_select(0, src + 1)
        is_vis = nxt < 0
        labels0 = torch.where(is_vis, vo + nxt_codes[:, 0].clamp(min=0), nxt)
        vis_codes = nxt_codes.index_select(0, vis)
        parts, eob_parts, vout = [], [], hs.new_zeros(0, N, D)
        if plan["n_text"]:
            tout = self._text_slots(hs.index_select(0, text), nxt.index_select(0, text))
            parts.append((text, tout[:, 0]))
            eob_parts.append((text, tout[:, -1]))
        if plan["n_visual"]:
            vout = self._visual_slots(hs.index_select(0, vis), vis_codes)
            parts.append((vis, vout[:, 0]))
            eob_parts.append((vis, vout[:, -1]))
            vout = vout[:, :N]
        full = self.config.eob_scoring == "full"
        pred = self._slot_predictions(scatter_rows(hs.shape[0], parts, hs), vout, labels0, is_vis, vis_codes,
                                      (rows, pos), h if return_hidden else None, return_logits,
                                      scatter_rows(hs.shape[0], eob_parts, hs) if full else None)
        pred.plan = plan
        return pred

    def _text_slots(self, ht: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Block decoder outputs ``[Pt, 1, D]`` of text targets from their ``h [Pt, D]``; with
        ``eob_scoring: full`` ``[Pt, 2, D]``: e(t) teacher-forced, the second predicts ``<eob>``."""
        x = ht[:, None]
        if self.config.eob_scoring == "full":
            x = torch.cat([x, self.backbone.get_input_embeddings()(ids)[:, None].to(x.dtype)], 1)
        return self.decoder(x, kind="text")

    def _visual_slots(self, hv: torch.Tensor, vis_codes: torch.Tensor) -> torch.Tensor:
        """Block decoder outputs ``[Pv, N, D]`` of visual targets from their ``h [Pv, D]`` and codes
        (``[Pv, N+1, D]`` with ``eob_scoring: full``: the last predicts ``<eob>``)."""
        N, x = self.vocab.N, hv[:, None]
        n = N - 1 + (self.config.eob_scoring == "full")
        if n > 0:  # teacher forcing: e(c_0..c_{n-1}) after h
            j = torch.arange(n, device=hv.device).expand(x.shape[0], -1)
            x = torch.cat([x, self.code_embed(j, vis_codes[:, :n]).to(x.dtype)], 1)
        return self.decoder(x, kind="visual")

    def _slot_predictions(self, out0, vout, labels0, is_vis, vis_codes, where, hidden, return_logits, eout=None):
        N, K, full = self.vocab.N, self.vocab.K, eout is not None
        nll0, hit0, arg0 = self.slot_nll(out0, 0, labels0, full=full)
        per_slot = [self.slot_nll(vout[:, j], j, code_ids(self, vis_codes, j) if full else vis_codes[:, j],
                                  full=full) for j in range(1, N)]
        if per_slot:
            nll_c, hit_c = torch.stack([p[0] for p in per_slot], 1), torch.stack([p[1] for p in per_slot], 1)
        else:
            nll_c, hit_c = nll0.new_zeros(vout.shape[0], 0), hit0.new_zeros(vout.shape[0], 0)
        pred = BlockPrediction(nll0, hit0, arg0, labels0, is_vis, nll_c, hit_c, vis_codes[:, 1:], where, hidden)
        if full:
            pred.nll_eob = self.slot_nll(eout, N, torch.full_like(labels0, self.vocab.eob), full=True)[0]
        if return_logits:
            pred.logits0 = self.slot_logits(out0, 0)
            pred.code_logits = (torch.stack([self.slot_logits(vout[:, j], j) for j in range(1, N)], 1) if N > 1
                                else out0.new_zeros(vout.shape[0], 0, K))
        return pred

    # -- generation helpers (the KV-cached generator builds on these)
    def new_decoder_cache(self):
        return self.decoder.new_cache()

    def decoder_step(self, x: torch.Tensor, slot: int, cache, kind: str = "visual") -> torch.Tensor:
        """One block-decoder position of a ``kind`` block: ``x [P, D]`` (h_i at slot 0, else
        e(previous token)) -> ``[P, D]``."""
        return self.decoder.step(x, slot, cache, kind=kind)
