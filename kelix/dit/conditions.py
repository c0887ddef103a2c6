"""Condition providers: a batch -> the DiT's condition ``(states [B, L, D] float, mask [B, L] bool)``.

A provider is frozen (never trained, never saved with the DiT) and picked by ``class_path`` in a recipe:

* :class:`PrecomputedConditions`: states stored in shards as ``{key}.cond.npy`` (``kelix precompute-dit``);
  the cheap way to train at scale, since the LLM then runs once per image, not once per epoch.
* :class:`LLMConditions`: the frozen unified LLM, run teacher-forced on the target image's codes (the
  504x504 condition image; pre-tokenized codes from the shard, else the frozen tokenizer encodes the pixels).
* :class:`PromptBytesConditions`: a SMOKE-TEST condition for quickstarts before an LLM exists: fixed random
  embeddings of the prompt's bytes. It is not what Kelix conditions on.

Each provider names the processor's ``condition`` mode it needs (``needs``), so a mismatched recipe
fails at start with one line.
"""

import math

import torch
from torch import nn


class ConditionProvider(nn.Module):
    """Base class: ``forward(batch) -> (states [B, L, D], mask [B, L] bool)``."""

    needs: str = "precomputed"

    @property
    def dim(self) -> int | None:
        """Width ``D`` of the states, when known before the first batch."""
        return None

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always eval


class PrecomputedConditions(ConditionProvider):
    """States read from the shards (``{key}.cond.npy`` ``[L, D]``), padded by the processor.

    Args:
        dim: expected width ``D`` (checked against the DiT at start; None: checked on the first batch).
    """

    needs = "precomputed"

    def __init__(self, dim: int | None = None):
        super().__init__()
        self._dim = dim

    @property
    def dim(self) -> int | None:
        return self._dim

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "cond" not in batch:
            raise KeyError("the batch has no 'cond': set the processor's condition: precomputed")
        return batch["cond"].float(), batch["cond_mask"].bool()


class PromptBytesConditions(ConditionProvider):
    """SMOKE TEST ONLY: the prompt's UTF-8 bytes as fixed random vectors plus sinusoidal positions.

    Lets the DiT train and sample end to end before a unified LLM exists (quickstart, tests). It is a
    deterministic function of the prompt text, with no knowledge of the image; never a real condition.

    Args:
        dim: width ``D`` of the states.
        max_length: prompts are cut to this many bytes.
        seed: seed of the byte table.
    """

    needs = "prompt"

    def __init__(self, dim: int = 64, max_length: int = 256, seed: int = 0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"PromptBytesConditions.dim must be an even number >= 2, got {dim}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(256, dim, generator=g), persistent=False)
        pos = torch.arange(max_length, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        pe = torch.zeros(max_length, dim)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        self.register_buffer("positions", pe, persistent=False)
        self._dim, self.max_length = dim, max_length

    @property
    def dim(self) -> int:
        return self._dim

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "prompts" not in batch:
            raise KeyError("the batch has no 'prompts': set the processor's condition: prompt")
        ids = [list(p.encode("utf-8")[: self.max_length]) or [0] for p in batch["prompts"]]
        n = max(len(i) for i in ids)
        dev = self.table.device
        tok = torch.zeros(len(ids), n, dtype=torch.long, device=dev)
        mask = torch.zeros(len(ids), n, dtype=torch.bool, device=dev)
        for r, i in enumerate(ids):
            tok[r, : len(i)] = torch.tensor(i, device=dev)
            mask[r, : len(i)] = True
        return self.table[tok] + self.positions[:n], mask


class LLMConditions(ConditionProvider):
    """The frozen unified LLM, teacher-forced on each target image's codes (paper 4.4.1).

    The states are the LLM's last hidden states (before its final norm) of the image's positions,
    from ``<vision_start>`` up to ``<vision_end>`` (``kelix.llm.condition.image_condition_states``).
    Codes come from the batch (pre-tokenized ``{key}.0.codes.npy``) or, for items without them, from
    the frozen tokenizer run on the condition image (resized to 504x504 by the processor).

    Args:
        lm: local directory of an exported Kelix LLM (``KelixLM.from_pretrained``; includes its text tokenizer).
        tokenizer: local directory of an exported Kelix tokenizer, needed when shards carry pixels, not codes.
        include_markers: also condition on the ``<vision_start>`` and row-marker positions (the official
            model does); False keeps only the visual blocks.
        dtype: dtype of the frozen LLM and tokenizer weights.
        include_end: also condition on the ``<vision_end>`` position (the released Kelix-DiT does; needs
            ``include_markers``). Off: up to the block before it (this kit's default).
        pad_to: zero-pad the states to this length (the release: its ``model_max_length``, 720), cutting
            longer ones; None: to the longest item of the batch.
    """

    needs = "llm"

    def __init__(self, lm: str, tokenizer: str | None = None, include_markers: bool = True,
                 dtype: str = "bfloat16", include_end: bool = False, pad_to: int | None = None):
        super().__init__()
        from kelix.llm.model import KelixLM

        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"LLMConditions.dtype {dtype!r} is not float32, bfloat16 or float16")
        torch_dtype = getattr(torch, dtype)
        self.lm = KelixLM.from_pretrained(lm, dtype=dtype).to(torch_dtype).eval().requires_grad_(False)
        self.tokenizer = None
        if tokenizer is not None:
            from kelix.tokenizer.model import KelixTokenizer

            self.tokenizer = KelixTokenizer.from_pretrained(tokenizer).to(torch_dtype).eval().requires_grad_(False)
        if include_end and not include_markers:
            raise ValueError("LLMConditions.include_end needs include_markers")
        self.include_markers, self.include_end, self.pad_to = include_markers, include_end, pad_to

    @property
    def dim(self) -> int:
        return self.lm.hidden_size

    @torch.no_grad()
    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        from kelix.llm.condition import image_condition_states

        if "prompts" not in batch:
            raise KeyError("the batch has no 'prompts': set the processor's condition: llm")
        codes = list(batch.get("codes") or [None] * len(batch["prompts"]))
        missing = [i for i, c in enumerate(codes) if c is None]
        if missing:
            if self.tokenizer is None:
                keys = batch.get("keys", ["?"] * len(codes))
                raise ValueError(f"sample {keys[missing[0]]} has no pre-tokenized codes and LLMConditions.tokenizer "
                                 "is not set: give the tokenizer directory or pre-tokenize the shards (kelix tokenize)")
            images = [batch["cond_images"][i] for i in missing]
            for i, c in zip(missing, self.tokenizer.encode(images)):
                codes[i] = c
        codes = [torch.as_tensor(c, dtype=torch.long) for c in codes]
        states, mask = image_condition_states(self.lm, list(batch["prompts"]), codes,
                                              include_markers=self.include_markers, include_end=self.include_end,
                                              pad_to=self.pad_to)
        return states.float(), mask.bool()
