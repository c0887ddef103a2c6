"""OpenAI's request shapes (the fields the server reads) and its error shape.

Unknown fields are ignored, as OpenAI-compatible servers do (clients send ``logprobs``, ``user``...);
fields that are read are typed and bounded here, and the route checks the server's own limits.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class APIError(Exception):
    """A refusal: HTTP ``status`` and OpenAI's ``{"error": {message, type, param, code}}`` body."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ImageURL(BaseModel):
    url: str


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # an extension (vLLM's): 0 keeps every id
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None


class ImageRequest(BaseModel):
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None  # "WxH" (or "auto"/None: the pipeline's image_size)
    response_format: Literal["b64_json"] = "b64_json"  # no file is hosted, so no "url"
    steps: int | None = Field(None, ge=1)  # the kit's extras: DiT steps and guidance, and a seed
    cfg_scale: float | None = Field(None, ge=0.0)
    seed: int = 0
