"""`kelix serve` driven by the real `openai` client on a loopback port: chat with an image, streaming,
image generation, 32 concurrent clients answered in batches as the offline pipeline answers them,
and the refusals (each a 4xx naming its field, the server answering the next request)."""

from __future__ import annotations

import base64
import io
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image

from kelix.serve.config import ServeConfig
from tests.serve.conftest import KEY, Running, data_url

MAX_TOKENS = 12


def picture(i: int) -> Image.Image:
    img = Image.new("RGB", (70 + 4 * (i % 3), 50), "white")
    img.paste((40 * (i % 6), 30 + 20 * (i % 4), 30), (10, 10, 40, 40))
    return img


def message(img, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                         {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def server(pipe):
    srv = Running(pipe, ServeConfig(api_key=KEY, max_batch=8, batch_wait_ms=100, max_queue=40, max_images=2,
                                    max_tokens=64, max_image_pixels=200 * 200, max_body_bytes=200_000))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M))


def test_chat_with_an_image_is_the_offline_answer(client, pipe):
    from kelix.llm.generate import understanding_doc

    img = picture(1)
    r = client.chat.completions.create(model="kelix", messages=message(img, "What colour?"), temperature=0,
                                       max_tokens=MAX_TOKENS)
    assert r.choices[0].message.content.strip() == pipe.understand(img, "What colour?", max_new_tokens=MAX_TOKENS)
    assert r.choices[0].finish_reason in ("stop", "length")
    doc = understanding_doc(pipe.lm, "What colour?", pipe.tokenizer.encode([img]))
    assert r.usage.prompt_tokens == len(doc)  # text tokens and visual blocks (2x2 grid + markers) alike
    # every drawn block counts: MAX_TOKENS at "length", the answer and its stop token at "stop"
    assert r.usage.completion_tokens == MAX_TOKENS if r.choices[0].finish_reason == "length" else \
        r.usage.completion_tokens <= MAX_TOKENS


def test_streaming_sends_the_same_answer_in_chunks(client):
    kw = dict(model="kelix", messages=message(picture(2), "Describe."), temperature=0, max_tokens=MAX_TOKENS)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stop_strings_end_the_answer_streamed_or_not(client, pipe):
    from kelix.llm.generate import Sampling, generate_text, understanding_doc

    img = picture(5)
    doc = understanding_doc(pipe.lm, "Stop?", pipe.tokenizer.encode([img]))
    ids = generate_text(pipe.lm, [doc], 20, Sampling(temperature=0))[0]
    answer = pipe.lm.text_tokenizer.decode(ids, skip_special_tokens=True)
    at = next(i for i in range(4, len(answer) - 2) if "\ufffd" not in answer[i:i + 2])
    stop = answer[at:at + 2]
    kw = dict(model="kelix", messages=message(img, "Stop?"), temperature=0, max_tokens=20, stop=[stop, "never!"])
    r = client.chat.completions.create(**kw)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (answer[:answer.index(stop)], "stop")
    chunks = [c.choices[0] for c in client.chat.completions.create(**kw, stream=True)]
    assert "".join(c.delta.content or "" for c in chunks) == answer[:answer.index(stop)]
    assert chunks[-1].finish_reason == "stop"


def test_a_seeded_sampled_answer_repeats(client):
    kw = dict(model="kelix", messages=message(picture(6), "Guess."), temperature=1.0, top_p=0.9, seed=5, max_tokens=8)
    first, again = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    other = client.chat.completions.create(**{**kw, "seed": 6}).choices[0].message.content
    assert first == again and first != other


def test_image_generation_returns_pngs_of_the_size_asked(client, pipe):
    r = client.images.generate(model="kelix", prompt="a red circle", size="32x16", n=2,
                               extra_body={"steps": 2, "seed": 3})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in r.data]
    assert [(im.format, im.size) for im in images] == [("PNG", (32, 16))] * 2
    offline = pipe.generate(["a red circle"] * 2, size=(16, 32), steps=2, seed=3)
    assert list(images[0].convert("RGB").getdata()) == list(offline[0].getdata())


