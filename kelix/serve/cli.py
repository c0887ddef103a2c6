"""``kelix serve``: load a pipeline and serve it (uvicorn) until SIGTERM or Ctrl-C, which drain first."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from kelix.data.decode import DEFAULT_MAX_PIXELS

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parser() -> argparse.ArgumentParser:
    from kelix.pipeline_cli import _cuda

    p = argparse.ArgumentParser(prog="kelix serve", description="Serve an exported pipeline behind an "
                                "OpenAI-compatible HTTP API (/v1/chat/completions, /v1/images/generations).")
    p.add_argument("--pipeline", help="pipeline directory (pipeline.json + tokenizer/ llm/ dit/)")
    p.add_argument("--tokenizer", help="exported tokenizer directory (instead of --pipeline)")
    p.add_argument("--llm", help="exported LLM directory (instead of --pipeline)")
    p.add_argument("--dit", help="exported DiT directory (instead of --pipeline)")
    p.add_argument("--no-dit", action="store_true", help="leave the DiT unloaded: chat only, faster start")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device (default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: as saved)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default="kelix", help="the model id clients name (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("KELIX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $KELIX_API_KEY; unset: no key)")
    p.add_argument("--max-batch", type=int, default=8, help="requests per batched forward (1: one by one)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting or running; more get 429")
    p.add_argument("--max-body-bytes", type=int, default=20 * 1024 * 1024)
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="width*height of a request image, checked from its header (default: %(default)s)")
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a request is cancelled (408)")
    p.add_argument("--allow-url-images", action="store_true", help="fetch http(s) image URLs named in requests")
    p.add_argument("--allow-local-files", metavar="DIR", help="read image files named in requests, under DIR only")
    p.add_argument("--access-log", action="store_true", help="log one line per request (never its body)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"kelix serve needs {', '.join(missing)}: pip install 'kelix[serve]'")
    import uvicorn

    from kelix.pipeline_cli import _load
    from kelix.serve.app import build_app
    from kelix.serve.config import ServeConfig

    if a.allow_local_files is not None and not os.path.isdir(a.allow_local_files):
        raise SystemExit(f"kelix serve: --allow-local-files {a.allow_local_files!r} is not a directory")
    try:
        cfg = ServeConfig(max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms, max_queue=a.max_queue,
                          max_body_bytes=a.max_body_bytes, max_image_pixels=a.max_image_pixels,
                          max_images=a.max_images, max_tokens=a.max_tokens, timeout_s=a.timeout,
                          api_key=a.api_key or None, allow_url_images=a.allow_url_images,
                          allow_local_files=a.allow_local_files, model_name=a.model_name)
    except ValueError as e:
        raise SystemExit(f"kelix serve: {str(e).removeprefix('serve ')}") from None
    if a.host not in LOOPBACK and cfg.api_key is None:
        print(f"kelix serve: warning: binding {a.host} with no API key: anyone who reaches this port can use it",
              file=sys.stderr)
    pipe = _load(a, dit=not a.no_dit)
    app = build_app(pipe, cfg)
    server = uvicorn.Server(uvicorn.Config(app, host=a.host, port=a.port, log_level="warning",
                                           access_log=a.access_log, timeout_graceful_shutdown=int(cfg.timeout_s)))
    # uvicorn drains on SIGTERM, then raises the signal again under the handler it found: a no-op here,
    # so a drained server exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    print(f"kelix serve: http://{a.host}:{a.port}/v1 (model {cfg.model_name!r}, max batch {cfg.max_batch}"
          f"{', API key required' if cfg.api_key else ''}); Ctrl-C or SIGTERM drains and stops", flush=True)
    server.run()
    print("kelix serve: drained and stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
