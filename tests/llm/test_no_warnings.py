"""Chat, image generation, training and a cached forward reach the user's terminal without library
noise: no Python warning (any category, as errors here) and no transformers logger warning (e.g. the
deprecated ``past_key_values`` keyword, removed in transformers 5.40)."""

import logging
import warnings

import torch

from kelix.llm.data import collate_docs
from kelix.llm.generate import Sampling, generate_image, generate_text, understanding_doc
from kelix.llm.loss import nbp_loss

from .conftest import random_doc_batch


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_generation_training_and_a_cached_forward_warn_nothing(lm_table):
    from transformers import DynamicCache
    from transformers.utils import logging as hf_logging

    lm = lm_table
    hf_logging.warning_once.cache_clear()  # a warning shown once earlier in the session must show again
    seen = _Records()
    hf = logging.getLogger("transformers")
    hf.addHandler(seen)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            codes = [torch.randint(0, lm.vocab.K, (2, 2, lm.vocab.N))]
            generate_text(lm, [understanding_doc(lm, "What is it?", codes)], 4, Sampling(temperature=0))
            generate_image(lm, ["a cat"], (1, 2), Sampling(temperature=0, cfg_scale=2.0))
            generate_image(lm, ["a cat"], (1, 2), Sampling(temperature=0), use_cache=False, decoder_cache=False)
            # a forward that fills a cache, then one that reads it
            x = lm.embed_blocks(torch.tensor([[5, 6, 7]]), torch.full((1, 3, lm.vocab.N), -1))
            cache = DynamicCache(config=lm.backbone.config)
            with torch.no_grad():
                _, back = lm.hidden(x, torch.arange(3)[None], cache=cache)
                h, _ = lm.hidden(x[:, :1], torch.tensor([[3]]), cache=back)
            assert back is cache and cache.get_seq_length() == 4 and h.shape == (1, 1, 64)
            # a training step (what fit runs)
            b = collate_docs(random_doc_batch(lm, [7, 5], seed=2), lm.vocab.N)
            nbp_loss(lm(b["tokens"], b["codes"], b["position_ids"], b["targets"]), lm.vocab.N)["loss"].backward()
            lm.zero_grad(set_to_none=True)
    finally:
        hf.removeHandler(seen)
    assert [r.getMessage() for r in seen.records] == []
