"""The LLM's processor: samples -> block documents -> packed batches.

Each sample is laid out by :class:`~kelix.llm.layout.Layout` (chat template or segments, images as
visual blocks with row markers). An image enters as its pre-computed code grid
(``{key}.{i}.codes.npy``) when the shard has one, else as pixels that the frozen image tokenizer
encodes inside the LightningModule (batched, on the device). Understanding and interleaved images
keep their native resolution (``image``); generation targets, images in an assistant turn, use
``gen_image`` (paper 4.3.3: 504x504, aspect 0.75-1.33); their pre-computed code grids must be the grid
that rule gives (else skipped as ``gen_grid``). A text-to-image sample drops its prompt with
probability ``prompt_dropout`` (:func:`~kelix.llm.layout.drop_prompt`): the unconditional branch of
classifier-free guidance is trained on exactly the prompt generation uses for it.

Batch (from :func:`collate_docs`): rows of ``L`` blocks, several documents per row when packing:

* ``tokens [B, L]``: text id, or -1 for a visual block; ``codes [B, L, N]``: -1 for text blocks;
* ``targets [B, L]``: block i is trained (predicted from h_{i-1}); never a document's first block;
* ``position_ids [B, L]``: restart at 0 for each document (and for the padding at a row's end),
  which makes transformers isolate packed documents (per-document causal attention);
* ``image_pixels``: list of ``uint8 [3, H, W]`` to encode (the module normalises them on the device);
  ``image_index``: list of flat indices into ``B*L`` of each image's blocks (raster order);
  ``image_grids [n, 2]``;
* ``num_tokens`` (real positions, for tokens/s), ``batch_size`` (samples), ``num_docs``;
* ``plan``: the step plan (:func:`~kelix.llm.plan.step_plan`): the indices and counts of the target
  and visual blocks and the documents, so that the training step never syncs to learn them. A caller
  that edits ``tokens``, ``targets`` or ``position_ids`` must drop or rebuild it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import numpy as np
import torch

from kelix.data.images import ImageConfig, resize_image, target_size, to_uint8_tensor
from kelix.data.processor import Processor
from kelix.data.schema import Sample, SampleError
from kelix.llm.layout import BlockDoc, Layout, drop_prompt, is_t2i
from kelix.llm.plan import step_plan
from kelix.llm.vocab import extend_text_tokenizer

GEN_IMAGE = ImageConfig(fixed_size=504, aspect_range=(0.75, 1.33))


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing bin packing of document lengths into rows of ``capacity`` blocks."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return [sorted(r) for r in rows]


def collate_docs(docs: list[BlockDoc], N: int, pad_id: int = 0, pack: bool = False, max_blocks: int | None = None,
                 pad_to_multiple_of: int = 1) -> dict:
    """Lay documents into rows (one per row, or packed first-fit into rows of ``max_blocks``)."""
    lengths = [len(d) for d in docs]
    if pack:
        capacity = max_blocks or max(lengths)
        rows = _first_fit(lengths, max(capacity, max(lengths)))
    else:
        rows = [[i] for i in range(len(docs))]
    L = max(sum(lengths[i] for i in r) for r in rows)
    L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    B = len(rows)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    codes = torch.full((B, L, N), -1, dtype=torch.long)
    targets = torch.zeros(B, L, dtype=torch.bool)
    position_ids = torch.zeros(B, L, dtype=torch.long)
    pixels, index, grids = [], [], []
    for b, row in enumerate(rows):
        off = 0
        for i in row:
            d, n = docs[i], lengths[i]
            tokens[b, off:off + n] = torch.tensor(d.tokens, dtype=torch.long)
            targets[b, off:off + n] = torch.tensor(d.targets, dtype=torch.bool)
            codes[b, off:off + n] = d.codes(N)
            position_ids[b, off:off + n] = torch.arange(n)
            for img in d.images:
                if img.codes is None:
                    pixels.append(img.pixels)
                    index.append(b * L + off + torch.tensor(img.positions, dtype=torch.long))
                    grids.append((img.h, img.w))
            off += n
        position_ids[b, off:] = torch.arange(L - off)  # the padding is a document of its own
    return dict(tokens=tokens, codes=codes, targets=targets, position_ids=position_ids, image_pixels=pixels,
                image_index=index, image_grids=torch.tensor(grids, dtype=torch.long).reshape(-1, 2),
                num_tokens=sum(lengths), batch_size=len(docs), num_docs=len(docs),
                plan=step_plan(tokens, targets, position_ids, grids))


class LLMProcessor(Processor):
    """Samples -> block documents for the unified LLM (every stage).

    Args:
        text_tokenizer: local tokenizer directory or ``builtin:bytes``; it is extended with the
            block-layout specials exactly as the model's (use the same value as ``lm.text_tokenizer``).
        N: sub-codebooks per visual token (the image tokenizer's).
        K: entries per sub-codebook (checks pre-computed codes).
        image: resizing of understanding and interleaved images (native resolution); its
            ``patch_size * merge_size`` must be the tokenizer's. Pixels leave as ``uint8``: the
            module normalises them on the device by the image tokenizer's ``mean``/``std``.
        gen_image: resizing of generation targets (images in an assistant turn).
        completion_only: train only the assistant's turns (stage 2.2 on).
        max_blocks: documents with more blocks are skipped (``too_long``); the packed row length.
        pack: pack the batch's documents into rows of ``max_blocks`` (per-document attention).
        pad_to_multiple_of: round the row length up (GPU kernels like multiples of 8 or 64).
        use_codes: use pre-computed ``codes.npy`` when present (False: always encode the pixels).
        row_marker: the row-marker text (must match ``lm.row_marker``).
        eob_token_id: an existing text id used as ``<eob>`` (must match ``lm.eob_token_id``; a converted
            release's ``q_eos``), so the processor's tokenizer gets no ``<|eob|>`` of its own.
        prompt_dropout: probability that a text-to-image sample (images in assistant turns only)
            loses its prompt, training the unconditional branch that CFG (``cfg_scale``) reads. Default
            0.0, as the official training code (its ``ARChatCompletionVisionDataset`` never drops a prompt);
            0.1 is the usual choice when CFG is wanted. The draw is a hash of (``prompt_dropout_seed``, shard file name, key): the
            same samples drop on every pass, on resume, and in validation.
        prompt_dropout_seed: seed of that draw.
    """

    def __init__(self, text_tokenizer: str, N: int, K: int, image: ImageConfig | None = None,
                 gen_image: ImageConfig | None = None, completion_only: bool = False, max_blocks: int = 4096,
                 pack: bool = True, pad_to_multiple_of: int = 1, use_codes: bool = True,
                 row_marker: str = "{row},{cols}", prompt_dropout: float = 0.0, prompt_dropout_seed: int = 0,
                 eob_token_id: int | None = None):
        if N < 1 or K < 1:
            raise ValueError(f"processor N and K must be >= 1, got N={N}, K={K}")
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ValueError(f"processor prompt_dropout {prompt_dropout} is not in [0, 1]")
        self.text_tokenizer, self.N, self.K = text_tokenizer, N, K
        self.image = image or ImageConfig()
        self.gen_image = gen_image or replace(GEN_IMAGE, patch_size=self.image.patch_size,
                                              merge_size=self.image.merge_size, mean=self.image.mean, std=self.image.std)
        if self.gen_image.factor != self.image.factor:
            raise ValueError(f"gen_image patch*merge {self.gen_image.factor} != image patch*merge {self.image.factor}")
        self.completion_only, self.max_blocks, self.pack = completion_only, max_blocks, pack
        self.pad_to_multiple_of, self.use_codes, self.row_marker = pad_to_multiple_of, use_codes, row_marker
        self.eob_token_id = eob_token_id
        self.prompt_dropout, self.prompt_dropout_seed = prompt_dropout, prompt_dropout_seed
        self._layout: Layout | None = None

    @property
    def layout(self) -> Layout:
        if self._layout is None:  # built lazily: each dataloader worker loads its own tokenizer
            from kelix.data.text import load_text_tokenizer

            tok = extend_text_tokenizer(load_text_tokenizer(self.text_tokenizer), eob_id=self.eob_token_id)
            self._layout = Layout(tok, self.row_marker, eob_id=self.eob_token_id)
        return self._layout

    def __getstate__(self):
        return {**self.__dict__, "_layout": None}

    def _image(self, sample: Sample):
        where = f"{sample.shard}:{sample.key}"

        def prepare(image, role):
            if self.use_codes and image.codes is not None:
                codes = np.asarray(image.codes)
                if codes.ndim != 3 or codes.shape[-1] != self.N:
                    raise SampleError("bad_codes", f"{where}: codes of {image.name} have shape {codes.shape}, want [h, w, {self.N}]")
                if codes.min() < 0 or codes.max() >= self.K:
                    raise SampleError("bad_codes", f"{where}: codes of {image.name} outside 0..{self.K - 1}")
                if role == "assistant":
                    self._check_gen_grid(codes.shape[0], codes.shape[1], image, where)
                t = torch.from_numpy(codes.astype(np.int64))
                return t.shape[0], t.shape[1], t, None
            if image.pixels is None:
                raise SampleError("missing_image", f"{where}: image {image.name} has codes of another N and no pixels")
            cfg = self.gen_image if role == "assistant" else self.image
            img = resize_image(image.pixels, cfg, where=f"{where}: {image.name}")
            x = to_uint8_tensor(img)  # normalised on the device (UnifiedLLMModule.encode_images)
            return x.shape[1] // cfg.factor, x.shape[2] // cfg.factor, None, x

        return prepare

    def _check_gen_grid(self, h: int, w: int, image, where: str):
        """A generation target's code grid must be what ``gen_image`` makes of pixels (the 504 px rule)."""
        cfg, f = self.gen_image, self.gen_image.factor
        if image.pixels is not None and cfg.aspect_range is not None:  # the source image, when shipped
            (lo, hi), (pw, ph) = cfg.aspect_range, image.pixels.size
            if not lo <= pw / ph <= hi:
                raise SampleError("aspect_ratio", f"{where}: image {image.name} {pw}x{ph} has aspect {pw / ph:.2f} "
                                                  f"outside [{lo}, {hi}]")
        try:
            want = target_size(h * f, w * f, cfg)
        except ValueError:  # an extreme aspect ratio
            want = None
        ok = want == (h * f, w * f) and (cfg.aspect_range is None or cfg.aspect_range[0] <= w / h <= cfg.aspect_range[1])
        if not ok:
            rule = f"fixed_size {cfg.fixed_size} gives {cfg.fixed_size // f}x{cfg.fixed_size // f}" if cfg.fixed_size \
                else f"pixels {cfg.min_pixels}..{cfg.max_pixels}, aspect {cfg.aspect_range}"
            hint = f" (pre-tokenize generation data with kelix tokenize --fixed-size {cfg.fixed_size})" \
                if cfg.fixed_size else ""
            raise SampleError("gen_grid", f"{where}: generation target {image.name} has a {h}x{w} code grid; "
                                          f"gen_image ({rule}) does not make it{hint}")

    def _drops_prompt(self, sample: Sample) -> bool:
        if self.prompt_dropout <= 0 or not is_t2i(sample):
            return False
        name = f"{self.prompt_dropout_seed}/{os.path.basename(sample.shard)}/{sample.key}".encode()
        u = int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little") / 2**64
        return u < self.prompt_dropout

    def __call__(self, sample: Sample) -> BlockDoc:
        if self._drops_prompt(sample):
            sample = drop_prompt(sample)
        doc = self.layout.build(sample, self._image(sample), completion_only=self.completion_only)
        if len(doc) > self.max_blocks:
            raise SampleError("too_long", f"{sample.shard}:{sample.key}: {len(doc)} blocks > max_blocks {self.max_blocks}")
        return doc

    def collate(self, items: list[BlockDoc]) -> dict:
        tok = self.layout.tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        return collate_docs(items, self.N, pad_id=pad, pack=self.pack, max_blocks=self.max_blocks,
                            pad_to_multiple_of=self.pad_to_multiple_of)
