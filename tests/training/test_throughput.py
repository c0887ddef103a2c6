"""Model FLOPs of a training step and the perf/* scalars (tokens/s, TFLOP/s, MFU) the Throughput callback logs."""

from types import SimpleNamespace

import torch

from kelix.hf import TINY_QWEN3
from kelix.llm.attention import square_sum
from kelix.training import callbacks


def test_train_flops_by_hand():
    from kelix.llm.model import KelixLM, LLMConfig

    lm = KelixLM(LLMConfig(backbone_config=TINY_QWEN3, text_tokenizer="builtin:bytes", N=4, K=32, decoder_width=32,
                           decoder_heads=2, decoder_ffn=64))
    c = TINY_QWEN3
    D, hd, H, kv, F = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
    layer = D * H * hd * 2 + D * kv * hd * 2 + 3 * D * F + 2 * D + 2 * hd  # q, o, k, v, MLP, 2 norms, q/k norms
    backbone = c["num_hidden_layers"] * layer + D  # + the final norm
    dec = sum(p.numel() for p in lm.decoder.parameters())
    docs, vis, rows, L = [30, 50, 48, 80, 48], 100, 2, 128
    vo, K, N = lm.vocab.visual_offset, 32, 4
    want = 2 * 3 * (backbone * rows * L                                   # every weight, every block
                    + D * (vo + K) * rows * L + D * K * (N - 1) * vis     # slot 0 everywhere, slots 1..3 for visual
                    + dec * (rows * L - vis) + dec * N * vis)             # decoder: 1 slot (text) or N (visual)
    want += 3 * c["num_hidden_layers"] * 2 * H * hd * sum(n * n for n in docs)  # QK^T and AV, half of each square
    assert lm.train_flops(rows, L, sum(n * n for n in docs), vis) == want
    pos = torch.cat([torch.arange(n) for n in docs]).view(rows, L)
    assert int(square_sum(pos)) == sum(n * n for n in docs)
    # eob_scoring full: one more slot per block (<eob>), every slot over all vo + N*K ids
    full = KelixLM(LLMConfig(backbone_config=TINY_QWEN3, text_tokenizer="builtin:bytes", N=4, K=32, decoder_width=32,
                             decoder_heads=2, decoder_ffn=64, eob_scoring="full"))
    dec = sum(p.numel() for p in full.decoder.parameters())
    slots = 2 * (rows * L - vis) + (N + 1) * vis
    want = 2 * 3 * (backbone * rows * L + D * (vo + N * K) * slots + dec * slots)
    want += 3 * c["num_hidden_layers"] * 2 * H * hd * sum(n * n for n in docs)
    assert full.train_flops(rows, L, sum(n * n for n in docs), vis) == want


class _Module:
    device = torch.device("cpu")

    def __init__(self):
        self.lm = SimpleNamespace(train_flops=self.flops)
        self.args, self.logged = [], {}

    def flops(self, rows, length, sq, vis):
        self.args.append((rows, length, sq, vis))
        return sq * 0 + 1e9  # a device tensor, as on a GPU

    def log_dict(self, logs, **_):
        self.logged = logs


def test_throughput_logs_mfu_from_the_model_flops(monkeypatch):
    monkeypatch.setattr(callbacks, "peak_flops", lambda device, dtype: 4e9 if dtype == torch.bfloat16 else None)
    cb, mod = callbacks.Throughput(), _Module()
    trainer = SimpleNamespace(global_step=1, log_every_n_steps=2, precision="bf16-mixed")
    pos = torch.cat([torch.arange(3), torch.arange(5)])[None]
    tokens = torch.tensor([[5, -1, -1, 7, -1, 2, 3, -1]])
    cb.on_train_start(trainer, mod)
    for step in (1, 2):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, mod, None, dict(position_ids=pos, tokens=tokens, num_tokens=torch.tensor([8])), 0)
    assert [(r, n, int(sq), int(v)) for r, n, sq, v in mod.args] == [(1, 8, 34, 4)] * 2  # 3^2 + 5^2, 4 visual
    logs = mod.logged
    assert abs(logs["perf/tokens_per_s"] - 8 / logs["perf/step_time_s"]) < 1e-6 * logs["perf/tokens_per_s"]
    assert abs(logs["perf/tflops_per_s"] - 1e9 / logs["perf/step_time_s"] / 1e12) < 1e-9
    assert abs(logs["perf/mfu"] - 1e9 / logs["perf/step_time_s"] / 4e9) < 1e-9
    trainer.precision = "32-true"  # no fp32 peak known: TFLOP/s without MFU
    cb.on_train_batch_end(trainer, mod, None, dict(position_ids=pos, tokens=tokens), 0)
    assert "perf/mfu" not in mod.logged and "perf/tflops_per_s" in mod.logged
