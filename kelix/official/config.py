"""The release's config dump (``"__class__": "KeyeARConfig"``) read strictly, and the kit configs it gives.

Every field of the dump is either used, or known and deliberately ignored (listed below with why);
any other field, or a known one with a value the kit cannot hold, is refused with one line naming it
before any weight is read. That is the opposite of the official loader, which builds what it can
and initialises the rest at random.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

# field -> value the kit requires (None: any value; it is used or harmless). Fields ignored on purpose say why.
QWEN_FIELDS = {
    "model_class": "UnifiedQwen3Model", "vocab_size": None, "embed_dim": None, "num_layers": None,
    "tie_word_embeddings": False, "hidden_act": "silu", "num_heads": None, "num_kv_heads": None, "head_dim": None,
    "attn_dropout": None,  # training only
    "attention_function": None,  # kernel choice, same math
    "q_proj_bias": False, "k_proj_bias": False, "v_proj_bias": False, "attention_bias": False,
    "intermediate_dim": None, "max_seq_len": None, "rope_base": None,
    "rope_impl": "llama",  # rotate-half RoPE, as transformers' Qwen3
    "rope_theta": None,  # unused by the official Qwen3: it reads rope_base
    "rope_scaling": None, "use_sliding_window": False, "sliding_window": None,
    "norm_eps": None, "rms_norm_eps": None,  # the official layers read norm_eps
    "q_norm": True, "k_norm": True, "eos_token_id": None, "use_multimodal_rope": False,
    "mrope_section": None,  # only with use_multimodal_rope
    "pre_embedding_size": None, "pre_embedding_tokens": None, "image_token_id": None, "pad_token_id": None,
    "q_eos_token": None, "vision_start_token_id": None, "vision_end_token_id": None,
    "output_last_hidden_states_only": None, "token_decoder_with_teacher_forcing": None,  # forward switches
    "codebook_size": None, "n_q_tokens": None, "skip_output_layer": None,
}
VISION_FIELDS = {
    "model_class": "KeyeVL1_5VisionModel", "image_size": None, "patch_size": None, "num_channels": 3,
    "hidden_size": None, "num_hidden_layers": None, "num_attention_heads": None, "intermediate_size": None,
    "hidden_act": None, "max_seq_len": None, "layer_norm_eps": None, "attention_dropout": None,
    "has_learnable_position_embedding": True, "use_qk_norm": False, "qk_norm_eps": None, "rope_theta": None,
    "attention_function": None, "output_attentions": None, "output_hidden_states": None,
}
TOKENIZER_FIELDS = {
    "model_class": "KeyeImageTokenizer", "vision_config": None, "codebook_size": None, "embedding_dim": None,
    "init_embedding_dim": None, "llm_hidden_size": None, "n_q_tokens": None, "split_dim": False, "split_voc": None,
    "add_voc_reducer": False, "vq_sampling_mode": "argmin",
    "vq_temperature": None, "vq_temperature_decay": None, "vq_min_temperature": None,  # softmax sampling only
    "pre_llm_align": False, "output_dim": None, "fusion_type": None,
}
DECODER_FIELDS = {
    "model_class": "UnifiedTokenDecoder",
    "vocab_size": None,  # the decoder's own token table is never built (it reads the LLM's)
    "max_pos_length": None, "max_length": None, "d_model": None, "eos_token": None, "nhead": None,
    "num_layers": None, "dim_feedforward": None, "use_gradient_checkpointing": None, "input_dim": None,
    "reduce": True, "attention_function": None,
}
TOP_FIELDS = {"model_class": "KeyeARModel", "qwen_config": None, "tokenizer_config": None,
              "token_decoder_config": None, "__class__": "KeyeARConfig"}
VIT_ACTS = ("gelu_pytorch_tanh",)


class ReleaseError(ValueError):
    """A release that the kit cannot hold exactly (one line: file, field or key, what was found)."""


def _check(where: str, d: dict, known: dict) -> None:
    if not isinstance(d, dict):
        raise ReleaseError(f"{where}: expected an object, got {type(d).__name__}")
    for k, v in d.items():
        if k not in known:
            raise ReleaseError(f"{where}.{k}: unknown config field (value {v!r}); the converter refuses what it "
                               f"cannot map")
        if known[k] is not None and v != known[k]:
            raise ReleaseError(f"{where}.{k} = {v!r}: the kit holds only {known[k]!r}")
    for k in known:
        if k not in d and known[k] is None and k not in ("pad_token_id", "sliding_window", "rope_scaling",
                                                          "pre_embedding_size", "pre_embedding_tokens", "mrope_section"):
            raise ReleaseError(f"{where}.{k}: missing config field")


@dataclass
class Release:
    """The sizes and ids of a release, read from its ``config.json``.

    Args:
        raw: the config dump as read.
        V: text rows of the LLM's tables (``qwen_config.vocab_size``); visual ids start here.
        N: sub-codebooks (slots per visual block).
        K: codes per sub-codebook (``codebook_size / N``).
    """

    raw: dict
    V: int
    N: int
    K: int

    @property
    def qwen(self) -> dict:
        return self.raw["qwen_config"]

    @property
    def tok(self) -> dict:
        return self.raw["tokenizer_config"]

    @property
    def vision(self) -> dict:
        return self.raw["tokenizer_config"]["vision_config"]

    @property
    def dec(self) -> dict:
        return self.raw["token_decoder_config"]

    @property
    def S(self) -> int:
        return self.N * self.K

    @property
    def slots(self) -> int:
        """Block decoder positions kept: the N code slots and the end-of-block slot."""
        return self.N + 1

    # -- the kit's configs
    def tokenizer_config(self) -> dict:
        from kelix.tokenizer.navit import keye_vit_config

        v, t = self.vision, self.tok
        return dict(
            N=self.N, K=self.K, d=t["embedding_dim"], out_dim=t["output_dim"], fusion=t["fusion_type"],
            centroid_dim=t["init_embedding_dim"], merger_hidden=4 * v["hidden_size"], merger_dim=t["llm_hidden_size"],
            merger_norm="concat", quantizer="pq", codebook_form="simvq", norm="layernorm", up_projection="per_slot",
            encoder=dict(kind="keye", hf_config=keye_vit_config(
                v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"], v["num_attention_heads"],
                v["image_size"], v["patch_size"], v["hidden_act"], v["layer_norm_eps"], v["rope_theta"])),
            image=dict(patch_size=v["patch_size"], merge_size=2, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        )

    def backbone_config(self) -> dict:
        """transformers' ``Qwen3Config`` (``model_type: qwen3``) of the LLM with its V + S rows."""
        q = self.qwen
        return dict(model_type="qwen3", vocab_size=self.V + self.S, hidden_size=q["embed_dim"],
                    intermediate_size=q["intermediate_dim"], num_hidden_layers=q["num_layers"],
                    num_attention_heads=q["num_heads"], num_key_value_heads=q["num_kv_heads"], head_dim=q["head_dim"],
                    rms_norm_eps=q["norm_eps"], rope_parameters={"rope_type": "default", "rope_theta": q["rope_base"]},
                    max_position_embeddings=q["max_seq_len"], tie_word_embeddings=False, attention_bias=False,
                    hidden_act="silu", eos_token_id=q["eos_token_id"], pad_token_id=q.get("pad_token_id"))

    def llm_config(self, row_marker: str) -> dict:
        d = self.dec
        return dict(N=self.N, K=self.K, visual_offset=self.V, visual_input="table", predictor="block_decoder",
                    decoder_kind="release", decoder_width=d["d_model"], decoder_layers=d["num_layers"],
                    decoder_heads=d["nhead"], decoder_ffn=d["dim_feedforward"], eob_token_id=self.qwen["q_eos_token"],
                    row_marker=row_marker, fusion=self.tok["fusion_type"])


