"""Generation with next-block prediction: text answers and images' visual blocks.

The backbone runs with a KV cache (one position per block); each new block is drawn by the block
decoder with its own KV cache, slot by slot, every slot sampled among its legal ids only (slot 0 of
a text block: text ids, the block-layout specials and the backbone's unused padding rows excluded;
slot j of a visual block: sub-codebook j). Rows of a batch are left padded, so prompts of different
lengths run together; a finished row keeps running on padding and never truncates another. Text
stops at ``<|im_end|>``, the tokenizer's eos or ``<|endoftext|>`` (:func:`default_stop_ids`).

Image generation follows the visual processor's layout exactly: ``<|vision_start|>``, per row the
marker text (forced, never sampled) and ``w`` sampled visual blocks, then ``<|vision_end|>``. The
hidden states collected along the way are the DiT's condition: the same positions, and the same
values, as :func:`kelix.llm.condition.image_condition_states` computes teacher-forced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kelix.data.schema import Image, Part, Sample, Turn
from kelix.llm.layout import VISUAL, BlockDoc
from kelix.llm.vocab import DOC_END


@dataclass
class Sampling:
    """How each slot of a block is drawn.

    Args:
        temperature: softmax temperature; 0 is greedy (argmax).
        top_k: keep only the k most likely ids of the slot's legal range (0: all).
        top_p: nucleus sampling: keep the smallest set of ids whose probability reaches ``top_p`` (1: all).
        cfg_scale: classifier-free guidance of image blocks on the LLM, ``l_u + s (l_c - l_u)`` per slot,
            the unconditional prompt being empty; 1 disables it (no unconditional rows at all).
        seed: seed of the sampling generator (None: torch's global RNG).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    seed: int | None = 0


def masked_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """``logits [P, V]`` as float, divided by the temperature (> 0), ids outside top-k / top-p at -inf:
    what a slot is drawn from (by :func:`sample_ids`, or Gumbel-max in the fast path)."""
    logits = logits.float() / s.temperature
    if 0 < s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= s.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_ids(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Column indices ``[P]`` drawn from ``logits [P, V]`` (already restricted to the legal range)."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(masked_logits(logits, s).softmax(-1), 1, generator=generator)[:, 0]


class BackboneRunner:
    """The backbone over left-padded rows, one block at a time, with or without a KV cache.

    Without a cache every step recomputes the whole prefix (slow; the reference the cached path is
    tested against).
    """

    def __init__(self, lm, use_cache: bool = True):
        self.lm, self.use_cache = lm, use_cache
        self.cache = None

    def _run(self, embeds, mask, pos, cache):
        return self.lm.hidden(embeds, pos, attention_mask=mask, cache=cache)[0]  # pre-norm h

    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``embeds [B, L, D]``, ``mask [B, L]`` (left padded) -> hidden states ``[B, L, D]``."""
        from transformers import DynamicCache

        self.embeds, self.mask = embeds, mask.long()
        self.pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=self.lm.backbone.config) if self.use_cache else None
        return self._run(embeds, self.mask, self.pos, self.cache)

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """Append one block ``embeds [B, D]`` to every row -> its hidden states ``[B, D]``."""
        B = embeds.shape[0]
        pos = self.pos[:, -1:] + 1
        self.mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], 1)
        self.pos = torch.cat([self.pos, pos], 1)
        if self.use_cache:
            return self._run(embeds[:, None], self.mask, pos, self.cache)[:, 0]
        self.embeds = torch.cat([self.embeds, embeds[:, None]], 1)
        return self._run(self.embeds, self.mask, self.pos, None)[:, -1]


class BlockDrawer:
    """Draws one block from ``h`` with the block decoder, slot by slot (cached or recomputed)."""

    def __init__(self, lm, sampling: Sampling, generator, decoder_cache: bool = True):
        self.lm, self.s, self.g, self.decoder_cache = lm, sampling, generator, decoder_cache
        self.text_banned = text_banned_ids(lm)

    def _outputs(self, kind: str):
        """A function giving the decoder's output for the next position, fed one input at a time."""
        lm = self.lm
        if self.decoder_cache:
            cache, slot = lm.new_decoder_cache(), [0]

            def feed(x):
                out = lm.decoder_step(x, slot[0], cache, kind=kind)
                slot[0] += 1
                return out
            return feed
        seq = []

        def feed(x):
            seq.append(x[:, None])
            return lm.decoder(torch.cat(seq, 1), kind=kind)[:, -1]
        return feed

    def _mix(self, logits: torch.Tensor) -> torch.Tensor:
        if self.s.cfg_scale == 1.0:
            return logits
        cond, uncond = logits.chunk(2)
        return uncond + self.s.cfg_scale * (cond - uncond)

    def text(self, h: torch.Tensor) -> torch.Tensor:
        """A text block: its token id ``[B]`` (slot 0 over text ids; :func:`text_banned_ids` never)."""
        logits = text_logits(self.lm, self._outputs("text")(h), self.text_banned)
        return sample_ids(logits, self.s, self.g)

    def visual(self, h: torch.Tensor) -> torch.Tensor:
        """A visual block: its codes ``[B, N]`` (slot j over sub-codebook j only). With CFG, ``h`` holds
        the conditional rows then the unconditional ones; both decode the same sampled codes."""
        lm, N = self.lm, self.lm.vocab.N
        feed = self._outputs("visual")
        reps = 2 if self.s.cfg_scale != 1.0 else 1
        out = feed(h)
        codes = []
        for j in range(N):
            c = sample_ids(self._mix(lm.slot_logits(out, j, "visual")), self.s, self.g)
            codes.append(c)
            if j + 1 < N:
                prev = c.repeat(reps)
                out = feed(lm.code_embed(torch.full_like(prev, j), prev).to(h.dtype))
        return torch.stack(codes, -1)


def text_banned_ids(lm) -> torch.Tensor:
    """Text ids a text answer never holds: the block-layout specials (``<|eob|>``, image start and
    end, row-marker brackets) and the backbone's padding rows past the tokenizer's last id."""
    v = lm.vocab
    ids = list(v.layout_specials()) + list(range(len(lm.text_tokenizer), v.visual_offset))
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


def text_logits(lm, out: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """Logits ``[P, visual_offset]`` of a text block's token (column = text id) from decoder outputs,
    ``banned`` ids at -inf."""
    logits = lm.slot_logits(out, 0, "text")
    logits[:, banned.to(logits.device)] = float("-inf")
    return logits


def default_stop_ids(lm) -> tuple[int, ...]:
    """``<|im_end|>``, the text tokenizer's eos and ``<|endoftext|>`` (those it has)."""
    tok = lm.text_tokenizer
    ids = [lm.vocab.im_end, tok.eos_token_id, tok.get_vocab().get(DOC_END)]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def _left_pad(lm, docs: list[BlockDoc], visual_embeds: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt documents -> block embeddings ``[B, L, D]`` and mask ``[B, L]``, left padded (``visual_embeds``:
    a continuous model's features of each document's visual blocks, in order)."""
    device = next(lm.parameters()).device
    N, L = lm.vocab.N, max(len(d) for d in docs)
    pad = lm.text_tokenizer.pad_token_id or 0
    tokens = torch.full((len(docs), L), pad, dtype=torch.long)
    codes = torch.full((len(docs), L, N), -1, dtype=torch.long)
    mask = torch.zeros(len(docs), L, dtype=torch.long)
    for b, d in enumerate(docs):
        n = len(d)
        tokens[b, L - n:] = torch.tensor(d.tokens)
        codes[b, L - n:] = d.codes(N)
        mask[b, L - n:] = 1
    feats = torch.cat([f.to(device) for f in visual_embeds]) if visual_embeds else None
    return lm.embed_blocks(tokens.to(device), codes.to(device), feats), mask.to(device)


def _embed_one(lm, tokens: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks ``[B]`` (text ids, or -1 with ``codes [B, N]``) -> input embeddings ``[B, D]``."""
    if codes is None:
        codes = torch.full((tokens.shape[0], lm.vocab.N), -1, dtype=torch.long, device=tokens.device)
    return lm.embed_blocks(tokens[:, None], codes[:, None])[:, 0]


def _generator(lm, s: Sampling):
    if s.seed is None:
        return None
    return torch.Generator(device=next(lm.parameters()).device).manual_seed(s.seed)


def understanding_doc(lm, question: str, codes: list[torch.Tensor]) -> BlockDoc:
    """``<|im_start|>user\\n`` + images (code grids) + question ``<|im_end|>\\n<|im_start|>assistant\\n``."""
    parts = [Part("image", image=Image(f"{i}.jpg", codes=c.cpu())) for i, c in enumerate(codes)]
    sample = Sample("prompt", "pipeline", "messages", [Turn("user", [*parts, Part("text", text=question)])])
    doc = lm.layout.build(sample, lambda im, role: (im.codes.shape[0], im.codes.shape[1], im.codes, None))
    doc.add_text(lm.layout.chat_header("assistant"), False)
    return doc


def image_inputs(tokenizer, images: list, N: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """What the LLM reads of ``images``: code grids ``[h, w, N]`` and no features, or for a continuous
    tokenizer (``quantizer: none``) placeholder grids of zeros and each image's features ``[h*w, out_dim]``."""
    if tokenizer.has_codes:
        return tokenizer.encode(images), None
    feats = tokenizer.features(images)
    return [torch.zeros(f.shape[0], f.shape[1], N, dtype=torch.long) for f in feats], [f.flatten(0, 1) for f in feats]


def prompt_doc(lm, prompt: str) -> BlockDoc:
    """The text-to-image prompt: ``user: prompt`` then the assistant header (the image follows)."""
    doc = BlockDoc()
    doc.add_text(lm.layout.t2i_prompt(prompt), False)  # as training lays t2i samples out; "" is CFG's
    return doc


@torch.no_grad()
def generate_text(lm, docs: list[BlockDoc], max_new_blocks: int = 64, sampling: Sampling | None = None,
                  use_cache: bool = True, decoder_cache: bool = True, stop_ids: tuple[int, ...] | None = None,
                  progress: bool = False, visual_embeds: list[torch.Tensor] | None = None) -> list[list[int]]:
    """Continue each prompt document with text blocks until a stop id (or ``max_new_blocks``).

    Args:
        stop_ids: ids that end a row's answer (default :func:`default_stop_ids`; ``()``: none).
        progress: show a progress bar of blocks.
        visual_embeds: a continuous model's image features, per document ``[n_visual_blocks, out_dim]``
            (:func:`image_inputs`); None for a model that reads codes.
    Returns:
        the new token ids of each row, the stop token excluded.
    """
    from tqdm.auto import tqdm

    s = sampling or Sampling(temperature=0.0)
    if s.cfg_scale != 1.0:
        raise ValueError("cfg_scale applies to image generation only")
    lm.eval()
    stops = set(default_stop_ids(lm) if stop_ids is None else stop_ids)
    run, draw = BackboneRunner(lm, use_cache), BlockDrawer(lm, s, _generator(lm, s), decoder_cache)
    embeds, mask = _left_pad(lm, docs, visual_embeds)
    h = run.prefill(embeds, mask)[:, -1]
    pad = lm.text_tokenizer.pad_token_id or 0
    out: list[list[int]] = [[] for _ in docs]
    done = torch.zeros(len(docs), dtype=torch.bool, device=h.device)
    for _ in tqdm(range(max_new_blocks), desc="answer blocks", disable=not progress, leave=False):
        t = draw.text(h)
        t = torch.where(done, torch.full_like(t, pad), t)
        for b, tok in enumerate(t.tolist()):
            if not done[b]:
                if tok in stops:
                    done[b] = True
                else:
                    out[b].append(tok)
        if bool(done.all()):
            break
        h = run.step(_embed_one(lm, t))
    return out


@torch.no_grad()
def generate_image(lm, prompts: list[str], grid: tuple[int, int], sampling: Sampling | None = None,
                   use_cache: bool = True, decoder_cache: bool = True, include_markers: bool = True,
                   progress: bool = False, fast: bool = False,
                   include_end: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate one image's blocks per prompt.

    Args:
        grid: ``(h, w)`` visual tokens of the image (the condition resolution / patch*merge).
        include_markers: return the hidden states of every position from ``<|vision_start|>`` up to
            ``<|vision_end|>`` (markers included), else of the visual blocks only.
        progress: show a progress bar over the image's blocks.
        fast: run :mod:`kelix.llm.fast_generate` (static caches, one fixed-shape step per block, CUDA
            graphs on a GPU): greedy codes equal this path's; sampled ones are drawn by Gumbel-max from
            noise of ``sampling.seed`` (the same distribution, other draws).
        include_end: also feed ``<|vision_end|>`` and return its state last (the released DiT's
            condition runs to ``<|vision_end|>`` inclusive; one more backbone step).
    Returns:
        ``codes [B, h, w, N]`` (0..K-1), condition ``states [B, L, D]`` (pre-norm) and ``mask [B, L]``.
    """
    s = sampling or Sampling()
    if fast:
        if not (use_cache and decoder_cache):
            raise ValueError("generate_image(fast=True) is a cached path: use_cache and decoder_cache must stay True")
        from kelix.llm.fast_generate import fast_generate_image

        return fast_generate_image(lm, prompts, grid, s, include_markers=include_markers, include_end=include_end)
    lm.eval()
    h_rows, w_cols = grid
    plan = BlockDoc()
    ref = lm.layout.add_image(plan, h_rows, w_cols, True)
    docs = [prompt_doc(lm, p) for p in prompts]
    if s.cfg_scale != 1.0:
        docs += [prompt_doc(lm, "") for _ in prompts]
    run, draw = BackboneRunner(lm, use_cache), BlockDrawer(lm, s, _generator(lm, s), decoder_cache)
    embeds, mask = _left_pad(lm, docs)
    h = run.prefill(embeds, mask)[:, -1]
    B, N, device = len(prompts), lm.vocab.N, h.device
    codes = torch.zeros(B, h_rows * w_cols, N, dtype=torch.long, device=device)
    states, k = [], 0
    from tqdm.auto import tqdm

    # the last planned block, <|vision_end|>, is fed only when its state is part of the condition
    for tok in tqdm(plan.tokens if include_end else plan.tokens[:-1], desc="image blocks", disable=not progress,
                    leave=False):
        if tok == VISUAL:
            c = draw.visual(h)
            codes[:, k] = c
            k += 1
            x = _embed_one(lm, torch.full((len(docs),), VISUAL, device=device), c.repeat(len(docs) // B, 1))
        else:
            x = _embed_one(lm, torch.full((len(docs),), tok, device=device))
        h = run.step(x)
        if include_markers or tok in (VISUAL, lm.vocab.vision_end):
            states.append(h[:B])
    assert k == h_rows * w_cols and ref.end == len(plan.tokens) - 1
    st = torch.stack(states, 1)
    return codes.reshape(B, h_rows, w_cols, N), st, torch.ones(st.shape[:2], dtype=torch.bool, device=device)
