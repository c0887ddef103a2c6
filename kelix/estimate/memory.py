"""Memory per GPU, FLOPs and time of one optimizer step, from the meta-built parts and the run shape.

Memory at the step's peak (the start of backward: every saved activation is alive, the first gradients
arrive), per GPU:

* weights, gradients and AdamW's two moments in each parameter's dtype (1/G of each under FSDP2);
* FSDP2's gathered copies (``fsdp_param_dtype``): the root's parameters stay gathered from forward to backward
  (the kit's roots: embeddings, head, block decoder), plus two blocks in flight;
* autocast's bf16 copies of fp32 trainable matmul weights (``bf16-mixed`` without FSDP2's ``param_dtype``),
  saved for backward (not under activation checkpointing, which drops them with the activations);
* activations saved for backward: for every backbone layer, the tensors a transformers decoder layer saves
  (:func:`decoder_layer_bytes`, counted tensor by tensor); with activation checkpointing only each layer's
  input (the backbone's backward then recomputes one layer at a time, after the block decoder's and the
  heads' activations are freed: a second candidate peak); the block decoder's slots; the slot heads' logits
  (``loss_chunk`` rows at a time once there are more);
* the later peak (after backward): every gradient plus AdamW's temporaries.

``HEADROOM`` of the GPU is kept for the CUDA context, NCCL buffers and allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

GIB = 2**30
HEADROOM = 0.08
H100_BF16 = 989e12  # dense bf16 peak, H100/H200 SXM


def decoder_layer_bytes(D: int, q: int, kv: int, F: int, heads: int, a: int, r: int, trainable: bool,
                        lora_inputs: tuple[int, ...] = (), lora_dropout: bool = False) -> int:
    """Bytes a transformers decoder layer (RMSNorm, GQA attention with q/k norms, SwiGLU MLP: Qwen3, Llama)
    saves for backward per token. ``a``: activation bytes (2 under bf16 autocast), ``r``: the residual stream's
    (the parameters' dtype), ``trainable``: its weights get gradients (a frozen linear keeps no copy of its
    input), ``lora_inputs``: in-features of the layer's LoRA-adapted linears (each adapter keeps its input)."""
    cast = a != r  # autocast casts the norm outputs once per linear that reads them
    norms = 2 * (4 * D + (r * D if trainable else 0))  # fp32 input (or its fp32 copy), normalised output
    inputs = (3 * a * D + 2 * a * D if cast else 0) if trainable else 0  # q/k/v and gate/up inputs cast apart
    qk_norms = (4 + (a if trainable else 0)) * (q + kv)
    sdpa = a * (q + 2 * kv) + a * q + 4 * heads  # q, k, v, output, log-sum-exp (flash/efficient kernels)
    o_in = a * q if trainable else 0  # the output's contiguous copy, o_proj's input
    mlp = 3 * a * F + (a * F if trainable else 0)  # gate, SiLU(gate), up; their product (down_proj's input)
    lora = 0
    for n in lora_inputs:  # an adapter keeps its (dropped-out) input; dropout also its mask
        lora += (a * n + n) if lora_dropout else (a * n if (cast or not trainable) else 0)
    return norms + inputs + qk_norms + sdpa + o_in + mlp + lora


@dataclass
class Memory:
    """Bytes per GPU of each term at the step's peak (see the module docstring)."""

    weights: int
    gradients: int
    optimizer: int
    gathered: int
    autocast_copies: int
    activations: int  # saved at the start of backward (backbone, block decoder, slot heads)
    loss: int  # the slot heads' logits and their gradients while the head's backward runs
    recompute: int  # checkpointing: one backbone layer's activations, rebuilt in its backward
    backbone_saved: int  # what of `activations` the backbone holds (all of it left when `recompute` happens)
    later_peak: int  # after backward: all gradients + AdamW temporaries (instead of activations)
    checkpointing: bool

    @property
    def total(self) -> int:
        static = self.weights + self.optimizer + self.gathered
        head = self.autocast_copies + self.activations + self.loss + self.gradients  # the head's backward
        body = self.backbone_saved + self.recompute + self.gradients  # a checkpointed layer's backward
        return static + max(head, body, self.later_peak)


def _sum_bytes(params, trainable: bool | None = None) -> int:
    return sum(p.numel() * p.element_size() for p in params if trainable is None or p.requires_grad == trainable)


