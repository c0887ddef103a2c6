"""The compute of one batch: chat rows decoded block by block, or images generated together.

Chat rows are left padded and run through the LLM generation's own parts
(:class:`~kelix.llm.generate.BackboneRunner`, :class:`~kelix.llm.generate.BlockDrawer`), as
:func:`~kelix.llm.generate.generate_text` runs them, so a greedy row's answer is the one the offline
pipeline gives (tests/llm/test_generate.py: a left-padded batch equals one-by-one runs). The loop is
the server's own because it does what an offline call need not: each step it streams every row's new
text, ends rows on stop strings and per-request ``max_tokens``, and drops the rows whose answer is
done or whose client has gone (KV cache, mask and positions selected down), so they cost nothing
from the next step on.
"""

from __future__ import annotations

import torch

from kelix.data.schema import Image, Part, Sample, Turn
from kelix.llm.generate import (
    BackboneRunner,
    BlockDrawer,
    _embed_one,
    _generator,
    _left_pad,
    default_stop_ids,
    image_inputs,
)
from kelix.llm.layout import BlockDoc


def chat_doc(lm, turns: list[tuple[str, list]], codes: list[torch.Tensor]) -> BlockDoc:
    """Messages ``[(role, [str | image index, ...])]`` -> the prompt document, then the assistant
    header. One user turn of images then text lays out exactly as
    :func:`~kelix.llm.generate.understanding_doc`."""
    out = []
    for role, parts in turns:
        out.append(Turn(role, [Part("text", text=p) if isinstance(p, str)
                               else Part("image", image=Image(f"{p}.jpg", codes=codes[p].cpu())) for p in parts]))
    sample = Sample("request", "serve", "messages", out)
    doc = lm.layout.build(sample, lambda im, role: (im.codes.shape[0], im.codes.shape[1], im.codes, None))
    doc.add_text(lm.layout.chat_header("assistant"), False)
    return doc


def prepare_chat(pipe, job) -> None:
    """Encode the job's images and lay out its document (``job.doc``, ``job.feats``, ``job.prompt_tokens``)."""
    if job.doc is not None:  # prepared already (a batch retried one by one)
        return
    lm = pipe.lm
    codes, feats = image_inputs(pipe.tokenizer, job.images, lm.vocab.N) if job.images else ([], None)
    job.doc = chat_doc(lm, job.turns, codes)
    job.feats = torch.cat(feats) if feats else None
    job.prompt_tokens = len(job.doc)
    job.images = None  # the pixels are no longer needed


class Row:
    """One choice of one request: its ids so far and the text already sent."""

    def __init__(self, job, index: int):
        self.job, self.index, self.ids, self.sent = job, index, [], 0

    def text(self, tok) -> str:
        return tok.decode(self.ids, skip_special_tokens=True)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters may not be sent yet: an incomplete UTF-8 character (decoded as
    U+FFFD), or the longest tail that could still begin a stop string."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if s.startswith(text[-k:]):
                n = max(n, k)
                break
    return n


def _finish(row: Row, text: str, reason: str, stopped_by_id: bool):
    job = row.job
    if job.stream and len(text) > row.sent:
        job.emit(("delta", row.index, text[row.sent:]))
    job.completion_tokens += len(row.ids) + int(stopped_by_id)
    job.emit(("choice", row.index, text, reason))


def run_chat(pipe, jobs: list, metrics=None) -> int:
    """Answer ``jobs`` (prepared, sharing one sampling) in one left-padded batch. Each job gets
    ``delta`` events (streaming), one ``choice`` event per choice, then ``end``. Returns the blocks drawn."""
    lm, tok = pipe.lm, pipe.lm.text_tokenizer
    rows = [Row(job, i) for job in jobs for i in range(job.n)]
    docs = [r.job.doc for r in rows]
    feats = [r.job.feats for r in rows if r.job.feats is not None] or None
    s = jobs[0].sampling
    run, draw = BackboneRunner(lm), BlockDrawer(lm, s, _generator(lm, s))
    embeds, mask = _left_pad(lm, docs, feats)
    h = run.prefill(embeds, mask)[:, -1]
    stop_ids = set(default_stop_ids(lm))
    active, drawn = list(rows), 0
    for _ in range(max(j.max_tokens for j in jobs)):
        toks = draw.text(h)
        drawn += len(active)
        keep = []
        for i, (row, t) in enumerate(zip(active, toks.tolist())):
            job = row.job
            if job.cancelled:
                continue
            if t in stop_ids:
                _finish(row, row.text(tok), "stop", True)
                continue
            row.ids.append(t)
            text = row.text(tok)
            hit = [text.index(st) for st in job.stop if st in text]
            if hit:
                _finish(row, text[: min(hit)], "stop", False)
            elif len(row.ids) >= job.max_tokens:
                _finish(row, text, "length", False)
            else:
                keep.append(i)
                safe = len(text) - _held_back(text, job.stop)
                if job.stream and safe > row.sent:
                    job.emit(("delta", row.index, text[row.sent:safe]))
                    row.sent = safe
        if not keep:
            break
        if len(keep) < len(active):  # finished or abandoned rows leave the batch
            idx = torch.tensor(keep, device=h.device)
            run.cache.batch_select_indices(idx)
            run.mask, run.pos, toks = run.mask[idx], run.pos[idx], toks[idx]
            active = [active[i] for i in keep]
        h = run.step(_embed_one(lm, toks))
    for job in jobs:
        if not job.cancelled:
            job.emit(("end", job.prompt_tokens, job.completion_tokens))
    return drawn


def run_images(pipe, jobs: list) -> int:
    """Generate every job's ``n`` images in one batched call (the jobs share size, steps, guidance
    and seed); each job gets an ``images`` event. Returns the images made."""
    todo = [j for j in jobs if not j.cancelled]  # a client gone before its batch started costs nothing
    if not todo:
        return 0
    prompts = [j.prompt for j in todo for _ in range(j.n)]
    images = pipe.generate(prompts, size=todo[0].size, steps=todo[0].steps, cfg_scale=todo[0].cfg_scale,
                           seed=todo[0].seed)
    k = 0
    for j in todo:
        j.emit(("images", images[k:k + j.n]))
        k += j.n
    return len(images)
