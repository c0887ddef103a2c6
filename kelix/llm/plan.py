"""The step plan: every data-dependent index of a training step, computed on the host at collate time.

Selecting target and visual blocks with boolean masks (``targets.nonzero()``, ``h[~is_vis]``,
``bool(is_vis.any())``) makes the device report a count back to the host before it can size the
next tensor: a sync that stalls the CUDA queue several times per step. The batch already knows all
of it when :func:`~kelix.llm.data.collate_docs` builds it, so :func:`step_plan` writes it down there
(int64 index tensors, which travel to the device with the batch, and Python ints that stay on the
host); :meth:`KelixLM.forward <kelix.llm.model.KelixLM.forward>` and
:func:`~kelix.llm.loss.nbp_loss` then only gather with those indices. A batch without a plan
(generation, evaluation helpers, other callers) takes the boolean-mask path, which gives the same
values.

Plan keys (P target blocks, Pt text and Pv visual ones, in row-major order):

* ``rows``, ``pos`` ``[P]``: row and position of each target's predicting hidden state ``h_i``
  (the target block is ``i + 1``); ``text`` ``[Pt]`` and ``visual`` ``[Pv]``: indices into P;
* ``visual_blocks`` ``[Nv]``: flat indices into ``B*L`` of every visual input block;
* ``cu_seqlens`` (int32) and ``doc_bounds`` (the same as a host list): the documents of the rows
  flattened into one (:func:`~kelix.llm.attention.doc_bounds`);
* ``n_text``, ``n_visual``, ``n_visual_blocks``: the counts, as Python ints;
* ``image_grids``: ``(h, w)`` of each pixel image (what the module checks the tokenizer's grids against).
"""

from __future__ import annotations

import torch

from kelix.llm.attention import doc_bounds


def step_plan(tokens: torch.Tensor, targets: torch.Tensor, position_ids: torch.Tensor,
              image_grids: list[tuple[int, int]] = ()) -> dict:
    """The plan (see module docstring) of a collated batch's host tensors ``[B, L]``; ``image_grids``:
    the ``(h, w)`` of each pixel image, kept as a host list."""
    rows, pos = targets[:, 1:].nonzero(as_tuple=True)
    vis = tokens[rows, pos + 1] < 0
    text_idx, vis_idx = (~vis).nonzero().flatten(), vis.nonzero().flatten()
    blocks = (tokens.flatten() < 0).nonzero().flatten()
    cu = doc_bounds(position_ids)
    return dict(rows=rows, pos=pos, text=text_idx, visual=vis_idx, visual_blocks=blocks, cu_seqlens=cu,
                doc_bounds=cu.tolist(), n_text=len(text_idx), n_visual=len(vis_idx), n_visual_blocks=len(blocks),
                image_grids=[tuple(g) for g in image_grids])


def text_only(plan: dict) -> dict:
    """The plan with its visual targets dropped (a continuous model predicts text blocks only)."""
    text = plan["text"]
    return {**plan, "rows": plan["rows"].index_select(0, text), "pos": plan["pos"].index_select(0, text),
            "text": torch.arange(plan["n_text"], device=text.device), "visual": text[:0], "n_visual": 0}


def scatter_rows(n: int, parts: list[tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
    """``[n, ...]`` zeros with each ``(index, rows)`` of ``parts`` copied in at ``index`` (out of place,
    so autograd sees it): the plan's answer to ``out[mask] = rows``."""
    out = like.new_zeros(n, *like.shape[1:])
    for index, rows in parts:
        out = out.index_copy(0, index, rows.to(out.dtype))
    return out
