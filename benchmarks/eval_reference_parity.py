"""Item-by-item parity of ``kelix eval``'s scorers with the reference toolkits' own scoring code.

Adversarial predictions (letters in odd places, refusals, option texts, long answers, numbers in many
spellings, contractions, periods, percents, spaces) are scored by the kit and by the reference, and every
disagreement is counted. The references: VLMEvalKit from a checkout (``--vlmevalkit DIR``, at the commit the
kit pins, ``kelix.eval.answers.VLMEVALKIT_COMMIT``; VLMEvalKit is not on PyPI, and its package imports the
world, so only its scoring modules are loaded, with its helper imports stubbed), and lmms-eval (installed,
the ``[eval]`` extra) for TextVQA and ChartQA. No judge: MCQ items the rules leave are wrong in both
(VLMEvalKit's ``exact_matching``), MathVista items its prefetch leaves are wrong in both.

    python benchmarks/eval_reference_parity.py --vlmevalkit ~/src/VLMEvalKit [--n 400] [--seed 7]

Prints one JSON object: per benchmark, the items compared and the disagreements (first ones shown).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import os
import random
import sys
import tempfile
import types

import pandas as pd


# ---------------------------------------------------------------- the reference, loaded from a checkout
def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = []  # a package, so submodules resolve
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _load_file(name: str, path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_reference(root: str) -> dict:
    """VLMEvalKit's scoring functions from the checkout ``root`` (helpers they import are stubbed)."""
    def option_str(d):  # vlmeval.smp.vlm.build_option_str (only used in judge prompts)
        return "".join(f"{k}. {v}\n" for k, v in d.items())

    _module("vlmeval")
    _module("vlmeval.smp", get_logger=logging.getLogger, cn_string=lambda s: False, d2df=None, dump=None, load=None,
            get_pred_file_format=None, istype=None, timestr=None)
    _module("vlmeval.smp.log", get_logger=logging.getLogger)
    _module("vlmeval.smp.vlm", build_option_str=option_str)
    _module("vlmeval.smp.file", load=None)
    match = _load_file("vlmeval.utils.matching_util", os.path.join(root, "vlmeval/utils/matching_util.py"))
    _module("vlmeval.utils", can_infer=match.can_infer, can_infer_lego=match.can_infer_lego, track_progress_rich=None)
    _module("vlmeval.dataset")
    _module("vlmeval.dataset.utils")
    mcq = _load_file("vlmeval.dataset.utils.multiple_choice", os.path.join(root, "vlmeval/dataset/utils/multiple_choice.py"))
    mv = _load_file("vlmeval.dataset.utils.mathvista", os.path.join(root, "vlmeval/dataset/utils/mathvista.py"))
    return {"mcq": mcq, "mathvista": mv, "ocrbench": _ocrbench_evaluate(os.path.join(root, "vlmeval/dataset/image_vqa.py"))}


def _ocrbench_evaluate(path: str):
    """``OCRBench.evaluate`` alone, taken out of image_vqa.py (whose imports need the whole toolkit)."""
    tree = ast.parse(open(path).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "OCRBench")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "evaluate")
    fn.decorator_list = []
    frames = {}
    ns = {"load": lambda f: frames["df"], "dump": lambda *a, **k: None, "tqdm": lambda x: x,
          "get_intermediate_file_path": lambda *a, **k: os.devnull}
    exec(compile(ast.Module([fn], []), path, "exec"), ns)

    def evaluate(df):
        frames["df"] = df
        return ns["evaluate"](None, "unused")
    return evaluate


# ---------------------------------------------------------------- adversarial predictions
FILLER = ["I think", "because it is bigger", "looking at the image", "it seems", "clearly", "a", "the", "is"]
REFUSALS = ["Cannot determine the answer", "I can't process this file.", "Failed to obtain answer via API."]


