"""One worker thread that batches requests: the window, the queue bound, faults kept to their request.

Routes :meth:`Engine.submit` a :class:`Job` from the event loop; the worker takes the oldest waiting
job, waits up to ``batch_wait_ms`` for compatible jobs (same kind and sampling; images: same size,
steps, guidance and seed) up to ``max_batch``, and runs them together. Events go back to each job's
asyncio queue. An exception in a batch is retried job by job, so only the job that raises it fails;
the server and the other jobs carry on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from kelix.serve.batch import prepare_chat, run_chat, run_images
from kelix.serve.protocol import APIError

log = logging.getLogger("kelix.serve")


@dataclass
class Job:
    """One request as the worker sees it.

    ``kind`` is ``chat`` (turns, images, sampling, n, max_tokens, stop, stream) or ``image`` (prompt,
    n, size, steps, cfg_scale, seed); ``key`` groups jobs that may share a batch."""

    kind: str
    key: tuple
    n: int = 1
    turns: list | None = None
    images: list | None = None
    sampling: object = None
    max_tokens: int = 0
    stop: list = field(default_factory=list)
    stream: bool = False
    prompt: str = ""
    size: tuple | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int = 0
    cancelled: bool = False
    started: bool = False
    streamed: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    doc: object = None
    feats: object = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    submitted: float = field(default_factory=time.perf_counter)

    def emit(self, event: tuple):
        """Hand ``event`` to the request's coroutine (called from the worker thread)."""
        self.streamed |= event[0] == "delta"
        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the loop closed in between: nobody is waiting any more
                pass


class Engine:
    """The batching worker over a loaded :class:`~kelix.pipeline.KelixPipeline`."""

    def __init__(self, pipe, cfg, metrics=None):
        self.pipe, self.cfg, self.metrics = pipe, cfg, metrics
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running = 0
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- the event loop's side
    def start(self):
        self._thread = threading.Thread(target=self._work, name="kelix-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0):
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> Job:
        """Queue ``job`` (429 when ``max_queue`` requests are already waiting or running)."""
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        with self._cond:
            if len(self._waiting) + self._running >= self.cfg.max_queue:
                raise APIError(429, f"the server has {self.cfg.max_queue} requests queued or running "
                               "(--max-queue); retry later", type="rate_limit_error", code="queue_full")
            self._waiting.append(job)
            self._gauge()
            self._cond.notify_all()
        return job

    @property
    def depth(self) -> int:
        return len(self._waiting) + self._running

    def _gauge(self):
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._waiting) + self._running)

    # -- the worker's side
    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job and the compatible ones arriving within the window."""
        with self._cond:
            while not self._waiting and not self._stop:
                self._cond.wait(0.5)
            if not self._waiting:
                return None
            first = self._waiting.popleft()
            batch, deadline = [first], time.monotonic() + self.cfg.batch_wait_ms / 1000
            while len(batch) < self.cfg.max_batch:
                more = [j for j in self._waiting if j.key == first.key][: self.cfg.max_batch - len(batch)]
                for j in more:
                    self._waiting.remove(j)
                batch += more
                left = deadline - time.monotonic()
                if len(batch) >= self.cfg.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            self._running = len(batch)
            return batch

    def _work(self):
        torch.set_grad_enabled(False)
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run([j for j in batch if not j.cancelled])
            finally:
                with self._cond:
                    self._running = 0
                    self._gauge()

    def _run(self, jobs: list[Job]):
        if not jobs:
            return
        for j in jobs:
            j.started = True
        if self.metrics is not None:
            self.metrics.batch_size.labels(jobs[0].kind).observe(len(jobs))
        t0 = time.perf_counter()
        try:
            if jobs[0].kind == "chat":
                ready = []
                for j in jobs:  # a request whose images cannot be read fails alone
                    try:
                        prepare_chat(self.pipe, j)
                        ready.append(j)
                    except Exception as e:  # noqa: BLE001 - reported to that request only
                        self._fail(j, e)
                if ready:
                    done = run_chat(self.pipe, ready)
                    self._count("tokens", done, t0)
            else:
                self._count("images", run_images(self.pipe, jobs), t0)
        except Exception as e:  # noqa: BLE001 - one request's fault must not end the others
            if len(jobs) == 1:
                self._fail(jobs[0], e)
                return
            log.warning("a batch of %d failed (%s: %s); retrying its requests one by one",
                        len(jobs), type(e).__name__, e)
            for j in jobs:
                if j.streamed:  # part of its answer has been sent
                    self._fail(j, e)
                else:
                    j.completion_tokens = 0
                    self._run([j])

    def _count(self, what: str, n: int, t0: float):
        if self.metrics is not None and n:
            self.metrics.produced.labels(what).inc(n)
            self.metrics.rate.labels(what).set(n / max(time.perf_counter() - t0, 1e-9))

    def _fail(self, job: Job, e: Exception):
        log.error("request failed: %s: %s", type(e).__name__, e)
        job.emit(("error", APIError(500, f"the server failed on this request: {type(e).__name__}: {e}",
                                    type="server_error", code="internal_error")))
