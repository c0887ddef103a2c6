"""An lmms-eval model over a Kelix pipeline (``pip install -e '.[eval]'``): chat-style ``generate_until`` and
``loglikelihood``.

lmms-eval finds it by the ``lmms_eval.models`` entry point this package declares (``kelix``), or after
:func:`register` in the same process::

    lmms-eval --model kelix --model_args pretrained=out/pipeline --tasks chartqa --batch_size 8

``generate_until`` reads each request's chat messages (images of the user turns, then their text
joined by newlines), answers greedily in batches and cuts the answer at the task's ``until`` strings.
``loglikelihood`` scores a continuation teacher-forced, one text block per token after the
assistant header (:func:`continuation_logprob`), and reports it as lmms-eval's models do: the loss
(the negated summed log-probability), which its multiple-choice scoring minimises.
"""

from __future__ import annotations

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from kelix.eval.base import load_image

MODEL_ID = "kelix"


def manifest():
    """The entry-point payload: lmms-eval's description of this model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, chat_class_path="kelix.eval.lmms.KelixLMMS",
                         simple_class_path="kelix.eval.lmms.KelixLMMSSimple")


def register() -> None:
    """Make ``--model kelix`` known to lmms-eval in this process (the entry point does it when installed)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


@torch.no_grad()
def continuation_logprob(lm, doc, target: list[int]) -> tuple[float, bool]:
    """``(sum of log p(target token | prefix), whether greedy decoding gives exactly target)`` after ``doc``."""
    from kelix.llm.generate import BackboneRunner, text_banned_ids, text_logits

    device, N = next(lm.parameters()).device, lm.vocab.N
    embeds = lm.embed_blocks(torch.tensor([doc.tokens], device=device), doc.codes(N)[None].to(device))
    run, banned = BackboneRunner(lm), text_banned_ids(lm)
    h = run.prefill(embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=device))[:, -1]
    total, greedy = 0.0, True
    for t in target:
        logp = text_logits(lm, lm.decoder(h[:, None], kind="text")[:, -1], banned).float().log_softmax(-1)[0]
        total += float(logp[t])
        greedy = greedy and int(logp.argmax()) == t
        x = lm.embed_blocks(torch.tensor([[t]], device=device), torch.full((1, 1, N), -1, device=device))
        h = run.step(x[:, 0])
    return total, greedy


def _as_output(pair: tuple[float, bool]):
    """lmms-eval 0.7's evaluator turns any response that is not text into ``str(response)``, which breaks
    its own loglikelihood scoring; a ``GenerationResult`` wrapper passes the pair through unchanged."""
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:  # releases before the wrapper take the pair as it is
        return pair
    if unwrap_generation_output(pair)[0] == pair:
        return pair
    return GenerationResult(text=pair)


class KelixLMMS(lmms):
    """lmms-eval's chat ``lmms`` interface for a Kelix pipeline (generation tasks).

    Args:
        pretrained: pipeline directory; ``pipeline`` is the same key (a directory or a loaded
            :class:`kelix.pipeline.KelixPipeline`), as the VLMEvalKit adapter takes it.
        device: torch device; batch_size: requests answered together; max_new_tokens: the default cap.
    """

    is_simple = False  # chat-style messages

    def __init__(self, pretrained: str | None = None, pipeline=None, device: str | None = "cpu",
                 batch_size: int | str | None = 1, max_new_tokens: int = 64, **kwargs):
        super().__init__()
        from kelix.eval.runner import resolve_pipeline

        self.pipe = resolve_pipeline(pipeline, pretrained, device, "kelix (lmms-eval)")
        self.batch_size_per_gpu = int(batch_size or 1)
        self.max_new_tokens = max_new_tokens

    @staticmethod
    def _messages(messages) -> tuple[list, str]:
        images, texts = [], []
        for m in messages:
            content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            for part in content:
                if part["type"] == "image":
                    images.append(load_image(part["url"], "lmms-eval image"))
                elif part["type"] == "text":
                    texts.append(part["text"])
                else:
                    raise ValueError(f"kelix: lmms-eval content type {part['type']!r} is not supported (image, text)")
        return images, "\n".join(texts)

    def _request(self, args) -> tuple[dict, tuple[list, str]]:
        """``(generation kwargs, (images, text))`` of one request's arguments."""
        _, doc_to_messages, kw, doc_id, task, split = args
        return kw, self._messages(doc_to_messages(self.task_dict[task][split][doc_id]))

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm.auto import tqdm

        from kelix.eval.runner import PipelineModel

        model, out = PipelineModel(self.pipe), [None] * len(requests)
        parsed = [self._request(r.args) for r in requests]
        # one batch per generation setting, so each batch shares its length cap
        groups: dict[str, list[int]] = {}
        for i, (kw, _) in enumerate(parsed):
            groups.setdefault(repr(sorted(kw.items())), []).append(i)
        bar = tqdm(total=len(requests), desc="kelix", disable=self.rank != 0)
        for idx in groups.values():
            kw = parsed[idx[0]][0]
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            for b in range(0, len(idx), self.batch_size_per_gpu):
                chunk = idx[b:b + self.batch_size_per_gpu]
                answers = model.answer([parsed[i][1] for i in chunk], int(kw.get("max_new_tokens", self.max_new_tokens)))
                for i, text in zip(chunk, answers):
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        from kelix.llm.generate import understanding_doc

        lm, tok, out = self.pipe.lm, self.pipe.tokenizer, []
        for r in requests:
            context, target, doc_to_visual, doc_id, task, split = r.args
            doc = self.task_dict[task][split][doc_id]
            target = target(doc) if callable(target) else target
            visuals = [load_image(v, "lmms-eval image") for v in (doc_to_visual(doc) or [])] if doc_to_visual else []
            codes = tok.encode(visuals) if visuals else []
            ids = lm.text_tokenizer.encode(str(target), add_special_tokens=False)
            logp, greedy = continuation_logprob(lm, understanding_doc(lm, context, list(codes)), ids)
            out.append((-logp, greedy))  # lmms-eval picks the choice of least loss (argmin), as its models report it
        return [_as_output(x) for x in out]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("kelix: multi-round generation is not supported")


class KelixLMMSSimple(KelixLMMS):
    """The same model through lmms-eval's simple interface (``--force_simple``): needed for
    ``loglikelihood`` / ``multiple_choice`` tasks, which lmms-eval runs only on simple models."""

    is_simple = True

    def _request(self, args):
        context, kw, doc_to_visual, doc_id, task, split = args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        return kw, ([load_image(v, "lmms-eval image") for v in visuals], context)