def mcq_prediction(rng: random.Random, options: dict) -> str:
    letters = list(options)
    L, L2 = rng.choice(letters), rng.choice(letters)
    text = str(rng.choice(list(options.values())))
    forms = [L, f"({L})", f"{L}.", f"**{L}**", f"The answer is {L}", f"the answer is {L.lower()}",
             f"Between {L} and {L2}, the answer is {rng.choice('ABCDE')}", f"{L} {rng.choice(FILLER)} {rng.choice(FILLER)}",
             f"{rng.choice(FILLER)} {rng.choice(FILLER)} {L}", f"{L} or {L2}", f"The correct answer is **{L2}**.",
             text, text.upper(), f"It is {text}.", f"{text} and {rng.choice(list(options.values()))}",
             " ".join(rng.choice(FILLER) for _ in range(rng.randint(3, 12))) + f" {text}", "Z", "I pick Z",
             rng.choice(REFUSALS) + rng.choice(["", f" {text}", f" {L}"]), "", "nan", "The answer is a big one",
             f"{text}{rng.choice(['', '!', '?', ' :)'])}", f"Answer: {L}\n", f"{L}\nbecause"]
    return rng.choice(forms)


OPTION_POOL = ["Yes", "No", "a cat", "a dog", "nothing", "red", "blue", "1", "2.5", "None", "N/A", "null", "", "Both",
               "The left one", "A", "b", "yes"]


def mcq_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        k = rng.randint(2, 5)
        opts = {c: rng.choice(OPTION_POOL) for c in "ABCDE"[:k]}
        for c in "AB":  # at least two options (pandas reads the NA strings as missing)
            opts[c] = opts[c] if opts[c] not in ("None", "N/A", "null", "") else f"option {c.lower()}"
        answer = rng.choice([c for c, v in opts.items() if v not in ("None", "N/A", "null", "")])
        rows.append({"index": i, "image": "x" * 80, "question": f"Question {i}?", **opts, "answer": answer,
                     "category": rng.choice(["c1", "c2"])})
    return rows


def _tsv(rows: list[dict], path: str) -> str:
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def compare(name, pairs) -> dict:
    bad = [p for p in pairs if p[1] != p[2]]
    return {"items": len(pairs), "disagreements": len(bad), "first": [list(map(str, p)) for p in bad[:3]]}


def run_mcq(ref, rng, n, tmp) -> dict:
    from kelix.eval import get_benchmark

    rows = mcq_rows(rng, n)
    path = _tsv(rows, os.path.join(tmp, "AI2D_TEST.tsv"))
    bench = get_benchmark("ai2d")
    bench.check_images = lambda *a: None
    items = {it.id: it for it in bench.read(path)}
    df = pd.read_csv(path, sep="\t")  # as VLMEvalKit's load() reads the dataset and the prediction file
    pairs = []
    for i in range(len(df)):
        line = df.iloc[i].copy()
        pred = mcq_prediction(rng, items[int(line["index"])].meta["options"])
        line["prediction"], line["GT"] = str(pred), line["answer"]
        want = ref["mcq"].eval_vanilla(None, line)["hit"]
        got = bench.score_item(items[int(line["index"])], pred)["acc"]
        pairs.append((pred, float(want), got))
    return compare("ai2d", pairs)


def run_mmbench(ref, rng, n, tmp) -> dict:
    from kelix.eval import get_benchmark
    from kelix.eval.mcq import rotations

    bench = get_benchmark("mmbench-en")
    base = bench.__class__.__bases__[0].__bases__[0]  # MultipleChoice.read: the file's rows, no rotation built
    rows = mcq_rows(rng, n)
    src = _tsv(rows, os.path.join(tmp, "q.tsv"))
    firsts = base.read(bench, src)
    full = [x for it in firsts for x in (it, *rotations(it))]
    table = [{**it.meta["row"], "index": it.id, "image": "x" * 80} for it in full]
    path = _tsv(table, os.path.join(tmp, "MMBench_DEV_EN.tsv"))
    items = {it.id: it for it in bench.read(path)}
    df = pd.read_csv(path, sep="\t")
    preds = {int(i): mcq_prediction(rng, items[int(i)].meta["options"]) for i in df["index"]}
    df["prediction"], df["GT"] = [str(preds[int(i)]) for i in df["index"]], df["answer"]
    df["g_index"] = [int(i % 1e6) for i in df["index"]]
    scores = {str(i): bench.score_item(items[i], p) for i, p in preds.items()}
    pairs = []
    for g in sorted(set(df["g_index"])):
        want = ref["mcq"].prefetch_circular_group(df[df["g_index"] == g], verbose=False)
        want = 0.0 if want is None else float(want["hit"])  # None: left for the judge, none here
        got = float(all(scores[str(i)]["acc"] == 1.0 for i in df[df["g_index"] == g]["index"]))
        pairs.append(([preds[int(i)] for i in df[df["g_index"] == g]["index"]], want, got))
    return compare("mmbench", pairs)


