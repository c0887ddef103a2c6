"""Faults and load: a full queue (429), a timeout (408), a client that leaves mid-answer (its rows
stop), a request that fails inside a batch (the others are answered), and SIGTERM during a request
(`kelix serve` in a subprocess drains it, then exits 0)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import kelix.serve.batch
import kelix.serve.engine
from kelix.serve.background import free_port
from kelix.serve.config import ServeConfig
from tests.serve.conftest import Running
from tests.serve.test_serve import message, metric, picture


@pytest.fixture(scope="module")
def server(pipe):
    srv = Running(pipe, ServeConfig(max_batch=4, batch_wait_ms=200, max_queue=4, timeout_s=2.0))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def slow(monkeypatch, where: str, seconds: float):
    """Make each call of ``kelix.serve.<where>`` (``engine.prepare_chat``, ``batch._embed_one``) take longer."""
    module, name = where.split(".")
    module = {"engine": kelix.serve.engine, "batch": kelix.serve.batch}[module]
    real = getattr(module, name)

    def delayed(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, delayed)


def wait_idle(server, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while httpx.get(server.url + "/health").json()["queue_depth"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def hello(client) -> str:
    return client.chat.completions.create(model="kelix", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices[0].message.content


def test_a_full_queue_answers_429_then_serves_again(server, client, monkeypatch):
    slow(monkeypatch, "engine.prepare_chat", 0.3)
    with ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(hello, client) for _ in range(4)]
        while httpx.get(server.url + "/health").json()["queue_depth"] < 4:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            hello(client)
        assert e.value.body["code"] == "queue_full"
        assert all(f.result() is not None for f in busy)
    assert hello(client) is not None


def test_a_request_over_the_timeout_gets_408_and_the_next_is_answered(server, client, monkeypatch):
    slow(monkeypatch, "engine.prepare_chat", 3.0)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
    monkeypatch.undo()
    wait_idle(server)
    assert hello(client) is not None


def test_a_client_that_leaves_stops_its_rows_at_the_next_block(server, client, monkeypatch):
    slow(monkeypatch, "batch._embed_one", 0.05)
    wait_idle(server)
    drawn = metric(server, 'kelix_generated_total{what="tokens"}')
    left = metric(server, 'kelix_cancelled_total{reason="disconnect"}')
    body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 60, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the first piece of the answer: leave
    wait_idle(server)
    assert metric(server, 'kelix_cancelled_total{reason="disconnect"}') == left + 1
    assert metric(server, 'kelix_generated_total{what="tokens"}') - drawn < 20  # not the 60 asked
    monkeypatch.undo()
    assert hello(client) is not None


def test_a_request_failing_in_a_batch_leaves_the_others_answered(server, client, pipe, monkeypatch):
    real = kelix.serve.engine.run_chat

    def fragile(p, jobs, *a, **k):  # a fault that only one request's presence triggers
        if any("boom" in str(j.turns) for j in jobs):
            raise RuntimeError("boom")
        return real(p, jobs, *a, **k)

    monkeypatch.setattr(kelix.serve.engine, "run_chat", fragile)
    asks = [(picture(i), q) for i, q in enumerate(["one?", "boom", "three?"])]
    before = metric(server, 'kelix_batch_size_count{kind="chat"}')

    def ask(a):
        try:
            return client.chat.completions.create(model="kelix", messages=message(*a), temperature=0,
                                                  max_tokens=6).choices[0].message.content.strip()
        except openai.InternalServerError as e:
            return e.body["code"]

    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(ask, asks))
    assert got[1] == "internal_error"
    assert [got[0], got[2]] == [pipe.understand(img, q, max_new_tokens=6) for img, q in (asks[0], asks[2])]
    # one batch of three, then each alone
    assert metric(server, 'kelix_batch_size_count{kind="chat"}') - before == 4
    assert hello(client) is not None


def _long_question(pipe) -> tuple[dict, str]:
    """A streamed request whose greedy answer runs long (still being written when a signal comes), and
    that answer."""
    from kelix.llm.generate import Sampling, generate_text
    from kelix.serve.batch import chat_doc

    question = "Tell me a long story."
    ids = generate_text(pipe.lm, [chat_doc(pipe.lm, [("user", [question])], [])], 200, Sampling(temperature=0))[0]
    assert len(ids) > 60
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 200, "stream": True, "temperature": 0}
    return body, pipe.lm.text_tokenizer.decode(ids, skip_special_tokens=True)


def _stream_and_signal(url: str, body: dict, signal_fn) -> tuple[str, str | None, str]:
    """Stream ``body``, call ``signal_fn()`` at the first piece of the answer, read on to the end:
    the answer, its finish reason and the last SSE line."""
    pieces, signalled, last = [], False, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice)
                if choice["delta"].get("content") and not signalled:
                    signal_fn()
                    signalled = True
            last = line or last
    assert signalled
    return "".join(p["delta"].get("content") or "" for p in pieces), pieces[-1]["finish_reason"], last


def test_shutdown_drains_the_request_in_flight(pipe):
    """What uvicorn does on SIGTERM (its handler: ``handle_exit``), on a server in a thread."""
    body, answer = _long_question(pipe)
    srv = Running(pipe, ServeConfig())
    try:
        text, reason, last = _stream_and_signal(srv.url, body, lambda: srv.server.handle_exit(signal.SIGTERM, None))
        assert (text, reason, last) == (answer, "stop", "data: [DONE]")  # whole, not cut by the shutdown
        srv.thread.join(30)
        assert not srv.thread.is_alive() and not srv.app.state.engine._thread.is_alive()
    finally:
        srv.stop()


@pytest.mark.slow  # a fresh process loads torch and the pipeline: 15 s idle, a minute on a busy 2-core box
def test_sigterm_drains_the_request_in_flight_then_exits_0(pipe, pipeline_dir):
    body, answer = _long_question(pipe)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kelix.cli", "serve", "--pipeline", pipeline_dir, "--no-dit",
                             "--port", str(port), "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.2)
        text, reason, last = _stream_and_signal(url, body, lambda: proc.send_signal(signal.SIGTERM))
        assert (text, reason, last) == (answer, "stop", "data: [DONE]")
        assert proc.wait(60) == 0
        assert "drained" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_flags_are_refused_before_loading(tmp_path, capsys):
    from kelix.cli import main

    for argv, line in [(["--max-batch", "0"], "kelix serve: max_batch must be >= 1, got 0"),
                       (["--allow-local-files", str(tmp_path / "nope")],
                        f"kelix serve: --allow-local-files {str(tmp_path / 'nope')!r} is not a directory")]:
        with pytest.raises(SystemExit) as e:  # one line on stderr, exit 2: the user's input
            main(["serve", "--pipeline", str(tmp_path), *argv])
        assert e.value.code == 2 and capsys.readouterr().err.splitlines() == [line]


def test_local_files_are_read_only_under_the_allowed_directory(pipe, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    picture(3).save(allowed / "ok.png")
    picture(4).save(tmp_path / "secret.png")
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")

    def ask(url, path):
        return httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": path}},
                                                      {"type": "text", "text": "What?"}]}],
            "max_tokens": 6, "temperature": 0})

    with Running(pipe, ServeConfig(allow_local_files=str(allowed))) as srv:
        r = ask(srv.url, str(allowed / "ok.png"))
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"].strip() == \
            pipe.understand(picture(3), "What?", max_new_tokens=6)
        assert ask(srv.url, "file://" + str(allowed / "ok.png")).status_code == 200
        for outside in (str(allowed / ".." / "secret.png"), str(allowed / "link.png")):
            r = ask(srv.url, outside)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_path", outside


def test_a_chat_only_pipeline_refuses_images_and_answers_n_choices(pipe):
    from kelix.pipeline import KelixPipeline

    chat_only = KelixPipeline(pipe.tokenizer, pipe.lm, None, pipe.config)
    with Running(chat_only, ServeConfig()) as srv:
        r = httpx.post(srv.url + "/v1/images/generations", json={"prompt": "a cat"}, timeout=30)
        assert r.status_code == 400 and (r.json()["error"]["param"], r.json()["error"]["code"]) == ("model", "unsupported")
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "messages": message(picture(7), "Two?"), "n": 2, "temperature": 0, "max_tokens": 6})
        expected = pipe.understand(picture(7), "Two?", max_new_tokens=6)
        assert [c["message"]["content"].strip() for c in r.json()["choices"]] == [expected, expected]
        assert [c["index"] for c in r.json()["choices"]] == [0, 1]
