"""The lmms-eval model, run for real by the installed lmms-eval on tiny local tasks built here."""

import importlib.util
import json
import pathlib

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


def test_pretrained_and_pipeline_keys_both_load_a_directory(pipeline_dir, pipe, tasks):
    from kelix.eval.lmms import KelixLMMS

    root, rows = tasks
    request = ([Image.open(rows[0]["image"]).convert("RGB")], rows[0]["question"])
    want = pipe.understand(*request, max_new_tokens=5)
    for key in ("pretrained", "pipeline"):  # --model_args pretrained=DIR or pipeline=DIR: a path, loaded
        model = KelixLMMS(**{key: pipeline_dir})
        from kelix.eval.runner import PipelineModel

        assert PipelineModel(model.pipe).answer([request], 5) == [want]
    with pytest.raises(ValueError, match="kelix \\(lmms-eval\\): pipeline directory '/nowhere' does not exist"):
        KelixLMMS(pretrained="/nowhere")


@pytest.mark.slow
def test_lmms_eval_cli_runs_the_kit_model(pipeline_dir, pipe, tasks, tmp_path):
    """lmms-eval's own CLI, as its users run it (entry point `--model kelix`), on a local json task."""
    import glob
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("filelock._api") is None:
        pytest.skip("filelock>=4 is installed; the [eval] extra pins filelock<4 (lmms-eval 0.7.3 imports filelock._api)")
    root, rows = tasks
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pathlib.Path(__file__).parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "lmms_eval", "eval", "--model", "kelix", "--model_args",
           f"pipeline={pipeline_dir},max_new_tokens=5", "--tasks", "kelix_tiny_gen", "--include_path", str(root),
           "--output_path", str(tmp_path / "out"), "--batch_size", "2", "--log_samples", "--verbosity", "ERROR"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    # lmms-eval exits 0 even when every item failed: the results files are what count
    results = glob.glob(str(tmp_path / "out" / "**" / "*_results.json"), recursive=True)
    assert proc.returncode == 0 and len(results) == 1, proc.stderr[-2000:]
    samples = [json.loads(x) for f in glob.glob(str(tmp_path / "out" / "**" / "*_samples_*.jsonl"), recursive=True)
               for x in open(f)]
    got = [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
    expected = [pipe.understand(Image.open(r["image"]).convert("RGB"), r["question"], max_new_tokens=5) for r in rows]
    assert [g[0] if isinstance(g, list) else g for g in got] == expected
    exact = json.load(open(results[0]))["results"]["kelix_tiny_gen"]["exact,none"]
    assert exact == sum(e == r["answer"] for e, r in zip(expected, rows)) / 3


def test_eval_extra_pins_filelock_below_4():
    tomllib = pytest.importorskip("tomllib")
    extra = tomllib.loads((pathlib.Path(__file__).parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["eval"]
    assert any(d.replace(" ", "").startswith("filelock") and "<4" in d for d in extra)


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