def run_mmmu(ref, rng, n, tmp) -> dict:
    from kelix.eval import get_benchmark

    golds = ["2.5", "2.50", "Paris", "1/2", "12", "yes", "a red car", "0.75", "B"]
    rows = []
    for r in mcq_rows(rng, n):
        if rng.random() < 0.5:  # an open question: no options
            r = {k: v for k, v in r.items() if k not in "ABCDE"} | {"A": "", "B": "", "answer": rng.choice(golds)}
        rows.append(r)
    path = _tsv(rows, os.path.join(tmp, "MMMU_DEV_VAL.tsv"))
    bench = get_benchmark("mmmu")
    items = {it.id: it for it in bench.read(path)}
    df = pd.read_csv(path, sep="\t")
    preds = []
    for i in df["index"]:
        it = items[int(i)]
        gold = it.meta.get("gold", "")
        preds.append(rng.choice([mcq_prediction(rng, it.meta["options"]), gold, f"{gold}0", f"It is {gold}.",
                                 str(gold).upper(), "Other Answers", "2.4", f"{gold} or 3"]))
    df["prediction"] = [str(p) for p in preds]
    data = ref["mcq"].MMMU_preproc(df.copy())
    pairs = []
    for j in range(len(data)):
        line = data.iloc[j].copy()
        line["GT"] = line["answer"] if line["answer"] in list("ABCDEFGHIJKLMNOPQRSTUVWXYZ") else "A"
        want = ref["mcq"].eval_vanilla(None, line)["hit"]
        got = bench.score_item(items[int(line["index"])], preds[j])["acc"]
        pairs.append((preds[j], float(want), got))
    return compare("mmmu", pairs)


def run_mathvista(ref, rng, n, tmp) -> dict:
    from kelix.eval import get_benchmark

    rows = []
    for i in range(n):
        kind = rng.choice(["mc", "integer", "float", "text", "list"])
        if kind == "mc":
            choices = rng.sample(["3", "5", "7/2", "blue", "a cat", "None of these"], rng.randint(2, 4))
            ans = rng.choice(choices)
            rows.append(dict(index=i, image="x" * 80, question=f"Q{i}", answer=ans, question_type="multi_choice",
                             answer_type="text", choices=str(choices), answer_option="ABCD"[choices.index(ans)],
                             precision="", task="t", skills=str(["s"])))
        else:
            ans = {"integer": rng.choice(["12", "0", "-3", "1000"]), "float": rng.choice(["1.25", "0.5", "3.0", "-2.75"]),
                   "text": "cat", "list": "[1, 2]"}[kind]
            rows.append(dict(index=i, image="x" * 80, question=f"Q{i}", answer=ans, question_type="free_form",
                             answer_type=kind, choices="", precision=rng.choice(["", "1", "2"]), task="t",
                             skills=str(["s"])))
    path = _tsv(rows, os.path.join(tmp, "MathVista_MINI.tsv"))
    bench = get_benchmark("mathvista")
    items = {it.id: it for it in bench.read(path)}
    df = pd.read_csv(path, sep="\t")
    pairs = []
    for j in range(len(df)):
        line = df.iloc[j].copy()
        it = items[int(line["index"])]
        a = str(it.answer)
        pred = rng.choice([a, f" {a} ", f"{a}.0", f"{a}0", f"The answer is {a}", "0", "twelve", "1_2", "12.", "B",
                           "The answer is B", "(A)", a.upper(), f"{a}%", "nan", ""])
        if it.meta["type"] == "multi_choice":
            pred = rng.choice([pred, mcq_prediction(rng, it.meta["options"])])
        line["prediction"] = pred
        pre = ref["mathvista"].post_check(line, prefetch=True)
        if pre:
            line["res"] = pre
            want = float(bool(ref["mathvista"].post_check(line, prefetch=False)))
        else:
            want = 0.0  # the judge's share; none here
        pairs.append((f"{a!r} <- {pred!r}", want, bench.score_item(it, pred)["acc"]))
    return compare("mathvista", pairs)