def read_release(sft_dir: str) -> Release:
    """Read and check ``sft_dir/config.json`` (raises :class:`ReleaseError`, one line)."""
    path = os.path.join(sft_dir, "config.json")
    if not os.path.isfile(path):
        raise ReleaseError(f"{path}: not found (--sft must be the Kelix-SFT directory)")
    with open(path) as f:
        raw = json.load(f)
    _check(path, raw, TOP_FIELDS)
    _check(f"{path}: qwen_config", raw["qwen_config"], QWEN_FIELDS)
    _check(f"{path}: tokenizer_config", raw["tokenizer_config"], TOKENIZER_FIELDS)
    _check(f"{path}: tokenizer_config.vision_config", raw["tokenizer_config"]["vision_config"], VISION_FIELDS)
    _check(f"{path}: token_decoder_config", raw["token_decoder_config"], DECODER_FIELDS)
    q, t, d, v = raw["qwen_config"], raw["tokenizer_config"], raw["token_decoder_config"], \
        raw["tokenizer_config"]["vision_config"]
    N, S = int(q["n_q_tokens"]), int(q["codebook_size"])
    for where, key, want in (("tokenizer_config", "n_q_tokens", N), ("tokenizer_config", "codebook_size", S),
                             ("tokenizer_config", "split_voc", N), ("token_decoder_config", "max_length", N + 1),
                             ("token_decoder_config", "input_dim", q["embed_dim"]),
                             ("token_decoder_config", "eos_token", q["q_eos_token"])):
        got = raw[where][key]
        if got != want:
            raise ReleaseError(f"{path}: {where}.{key} = {got!r}, expected {want!r} (qwen_config's sizes)")
    if S % N:
        raise ReleaseError(f"{path}: qwen_config.codebook_size {S} is not divisible by n_q_tokens {N}")
    if v["hidden_act"] not in VIT_ACTS:
        raise ReleaseError(f"{path}: tokenizer_config.vision_config.hidden_act {v['hidden_act']!r} is not {VIT_ACTS}")
    if t["fusion_type"] not in ("sum", "mean"):
        raise ReleaseError(f"{path}: tokenizer_config.fusion_type {t['fusion_type']!r} is not sum or mean")
    if q["pre_embedding_size"] is not None:
        raise ReleaseError(f"{path}: qwen_config.pre_embedding_size {q['pre_embedding_size']!r}: a stage-1 "
                           f"checkpoint (pre-embedding table); the kit converts unified releases only")
    if d["max_pos_length"] < N + 1:
        raise ReleaseError(f"{path}: token_decoder_config.max_pos_length {d['max_pos_length']} < N + 1 = {N + 1}")
    return Release(raw=raw, V=int(q["vocab_size"]), N=N, K=S // N)
