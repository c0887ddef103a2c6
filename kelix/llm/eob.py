"""``eob_scoring: full`` (the official loss): logits over the whole vocabulary for any block-decoder slot.

With ``implied`` scoring (Eq. 6 as written) each slot is scored over the ids legal in it and ``<eob>``
is given by the block kind; the official code instead scores every slot of a block, ``<eob>`` included,
against the whole LM head. :class:`~kelix.llm.model.KelixLM` then runs one more decoder position per
block (after a text block's token, after a visual block's N codes) whose target is ``<eob>``.
"""

from __future__ import annotations

import torch
from torch import nn


def vocab_logits(lm, out: torch.Tensor, slot: int) -> torch.Tensor:
    """Decoder outputs ``[..., D]`` -> logits over every id ``[..., V]`` (column c is id c). Slot 0 keeps the
    learned ``visual_bias`` on the visual ids, as :meth:`~kelix.llm.model.KelixLM.slot_logits` does."""
    head = lm.lm_head
    logits = nn.functional.linear(lm.final_norm(out), head.weight, getattr(head, "bias", None))
    if slot == 0:
        vo = lm.vocab.visual_offset
        logits = torch.cat([logits[..., :vo], logits[..., vo:] + lm.visual_bias.to(logits.dtype)], -1)
    return logits


def code_ids(lm, vis_codes: torch.Tensor, slot: int) -> torch.Tensor:
    """Ids of sub-codebook ``slot``'s codes ``vis_codes[:, slot]``: a full-vocabulary target."""
    return lm.vocab.visual_offset + slot * lm.vocab.K + vis_codes[:, slot]