def run_ocrbench(ref, rng, n, tmp) -> dict:
    from kelix.eval.answers import HME, ocrbench_match

    cats = ["Regular Text Recognition", "Doc-oriented VQA", HME]
    pairs = []
    for i in range(n):
        answers = rng.sample(["STOP", "x^{2}+y", "$5", "Kelix Lab", "A B", "ｆｕｌｌ"], rng.randint(1, 2))
        a = rng.choice(answers)
        pred = rng.choice([a, a.lower(), a.replace(" ", ""), f"it says {a}", a.replace("^", " ^ "), "nothing", "",
                           f"{a}\n", " ".join(a)])
        cat = rng.choice(cats)
        df = pd.DataFrame([{"index": i, "prediction": pred, "answer": str(answers), "category": cat}])
        want = ref["ocrbench"](df)["Final Score"]
        pairs.append((pred, float(want), ocrbench_match(pred, answers, cat)))
    return compare("ocrbench", pairs)


def run_textvqa(rng, n) -> dict:
    from lmms_eval.tasks.textvqa.utils import textvqa_process_results

    from kelix.eval.answers import vqa_accuracy

    pool = ["we'll", "well", "were", "hed", "he'd", "im", "i'm", "lets", "let's", "Two", "2", "the bus", "a.b.c",
            "." * 35 + "x", "e.g.", "U.S.", "3.5", "1,000", "none", "somebody'd", "won't", "wont", "it's", "its"]
    pairs = []
    for _ in range(n):
        answers = [" ".join(rng.choice(pool) for _ in range(rng.randint(1, 2))) for _ in range(10)]
        pred = rng.choice([*answers, " ".join(rng.choice(pool) for _ in range(2))])
        want = textvqa_process_results({"answers": list(answers), "question_id": 0}, [pred])["exact_match"]
        pairs.append((pred, round(want, 12), round(vqa_accuracy(pred, answers), 12)))
    return compare("textvqa", pairs)


def run_chartqa(rng, n) -> dict:
    from lmms_eval.tasks.chartqa.utils import relaxed_correctness

    from kelix.eval.answers import relaxed_accuracy

    targets = ["100", "0", "5%", "0.05", "Blue", "Blue ", "2019", "-3.2", "12.5", "5%%", " 7"]
    pairs = []
    for _ in range(n):
        t = rng.choice(targets)
        p = rng.choice([*targets, "blue", "blue ", "4.9%", "5.1%", "104.9", "105.1", "5% ", " 100", "1e2", "nan"])
        pairs.append((f"{t!r} <- {p!r}", float(relaxed_correctness(p, t)), relaxed_accuracy(p, t)))
    return compare("chartqa", pairs)


def _guarded(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as e:  # a kit that cannot read the fixture is reported, not hidden
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vlmevalkit", required=True, help="a VLMEvalKit checkout (the commit kelix pins)")
    p.add_argument("--n", type=int, default=400, help="items per benchmark")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    logging.disable(logging.WARNING)
    ref = load_reference(a.vlmevalkit)
    rng = random.Random(a.seed)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("mcq (ai2d, seed-bench, realworldqa)", run_mcq), ("mmbench (circular groups)", run_mmbench),
                         ("mmmu", run_mmmu), ("mathvista (prefetch)", run_mathvista), ("ocrbench", run_ocrbench)):
            out[name] = _guarded(fn, ref, rng, a.n, tmp)
    out["textvqa (lmms-eval)"] = _guarded(run_textvqa, rng, a.n)
    out["chartqa (lmms-eval)"] = _guarded(run_chartqa, rng, a.n)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
