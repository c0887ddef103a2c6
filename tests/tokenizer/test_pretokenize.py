"""`kelix tokenize` on a shard with broken samples: each is skipped and counted, the rest get their codes."""

import numpy as np
import torch

from kelix.data.stream import ShardStream
from kelix.tokenizer.model import KelixTokenizer, tiny_config
from kelix.tokenizer.pretokenize import tokenize_shard
from tests.conftest import jpeg_bytes, write_shard


def _sample(key, color):
    return {"__key__": key, "json": {"task": "caption", "segments": [{"type": "image", "image": "0.jpg"},
                                                                       {"type": "text", "text": key}]},
            "0.jpg": jpeg_bytes((56, 56), color)}


def test_a_duplicate_key_is_skipped_and_the_rest_of_the_shard_tokenized(tmp_path):
    torch.manual_seed(0)
    tok = KelixTokenizer(tiny_config()).eval()
    src = write_shard(tmp_path / "in.tar", [_sample("a", (200, 0, 0)), _sample("b", (0, 200, 0)),
                                            _sample("a", (0, 0, 200)), _sample("c", (9, 9, 9))])
    stats = tokenize_shard(tok, src, str(tmp_path / "out.tar"))
    assert stats == {"samples": 3, "images": 3, "skipped": 1}
    out = list(ShardStream([str(tmp_path / "out.tar")], shuffle_buffer=1, repeat=False))
    assert [s.key for s in out] == ["a", "b", "c"]
    for s in out:
        img = s.images[0]
        assert np.array_equal(img.codes, tok.encode([img.pixels])[0].numpy())
