"""``kelix serve``: an exported :class:`~kelix.pipeline.KelixPipeline` behind an OpenAI-compatible HTTP API.

FastAPI routes (:mod:`kelix.serve.app`) validate and bound each request, then hand it to the
:class:`~kelix.serve.engine.Engine`, one worker thread that gathers the requests arriving within a
short window and answers them in one batched forward (understanding as left-padded rows, block by
block; generation through the pipeline's batched image path). See docs/serve.md.
"""

from kelix.serve.config import ServeConfig

__all__ = ["ServeConfig"]