def test_32_concurrent_clients_are_batched_and_answer_as_offline(server, client, pipe):
    # answers of different lengths: rows leave the batch at different blocks and the rest go on
    asks = [(picture(i), f"Question {i}: what is drawn?", 4 + i % 9) for i in range(32)]
    offline = [pipe.understand(img, q, max_new_tokens=m) for img, q, m in asks]
    assert len(set(offline)) > 8  # the answers differ, so a row mixed up with another would show
    batches, requests = metric(server, 'kelix_batch_size_count{kind="chat"}'), \
        metric(server, 'kelix_batch_size_sum{kind="chat"}')

    def ask(a):
        r = client.chat.completions.create(model="kelix", messages=message(*a[:2]), temperature=0, max_tokens=a[2])
        return r.choices[0].message.content.strip()

    with ThreadPoolExecutor(32) as pool:
        served = list(pool.map(ask, asks))
    assert served == offline
    batches = metric(server, 'kelix_batch_size_count{kind="chat"}') - batches
    requests = metric(server, 'kelix_batch_size_sum{kind="chat"}') - requests
    assert requests == 32 and batches < 32  # some batch held more than one request
    assert metric(server, 'kelix_batch_size_bucket{kind="chat",le="1.0"}') < \
        metric(server, 'kelix_batch_size_count{kind="chat"}')


def _bomb() -> str:
    """A PNG whose header claims 1000 x 1000 pixels (over the server's 200 x 200, under PIL's own bound)
    and whose data holds 30 x 30: decoding it would fail, so only a header check refuses it as too large."""
    import zlib

    buf = io.BytesIO()
    Image.new("L", (30, 30)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = (1000).to_bytes(4, "big") * 2  # IHDR width, height
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")  # the IHDR chunk's CRC
    return "data:image/png;base64," + base64.b64encode(bytes(raw)).decode()


def _chat(content=None, **kw) -> dict:
    content = content if content is not None else [{"type": "text", "text": "hi"}]
    return {"model": "kelix", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


def _image(url: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]


BAD = {
    # an ignored field: without the bound this body would be answered at once
    "body over the limit": ("chat", _chat(padding="x" * 300_000), 413, None, "body_too_large"),
    "image pixels over the bound": ("chat", _chat(_image(_bomb())), 400, "messages[0].content[0].image_url",
                                    "too_many_pixels"),
    "too many images": ("chat", _chat(_image(data_url(picture(0))) * 2 + _image(data_url(picture(1)))), 400,
                        "messages", "too_many_images"),
    "max_tokens over the cap": ("chat", _chat(max_tokens=65), 400, "max_tokens", "max_tokens_too_large"),
    "an http image URL": ("chat", _chat(_image("http://127.0.0.1:9/cat.png")), 400,
                          "messages[0].content[0].image_url", None),
    "a local file": ("chat", _chat(_image("/etc/hostname")), 400, "messages[0].content[0].image_url", None),
    "not an image": ("chat", _chat(_image("data:image/png;base64," + base64.b64encode(b"GIF89a...").decode())),
                     400, "messages[0].content[0].image_url", None),
    "a bad role": ("chat", {"model": "kelix", "messages": [{"role": "robot", "content": "hi"}]}, 400,
                   "messages[0].role", "invalid_value"),
    "no messages": ("chat", {"model": "kelix", "messages": []}, 400, "messages", "invalid_value"),
    "an unknown model": ("chat", _chat(model="gpt-4o"), 404, "model", "model_not_found"),
    "a bad temperature": ("chat", _chat(temperature=3), 400, "temperature", "invalid_value"),
    "a bad size": ("images", {"prompt": "x", "size": "30x30"}, 400, "size", None),
    "a url response format": ("images", {"prompt": "x", "response_format": "url"}, 400, "response_format",
                              "invalid_value"),
    "too many steps": ("images", {"prompt": "x", "steps": 1000}, 400, "steps", None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_its_4xx_and_the_next_request_is_answered(server, client, case):
    route, body, status, param, code = BAD[case]
    path = "/v1/chat/completions" if route == "chat" else "/v1/images/generations"
    r = httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]
    if code:
        assert error["code"] == code
    ok = client.chat.completions.create(model="kelix", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_invalid_json_is_a_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_the_api_key_is_required(server):
    body = _chat()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # probes need no key


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["kelix"]
