"""Image generation's fast path: static KV caches, one fixed-shape step per block, no host sync.

The eager path (:func:`kelix.llm.generate.generate_image`) runs transformers' forward with a growing
``DynamicCache`` per block: masks rebuilt, caches concatenated, thousands of small kernels and a few
host syncs per block. Here everything an image needs is known in advance (the prompt, the grid, the
forced row-marker blocks), so:

* the backbone's KV caches are preallocated for prompt + image, ``[B, kv_heads, L, head_dim]`` per
  layer, written in place at a cursor kept on the device; RoPE tables and key masks are built once;
* one visual step (block decoder slot by slot, per-slot sampling, block embedding, one backbone
  position) and one marker step (a row's forced marker blocks fed at once, padded to the longest
  row) have fixed shapes and read their indices from device counters, so on CUDA each is captured
  whole in a CUDA graph (``torch.cuda.CUDAGraph``) and replayed ``h*w`` and ``h`` times; on CPU
  the same functions run eagerly (the tested fallback);
* CFG's conditional and unconditional rows run as one batch (as the eager path);
* slots are drawn by the Gumbel-max trick from noise drawn up front (:func:`gumbel_noise` from
  ``Sampling.seed``): ``argmax(masked_logits / T + g)`` is a draw from the same distribution as the
  eager path's ``multinomial`` (same temperature, top-k, top-p, CFG), but not the same draw.

What is guaranteed: greedy codes equal the eager path's, token for token, and the condition states
equal them to float tolerance; sampled codes are ``argmax(masked_logits(l) + noise)`` of the logits
the model gives teacher-forced (tests/llm/test_fast_generate.py). The layers are computed here from
the backbone's own modules (Llama-style layers: q/k/v/o projections, Qwen3's q/k norms when present,
the layer's norms and MLP); :func:`unsupported` names what else cannot run.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from kelix.llm.decoder import BlockDecoder, ParallelHeads
from kelix.llm.generate import Sampling, _left_pad, masked_logits, prompt_doc
from kelix.llm.layout import VISUAL, BlockDoc

PAD_TO = 16  # prompts are left padded to a multiple of this, so similar lengths reuse one generator
_KEEP = 4  # generators kept per model (each holds its caches and graphs)
_GENERATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def unsupported(lm) -> str | None:
    """Why the fast path cannot run ``lm`` (None: it can)."""
    body = lm.body
    if not hasattr(body, "rotary_emb"):
        return f"{type(body).__name__} has no rotary_emb"
    for layer in _layers(body):
        a = getattr(layer, "self_attn", None)
        parts = ("input_layernorm", "post_attention_layernorm", "mlp")
        if a is None or not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")) \
                or not all(hasattr(layer, n) for n in parts):
            return f"{type(layer).__name__} is not a Llama-style decoder layer"
        if getattr(a, "sliding_window", None):
            return f"{type(layer).__name__} uses sliding-window attention"
    if not isinstance(lm.decoder, (BlockDecoder, ParallelHeads)):
        return f"block decoder {type(lm.decoder).__name__} is unknown"
    return None


def _layers(body):
    return list(body.layers[: body.config.num_hidden_layers])


def gumbel_noise(blocks: int, N: int, rows: int, K: int, seed: int | None, device) -> torch.Tensor:
    """Gumbel noise ``[blocks, N, rows, K]`` (float32) of the sampled slots, drawn from ``seed`` on
    ``device`` (None: torch's global RNG)."""
    g = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    u = torch.rand(blocks, N, rows, K, generator=g, device=device)
    return -torch.log(-torch.log(u.clamp_(min=torch.finfo(torch.float32).tiny)))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x [B, H, L, hd]`` with ``cos, sin [B, L, hd]`` (transformers' rotate-half form)."""
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), -1) * sin[:, None]


