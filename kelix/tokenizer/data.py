"""The tokenizer's processor: a sample -> pixels + aux-LM token ids + labels (runs in dataloader workers).

Each image becomes ``<vision_start>``, one placeholder per merged visual token (``image_mask``
marks them; the module writes the fused visual embeddings there), ``<vision_end>``. Text:

* ``messages`` (OCR, VQA, chat): ChatML turns; the loss is on assistant text (and its ``<|im_end|>``);
* ``segments`` (captions, interleaved): the parts in order; the loss is on text after the first
  image, then the end-of-text token.

Samples without an image, or without a loss target (e.g. text-to-image turns), are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kelix.data.images import ImageConfig, resize_image, to_uint8_tensor
from kelix.data.processor import Processor
from kelix.data.schema import Sample, SampleError
from kelix.data.text import IM_END, IM_START, load_text_tokenizer

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IGNORE = -100


def aux_text_tokenizer(name_or_path: str, vision_start: str = VISION_START, vision_end: str = VISION_END):
    """The aux LM's text tokenizer with the vision markers (added as special tokens if missing).

    The processor (in workers) and the module (to size the embedding table) both call this, so
    they agree on every id.
    """
    tok = load_text_tokenizer(name_or_path)
    missing = [t for t in (vision_start, vision_end) if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    return tok


@dataclass
class _Seq:
    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    image_mask: list[bool] = field(default_factory=list)

    def add(self, ids: list[int], loss: bool, image: bool = False):
        self.ids += ids
        self.labels += ids if loss else [IGNORE] * len(ids)
        self.image_mask += [image] * len(ids)


class TokenizerProcessor(Processor):
    """Samples -> items for :class:`~kelix.tokenizer.module.TokenizerModule`.

    Args:
        text_tokenizer: ``builtin:bytes`` or a local tokenizer directory (the aux LM's).
        image: image sizing; must equal the tokenizer's ``image`` config (recipes interpolate
            ``${model.init_args.tokenizer.image}``). Pixels leave as ``uint8 [3, H, W]``:
            :meth:`~kelix.tokenizer.module.TokenizerModule.pixels` normalises them on the device.
        max_length: aux-LM tokens per sample; longer samples are cut after their last image if
            that keeps a target, else skipped (``too_long``).
        vision_start: token before each image's visual tokens.
        vision_end: token after them.
    """

    def __init__(self, text_tokenizer: str = "builtin:bytes", image: ImageConfig | None = None,
                 max_length: int = 2048, vision_start: str = VISION_START, vision_end: str = VISION_END):
        self.text_tokenizer, self.image = text_tokenizer, image or ImageConfig()
        if isinstance(self.image, dict):
            self.image = ImageConfig(**self.image)
        self.max_length, self.vision_start, self.vision_end = max_length, vision_start, vision_end
        self._tok = None  # built lazily: a processor is pickled into each worker

    @property
    def tok(self):
        if self._tok is None:
            self._tok = aux_text_tokenizer(self.text_tokenizer, self.vision_start, self.vision_end)
            self._ids = {t: self._tok.convert_tokens_to_ids(t) for t in (self.vision_start, self.vision_end)}
            eos = self._tok.eos_token_id
            self._eos = eos if eos is not None else self._tok.convert_tokens_to_ids(IM_END)
            self._pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else self._eos
        return self._tok

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}

    def _text(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def _image(self, seq: _Seq, img, where: str, pixels: list, grids: list):
        if img.pixels is None:
            raise SampleError("no_pixels", f"{where}: image {img.name!r} has codes only; the tokenizer needs pixels")
        im = resize_image(img.pixels, self.image, where=where)
        h, w = im.height // self.image.factor, im.width // self.image.factor
        pixels.append(to_uint8_tensor(im))  # normalised on the device (TokenizerModule.pixels)
        grids.append((h, w))
        seq.add([self._ids[self.vision_start]], loss=False)
        seq.add([self._pad] * (h * w), loss=False, image=True)
        seq.add([self._ids[self.vision_end]], loss=False)

    def __call__(self, sample: Sample) -> dict:
        where = f"{sample.shard}:{sample.key}"
        self.tok  # noqa: B018 - build ids
        if not sample.images:
            raise SampleError("no_image", f"{where}: no image (the tokenizer trains on image-text samples)")
        seq, pixels, grids = _Seq(), [], []
        if sample.kind == "messages":
            for turn in sample.turns:
                loss = turn.role == "assistant" and bool(turn.text.strip())  # an image-only answer: no target
                seq.add(self._text(f"{IM_START}{turn.role}\n"), loss=False)
                for part in turn.parts:
                    if part.type == "image":
                        self._image(seq, part.image, where, pixels, grids)
                    else:
                        seq.add(self._text(part.text), loss=loss)
                seq.add(self._text(IM_END), loss=loss)
                seq.add(self._text("\n"), loss=False)
        else:
            seen_image = False
            for part in sample.turns[0].parts:
                if part.type == "image":
                    self._image(seq, part.image, where, pixels, grids)
                    seen_image = True
                else:
                    seq.add(self._text(part.text), loss=seen_image)
            seq.add([self._eos], loss=True)
        return self._finish(seq, pixels, grids, where)

    def _finish(self, seq: _Seq, pixels: list, grids: list, where: str) -> dict:
        if len(seq.ids) > self.max_length:
            last_image = max(i for i, m in enumerate(seq.image_mask) if m)
            if last_image + 2 > self.max_length or all(x == IGNORE for x in seq.labels[: self.max_length]):
                raise SampleError("too_long", f"{where}: {len(seq.ids)} tokens > max_length {self.max_length}")
            seq.ids, seq.labels = seq.ids[: self.max_length], seq.labels[: self.max_length]
            seq.image_mask = seq.image_mask[: self.max_length]
        if all(x == IGNORE for x in seq.labels):
            raise SampleError("no_target", f"{where}: no text to predict after an image (e.g. a text-to-image turn)")
        return {
            "pixels": pixels,
            "grids": grids,
            "input_ids": torch.tensor(seq.ids, dtype=torch.long),
            "labels": torch.tensor(seq.labels, dtype=torch.long),
            "image_mask": torch.tensor(seq.image_mask, dtype=torch.bool),
        }

    def collate(self, items: list[dict]) -> dict:
        """Pad token sequences on the right; images of all samples go in one flat list (any sizes)."""
        self.tok  # noqa: B018
        n = max(len(it["input_ids"]) for it in items)
        b = len(items)
        input_ids = torch.full((b, n), self._pad, dtype=torch.long)
        labels = torch.full((b, n), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros(b, n, dtype=torch.long)
        image_mask = torch.zeros(b, n, dtype=torch.bool)
        for i, it in enumerate(items):
            k = len(it["input_ids"])
            input_ids[i, :k], labels[i, :k], image_mask[i, :k] = it["input_ids"], it["labels"], it["image_mask"]
            attention_mask[i, :k] = 1
        return {
            "batch_size": b,
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "image_mask": image_mask,
            "pixels": [p for it in items for p in it["pixels"]],
            "grids": [g for it in items for g in it["grids"]],
            "num_tokens": int(attention_mask.sum()),
        }
