"""Run a benchmark with a model (resumable), score predictions, write predictions.jsonl / scores.json / scores.md.

A model is anything with ``answer(requests, max_new_tokens) -> list[str]`` (``requests``: a list of
``(images, prompt)``) and, for generation benchmarks, ``render(prompts, seed) -> list[PIL image]``;
:class:`PipelineModel` is the one over a :class:`kelix.pipeline.KelixPipeline`.
"""

from __future__ import annotations

import json
import os

from kelix.eval.base import Benchmark, DataError, Item, load_image, where

PREDICTIONS, SCORES_JSON, SCORES_MD, MANIFEST = "predictions.jsonl", "scores.json", "scores.md", "manifest.json"


class PipelineModel:
    """Batched greedy answers (and images) from a KelixPipeline, through its public parts.

    Args:
        pipe: the loaded pipeline.
        sampling: how answers are drawn (default greedy).
    """

    def __init__(self, pipe, sampling=None):
        self.pipe, self.sampling = pipe, sampling

    def answer(self, requests: list[tuple[list, str | list[str]]], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers to ``(images, prompt)`` requests: ``prompt`` a text (read after the images) or the
        texts around the images (``len(images) + 1`` of them: text, image, text, ..., as MMMU places them)."""
        import torch

        from kelix.llm.generate import Sampling, generate_text, image_inputs

        lm, tok = self.pipe.lm, self.pipe.tokenizer
        flat = [im for ims, _ in requests for im in ims]
        codes, feats = image_inputs(tok, flat, lm.vocab.N) if flat else ([], None)
        docs, per_doc, k = [], [], 0
        for ims, prompt in requests:
            docs.append(prompt_doc(lm, prompt, list(codes[k:k + len(ims)])))
            per_doc += [torch.cat(feats[k:k + len(ims)])] if feats and ims else []
            k += len(ims)
        ids = generate_text(lm, docs, max_new_blocks=max_new_tokens, sampling=self.sampling or Sampling(temperature=0),
                            visual_embeds=per_doc or None)
        return [lm.text_tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]

    def render(self, prompts: list[str], seed: int = 0) -> list:
        return self.pipe.generate(list(prompts), seed=seed)


def resolve_pipeline(pipeline=None, pretrained=None, device: str | None = "cpu", who: str = "kelix"):
    """The pipeline an adapter was given: a loaded :class:`kelix.pipeline.KelixPipeline`, or a directory under
    either key (``pipeline=DIR`` or ``pretrained=DIR``: lmms-eval's and VLMEvalKit's users write both)."""
    value = pipeline if pipeline is not None else pretrained
    if value is None:
        raise ValueError(f"{who}: give the pipeline directory as pretrained=DIR (or pipeline=DIR)")
    if isinstance(value, (str, os.PathLike)):
        from kelix.pipeline import KelixPipeline

        if not os.path.isdir(value):
            raise ValueError(f"{who}: pipeline directory {str(value)!r} does not exist")
        return KelixPipeline.from_pretrained(str(value), device=device or "cpu")
    return value


def prompt_doc(lm, prompt, codes: list):
    """The understanding document of one request: images then the text, or texts and images interleaved."""
    from kelix.data.schema import Image, Part, Sample, Turn
    from kelix.llm.generate import understanding_doc

    if isinstance(prompt, str):
        return understanding_doc(lm, prompt, codes)
    if len(prompt) != len(codes) + 1:
        raise ValueError(f"an interleaved prompt has {len(prompt)} texts for {len(codes)} image(s)")
    parts = [Part("text", text=prompt[0])] if prompt[0] else []
    for i, (c, text) in enumerate(zip(codes, prompt[1:])):
        parts.append(Part("image", image=Image(f"{i}.jpg", codes=c.cpu())))
        parts += [Part("text", text=text)] if text else []
    sample = Sample("prompt", "pipeline", "messages", [Turn("user", parts)])
    doc = lm.layout.build(sample, lambda im, role: (im.codes.shape[0], im.codes.shape[1], im.codes, None))
    doc.add_text(lm.layout.chat_header("assistant"), False)
    return doc


def read_predictions(path: str) -> dict[str, dict]:
    """``{str(id): record}`` of a predictions.jsonl (a torn last line, from an interrupted run, is ignored) or
    of VLMEvalKit's prediction file (.xlsx, .tsv, .csv: ``index`` and ``prediction`` columns)."""
    if not path.endswith(".jsonl"):
        from kelix.eval.predfiles import read_prediction_file

        return read_prediction_file(path)
    out: dict[str, dict] = {}
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 or all(not x.strip() for x in lines[i + 1:]):
                break  # the line a killed run was writing
            raise DataError(f"{where(path, i)}: not JSON ({e})") from None
        for k in ("id", "prediction"):
            if k not in rec:
                raise DataError(f"{where(path, i, k)}: missing")
        out[str(rec["id"])] = rec
    return out


def _load(item: Item, data: str) -> list:
    return [load_image(s, where(data, item.id, "image")) for s in item.images]


def run(model, bench: Benchmark, items: list[Item], out: str, data: str = "", batch_size: int = 8,
        max_new_tokens: int | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Answer (or render) every item not yet in ``out/predictions.jsonl``, then score them all.

    Returns the scores (also written to scores.json / scores.md).
    """
    from tqdm.auto import tqdm

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, PREDICTIONS)
    done = read_predictions(path)
    _truncate_torn_line(path)
    seeds = {it.key: seed + i for i, it in enumerate(items)}  # per item, so a resumed run draws the same
    todo = [it for it in items if it.key not in done]
    if bench.kind == "generate":
        _write_manifest(bench, items, out, data, seed)
    with open(path, "a") as f, tqdm(total=len(items), initial=len(items) - len(todo), unit="item",
                                    desc=bench.name, disable=not progress) as bar:
        step = 1 if bench.kind == "generate" else max(1, batch_size)
        for b in range(0, len(todo), step):
            batch = todo[b:b + step]
            if bench.kind == "generate":
                preds = [bench.generate_item(model, it, out, seeds[it.key]) for it in batch]
            else:
                requests = [(_load(it, data), it.meta.get("segments", it.prompt)) for it in batch]
                preds = model.answer(requests, max_new_tokens or bench.max_new_tokens)
            for it, p in zip(batch, preds):
                rec = {"id": it.id, "prompt": it.prompt, "prediction": p, "answer": it.answer,
                       "score": bench.score_item(it, p)}
                if bench.kind == "generate":
                    rec["seed"] = seeds[it.key]
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()  # each answer survives an interruption
            bar.update(len(batch))
    keys = {it.key for it in items}  # a smaller --limit than an earlier run's scores only its own items
    return score(bench, items, {k: r["prediction"] for k, r in read_predictions(path).items() if k in keys}, out,
                 write_predictions=False)


def _truncate_torn_line(path: str) -> None:
    if os.path.isfile(path):
        with open(path, "rb+") as f:
            text = f.read()
            if text and not text.endswith(b"\n"):
                f.truncate(text.rfind(b"\n") + 1)


def _write_manifest(bench: Benchmark, items: list[Item], out: str, data: str, seed: int) -> None:
    info = {"benchmark": bench.name, "data": os.path.abspath(data) if data else "", "prompts": len(items),
            "samples_per_prompt": getattr(bench, "samples", 1), "seed": seed,
            "seeds": "seed + 0-based prompt row (recorded per prompt in predictions.jsonl)",
            "layout": getattr(bench, "layout", "images/<id>.png"), "scorer": getattr(bench, "scorer", "kelix eval score")}
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(info, f, indent=2)


def score(bench: Benchmark, items: list[Item], predictions: dict[str, str], out: str | None = None,
          write_predictions: bool = True) -> dict:
    """Score ``predictions`` (``{str(id): prediction}``) of ``items``; write scores.json/md under ``out``."""
    scores, known = {}, {it.key for it in items}
    unknown = [k for k in predictions if k not in known]
    if unknown:
        raise DataError(f"predictions: id {unknown[0]!r} is not an item of {bench.name} ({len(unknown)} unknown id(s))")
    records = []
    for it in items:
        if it.key in predictions:
            scores[it.key] = bench.score_item(it, predictions[it.key])
            records.append({"id": it.id, "prompt": it.prompt, "prediction": predictions[it.key], "answer": it.answer,
                            "score": scores[it.key]})
    result = {"benchmark": bench.name, **bench.aggregate(items, scores, predictions),
              "missing": len(items) - len(scores)}
    if bench.judge is not None:
        result["judge"] = f"{bench.judge.model} at {bench.judge.url}"
    if out is not None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, SCORES_JSON), "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(out, SCORES_MD), "w") as f:
            f.write(markdown(result))
        if write_predictions:
            tmp = os.path.join(out, PREDICTIONS + ".tmp")
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            os.replace(tmp, os.path.join(out, PREDICTIONS))
    return result


def markdown(result: dict) -> str:
    """scores.md: the overall metrics, then one row per category."""
    lines = [f"# {result['benchmark']}", "", f"{result['count']} item(s) scored, {result['missing']} missing.", ""]
    overall = result.get("overall", {})
    if not overall:
        lines += ["Scored by the benchmark's own scorer (see manifest.json and docs/eval.md)."]
        return "\n".join(lines) + "\n"
    lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in overall.items()]
    cats = result.get("per_category", {})
    if cats:
        metrics = list(next(iter(cats.values())))
        lines += ["", "| category | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        lines += [f"| {c} | " + " | ".join(_fmt(v.get(m, float("nan"))) for m in metrics) + " |" for c, v in cats.items()]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
