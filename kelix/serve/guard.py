"""The ASGI layer in front of the routes: API key, body size, and per-endpoint counts and latency.

It answers before the routes read anything: a ``/v1`` request without the right bearer token gets
401 (the token compared in constant time), and a body over ``max_body_bytes`` gets 413 as soon as
its ``Content-Length`` or its bytes so far exceed the bound (FastAPI would buffer it whole first).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time

from kelix.serve.protocol import APIError


def _digest(s: str | bytes) -> bytes:
    return hashlib.sha256(s.encode() if isinstance(s, str) else s).digest()


class Guard:
    """ASGI middleware: ``Guard(app, cfg, metrics)``."""

    def __init__(self, app, cfg, metrics):
        self.app, self.cfg, self.metrics = app, cfg, metrics
        self._key = _digest(cfg.api_key) if cfg.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, path = time.perf_counter(), [500], scope["path"]
        endpoint = path if path in ("/v1/chat/completions", "/v1/images/generations", "/v1/models", "/health",
                                    "/metrics") else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            error = self._check_key(scope) if path.startswith("/v1/") else None
            body = None
            if error is None:
                body, error = await self._read_body(scope, receive)
            if error is not None:
                return await self._refuse(error, counted)
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: waits for the client's disconnect

            await self.app(scope, replay, counted)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    def _check_key(self, scope) -> APIError | None:
        if self._key is None:
            return None
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        # both sides hashed: compare_digest's time then depends on neither the key nor its length
        if scheme.lower() == "bearer" and hmac.compare_digest(_digest(token.strip()), self._key):
            return None
        return APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                        type="invalid_request_error", code="invalid_api_key")

    async def _read_body(self, scope, receive) -> tuple[bytes, APIError | None]:
        limit = self.cfg.max_body_bytes
        too_big = APIError(413, f"the request body is over this server's limit of {limit} bytes (--max-body-bytes)",
                           code="body_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return b"", too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return b"", too_big
            if not message.get("more_body", False):
                break
        return b"".join(chunks), None

    async def _refuse(self, error: APIError, send):
        self.metrics.errors.labels(error.type, error.code or "").inc()
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if error.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
