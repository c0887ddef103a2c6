"""Next-block prediction loss (paper Eq. 6) from the model's per-token NLLs over slot-restricted logits
(:meth:`~kelix.llm.model.KelixLM.slot_nll`, computed chunk by chunk inside the model's forward).

Per target block the negative log-likelihood of its tokens: slot 0 (a text id or a code of
sub-codebook 0), then the codes of slots 1..N-1 of a visual block. With ``lm.eob_scoring: implied``
``<eob>`` is implied by the block kind: its probability under the slot restriction is 1 and its NLL
exactly 0, so it is not computed. With ``full`` (the official loss) every token is scored over the whole
vocabulary and the block's ``<eob>`` NLL (``pred.nll_eob``) is one more token of it, in both weightings.

``block_loss``:

* ``sum`` (Eq. 6): a block's loss is the sum of its tokens' NLL; the batch loss is the mean over
  target blocks (on text-only data this is the usual per-token LM loss).
* ``equal_block`` (the official code's choice): tokens are weighted so every block carries the same
  total, weight ``(M_text + M_visual) / (2 M)`` with M counting ``<eob>`` (2.75 for text tokens and
  0.611 for image tokens at N = 8); the batch loss is the weighted sum over the number of target
  tokens, ``<eob>`` included (as the official code normalises).
"""

from __future__ import annotations

import torch

from kelix.llm.model import BlockPrediction

BLOCK_LOSSES = ("sum", "equal_block")


def nbp_loss(pred: BlockPrediction, N: int, block_loss: str = "sum") -> dict[str, torch.Tensor]:
    """Loss and logged terms of a :class:`~kelix.llm.model.BlockPrediction`.

    Returns ``loss`` plus ``nll_text`` (mean NLL of text targets), ``nll_visual`` (mean per code),
    ``nll_slot{j}`` (mean per slot of visual targets), ``acc_text`` / ``acc_visual`` (top-1 of
    slot 0 / of all codes) and the counts ``blocks_text`` and ``blocks_visual``.
    """
    if block_loss not in BLOCK_LOSSES:
        raise ValueError(f"block_loss {block_loss!r} is not one of {', '.join(BLOCK_LOSSES)}")
    vis, plan = pred.is_visual, pred.plan
    nll0, nll_c = pred.nll0, pred.nll_codes  # [P], [Pv, N-1]
    if plan is None:  # boolean masks: the counts are read back from the device
        n_text, n_vis = int((~vis).sum()), int(vis.sum())
        text_idx, vis_idx = (~vis).nonzero().flatten(), vis.nonzero().flatten()
    else:  # the step plan's (kelix.llm.plan): counted on the host, no sync
        n_text, n_vis, text_idx, vis_idx = plan["n_text"], plan["n_visual"], plan["text"], plan["visual"]
    zero = nll0.sum() * 0.0  # keeps the graph connected when a kind is absent
    eob = pred.nll_eob
    if block_loss == "sum":
        total = nll0.sum() + nll_c.sum() + (eob.sum() if eob is not None else zero)
        loss = total / max(1, n_text + n_vis)
    else:
        m_text, m_vis = 2, N + 1
        w_text, w_vis = (m_text + m_vis) / (2 * m_text), (m_text + m_vis) / (2 * m_vis)
        w0 = torch.where(vis, w_vis, w_text)
        total = (w0 * (nll0 + eob if eob is not None else nll0)).sum() + w_vis * nll_c.sum()
        loss = total / max(1, n_text * m_text + n_vis * m_vis)
    out = {"loss": loss}
    if eob is not None:
        out["nll_eob"] = eob.detach().mean() if eob.numel() else zero.detach()
    with torch.no_grad():
        pred0 = pred.hit0
        out["nll_text"] = nll0.index_select(0, text_idx).mean() if n_text else zero.detach()
        out["acc_text"] = pred0.index_select(0, text_idx).float().mean() if n_text else zero.detach()
        if n_vis:
            codes_nll = torch.cat([nll0.index_select(0, vis_idx)[:, None], nll_c], 1)  # [Pv, N]
            out["nll_visual"] = codes_nll.mean()
            for j in range(N):
                out[f"nll_slot{j}"] = codes_nll[:, j].mean()
            hits = torch.cat([pred0.index_select(0, vis_idx)[:, None], pred.hit_codes.to(pred0.device)], 1)
            out["acc_visual"] = hits.float().mean()
        # counted on the device (a host number would be copied in, a sync on CUDA)
        out["blocks_visual"] = vis.sum().to(nll0.dtype)
        out["blocks_text"] = vis.numel() - out["blocks_visual"]
    return out
