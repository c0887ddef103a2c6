"""An optional OpenAI-compatible judge, for the benchmarks whose reference toolkit uses one.

* multiple choice (VLMEvalKit's MCQ benchmarks: MMBench, SEED-Bench, AI2D, RealWorldQA, MMMU): asked
  only when the rules find no option in the answer, as VLMEvalKit falls back to ChatGPT;
* MathVista: extracts the final answer from every response before the rules score it (the reference
  extracts with GPT-4).

``kelix eval run|score --judge-url http://host:port/v1 --judge-model NAME`` (the key, if the endpoint
needs one, from ``$OPENAI_API_KEY``). Replies are greedy (temperature 0); scores.json records the judge.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from kelix.eval.answers import extract_choice


class JudgeError(RuntimeError):
    """The judge endpoint did not answer (or answered something that is not a chat completion)."""


class Judge:
    """Chat completions from ``url`` (``.../v1``) with ``model``.

    Args:
        url: the endpoint's base URL; ``/chat/completions`` is appended.
        model: the model name the endpoint serves.
        timeout: seconds per request.
    """

    def __init__(self, url: str, model: str, timeout: float = 60.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--judge-url {url!r} is not an http(s) URL")
        self.url, self.model, self.timeout = url.rstrip("/") + "/chat/completions", model, timeout

    def ask(self, prompt: str, max_tokens: int = 32) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": max_tokens}
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        req = urllib.request.Request(self.url, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:  # noqa: S310 (the user's own endpoint)
                reply = json.loads(r.read())
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
            raise JudgeError(f"judge {self.url}: {e}") from None
        try:
            return str(reply["choices"][0]["message"]["content"]).strip()
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"judge {self.url}: unexpected reply {str(reply)[:120]!r}") from None

    def choose(self, question: str, options: dict[str, str], prediction: str) -> str | None:
        """The option letter the judge reads in ``prediction`` (None for none of them)."""
        listed = "\n".join(f"{k}. {v}" for k, v in options.items())
        prompt = ("Match the answer below to one option of the multiple-choice question. Reply with that "
                  "option's letter only, or Z if the answer matches no option.\n"
                  f"Question: {question}\nOptions:\n{listed}\nAnswer: {prediction}\nLetter:")
        for _ in range(3):  # VLMEvalKit reads the judge's reply with its own rules, three tries
            letter = extract_choice(self.ask(prompt, 4), options)
            if letter:
                return letter
        return None  # where VLMEvalKit then picks an option at random, the kit counts it wrong

    def extract(self, question: str, prediction: str) -> str:
        """The final answer the judge reads in a free-form ``prediction``."""
        prompt = ("Read the question and a model's response, then reply with the response's final answer "
                  "only: a number, the text of the chosen option, or a short phrase.\n"
                  f"{question}\nResponse: {prediction}\nFinal answer:")
        return self.ask(prompt, 32)
