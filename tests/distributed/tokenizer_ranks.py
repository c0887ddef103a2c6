"""Rank bodies of the tokenizer's multi-process tests: each runs in a process of its own (gloo, CPU).

:func:`spawn` starts ``world`` processes from the launcher's forkserver (torch, Lightning and the kit
already imported), each calling ``body(rank, world, out_dir)`` inside an initialised process group;
a rank writes what it saw to ``out_dir/rank<r>.json``, its output to ``out_dir/rank<r>.log``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from tests.distributed import launch


def _entry(body_name: str, rank: int, world: int, port: int, out_dir: str) -> None:
    fd = os.open(os.path.join(out_dir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", NODE_RANK="0",
                      OMP_NUM_THREADS="1")
    code = 1
    try:
        import torch
        import torch.distributed as dist
        from lightning.pytorch.utilities import rank_zero_only

        torch.set_num_threads(1)
        rank_zero_only.rank = rank  # the forkserver imported Lightning before RANK was set
        dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
        result = globals()[body_name](rank, world, out_dir)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
        dist.destroy_process_group()
        code = 0
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def spawn(body_name: str, out_dir, world: int = 2, timeout: float = 120) -> list[dict]:
    """Run ``body_name`` of this module on ``world`` ranks; their results (a hung collective is killed)."""
    ctx, port = launch.context(), launch.free_port()
    procs = [ctx.Process(target=_entry, args=(body_name, r, world, port, str(out_dir))) for r in range(world)]
    for p in procs:
        p.start()
    codes = launch.wait(procs, timeout)
    assert codes == [0] * world, f"exit codes {codes}\n" + launch.logs(out_dir)
    out = []
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            out.append(json.load(f))
    return out


def _module(**kw):
    import torch

    from kelix.hf import TINY_QWEN3
    from kelix.tokenizer.model import tiny_config
    from kelix.tokenizer.module import TokenizerModule

    torch.manual_seed(0)
    tok = kw.pop("tokenizer", {})
    return TokenizerModule(tiny_config(**tok), aux_lm_config=TINY_QWEN3, **kw)


def rank_codes(rank: int, n: int, K: int = 32):
    import torch

    return torch.randint(0, K, (n, 4), generator=torch.Generator().manual_seed(100 + rank))


def metrics_body(rank: int, world: int, out_dir: str) -> dict:
    """Train usage from both ranks; validation codes on rank 0 only; then no validation codes at all."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    m = _module(histogram_every=1)
    logger = TensorBoardLogger(os.path.join(out_dir, "tb"), name="", version=0)
    m.trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp", logger=logger,
                           enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    assert m.global_rank == rank
    m.usage.update(rank_codes(rank, 50 + 30 * rank))
    local = m.usage.counts.clone()
    stats = m._log_usage(m.usage, "codebook", histogram=True)
    if rank == 0:
        m.val_usage.update(rank_codes(7, 40))
    m.on_validation_epoch_end()  # rank 1 saw no validation codes: it must still join the sum
    m.on_validation_epoch_end()  # no rank saw any: nothing logged, nobody waits
    logger.finalize("success")
    return {"local_counts": local.tolist(), "usage": stats["usage"].tolist()}


def fsdp_body(rank: int, world: int, out_dir: str) -> dict:
    """FSDP2 with bf16 parameters: the quantizer is gathered in float32 and its codes are the fp32 codes."""
    import copy

    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from kelix.training.parallel import apply_fsdp2

    m = _module(tokenizer=dict(K=256))
    ref = copy.deepcopy(m.tokenizer.quantizer).eval()  # float32, before sharding
    mesh = init_device_mesh("cpu", (world,))
    apply_fsdp2(m.parallel_roots(), m.parallel_blocks(), mesh, param_dtype="bfloat16", owner=m)
    seen = {}

    def grab(module, args):
        seen["x"] = args[0].detach()
        seen["dtypes"] = sorted({str(p.dtype) for p in module.parameters()})

    m.tokenizer.quantizer.register_forward_pre_hook(grab)
    block = m.tokenizer.encoder.model.blocks[0]
    block.register_forward_pre_hook(lambda mod, args: seen.__setitem__("block", str(mod.attn.qkv.weight.dtype)))
    g = torch.Generator().manual_seed(rank)
    pixels = [torch.randn(3, 112, 112, generator=g) for _ in range(6)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.tokenizer(pixels)
    with torch.no_grad():
        want = ref(seen["x"].float())
    return {"quantizer_dtypes": seen["dtypes"], "block_dtype": seen["block"], "tokens": int(out.codes.shape[0]),
            "codes_equal": bool(torch.equal(out.codes, want.codes)),
            "mismatch": int((out.codes != want.codes).sum())}


def fsdp_grad_body(rank: int, world: int, out_dir: str) -> dict:
    """One step under FSDP2 (float32), each rank its own batch: the gradients equal one process's
    gradient of the mean of the ranks' losses (FSDP2 averages over ranks)."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh

    from kelix.training.parallel import apply_fsdp2
    from tests.tokenizer.test_usage_logging import _batches

    m = _module()
    batches = _batches(world + 1)[1:]  # different images and captions per rank
    ref = copy.deepcopy(m)
    (sum(ref.step(b, "train")["loss"] for b in batches) / world).backward()
    want = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
    mesh = init_device_mesh("cpu", (world,))
    roots = m.parallel_roots()
    apply_fsdp2(roots, m.parallel_blocks(), mesh, owner=m)
    m.__dict__["_fsdp_roots"] = roots  # as KelixModule.configure_model does
    m._unshard_roots()
    m.step(batches[rank], "train")["loss"].backward()
    worst, missing = {}, []
    for n, p in m.named_parameters():
        if n not in want:
            continue
        if p.grad is None:
            missing.append(n)
            continue
        g = p.grad.full_tensor()
        worst[n] = float((g - want[n]).abs().max() / want[n].abs().max().clamp(min=1e-12))
    return {"missing": missing, "worst": max(worst.values()), "worst_name": max(worst, key=worst.get),
            "checked": len(worst)}
