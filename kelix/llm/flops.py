"""Model FLOPs of a :class:`~kelix.llm.model.KelixLM` training step: the MFU the throughput callback logs and
``kelix estimate`` reports. Kept apart from the model's math: it counts, it computes nothing the model uses."""

from __future__ import annotations


def train_flops(lm, rows: int, length: int, square_sum=None, visual_blocks=None):
    """Model FLOPs of one training step (forward + backward, 3x the forward's 2 per weight per
    block) on ``rows x length`` blocks: the backbone's weights (embedding tables excluded), causal
    attention within each document, the slot heads (slot 0 over text ids and sub-codebook 0, then
    K rows per further slot of a visual block) and the block decoder (one slot for a text block,
    N for a visual one; with ``eob_scoring: full`` one more per block, every slot over every id).
    ``square_sum``: the sum of squared document lengths (default one document per row;
    :func:`~kelix.llm.attention.square_sum` gives it from position ids on the device);
    ``visual_blocks``: their number (default all). Both may be device tensors: no host sync."""
    cfg, v = lm.backbone.config, lm.vocab
    blocks = rows * length
    sq = rows * length * length if square_sum is None else square_sum
    vis = blocks if visual_blocks is None else visual_blocks
    params = sum(p.numel() for n, p in lm.body.named_parameters() if "embed" not in n)
    hd = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    heads = lm.hidden_size * ((v.visual_offset + v.K) * blocks + (v.N - 1) * v.K * vis)
    slots = blocks + (v.N - 1) * vis
    if lm.config.eob_scoring == "full":  # one more slot per block (<eob>), each over every id
        slots = slots + blocks
        heads = lm.hidden_size * (v.visual_offset + v.N * v.K) * slots
    dec = sum(p.numel() for p in lm.decoder.parameters()) * slots
    return 6 * (params * blocks + heads + dec) + 6 * cfg.num_hidden_layers * hd * sq  # attention: 2 matmuls, causal
