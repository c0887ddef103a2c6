"""Launch ``kelix fit`` on N local CPU ranks the way torchrun does (one process per rank, env vars).

Ranks are forked from a forkserver that imported torch, Lightning and the kit once, so a
2-rank run costs its training time, not 2 x 10 s of imports. Each rank runs the real entry point,
``kelix.cli.main(["fit", ...])``, with ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*`` set:
Lightning sees externally created processes (TorchElasticEnvironment), as under torchrun or SLURM.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import sys
import time
import traceback

PRELOAD = ["torch", "lightning.pytorch", "kelix.training.cli", "kelix.data.datamodule", "tests.distributed.toy",
           "torch.distributed.checkpoint", "torch.distributed.fsdp", "transformers.models.qwen3.modeling_qwen3",
           "lightning.pytorch.loggers.tensorboard", "kelix.training.convert"]
_CTX = None


def context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(argv: list[str], rank: int, world: int, port: int, log_path: str, cwd: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(cwd)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", NODE_RANK="0",
                      OMP_NUM_THREADS="1")
    # as in a rank started by torchrun: DataLoader workers fork from it (not from a new forkserver)
    mp.set_start_method("fork", force=True)
    code, t0 = 1, time.monotonic()
    try:
        import torch

        torch.set_num_threads(1)  # deterministic, and 2 ranks on 2 cores
        from kelix.cli import main

        main(["fit", *argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        import resource

        cpu = sum(getattr(resource.getrusage(w), k) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for k in ("ru_utime", "ru_stime"))
        print(f"[launch] rank {rank}: exit {code}, cpu {cpu:.1f} s (with data workers), wall {time.monotonic() - t0:.1f} s")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def launch(argv: list[str], cwd, world: int = 2) -> list:
    """Start ``kelix fit <argv>`` on ``world`` ranks in ``cwd``; logs go to ``cwd/rank<r>.log``."""
    ctx, port = context(), free_port()
    procs = []
    for rank in range(world):
        p = ctx.Process(target=_rank_main, args=(list(argv), rank, world, port, os.path.join(cwd, f"rank{rank}.log"),
                                                 str(cwd)), daemon=False)
        p.start()
        procs.append(p)
    return procs


def wait(procs, timeout: float = 300) -> list[int]:
    """Exit codes of every rank; kills them all if one fails or time runs out (no hung collective)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.exitcode for p in procs]
        if all(c is not None for c in codes):
            return codes
        if any(c not in (None, 0) for c in codes):
            time.sleep(5)  # let the others report their own error, then stop them
            break
        time.sleep(0.1)
    for p in procs:
        if p.exitcode is None:
            p.kill()
        p.join()
    return [p.exitcode for p in procs]


def run(argv: list[str], cwd, world: int = 2, timeout: float = 300) -> list[int]:
    return wait(launch(argv, cwd, world), timeout)


def logs(cwd) -> str:
    out = []
    for name in sorted(os.listdir(cwd)):
        if name.startswith("rank") and name.endswith(".log"):
            with open(os.path.join(cwd, name)) as f:
                out.append(f"--- {name}\n" + f.read()[-4000:])
    return "\n".join(out)


def batches_seen(key_dir, rank: int = 0) -> int:
    path = os.path.join(key_dir, f"keys.{rank}.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def key_sequence(key_dir, world: int = 2) -> dict[int, list[tuple[int, list[str], list[float]]]]:
    """Per rank, ``(batch index, keys, RNG draws)`` of each training batch; a replayed batch (after a
    resume) replaces the earlier record of the same index, so this is what the final model saw."""
    out = {}
    for rank in range(world):
        by_batch: dict[int, tuple] = {}
        with open(os.path.join(key_dir, f"keys.{rank}.jsonl")) as f:
            for line in f:
                rec = json.loads(line)
                by_batch[rec["batch"]] = (rec["keys"], rec["noise"])
        out[rank] = [(b, *v) for b, v in sorted(by_batch.items())]
    return out
