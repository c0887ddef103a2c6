"""synthetic-dense: held-out items, exact/character scores, and the token probe (what tokens tell apart)."""

import json

import pytest
import torch

from kelix.data import synthetic_dense as sd
from kelix.eval import get_benchmark
from kelix.eval.synthetic_dense import token_distinctness, write_dense_benchmark


def test_benchmark_items_scores_and_prefix(tmp_path):
    write_dense_benchmark(str(tmp_path / "a"), 12)
    write_dense_benchmark(str(tmp_path / "b"), 5)
    bench = get_benchmark("synthetic-dense")
    items = bench.read(str(tmp_path / "a"))
    assert len(items) == 12 and all(sd.is_held_out(i.answer) for i in items) and items[0].prompt == sd.QUESTION
    short = bench.read(str(tmp_path / "b"))
    assert [i.answer for i in short] == [i.answer for i in items[:5]]  # a shorter split is a prefix
    it = items[0]
    assert bench.score_item(it, it.answer) == {"exact": 1.0, "char_acc": 1.0}
    wrong = it.answer[:-1] + ("0" if it.answer[-1] != "0" else "1")  # one digit of nine wrong
    got = bench.score_item(it, wrong)
    assert got["exact"] == 0.0 and got["char_acc"] == pytest.approx(8 / 9)
    agg = bench.aggregate(items[:2], {str(items[0].id): bench.score_item(items[0], items[0].answer),
                                      str(items[1].id): bench.score_item(items[1], "")},
                          {str(items[0].id): items[0].answer, str(items[1].id): ""})
    assert agg["overall"]["corpus_char_acc"] == pytest.approx(0.5)  # 9 of 18 characters
    row = json.loads(open(tmp_path / "a" / "synthetic-dense" / "data.jsonl").readline())
    assert row["category"] == "dense" and row["image"].startswith("images/")


def test_token_probe_tells_bottleneck_from_continuous():
    from kelix.tokenizer.model import KelixTokenizer, tiny_config

    image = dict(patch_size=14, merge_size=2, min_pixels=140 * 140, max_pixels=168 * 168)
    torch.manual_seed(0)
    cont = KelixTokenizer(tiny_config(quantizer="none", image=image)).eval()
    one = KelixTokenizer(tiny_config(N=1, K=1, image=image)).eval()  # every patch the same code
    few = KelixTokenizer(tiny_config(N=1, K=4, image=image)).eval()
    c, o, f = (token_distinctness(t, 30) for t in (cont, one, few))
    assert c["patches"] == o["patches"] == 60  # 2 merged patches of 4 digits per image
    assert c["distinct"] == 1.0 and c["tokens"] == 60
    assert o["distinct"] == 0.0 and o["tokens"] == 1
    assert f["tokens"] <= 4 and f["distinct"] < 0.2
