"""Text tokenizers: a local Hugging Face tokenizer, or a byte-level one built from nothing.

Nothing is downloaded: ``load_text_tokenizer`` takes a local directory, ``"builtin:bytes"`` for a
256-symbol byte-level BPE with ChatML special tokens (tests), or ``"builtin:synthetic"``: the same
bytes plus BPE merges learned on the synthetic world's sentences, so each of its words is one token
as common words are in a real LLM's vocabulary (the quickstart; other text falls back to bytes).
"""

from __future__ import annotations

import os

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
BUILTIN_BYTES = "builtin:bytes"
BUILTIN_SYNTHETIC = "builtin:synthetic"
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_byte_tokenizer():
    """A byte-level tokenizer (ids 0..255 are bytes) with ChatML specials; needs no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return _wrap(tok)


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT, additional_special_tokens=[IM_START]
    )
    out.chat_template = CHATML_TEMPLATE
    return out


def build_synthetic_tokenizer():
    """Byte-level BPE whose merges spell every word of the synthetic world (:func:`world_sentences`).

    GPT-2 style: words are split before BPE, a leading space is part of the word. Deterministic:
    the same sentences give the same merges in every process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from kelix.data.synthetic import world_sentences

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(world_sentences(), trainer)
    return _wrap(tok)


def load_text_tokenizer(name_or_path: str):
    """Load a tokenizer from a local directory (or build the ``builtin:bytes`` one)."""
    if name_or_path == BUILTIN_BYTES:
        return build_byte_tokenizer()
    if name_or_path == BUILTIN_SYNTHETIC:
        return build_synthetic_tokenizer()
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(
            f"text tokenizer {name_or_path!r} is not a local directory (kelix loads from local paths only; "
            f"use {BUILTIN_BYTES!r} or {BUILTIN_SYNTHETIC!r} for a built-in one)"
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
