"""DiT de-tokenizer: flow-matching training step (images/s, MFU estimate) and sampling time.

``--scale tiny`` (CPU default) or ``sana600m`` / ``sana1600m`` (SANA-sized random DiTs on DC-AE f32c32
latents of 1024 px images, conditioned on 720 states of a Qwen3-8B-wide LLM; GPU default sana600m).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import report, time_train_step, timeit

SCALES = {
    "tiny": dict(cond=64, latent=(4, 8), L=16, t=dict(in_channels=4, out_channels=4, num_attention_heads=2,
                                                      attention_head_dim=8, num_layers=2, num_cross_attention_heads=2,
                                                      cross_attention_head_dim=8, cross_attention_dim=16,
                                                      caption_channels=16, sample_size=8)),
    "sana600m": dict(cond=4096, latent=(32, 32), L=720, t=dict(in_channels=32, out_channels=32, num_attention_heads=36,
                                                               attention_head_dim=32, num_layers=28,
                                                               num_cross_attention_heads=16, cross_attention_head_dim=72,
                                                               cross_attention_dim=1152, caption_channels=2304,
                                                               sample_size=32)),
    "sana1600m": dict(cond=4096, latent=(32, 32), L=720, t=dict(in_channels=32, out_channels=32, sample_size=32)),
}


def main(argv=None):
    from kelix.dit.flow import FlowConfig, add_noise, sample_sigmas, velocity_target
    from kelix.dit.model import DiTConfig, KelixDiT
    from kelix.dit.sampler import sample_latents

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser()
    p.add_argument("--scale", choices=list(SCALES), default="sana600m" if cuda else "tiny")
    p.add_argument("--batch", type=int, default=8 if cuda else 2)
    a = p.parse_args(argv)
    s = SCALES[a.scale]
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    dit = KelixDiT(DiTConfig(cond_dim=s["cond"], transformer=dict(s["t"]), max_condition_length=s["L"])).to(device)
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-5, fused=cuda)
    C, (h, w) = dit.latent_channels, s["latent"]
    x0 = torch.randn(a.batch, C, h, w, device=device)
    states = torch.randn(a.batch, s["L"], s["cond"], device=device)
    mask = torch.ones(a.batch, s["L"], dtype=torch.bool, device=device)
    flow = FlowConfig()
    g = torch.Generator(device=device).manual_seed(0)

    def loss():
        sigma = sample_sigmas(a.batch, flow, generator=g).to(device)
        noise = torch.randn(x0.shape, device=device, generator=g)
        with torch.autocast(device, dtype=dtype, enabled=cuda):
            v = dit(add_noise(x0, noise, sigma), sigma * 1000, states, mask)
            return torch.nn.functional.mse_loss(v.float(), velocity_target(x0, noise))

    t = time_train_step(loss, opt, repeat=5 if cuda else 2)
    params = sum(q.numel() for q in dit.parameters())
    res = {"scale": a.scale, "batch": a.batch, "latent": [C, h, w], "condition_length": s["L"],
           "params_m": round(params / 1e6, 1), "train_step_s": round(t, 4), "images_per_s": round(a.batch / t, 2)}
    if cuda:
        tokens = a.batch * h * w  # one token per latent pixel (patch size 1)
        res["approx_mfu"] = round(6 * params * tokens / t / 989e12, 3)
        res["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    dit.eval()
    with torch.autocast(device, dtype=dtype, enabled=cuda):
        for scale in (1.0, 4.5):
            st = timeit(lambda scale=scale: sample_latents(dit, states[:1], mask[:1], latent_size=(h, w), steps=20,
                                                           cfg_scale=scale), warmup=1, repeat=2)
            res[f"sample_20_steps_cfg{scale}_s"] = round(st, 3)
    return report("dit", **res)


if __name__ == "__main__":
    main()
