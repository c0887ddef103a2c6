"""kelix data stats: counts, histograms, and blocks per sample against a hand count of the block layout."""

import json

from kelix.cli import main as kelix
from kelix.data.text import load_text_tokenizer
from kelix.llm.layout import DOC_END
from kelix.llm.vocab import extend_text_tokenizer
from tests.data.convert_helpers import convert, images, write_jsonl


def test_stats_counts_histograms_and_blocks(tmp_path, capsys):
    images(tmp_path / "img", {"sq.png": ((9, 9, 9), (56, 56)), "wide.png": ((9, 9, 9), (112, 56))})
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"image": "sq.png", "caption": "ab"},
                                               {"image": "wide.png", "caption": "ab"}])
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}, {"text": "x" * 40}])
    convert("pairs", [pairs], tmp_path / "out", images_root=str(tmp_path / "img"))
    convert("text", [text], tmp_path / "out")
    out_json = tmp_path / "stats.json"
    assert kelix(["data", "stats", str(tmp_path / "out" / "*.tar"), "--text-tokenizer", "builtin:bytes",
                  "--json", str(out_json)]) == 0
    s = json.loads(out_json.read_text())
    assert s["samples"] == 4 and s["tasks"] == {"caption": 2, "text": 2}
    assert s["images_per_sample"] == {"0": 2, "1": 2} and s["image_longer_side"] == {"32-63": 1, "64-127": 1}
    assert s["text_chars"] == {"2-3": 2, "8-15": 1, "32-63": 1}
    # by hand: byte tokenizer, one block per ASCII byte; an image h x w (28 px per block) is
    # vision_start + per row (mm_pos_start, "r,w" marker bytes, mm_pos_end, w visual blocks) + vision_end;
    # a segments document ends with the doc-end token when the tokenizer has it
    end = int(DOC_END in extend_text_tokenizer(load_text_tokenizer("builtin:bytes")).get_vocab())

    def image(h, w):
        return 1 + sum(1 + len(f"{r},{w}") + 1 + w for r in range(h)) + 1

    assert s["blocks"]["caption"] == {"p50": image(2, 2) + 2 + end, "p90": image(2, 4) + 2 + end,
                                      "p99": image(2, 4) + 2 + end, "p100": image(2, 4) + 2 + end}
    assert s["blocks"]["text"]["p50"] == 11 + end and s["blocks"]["text"]["p100"] == 40 + end
    assert "blocks per sample: p50=" in capsys.readouterr().out