def _layer(layer, x: torch.Tensor, cos, sin, kv, mask) -> torch.Tensor:
    """A Llama-style decoder layer on ``x [B, L, D]``; ``kv(k, v)`` stores this step's keys and values
    and returns all those the queries attend to (under the boolean ``mask``, None: all)."""
    a = layer.self_attn
    B, L, _ = x.shape
    y = layer.input_layernorm(x)

    def heads(proj, norm=None):
        t = proj(y).view(B, L, -1, a.head_dim)
        return (norm(t) if norm is not None else t).transpose(1, 2)

    q, k, v = heads(a.q_proj, getattr(a, "q_norm", None)), heads(a.k_proj, getattr(a, "k_norm", None)), heads(a.v_proj)
    k_all, v_all = kv(_rotate(k, cos, sin), v)
    o = F.scaled_dot_product_attention(_rotate(q, cos, sin), k_all, v_all, attn_mask=mask,
                                       scale=getattr(a, "scaling", a.head_dim ** -0.5), enable_gqa=True)
    x = x + a.o_proj(o.transpose(1, 2).reshape(B, L, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _block_embed(lm, codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[B, N]`` -> visual block input embeddings ``[B, D]``: ``embed_blocks``' visual branch
    without its range check (a host sync; sampled codes are in range by construction) and with a
    gather and sum for ``embedding_bag`` (the same values; some releases' CUDA forward syncs)."""
    emb = lm.backbone.get_input_embeddings()
    if lm.visual is None:
        ids = lm.vocab.code_to_id(codes)
        return emb.weight.index_select(0, ids.flatten()).view(*ids.shape, -1).sum(-2)
    return lm.visual.block(codes).to(emb.weight.dtype)


class FastImageGenerator:
    """Static buffers and the two fixed-shape steps for one shape of request.

    Args:
        lm: the :class:`~kelix.llm.model.KelixLM`.
        batch: images per call (B; CFG adds B unconditional rows).
        prompt_len: prompt blocks after left padding (every call's prompts must fit).
        grid: ``(h, w)`` visual blocks of the image.
        sampling: temperature, top-k, top-p and CFG scale (fixed per generator; the seed is per call).
        graphs: capture the steps in CUDA graphs (CUDA only).
    """

    def __init__(self, lm, batch: int, prompt_len: int, grid: tuple[int, int], sampling: Sampling, graphs: bool):
        self.lm, self.s, self.B, self.P, self.grid = lm, sampling, batch, prompt_len, grid
        emb = lm.backbone.get_input_embeddings().weight
        dev, dt = emb.device, emb.dtype
        self.reps = 2 if sampling.cfg_scale != 1.0 else 1
        R, (h, w), N, D = batch * self.reps, grid, lm.vocab.N, lm.hidden_size
        plan = BlockDoc()
        lm.layout.add_image(plan, h, w, True)
        toks = plan.tokens[:-1]  # <|vision_end|> is not fed
        self.T, self.visual_at = len(toks), [i for i, t in enumerate(toks) if t == VISUAL]
        segments, cur = [], []  # the forced blocks before each row of visual blocks
        for t in toks:
            if t != VISUAL:
                cur.append(t)
            elif cur:
                segments.append(cur)
                cur = []
        assert len(segments) == h and len(self.visual_at) == h * w, "unexpected image layout"
        M = max(len(sg) for sg in segments)
        self.marker_ids = torch.tensor([sg + [sg[-1]] * (M - len(sg)) for sg in segments], device=dev)
        self.marker_len = torch.tensor([len(sg) for sg in segments], device=dev)
        self.L = prompt_len + self.T + M  # padded marker blocks may write up to M - 1 past the image
        cfg = lm.backbone.config
        kvh = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        hd = _layers(lm.body)[0].self_attn.head_dim
        self.kv = [(torch.zeros(R, kvh, self.L, hd, device=dev, dtype=dt),
                    torch.zeros(R, kvh, self.L, hd, device=dev, dtype=dt)) for _ in _layers(lm.body)]
        self.kidx = torch.arange(self.L, device=dev)
        self.keyok = torch.zeros(R, self.L, dtype=torch.bool, device=dev)
        self.cos = torch.zeros(R, self.L, hd, device=dev, dtype=dt)
        self.sin = torch.zeros_like(self.cos)
        self.marker_emb = torch.zeros(h, M, D, device=dev, dtype=dt)
        self.cursor = torch.zeros(1, dtype=torch.long, device=dev)  # next cache position
        self.k = torch.zeros(1, dtype=torch.long, device=dev)  # next visual block
        self.row = torch.zeros(1, dtype=torch.long, device=dev)  # next row
        self.h = torch.zeros(R, D, device=dev, dtype=dt)
        self.codes = torch.zeros(batch, h * w, N, dtype=torch.long, device=dev)
        self.states = torch.zeros(batch, self.T + M, D, device=dev, dtype=dt)
        self.noise = (torch.zeros(h * w, N, batch, lm.vocab.K, device=dev) if sampling.temperature > 0 else None)
        if isinstance(lm.decoder, BlockDecoder):
            body = lm.decoder.body
            z = torch.zeros(1, device=dev, dtype=lm.decoder.proj_in.weight.dtype)
            self.dec_cos, self.dec_sin = body.rotary_emb(z, torch.arange(N, device=dev)[None])
        self.cursor.fill_(prompt_len)  # where the first image block goes (warm-up steps write there)
        self.graphs = self._capture() if graphs else None

    # -- the steps (fixed shapes, indices on the device)
    def _chunk(self, x: torch.Tensor, keep_states: bool = True) -> torch.Tensor:
        """Feed ``x [R, L, D]`` at the cursor (caches written in place) -> hidden states ``[R, L, D]``."""
        idx = self.cursor + torch.arange(x.shape[1], device=x.device)
        cos, sin = self.cos.index_select(1, idx), self.sin.index_select(1, idx)
        later = self.kidx[None, :] > idx[:, None]  # [L, Lc]
        own = self.kidx[None, :] == idx[:, None]  # a padding query sees itself, so no row is empty
        mask = (~later & (self.keyok[:, None, :] | own))[:, None]

        for layer, (kc, vc) in zip(_layers(self.lm.body), self.kv):
            def kv(k, v, kc=kc, vc=vc):
                kc.index_copy_(2, idx, k.to(kc.dtype))
                vc.index_copy_(2, idx, v.to(vc.dtype))
                return kc, vc
            x = _layer(layer, x, cos, sin, kv, mask)
        if keep_states:
            self.states.index_copy_(1, idx - self.P, x[: self.B].to(self.states.dtype))
        return x

    def _decoder_out(self, x: torch.Tensor, j: int, cache) -> torch.Tensor:
        """Block-decoder output of slot ``j`` (as the decoder's ``step``; ``cache``, a list for a
        :class:`BlockDecoder`, a dict for :class:`ParallelHeads`, grows by one slot)."""
        dec = self.lm.decoder
        if not isinstance(dec, BlockDecoder):  # ParallelHeads, ReleaseBlockDecoder: their own step
            return dec.step(x, j, cache, kind="visual")
        z = dec.proj_in(x[:, None]) + dec.slot_embed.weight[j]
        cos, sin = self.dec_cos[:, j:j + 1], self.dec_sin[:, j:j + 1]
        layers = _layers(dec.body)
        if not cache:
            cache.extend(([], []) for _ in layers)
        for layer, (ks, vs) in zip(layers, cache):
            def kv(k, v, ks=ks, vs=vs):
                ks.append(k)
                vs.append(v)
                return torch.cat(ks, 2), torch.cat(vs, 2)
            z = _layer(layer, z, cos, sin, kv, None)
        return x + dec.proj_out(dec.body.norm(z)[:, 0])

    def _pick(self, logits: torch.Tensor, j: int) -> torch.Tensor:
        if self.reps == 2:
            cond, uncond = logits.chunk(2)
            logits = uncond + self.s.cfg_scale * (cond - uncond)
        if self.noise is None:
            return logits.argmax(-1)
        return (masked_logits(logits, self.s) + self.noise.index_select(0, self.k)[0, j]).argmax(-1)

    def _visual_step(self):
        """Draw block k from ``h`` slot by slot, then feed it to the backbone."""
        lm, x, codes = self.lm, self.h, []
        cache = {} if isinstance(lm.decoder, ParallelHeads) else []
        for j in range(lm.vocab.N):
            c = self._pick(lm.slot_logits(self._decoder_out(x, j, cache), j, "visual"), j)
            codes.append(c)
            if j + 1 < lm.vocab.N:
                prev = c.repeat(self.reps)
                x = lm.code_embed(torch.full_like(prev, j), prev).to(self.h.dtype)
        c = torch.stack(codes, -1)
        self.codes.index_copy_(1, self.k, c[:, None])
        out = self._chunk(_block_embed(lm, c.repeat(self.reps, 1))[:, None].to(self.h.dtype))
        self.h.copy_(out[:, 0])
        self.cursor += 1
        self.k += 1

    def _marker_step(self):
        """Feed the next row's forced blocks at once (padded; the cursor moves by their true count)."""
        x = self.marker_emb.index_select(0, self.row).expand(self.h.shape[0], -1, -1)
        n = self.marker_len.index_select(0, self.row)
        self.h.copy_(self._chunk(x).index_select(1, n - 1)[:, 0])
        self.cursor += n
        self.row += 1

    @torch.no_grad()
    def _warm_up(self):
        """Run each step twice from the current state, then restore counters and ``h``: its writes
        land at and past the cursor, where a run writes again before reading."""
        keep = [t.clone() for t in (self.cursor, self.k, self.row, self.h)]
        for _ in range(2):
            for fn in (self._marker_step, self._visual_step):
                for t, v in zip((self.cursor, self.k, self.row, self.h), keep):
                    t.copy_(v)
                fn()
        for t, v in zip((self.cursor, self.k, self.row, self.h), keep):
            t.copy_(v)

    @torch.no_grad()
    def _capture(self) -> dict:
        """CUDA graphs of both steps (capture records, it does not run them), after a warm-up on a
        side stream."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._warm_up()
        torch.cuda.current_stream().wait_stream(side)
        pool, graphs = torch.cuda.graph_pool_handle(), {}
        for name, fn in (("marker", self._marker_step), ("visual", self._visual_step)):
            graphs[name] = torch.cuda.CUDAGraph()
            # autocast's cache of cast weights would be freed after capture while the graph reads it
            amp = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False,
                                 enabled=torch.is_autocast_enabled("cuda"))
            with amp, torch.cuda.graph(graphs[name], pool=pool):
                fn()
        return graphs

    def _step(self, name: str):
        if self.graphs is not None:
            self.graphs[name].replay()
        else:
            (self._visual_step if name == "visual" else self._marker_step)()

    # -- one call: prepare (host work, a few syncs), decode (no sync), result
    @torch.no_grad()
    def prepare(self, embeds: torch.Tensor, mask: torch.Tensor, seed: int | None):
        """Load prompt blocks ``embeds [R, p, D]``, ``mask [R, p]`` (left padded, p <= prompt_len):
        position tables, key mask, marker embeddings, noise; then prefill the caches."""
        lm, dev = self.lm, self.h.device
        if embeds.shape[0] != self.h.shape[0] or embeds.shape[1] > self.P:
            raise ValueError(f"prompt blocks {tuple(embeds.shape[:2])} do not fit this generator "
                             f"({self.h.shape[0]} rows, {self.P} blocks)")
        first = self.P - mask.sum(1)  # each row's first prompt block
        self.keyok.copy_(self.kidx[None, :] >= first[:, None])
        pos = (self.kidx[None, :] - first[:, None]).clamp(min=0)
        cos, sin = lm.body.rotary_emb(self.h, pos)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        ids = self.marker_ids
        self.marker_emb.copy_(lm.embed_blocks(ids, torch.full((*ids.shape, lm.vocab.N), -1, device=dev)))
        if self.noise is not None:
            self.noise.copy_(gumbel_noise(*self.noise.shape[:3], lm.vocab.K, seed, dev))
        for t in (self.cursor, self.k, self.row):
            t.zero_()
        x = F.pad(embeds, (0, 0, self.P - embeds.shape[1], 0)).to(self.h.dtype)
        self._chunk(x, keep_states=False)
        self.cursor.fill_(self.P)

    @torch.no_grad()
    def decode(self):
        """Every row: its marker step, then its ``w`` visual steps (graph replays on CUDA)."""
        h, w = self.grid
        for _ in range(h):
            self._step("marker")
            for _ in range(w):
                self._step("visual")

    @torch.no_grad()
    def end_step(self):
        """Feed ``<|vision_end|>`` after the image: its state is the condition's last (the release's range)."""
        lm = self.lm
        end = torch.full((1, 1), lm.vocab.vision_end, device=self.h.device)
        x = lm.embed_blocks(end, torch.full((1, 1, lm.vocab.N), -1, device=self.h.device))
        self._chunk(x.expand(self.h.shape[0], -1, -1).to(self.h.dtype))
        self.cursor += 1

    def result(self, include_markers: bool, include_end: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes ``[B, h*w, N]`` and condition states ``[B, T, D]`` (visual blocks only without markers;
        ``<|vision_end|>``'s state last with ``include_end``, after :meth:`end_step`)."""
        states = self.states[:, : self.T + include_end]
        if not include_markers:
            keep = self.visual_at + ([self.T] if include_end else [])
            states = states[:, torch.tensor(keep, device=states.device)]
        return self.codes.clone(), states.clone()

    def run(self, embeds: torch.Tensor, mask: torch.Tensor, seed: int | None, include_markers: bool = True,
            include_end: bool = False):
        self.prepare(embeds, mask, seed)
        self.decode()
        if include_end:
            self.end_step()
        return self.result(include_markers, include_end)


def _generator_for(lm, key: tuple, make) -> FastImageGenerator:
    """A cached generator of ``lm`` for ``key`` (same shapes, sampling and weight storage), else ``make()``."""
    kept = _GENERATORS.setdefault(lm, {})
    if key not in kept:
        if len(kept) >= _KEEP:
            kept.pop(next(iter(kept)))
        kept[key] = make()
    return kept[key]


@torch.no_grad()
def fast_generate_image(lm, prompts: list[str], grid: tuple[int, int], sampling: Sampling | None = None,
                        include_markers: bool = True, graphs: bool | None = None, include_end: bool = False):
    """:func:`~kelix.llm.generate.generate_image` on the fast path (same arguments and returns).

    Args:
        graphs: replay CUDA graphs of the steps (default: on CUDA); off, the steps run eagerly.
    """
    s = sampling or Sampling()
    why = unsupported(lm)
    if why:
        raise ValueError(f"fast image generation cannot run this model: {why} (use generate_image(fast=False))")
    lm.eval()
    docs = [prompt_doc(lm, p) for p in prompts]
    if s.cfg_scale != 1.0:
        docs += [prompt_doc(lm, "") for _ in prompts]
    embeds, mask = _left_pad(lm, docs)
    dev = embeds.device
    use_graphs = dev.type == "cuda" if graphs is None else graphs
    if use_graphs and dev.type != "cuda":
        raise ValueError(f"graphs=True needs a CUDA model, this one is on {dev}")
    P = -(-embeds.shape[1] // PAD_TO) * PAD_TO
    weights = tuple(t.data_ptr() for t in lm.parameters())  # graphs hold these addresses
    key = (len(prompts), P, tuple(grid), s.temperature, s.top_k, s.top_p, s.cfg_scale, use_graphs,
           torch.is_autocast_enabled(dev.type), hash(weights))
    gen = _generator_for(lm, key, lambda: FastImageGenerator(lm, len(prompts), P, tuple(grid), s, use_graphs))
    codes, states = gen.run(embeds, mask, s.seed, include_markers, include_end)
    B, (h, w) = len(prompts), grid
    return codes.reshape(B, h, w, -1), states, torch.ones(states.shape[:2], dtype=torch.bool, device=dev)
