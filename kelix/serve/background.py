"""The server on a loopback port in a background thread of this process: for notebooks, tests and
benchmarks (``kelix serve`` is the command for everything else)."""

from __future__ import annotations

import socket
import threading
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS has free now (another process may take it before it is bound: fine for tests)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """``BackgroundServer(pipe, cfg)`` serves at ``.url`` until :meth:`stop` (``.app``, ``.server``:
    the FastAPI app and the uvicorn server). Signals are not captured off the main thread: stop it,
    or call ``server.handle_exit(sig, None)`` as uvicorn's signal handler does."""

    def __init__(self, pipe, cfg, host: str = "127.0.0.1", port: int | None = None, start_timeout: float = 60):
        import uvicorn

        from kelix.serve.app import build_app

        self.app = build_app(pipe, cfg)
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        # keep-alive past uvicorn's 5 s: a pooled client connection idle for a slow test is not closed
        # under it as it sends (a race that surfaces as a connection error with max_retries=0)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=self.port, log_level="error",
                                                    timeout_keep_alive=300))
        self.thread = threading.Thread(target=self.server.run, name="kelix-serve", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"kelix serve did not start on {self.url}")
            time.sleep(0.02)

    def stop(self, timeout: float = 30):
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
