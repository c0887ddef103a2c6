"""The FastAPI app: OpenAI's chat, image and model routes, ``/health`` and ``/metrics``.

Routes check each request against the server's limits (errors name the field, in OpenAI's error
shape), read its images, and hand it to the :class:`~kelix.serve.engine.Engine`. A request's wait is
bounded by ``timeout_s`` (408), and a client that disconnects cancels its rows at the next block.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from kelix.llm.generate import Sampling
from kelix.serve.engine import Engine, Job
from kelix.serve.guard import Guard
from kelix.serve.inputs import read_messages
from kelix.serve.metrics import Metrics
from kelix.serve.protocol import APIError, ChatRequest, ImageRequest

MAX_STOPS = 4  # as OpenAI


def _param(loc) -> str | None:
    """A pydantic error location ``("body", "messages", 0, "content")`` -> ``messages[0].content``."""
    out = ""
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def build_app(pipe, cfg, metrics: Metrics | None = None) -> FastAPI:
    """The app serving ``pipe`` under ``cfg`` (a :class:`~kelix.serve.config.ServeConfig`)."""
    metrics = metrics or Metrics()
    engine = Engine(pipe, cfg, metrics)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="kelix serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, cfg
    app.add_middleware(Guard, cfg=cfg, metrics=metrics)

    def refuse(e: APIError) -> JSONResponse:
        metrics.errors.labels(e.type, e.code or "").inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return refuse(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return refuse(APIError(400, "the request body is not valid JSON", code="invalid_json"))
        param = _param(first.get("loc", ()))
        return refuse(APIError(400, f"{param}: {first.get('msg', 'invalid')}", param, code="invalid_value"))

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        return refuse(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        return refuse(APIError(500, f"internal error: {type(e).__name__}", type="server_error",
                               code="internal_error"))

    def check_model(model: str | None):
        if model not in (None, cfg.model_name):
            raise APIError(404, f"model {model!r} is not served here (this server serves {cfg.model_name!r})",
                           "model", code="model_not_found")

    async def watch(request: Request, job: Job):
        """Cancel ``job`` when its client disconnects (its rows leave the batch at the next block)."""
        while True:
            await asyncio.sleep(0.05)
            if await request.is_disconnected():
                job.cancelled = True
                metrics.cancelled.labels("disconnect").inc()
                job.events.put_nowait(("gone",))
                return

    async def next_event(job: Job) -> tuple:
        left = job.submitted + cfg.timeout_s - time.perf_counter()
        try:
            return await asyncio.wait_for(job.events.get(), max(left, 0))
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
            job.cancelled = True
            metrics.cancelled.labels("timeout").inc()
            raise APIError(408, f"the request took over {cfg.timeout_s:g} s (--timeout) and was cancelled",
                           type="timeout_error", code="timeout") from None

    async def events(request: Request, job: Job):
        """The job's events until its last (``end``, ``images``); raises a failed job's error."""
        watcher, done = asyncio.create_task(watch(request, job)), False
        try:
            while True:
                ev = await next_event(job)
                if ev[0] == "error":
                    done = True
                    raise ev[1]
                yield ev
                if ev[0] in ("end", "images", "gone"):
                    done = True
                    return
        finally:
            watcher.cancel()
            if not done and not job.cancelled:  # a stream whose client left: the response closed us
                job.cancelled = True
                metrics.cancelled.labels("disconnect").inc()

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue_depth": engine.depth}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "kelix"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        max_tokens = req.max_completion_tokens or req.max_tokens or cfg.default_max_tokens
        which = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        if max_tokens > cfg.max_tokens:
            raise APIError(400, f"{which} {max_tokens} is over this server's cap of {cfg.max_tokens}", which,
                           code="max_tokens_too_large")
        if req.n > cfg.max_n:
            raise APIError(400, f"n {req.n} is over this server's cap of {cfg.max_n}", "n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOPS or not all(stop):
            raise APIError(400, f"stop: at most {MAX_STOPS} non-empty strings", "stop")
        turns, images = await run_in_threadpool(read_messages, req.messages, cfg)
        greedy = req.temperature == 0
        s = Sampling(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed)
        key = ("chat", "greedy") if greedy else ("chat", s.temperature, s.top_k, s.top_p, s.seed)
        job = engine.submit(Job("chat", key, n=req.n, turns=turns, images=images, sampling=s,
                                max_tokens=max_tokens, stop=stop, stream=req.stream))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(request, job, rid, created, usage), media_type="text/event-stream")
        choices, usage = {}, None
        async for ev in events(request, job):
            if ev[0] == "choice":
                choices[ev[1]] = {"index": ev[1], "message": {"role": "assistant", "content": ev[2]},
                                  "finish_reason": ev[3], "logprobs": None}
            elif ev[0] == "end":
                usage = {"prompt_tokens": ev[1], "completion_tokens": ev[2], "total_tokens": ev[1] + ev[2]}
        return {"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                "choices": [choices[i] for i in sorted(choices)], "usage": usage}

    async def stream(request, job, rid, created, include_usage):
        def chunk(choices, **extra) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_name,
                    "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        for i in range(job.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        try:
            async for ev in events(request, job):
                if ev[0] == "delta":
                    yield chunk([{"index": ev[1], "delta": {"content": ev[2]}, "finish_reason": None}])
                elif ev[0] == "choice":
                    yield chunk([{"index": ev[1], "delta": {}, "finish_reason": ev[3]}])
                elif ev[0] == "end" and include_usage:
                    yield chunk([], usage={"prompt_tokens": ev[1], "completion_tokens": ev[2],
                                           "total_tokens": ev[1] + ev[2]})
        except APIError as e:  # the status line is sent already: the error goes in the stream
            metrics.errors.labels(e.type, e.code or "").inc()
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/images/generations")
    async def images(req: ImageRequest, request: Request):
        check_model(req.model)
        if pipe.detokenizer is None:
            raise APIError(400, "this server's pipeline has no DiT, so it does not generate images", "model",
                           code="unsupported")
        if req.n > cfg.max_n:
            raise APIError(400, f"n {req.n} is over this server's cap of {cfg.max_n}", "n")
        size = _size(req.size, pipe, cfg)
        steps = req.steps or pipe.config.steps
        if steps > cfg.max_steps:
            raise APIError(400, f"steps {steps} is over this server's cap of {cfg.max_steps}", "steps")
        job = engine.submit(Job("image", ("image", size, steps, req.cfg_scale, req.seed), n=req.n, prompt=req.prompt,
                                size=size, steps=steps, cfg_scale=req.cfg_scale, seed=req.seed))
        pictures = []
        async for ev in events(request, job):
            if ev[0] == "images":
                pictures = ev[1]
        data = await run_in_threadpool(lambda: [{"b64_json": _png_b64(p)} for p in pictures])
        return {"created": int(time.time()), "data": data}

    return app


def _size(size: str | None, pipe, cfg) -> tuple[int, int]:
    """``"WxH"`` (or None / ``"auto"``: the pipeline's ``image_size``) -> ``(H, W)``, checked."""
    if size in (None, "auto"):
        return pipe.config.image_size, pipe.config.image_size
    m = re.fullmatch(r"(\d+)x(\d+)", size)
    if not m:
        raise APIError(400, f"size {size!r} is not WIDTHxHEIGHT (e.g. 1024x1024)", "size")
    w, h = int(m.group(1)), int(m.group(2))
    step = pipe.detokenizer.vae.downsample
    if not (0 < w <= cfg.max_image_size and 0 < h <= cfg.max_image_size) or w % step or h % step:
        raise APIError(400, f"size {size}: each side must be a multiple of {step} up to {cfg.max_image_size}", "size")
    return h, w


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
