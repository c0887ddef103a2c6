"""What the server accepts and how it batches (``kelix serve`` flags map one to one)."""

from __future__ import annotations

from dataclasses import dataclass

from kelix.data.decode import DEFAULT_MAX_PIXELS


@dataclass
class ServeConfig:
    """Limits, batching and security of the server.

    Args:
        max_batch: requests answered together in one batched forward (1: one by one).
        batch_wait_ms: how long the first request of a batch waits for others to join it.
        max_queue: requests waiting or running; one more is refused with 429.
        max_body_bytes: largest request body (413 above; checked while it arrives, not after).
        max_image_pixels: width x height of an image, read from its header before any pixel is
            decoded: the data layer's decompression-bomb bound (:data:`kelix.data.decode.DEFAULT_MAX_PIXELS`).
        max_images: images per request.
        max_tokens: the largest ``max_tokens`` a request may ask (blocks of the answer).
        default_max_tokens: ``max_tokens`` of a request that gives none.
        max_n: the largest ``n`` (choices of a chat, images of a generation).
        max_image_size: the largest side of a generated image, in pixels.
        max_steps: the most DiT sampling steps a generation may ask.
        timeout_s: a request not answered within this is cancelled (408); its rows leave the batch.
        api_key: when set, every ``/v1`` request needs ``Authorization: Bearer <api_key>`` (401 without).
        allow_url_images: fetch ``http(s)://`` image URLs (off: refused; the server makes no outbound request).
        allow_local_files: a directory whose files a request may name as images (``file://`` or a
            path); None: no local file is ever read.
        model_name: the id ``/v1/models`` lists and responses carry.
    """

    max_batch: int = 8
    batch_wait_ms: float = 10.0
    max_queue: int = 64
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = 8
    max_tokens: int = 1024
    default_max_tokens: int = 128
    max_n: int = 4
    max_image_size: int = 2048
    max_steps: int = 100
    timeout_s: float = 300.0
    api_key: str | None = None
    allow_url_images: bool = False
    allow_local_files: str | None = None
    model_name: str = "kelix"

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_image_pixels", "max_images", "max_tokens",
                     "default_max_tokens", "max_n", "max_image_size", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0 or self.timeout_s <= 0:
            raise ValueError(f"serve batch_wait_ms ({self.batch_wait_ms}) must be >= 0 and timeout_s "
                             f"({self.timeout_s}) > 0")
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)
