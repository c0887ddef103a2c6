"""The optional judge against a local OpenAI-compatible endpoint served by the test."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from kelix.cli import main
from kelix.eval import get_benchmark
from kelix.eval.judge import Judge, JudgeError
from tests.eval.test_readers import MMB, b64png, write_tsv


@pytest.fixture
def endpoint():
    """Replies "B" to option matching and "12" to answer extraction; records every request."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            prompt = body["messages"][0]["content"]
            reply = "The letter is B." if prompt.endswith("Letter:") else "12"
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()
    server.server_close()


def test_multiple_choice_asks_the_judge_only_when_the_rules_fail(endpoint, tmp_path, monkeypatch):
    url, seen = endpoint
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    bench = get_benchmark("ai2d")
    bench.judge = Judge(url, "judge-model")
    items = bench.read(write_tsv(tmp_path / "a.tsv", MMB))
    assert bench.score_item(items[0], "C") == {"acc": 0.0, "path": "rule"} and seen == []  # the rules read "C"
    assert bench.score_item(items[0], "the animal that barks") == {"acc": 1.0, "path": "judge"}  # the judge reads B
    assert len(seen) == 1 and seen[0]["path"] == "/v1/chat/completions" and seen[0]["auth"] == "Bearer sk-test"
    body = seen[0]["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert "Question: What animal is this?\nOptions:\nA. cat\nB. dog" in body["messages"][0]["content"]
    assert get_benchmark("ai2d").score_item(items[0], "the animal that barks") == {"acc": 0.0, "path": "none"}


def test_mathvista_extracts_with_the_judge_through_the_cli(endpoint, tmp_path):
    url, seen = endpoint
    rows = [dict(index=2, image=b64png(), question="How many birds?", answer="12", question_type="free_form",
                 answer_type="integer", precision="", choices="", task="counting")]
    data = write_tsv(tmp_path / "MathVista_MINI.tsv", rows)
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": 2, "prediction": "a dozen of them"}) + "\n")
    args = ["eval", "score", "--benchmark", "mathvista", "--data", data, "--predictions", str(tmp_path / "p.jsonl")]
    assert main([*args, "--out", str(tmp_path / "rules")]) == 0
    assert json.load(open(tmp_path / "rules" / "scores.json"))["overall"] == {"acc": 0.0}
    assert main([*args, "--out", str(tmp_path / "judged"), "--judge-url", url, "--judge-model", "m"]) == 0
    scores = json.load(open(tmp_path / "judged" / "scores.json"))
    assert scores["overall"] == {"acc": 1.0} and scores["judge"] == f"m at {url}/chat/completions"
    assert "Response: a dozen of them" in seen[0]["body"]["messages"][0]["content"]


def test_judge_errors_are_one_line(tmp_path, capsys):
    data = write_tsv(tmp_path / "a.tsv", MMB)
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": 0, "prediction": "no idea"}) + "\n")
    args = ["eval", "score", "--benchmark", "ai2d", "--data", data, "--predictions", str(tmp_path / "p.jsonl"),
            "--out", str(tmp_path / "o")]
    assert main([*args, "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kelix eval: judge http://127.0.0.1:9/v1/chat/completions:")
    assert main([*args, "--judge-url", "http://127.0.0.1:9/v1"]) == 2
    assert "give both --judge-url and --judge-model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'ftp://x' is not an http"):
        Judge("ftp://x", "m")
    assert issubclass(JudgeError, RuntimeError)
