"""The LLM's hidden states of an image: the DiT's condition (paper 4.4.1).

For text-to-image the DiT is conditioned on the LLM's last-layer hidden states of the generated
image's positions, taken before the final norm (as the official code). Training the DiT needs the
same states for known images: :func:`image_condition_states` runs the text-to-image chat sequence
teacher-forced. A generator collects exactly these positions: the hidden state computed when each
block from ``<|vision_start|>`` up to the block before ``<|vision_end|>`` is fed to the backbone.
The released Kelix-DiT conditions on ``<|vision_start|>`` to ``<|vision_end|>`` inclusive, zero-padded
to its ``model_max_length`` (720): ``include_end=True, pad_to=720``.
"""

from __future__ import annotations

import torch

from kelix.llm.data import collate_docs
from kelix.llm.layout import t2i_doc


@torch.no_grad()
def image_condition_states(lm, prompts: list[str], codes: list[torch.Tensor], include_markers: bool = True,
                           include_end: bool = False, pad_to: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of each image in its text-to-image sequence.

    Each item is laid out as ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`` followed
    by the image (``<|vision_start|>``, row markers and visual blocks, ``<|vision_end|>``) and
    ``<|im_end|>``, and run through the backbone teacher-forced under ``no_grad``.

    Args:
        lm: a :class:`~kelix.llm.model.KelixLM`.
        prompts: one prompt per image.
        codes: code grids ``[h, w, N]`` (values 0..K-1).
        include_markers: keep every position from ``<|vision_start|>`` up to but excluding
            ``<|vision_end|>`` (``1 + h * (w + marker blocks)`` states); False keeps only the ``h*w``
            visual blocks, in raster order.
        include_end: with ``include_markers``, also keep the ``<|vision_end|>`` position (the released
            Kelix-DiT's condition: ``<|vision_start|>`` to ``<|vision_end|>`` inclusive).
        pad_to: zero-pad every item to this length ``L`` (the release pads to ``model_max_length``);
            longer conditions are cut to it, as the release does. None: pad to the longest item.

    Returns:
        ``states [B, L, D]`` (pre-norm, left-aligned, zero padded) and ``mask [B, L]`` (valid positions).
    """
    if len(prompts) != len(codes):
        raise ValueError(f"{len(prompts)} prompts for {len(codes)} code grids")
    if include_end and not include_markers:
        raise ValueError("include_end needs include_markers (the range <|vision_start|> .. <|vision_end|>)")
    if pad_to is not None and pad_to < 1:
        raise ValueError(f"pad_to must be >= 1, got {pad_to}")
    N = lm.vocab.N
    docs, refs = [], []
    for p, c in zip(prompts, codes):
        if c.ndim != 3 or c.shape[-1] != N:
            raise ValueError(f"code grid must be [h, w, {N}], got {tuple(c.shape)}")
        doc, ref = t2i_doc(lm.layout, p, c.cpu())
        docs.append(doc)
        refs.append(ref)
    tok = lm.text_tokenizer
    batch = collate_docs(docs, N, pad_id=tok.pad_token_id or 0, pack=False)
    device = next(lm.parameters()).device
    tokens, bcodes = batch["tokens"].to(device), batch["codes"].to(device)
    L = tokens.shape[1]
    # right padding needs no mask under causal attention: positions simply continue
    pos = torch.arange(L, device=device).expand_as(tokens)
    h, _ = lm.hidden(lm.embed_blocks(tokens, bcodes), pos)
    picks = [list(range(r.start, r.end + int(include_end))) if include_markers else r.positions for r in refs]
    if pad_to is not None:
        picks = [p[:pad_to] for p in picks]
    width = pad_to or max(len(p) for p in picks)
    states = h.new_zeros(len(docs), width, h.shape[-1])
    mask = torch.zeros(len(docs), width, dtype=torch.bool, device=device)
    for b, idx in enumerate(picks):
        states[b, : len(idx)] = h[b, idx]
        mask[b, : len(idx)] = True
    return states, mask
