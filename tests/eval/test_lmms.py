"""The lmms-eval model, run for real by the installed lmms-eval on tiny local tasks built here."""

import json

import pytest
import torch
from PIL import Image

lmms_eval = pytest.importorskip("lmms_eval")  # the [eval] extra

UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return doc["choices"]


def process_results(doc, results):
    return {"exact": float(results[0].strip() == doc["answer"])}
'''

GEN_TASK = """task: kelix_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 5
  until: []
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
"""

MC_TASK = """task: kelix_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: 0
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms-tasks")
    rows = []
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40 + 8 * i, 36), color).save(root / f"{i}.png")
        rows.append({"image": str(root / f"{i}.png"), "question": f"What colour is picture {i}?", "answer": color,
                     "choices": [color, "purple"]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "utils.py").write_text(UTILS)
    (root / "gen.yaml").write_text(GEN_TASK.format(data=root / "data.jsonl"))
    (root / "mc.yaml").write_text(MC_TASK.format(data=root / "data.jsonl"))
    return root, rows


@pytest.fixture(autouse=True)
def _filelock4(monkeypatch):
    """lmms-eval 0.7's file-lock patch imports filelock._api, gone in filelock 4 (its own bug, not ours):
    without that module the patch is skipped; datasets' own locks still work."""
    import importlib.util

    import lmms_eval.evaluator

    if importlib.util.find_spec("filelock._api") is None:
        monkeypatch.setattr(lmms_eval.evaluator, "_enable_reentrant_filelocks", lambda: None)


def _evaluate(model, task, root):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    return simple_evaluate(model=model, tasks=[task], task_manager=TaskManager(include_path=str(root)),
                           log_samples=True, bootstrap_iters=0, process_docs_parallel=1)


def test_generate_until_through_lmms_eval(pipe, tasks):
    from kelix.eval.lmms import KelixLMMS

    root, rows = tasks
    out = _evaluate(KelixLMMS(pipeline=pipe, batch_size=2), "kelix_tiny_gen", root)
    samples = sorted(out["samples"]["kelix_tiny_gen"], key=lambda s: s["doc_id"])
    expected = [pipe.understand(Image.open(r["image"]).convert("RGB"), r["question"], max_new_tokens=5) for r in rows]
    got = [s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0] for s in samples]
    assert got == expected
    assert out["results"]["kelix_tiny_gen"]["exact,none"] == sum(e == r["answer"] for e, r in zip(expected, rows)) / 3


def test_loglikelihood_through_lmms_eval_matches_teacher_forcing(pipe, tasks):
    from kelix.eval.lmms import KelixLMMSSimple, continuation_logprob
    from kelix.llm.generate import understanding_doc

    root, rows = tasks
    out = _evaluate(KelixLMMSSimple(pipeline=pipe), "kelix_tiny_mc", root)
    samples = sorted(out["samples"]["kelix_tiny_mc"], key=lambda s: s["doc_id"])
    lm = pipe.lm
    right = 0
    for s, r in zip(samples, rows):
        codes = pipe.tokenizer.encode([Image.open(r["image"]).convert("RGB")])
        lls = []
        for choice in r["choices"]:
            ids = lm.text_tokenizer.encode(" " + choice, add_special_tokens=False)
            lls.append(_teacher_forced(lm, understanding_doc(lm, r["question"], codes), ids))
        got = [x[0][0] if isinstance(x[0], (list, tuple)) else x[0] for x in s["resps"]]
        assert got == pytest.approx([-x for x in lls], abs=1e-4)  # reported as a loss, as lmms-eval's models do
        right += int(max(range(2), key=lambda k: lls[k]) == 0)
    assert out["results"]["kelix_tiny_mc"]["acc,none"] == pytest.approx(right / 3)
    # greedy: the continuation the model writes itself is greedy, and a changed token is not
    from kelix.llm.generate import Sampling, generate_text

    doc = understanding_doc(lm, "Say something.", [])
    ids = generate_text(lm, [doc], 4, Sampling(temperature=0), stop_ids=())[0]
    assert continuation_logprob(lm, doc, ids)[1] is True
    assert continuation_logprob(lm, doc, ids[:-1] + [(ids[-1] + 1) % 200 + 32])[1] is False


@torch.no_grad()
def _teacher_forced(lm, doc, ids):
    """One backbone pass over prompt + continuation (no cache), slot-0 text logits at each position."""
    from kelix.llm.generate import text_banned_ids, text_logits

    N = lm.vocab.N
    tokens = torch.tensor([doc.tokens + ids[:-1]])
    codes = torch.cat([doc.codes(N), torch.full((len(ids) - 1, N), -1)])[None]
    h = lm.hidden(lm.embed_blocks(tokens, codes))[0][0, len(doc.tokens) - 1:]
    logp = text_logits(lm, lm.decoder(h[:, None], kind="text")[:, -1], text_banned_ids(lm)).float().log_softmax(-1)
    return float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum())


def test_registration():
    import importlib
    import pathlib

    from lmms_eval import models

    from kelix.eval import lmms

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    # the entry point lmms-eval loads once the package is installed: pyproject names manifest()

    project = tomllib.loads((pathlib.Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["lmms_eval.models"]["kelix"]
    module, func = target.split(":")
    manifest = getattr(importlib.import_module(module), func)()
    assert manifest.model_id == "kelix" and manifest.chat_class_path == "kelix.eval.lmms.KelixLMMS"
    assert any("lmms-eval" in d for d in project["optional-dependencies"]["eval"])
    lmms.register()
    assert models.get_model("kelix") is lmms.KelixLMMS
    assert models.get_model("kelix", force_simple=True) is lmms.KelixLMMSSimple
