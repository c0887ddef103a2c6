"""A VLMEvalKit model: ``generate_inner(message, dataset)`` over a Kelix pipeline (VLMEvalKit not needed to import).

VLMEvalKit builds each benchmark's prompt itself (``use_custom_prompt`` is False) and passes a message,
a list of ``{"type": "text"|"image", "value": str}`` (image values are file paths). Register it in
VLMEvalKit's ``vlmeval/config.py``::

    from functools import partial
    from kelix.eval.vlmevalkit import KelixVLM
    supported_VLM["kelix"] = partial(KelixVLM, pipeline="out/pipeline")

then ``python run.py --data MMBench_DEV_EN --model kelix``. Images come first in the user turn, then the
message's text parts joined by newlines (the layout the model is trained on).
"""

from __future__ import annotations


class KelixVLM:
    """VLMEvalKit's model contract (``generate``/``generate_inner``, ``INTERLEAVE``, ``is_api``).

    Args:
        pipeline: a pipeline directory, or a loaded :class:`kelix.pipeline.KelixPipeline`.
        max_new_tokens: answer length cap.
        device: torch device for a pipeline loaded from a directory.
    """

    INSTALL_REQ = False
    INTERLEAVE = False  # images are gathered in front of the text
    is_api = False

    def __init__(self, pipeline, max_new_tokens: int = 64, device: str = "cpu", **kwargs):
        if isinstance(pipeline, str):
            from kelix.pipeline import KelixPipeline

            pipeline = KelixPipeline.from_pretrained(pipeline, device=device)
        self.pipe, self.max_new_tokens = pipeline, max_new_tokens

    def use_custom_prompt(self, dataset: str | None) -> bool:
        return False  # VLMEvalKit's own prompts, as the kit's readers build them

    @staticmethod
    def split(message) -> tuple[list, str]:
        """``(images, text)`` of a message (a string, or a list of typed parts)."""
        from kelix.eval.base import DataError, load_image

        if isinstance(message, str):
            return [], message
        images, texts = [], []
        for i, part in enumerate(message):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                images.append(load_image(part["value"], f"message part {i}"))
            elif kind == "text":
                texts.append(str(part["value"]))
            else:
                raise DataError(f"message part {i}: type {kind!r} is not 'text' or 'image'")
        return images, "\n".join(texts)

    def generate_inner(self, message, dataset: str | None = None) -> str:
        from kelix.eval.runner import PipelineModel

        return PipelineModel(self.pipe).answer([self.split(message)], self.max_new_tokens)[0]

    def generate(self, message, dataset: str | None = None) -> str:
        return self.generate_inner(message, dataset)

    def batch_generate(self, messages: list, dataset: str | None = None) -> list[str]:
        """Several messages in one batched greedy pass (answers equal one-at-a-time ones)."""
        from kelix.eval.runner import PipelineModel

        return PipelineModel(self.pipe).answer([self.split(m) for m in messages], self.max_new_tokens)
