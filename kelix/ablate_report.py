"""The tables of ``kelix ablate``: Table 6 (Kelix-Tok) and Table 7 (the unified LLM) laid out as the paper's.

Each row of a table names a run of the suite (:data:`TABLES`); a run trained once stands in every
section that names it (the default Kelix-Tok is the independent row of (b), the sum row of (c) and N = 4).
Columns: ``general`` (synthetic-vqa accuracy: colour, shape, count), ``text-rich`` (synthetic-dense
character accuracy: several digits per merged patch), ``OCR`` (synthetic-ocr character accuracy) and
``LM loss`` (validation loss of the last LLM stage), and ``tokens distinct``: the fraction of the dense
task's text patches whose visual token no patch of other content shares
(:func:`kelix.eval.synthetic_dense.token_distinctness`: what any reader of the tokens could tell apart,
measured on the tokenizer alone). A cell is the mean over seeds ± their sample
standard deviation (n - 1 in the denominator; one seed: the value alone).
"""

from __future__ import annotations

import json
import math
import os

# (key in a run's scores, column title, as a percentage)
COLUMNS = (("general", "general", True), ("text_rich", "text-rich", True), ("ocr", "OCR", True),
           ("lm_loss", "LM loss", False), ("dense_distinct", "tokens distinct", True))

TABLES: dict[str, list[tuple[str, list[tuple[str, str]]]]] = {
    "tokenizer": [
        ("(a) Baseline comparison", [("Discrete baseline (one code, S = 256)", "one_code"),
                                     ("Continuous baseline", "continuous"),
                                     ("Kelix-Tok (default, N = 4 x K = 64)", "kelix_tok")]),
        ("(b) Independent vs. shared codebooks (N = 4, sum)", [("Shared codebook", "shared"),
                                                               ("Independent (default)", "kelix_tok")]),
        ("(c) Fusion strategy (N = 4)", [("Mean pooling", "mean"), ("Sum pooling (default)", "kelix_tok")]),
        ("(d) Codebook dimension d (one code, S = 256)", [("d = 4", "one_code_d4"), ("d = 8", "one_code_d8"),
                                                          ("d = 16 (default)", "one_code"),
                                                          ("d = 32", "one_code_d32")]),
        ("(e) Codebook size S (one code, d = 16)", [("S = 128", "one_code_s128"), ("S = 256 (default)", "one_code"),
                                                    ("S = 512", "one_code_s512")]),
        ("Quantization strategy", [("VQ (one code, S = 256)", "one_code"), ("RQ (3 levels x K = 64)", "rvq"),
                                   ("FSQ (4^4 = 256)", "fsq")]),
        ("Number of sub-tokens N (K = 64 each; Figure 7)", [("N = 1", "n1"), ("N = 2", "n2"),
                                                            ("N = 4 (default)", "kelix_tok"), ("N = 8", "n8"),
                                                            ("N = 16", "n16"), ("Continuous", "continuous")]),
    ],
    "llm": [
        ("Table 7 (LLM stages 1 and 3 on the default Kelix-Tok)",
         [("exp1: unified baseline", "exp1"), ("exp2: random init input emb.", "exp2"),
          ("exp3: N+1-head predictor (output)", "exp3")]),
    ],
}


def rows_of(suite: str) -> list[str]:
    """The suite's runs, each once, in the order the tables first name them."""
    return list(dict.fromkeys(run for _, rows in TABLES[suite] for _, run in rows))


def mean_spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def cell(values: list[float], percent: bool) -> str:
    if not values:
        return "n/a"
    mean, spread = mean_spread(values)
    scale, digits = (100.0, 1) if percent else (1.0, 3)
    text = f"{mean * scale:.{digits}f}"
    return text if spread is None else f"{text} ± {spread * scale:.{digits}f}"


def aggregate(suite: str, scores: dict[str, dict[int, dict]]) -> list[dict]:
    """``scores[run][seed]`` (a run's scores json) -> the table rows: section, label, run, seeds, and per
    column the values, mean and spread."""
    out = []
    for section, rows in TABLES[suite]:
        for label, run in rows:
            by_seed = scores.get(run, {})
            row = {"section": section, "label": label, "run": run, "seeds": sorted(by_seed)}
            for key, _, _ in COLUMNS:
                vals = [float(s[key]) for _, s in sorted(by_seed.items()) if s.get(key) is not None]
                mean, spread = mean_spread(vals) if vals else (None, None)
                row[key] = {"values": vals, "mean": mean, "spread": spread}
            out.append(row)
    return out


def format_markdown(suite: str, rows: list[dict], header: str = "") -> str:
    """The table as Markdown: one header row, then per section a title row and its configurations."""
    title = "Table 6: ablations of Kelix-Tok" if suite == "tokenizer" else "Table 7: ablations of the unified LLM"
    cols = [c[1] for c in COLUMNS]
    lines = [f"# {title} (kelix ablate --suite {suite})", ""]
    if header:
        lines += [header, ""]
    lines += ["| Configuration | run | seeds | " + " | ".join(cols) + " |",
              "| --- | --- | --- | " + " | ".join("---:" for _ in cols) + " |"]
    section = None
    for r in rows:
        if r["section"] != section:
            section = r["section"]
            lines.append(f"| *{section}* | | | " + " | ".join("" for _ in cols) + " |")
        cells = [cell(r[k]["values"], pct) for k, _, pct in COLUMNS]
        lines.append(f"| {r['label']} | {r['run']} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "general: synthetic-vqa accuracy (colour, shape, count), text-rich: synthetic-dense character "
              "accuracy (2 x 4 digits, 4 per merged patch), OCR: synthetic-ocr character accuracy, all in %; "
              "LM loss: validation loss of the last LLM stage; tokens distinct: % of the dense task's text patches whose "
              "visual token no patch of other content shares (the tokenizer alone). "
              "Cells: mean ± sample standard deviation over seeds."]
    return "\n".join(lines) + "\n"


def write(out: str, suite: str, scores: dict[str, dict[int, dict]], meta: dict) -> tuple[str, str]:
    """``out/ablations.md`` and ``out/ablations.json`` (every run's scores, the aggregated rows, ``meta``)."""
    rows = aggregate(suite, scores)
    os.makedirs(out, exist_ok=True)
    md, js = os.path.join(out, "ablations.md"), os.path.join(out, "ablations.json")
    header = " ".join(f"{k}: {v}" for k, v in meta.items() if isinstance(v, (str, int, float)))
    with open(md + ".tmp", "w") as f:
        f.write(format_markdown(suite, rows, header))
    os.replace(md + ".tmp", md)
    doc = {"suite": suite, **meta, "rows": rows,
           "runs": {run: {str(seed): s for seed, s in by.items()} for run, by in scores.items()}}
    with open(js + ".tmp", "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(js + ".tmp", js)
    return md, js