@dataclass
class LLMRun:
    """What the LLM's memory and FLOPs depend on besides the run shape.

    Args:
        checkpointing: ``activation_checkpointing`` of the module.
        fsdp_param_dtype: FSDP2's gather dtype (``bfloat16``) or None.
        visual_frac: share of the target blocks that are visual (they fill N decoder slots, not 1).
        fused_optimizer: AdamW ``fused=True`` (no temporaries); the kit's default (``foreach`` on CUDA) holds
            one temporary the size of the trainable weights while it steps.
    """

    checkpointing: bool
    fsdp_param_dtype: str | None
    visual_frac: float = 0.5
    fused_optimizer: bool = False


def llm_memory(lm, parts, shape, run: LLMRun) -> Memory:
    """Memory per GPU of a ``UnifiedLLMModule`` run (``lm`` and ``parts`` from :func:`~kelix.estimate.models.llm_parts`)."""
    from peft.tuners.lora import LoraLayer

    G = shape.gpus if shape.strategy == "fsdp2" else 1
    model_params = list(lm.parameters())
    other = [p for part in parts if part.on_gpu for p in part.params if all(p is not q for q in model_params)]
    cfg, v = lm.backbone.config, lm.vocab
    D, layers = lm.hidden_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or D // cfg.num_attention_heads
    q, kv, F = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    r = lm.body.layers[0].input_layernorm.weight.element_size()
    if shape.strategy == "fsdp2" and run.fsdp_param_dtype in ("bfloat16", "float16"):
        r = 2  # FSDP2 computes with the gathered bf16 weights: the residual stream is bf16 too
    a = 2 if shape.mixed else r
    layer0 = lm.body.layers[0]
    base_trainable = any(p.requires_grad for n, p in layer0.named_parameters() if ".lora_" not in n)
    lora_in = tuple(m.in_features for m in layer0.modules() if isinstance(m, LoraLayer))
    dropout = any(isinstance(d, nn.Dropout) for m in layer0.modules() if isinstance(m, LoraLayer)
                  for d in m.lora_dropout.values())
    per_layer = decoder_layer_bytes(D, q, kv, F, cfg.num_attention_heads, a, r, base_trainable, lora_in, dropout)
    T = shape.micro_batch * shape.row_length
    backbone = T * layers * (r * D if run.checkpointing else per_layer)  # checkpointing: each layer's input
    # block decoder: one slot per text target, N per visual one
    Pv = int(T * run.visual_frac)
    slots = T - Pv + v.N * Pv
    dec = lm.decoder
    if hasattr(dec, "body"):
        dcfg = dec.body.config
        dr = dec.proj_in.weight.element_size()
        dec_trainable = dec.proj_in.weight.requires_grad
        w = dcfg.hidden_size
        dec_layer = decoder_layer_bytes(w, w, dcfg.num_key_value_heads * dcfg.head_dim, dcfg.intermediate_size,
                                        dcfg.num_attention_heads, 2 if shape.mixed else dr, dr, dec_trainable)
        decoder = slots * (dcfg.num_hidden_layers * dec_layer + (2 * r + a) * D + a * w)
    else:  # parallel heads: h_i and each head's output
        decoder = slots * 2 * r * D
    # slot heads: logits of `loss_chunk` rows exist at once (recomputed in backward) once rows exceed it
    chunk, V0 = lm.config.loss_chunk, v.visual_offset + v.K
    heads = [(T, V0)] + [(Pv, v.K)] * (v.N - 1)
    saved = sum(rows * cols * 10 for rows, cols in heads if rows <= chunk)
    transient = max(min(rows, chunk) * cols * 16 for rows, cols in heads)
    acts = backbone + decoder + saved
    # weights and optimizer: the model's parameters are sharded under FSDP2, frozen extra networks are not
    weights = _sum_bytes(model_params) // G + _sum_bytes(other)
    train_bytes = _sum_bytes(model_params, True)
    optimizer = 2 * train_bytes // G
    blocks = list(lm.body.layers)
    block_params = {id(p) for b in blocks for p in b.parameters()}
    root = [p for p in model_params if id(p) not in block_params]
    gather_b = 2 if run.fsdp_param_dtype in ("bfloat16", "float16") else None
    if shape.strategy == "fsdp2":
        gb = (lambda ps: sum(p.numel() for p in ps) * gather_b) if gather_b else _sum_bytes
        gathered = gb(root) + 2 * gb(list(blocks[0].parameters()))
        early_grads = sum(p.numel() for p in root if p.requires_grad) * (gather_b or 4)  # root grads, unsharded
        copies = 0
    else:
        gathered = 0
        emb = lm.backbone.get_input_embeddings().weight  # its gradient comes last, after the activations are gone
        early_grads = _sum_bytes([p for p in root if p.requires_grad and p is not emb])
        mats = [p for b in [*blocks, lm.decoder] for p in b.parameters()
                if p.requires_grad and p.ndim >= 2 and p.element_size() == 4]
        # kept from forward to backward as saved tensors: under checkpointing they are dropped with the rest
        copies = 2 * sum(p.numel() for p in mats) if shape.mixed and not run.checkpointing else 0
    later = train_bytes // G * (1 if run.fused_optimizer else 2)  # every gradient (+ AdamW's temporaries)
    recompute = T * per_layer if run.checkpointing else 0
    return Memory(weights, early_grads, optimizer, gathered, copies, acts, transient, recompute, backbone, later,
                  run.checkpointing)


