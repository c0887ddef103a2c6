"""A VLMEvalKit model over a Kelix pipeline, with what VLMEvalKit's ``BaseModel`` gives a local model
(VLMEvalKit is not needed to import it; it is not on PyPI).

VLMEvalKit's ``infer_data`` builds the model (``supported_VLM[name](**kwargs)``), reads ``is_api``, calls
``set_dump_image(dataset.dump_image)``, asks ``use_custom_prompt(dataset_name)`` (False here: VLMEvalKit
builds every prompt, as the kit's readers do) and then ``generate(message=..., dataset=...)`` per item, the
message being ``[{"type": "text"|"image", "value": ...}]`` (image values are file paths). Register it in
VLMEvalKit's ``vlmeval/config.py``::

    from functools import partial
    from kelix.eval.vlmevalkit import KelixVLM
    supported_VLM["kelix"] = partial(KelixVLM, pretrained="out/pipeline")   # or pipeline="out/pipeline"

then ``python run.py --data MMBench_DEV_EN --model kelix``. Parts are laid out in their order (``INTERLEAVE``:
MMMU's images stand where its ``<image k>`` marks were); text parts with no image between them are joined by
newlines. The request equals the one ``kelix eval run`` makes for the same row.
"""

from __future__ import annotations

import base64
import mimetypes
import os


class KelixVLM:
    """VLMEvalKit's model contract (``generate``/``generate_inner``, ``set_dump_image``/``dump_image``,
    ``use_custom_prompt``, ``check_content``/``preproc_content``, ``INTERLEAVE``, ``is_api``).

    Args:
        pipeline: a pipeline directory, or a loaded :class:`kelix.pipeline.KelixPipeline`.
        pretrained: the same, under lmms-eval's key (give one of the two).
        max_new_tokens: answer length cap.
        device: torch device for a pipeline loaded from a directory.
    """

    INSTALL_REQ = False
    INTERLEAVE = True  # text and images in the message's order
    VIDEO_LLM = False
    is_api = False
    allowed_types = ["text", "image"]

    def __init__(self, pipeline=None, pretrained=None, max_new_tokens: int = 64, device: str = "cpu", **kwargs):
        from kelix.eval.runner import resolve_pipeline

        self.pipe = resolve_pipeline(pipeline, pretrained, device, "kelix (VLMEvalKit)")
        self.max_new_tokens = int(max_new_tokens)
        self.dump_image_func = None

    # ------------------------------------------------------------ what BaseModel provides
    def use_custom_prompt(self, dataset: str | None) -> bool:
        return False  # VLMEvalKit's own prompts, as the kit's readers build them

    def build_prompt(self, line, dataset=None):
        raise NotImplementedError("kelix: VLMEvalKit builds the prompts (use_custom_prompt is False)")

    def set_dump_image(self, dump_image_func) -> None:
        self.dump_image_func = dump_image_func

    def dump_image(self, line, dataset=None):
        return self.dump_image_func(line)

    def check_content(self, msgs) -> str:
        """``str``, ``dict``, ``liststr``, ``listdict`` or ``unknown``, as VLMEvalKit classifies a message."""
        if isinstance(msgs, str):
            return "str"
        if isinstance(msgs, dict):
            return "dict"
        if isinstance(msgs, list):
            kinds = {self.check_content(m) for m in msgs}
            if kinds == {"str"}:
                return "liststr"
            if kinds == {"dict"}:
                return "listdict"
        return "unknown"

    def preproc_content(self, inputs) -> list[dict] | None:
        """The message as a list of ``{"type", "value"}`` parts (a path to an image file becomes an image)."""
        kind = self.check_content(inputs)
        if kind == "str":
            return [{"type": "text", "value": inputs}]
        if kind == "dict":
            return [inputs]
        if kind == "liststr":
            return [{"type": "image" if _is_image_file(s) else "text", "value": s} for s in inputs]
        if kind == "listdict":
            return inputs
        return None

    def generate(self, message, dataset: str | None = None) -> str:
        parts = self.preproc_content(message)
        if parts is None:
            raise ValueError(f"kelix: a VLMEvalKit message is a str, a dict or a list of them, not {message!r:.80}")
        return self.generate_inner(parts, dataset)

    def chat(self, messages, dataset=None):
        raise NotImplementedError("kelix: VLMEvalKit's multi-turn chat datasets are not supported")

    # ------------------------------------------------------------ Kelix
    def request(self, message) -> tuple[list, str | list[str]]:
        """``(images, prompt)`` of a message: the prompt a text read after the images, or the texts around
        them (``len(images) + 1``) when a text stands before an image."""
        from kelix.eval.base import DataError, load_image

        if isinstance(message, str):
            return [], message
        images, texts = [], [[]]
        for i, part in enumerate(message):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in self.allowed_types or "value" not in part:
                raise DataError(f"message part {i}: type {kind!r} is not 'text' or 'image' (with a value)")
            if kind == "image":
                images.append(load_image(_image_source(part["value"]), f"message part {i}"))
                texts.append([])
            else:
                texts[-1].append(str(part["value"]))
        joined = ["\n".join(t) for t in texts]
        if not any(joined[:-1]):  # images first, then the text: the plain layout
            return images, joined[-1]
        return images, joined

    def generate_inner(self, message, dataset: str | None = None) -> str:
        return self.batch_generate([message], dataset)[0]

    def batch_generate(self, messages: list, dataset: str | None = None) -> list[str]:
        """Several messages in one batched greedy pass (answers equal one-at-a-time ones)."""
        from kelix.eval.runner import PipelineModel

        return PipelineModel(self.pipe).answer([self.request(m) for m in messages], self.max_new_tokens)


def _is_image_file(s: str) -> bool:
    if s.startswith("data:image/"):
        return True
    if not (os.path.isfile(s)):
        return False
    mime = mimetypes.types_map.get(os.path.splitext(s)[1].lower(), "")
    return mime.startswith("image/") or s.lower().endswith(".webp")


def _image_source(value):
    """A path, or the bytes of a ``data:image/...;base64,`` value (VLMEvalKit accepts both)."""
    if isinstance(value, str) and value.startswith("data:image/"):
        return base64.b64decode(value.split("base64,", 1)[1])
    return value