def llm_step_flops(lm, shape, visual_frac: float) -> float:
    """Model FLOPs of one optimizer step on one GPU (:meth:`KelixLM.train_flops`; frozen weights get no
    weight gradients, so they cost 4 FLOPs per weight per block instead of 6)."""
    rows, L = shape.micro_batch, shape.row_length
    T = rows * L
    flops = lm.train_flops(rows, L, visual_blocks=int(T * visual_frac))
    frozen = sum(p.numel() for n, p in lm.body.named_parameters() if not p.requires_grad and "embed" not in n)
    return float(flops - 2 * frozen * T) * shape.accumulate


def with_shape(shape, **changes):
    return replace(shape, **changes)


def saved_bytes(fn, params=()) -> int:
    """Bytes of the tensors autograd saves while ``fn()`` runs (on ``meta``: shapes only), each storage once,
    the storages of ``params`` (the weights, counted apart) left out."""
    import torch

    seen: dict[int, int] = {}
    weights = {p.untyped_storage()._cdata for p in params}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in weights:
            seen[s._cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def dit_memory(model, parts, shape, checkpointing: bool, fsdp_param_dtype: str | None, tokens: int,
               cond_len: int) -> Memory:
    """Memory per GPU of a ``DiTModule`` run. Activations are traced: one and two of the transformer's blocks
    run on ``meta`` tensors (bf16 under mixed precision) of a micro-batch of ``tokens`` latent tokens and
    ``cond_len`` condition states, and the saved bytes counted (the second block's are a block's)."""
    import copy

    import torch

    G = shape.gpus if shape.strategy == "fsdp2" else 1
    tr = model.transformer
    cfg = tr.config
    dtype = torch.bfloat16 if shape.mixed else torch.float32
    side = int(round(tokens ** 0.5)) * cfg.patch_size
    B = shape.micro_batch

    def trace(n_blocks: int) -> int:
        import logging

        m = copy.deepcopy(tr)
        m.transformer_blocks = m.transformer_blocks[:n_blocks]
        quiet = logging.getLogger("diffusers")
        level, _ = quiet.level, quiet.setLevel(logging.ERROR)  # a cast on meta needs no float32 advice
        m = m.to(dtype)
        quiet.setLevel(level)
        x = torch.zeros(B, cfg.in_channels, side, side, device="meta", dtype=dtype)
        c = torch.zeros(B, cond_len, cfg.caption_channels, device="meta", dtype=dtype)
        t = torch.zeros(B, device="meta")
        return saved_bytes(lambda: m(x, encoder_hidden_states=c, timestep=t), list(m.parameters()))

    one, two = trace(1), trace(2)
    block, stem = two - one, 2 * one - two
    n = len(tr.transformer_blocks)
    width = cfg.num_attention_heads * cfg.attention_head_dim
    r = 4  # fp32 weights: the residual stream stays fp32 under autocast
    backbone = B * tokens * n * r * width if checkpointing else n * block
    recompute = block if checkpointing else 0
    dit_params = [p for part in parts[:2] for p in part.params]
    ema = parts[2].params
    others = [p for part in parts[3:] for p in part.params]
    weights = (_sum_bytes(dit_params) + _sum_bytes(ema)) // G + _sum_bytes(others)
    train_bytes = _sum_bytes(dit_params, True)
    gathered = 0
    if shape.strategy == "fsdp2":
        per = 2 if fsdp_param_dtype in ("bfloat16", "float16") else 4
        blk = sum(p.numel() for p in tr.transformer_blocks[0].parameters())
        gathered = 2 * blk * per
    copies = 2 * sum(p.numel() for p in dit_params if p.ndim >= 2) if shape.mixed and shape.strategy != "fsdp2" \
        and not checkpointing else 0
    return Memory(weights, 0, 2 * train_bytes // G, gathered, copies, backbone + stem, 0, recompute, backbone,
                  train_bytes // G * 2, checkpointing)
