"""A conversion job: source rows -> numbered shards, in parallel, resumable, with a manifest.

The inputs are counted first; shard ``i`` holds the usable rows among source rows
``[i * shard_size, (i + 1) * shard_size)`` (the global row order is the inputs' order, then their own),
so the plan depends only on the inputs and options: any number of workers, and a rerun after a kill,
give the same shards. A sample's key is its global row number, unique in the output.

Each finished shard leaves a record ``{out}/.convert-{prefix}/{i:05d}.json`` (its sample count,
bytes, and skipped rows), written after the shard was synced and renamed; a rerun keeps every shard
whose record matches the job and whose file has the recorded size, and converts the rest. At the
end ``{out}/{prefix}.manifest.json`` lists every shard (samples, bytes), the totals and each skipped
row with its reason and source row; the shard reader checks the sample counts in it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

from kelix.data.convert.formats import FORMATS, Options, RowError, sanitize
from kelix.data.convert.readers import count_rows, expand_inputs, read_rows
from kelix.data.shards import MANIFEST_SUFFIX, MANIFEST_VERSION
from kelix.data.writer import ShardSink, make_record, write_json_atomic


@dataclass
class Job:
    """One conversion.

    Args:
        format: one of :data:`~kelix.data.convert.formats.FORMATS`.
        inputs: files, folders or globs, read in this order.
        out_dir: where the shards go.
        shard_size: source rows per shard (a shard holds the usable ones among them).
        prefix: shard file prefix (default: the format); keys are ``{prefix}-{global row:09d}``.
        opts: what to read from each row (:class:`~kelix.data.convert.formats.Options`).
        hf_split: the split of a ``datasets`` DatasetDict.
    """

    format: str
    inputs: list[str]
    out_dir: str
    shard_size: int = 1000
    prefix: str | None = None
    opts: Options = field(default_factory=Options)
    hf_split: str | None = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"--format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
        self.prefix = sanitize(self.prefix or self.format)


class RecordedSink(ShardSink):
    """ShardSink numbering its shards from ``index``, byte-reproducibly (fixed member mtime), with its
    count record at ``record_path`` instead of the shared manifest (workers write shards concurrently).
    Shared by the resumable jobs (convert, ``kelix precompute-dit``)."""

    def __init__(self, out_dir, prefix, index, record_path, max_count):
        super().__init__(out_dir, prefix, max_count)
        self.index, self.record_path = index, record_path

    @property
    def manifest_path(self) -> str:
        return self.record_path

    def _open(self):
        super()._open()
        self._writer.mtime = 0.0


def _plan(job: Job) -> list[tuple[str, int, list[int] | None]]:
    """``(input, rows, seek offsets)`` of each input."""
    return [(p, *count_rows(p, job.hf_split, job.shard_size)) for p in expand_inputs(job.inputs)]


def _fingerprint(job: Job, plan) -> str:
    desc = {"format": job.format, "shard_size": job.shard_size, "prefix": job.prefix, "opts": asdict(job.opts),
            "split": job.hf_split, "inputs": [(os.path.abspath(p), n) for p, n, _ in plan]}
    return hashlib.sha1(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _segments(plan, start: int, stop: int):
    """``(path, seek, local_start, local_stop, global_start)`` of the inputs overlapping global rows [start, stop)."""
    first = 0
    for path, n, seek in plan:
        lo, hi = max(start, first), min(stop, first + n)
        if lo < hi:
            yield path, seek, lo - first, hi - first, lo
        first += n


def _record_dir(job: Job) -> str:
    return os.path.join(job.out_dir, f".convert-{job.prefix}")


def load_record(path: str, fp: str, out_dir: str, **expect) -> dict | None:
    """The completion record at ``path`` if it is of job ``fp``, has the ``expect`` fields and every
    shard it lists is in ``out_dir`` with its recorded size; else None (that work is redone).
    Shared by the resumable jobs (convert, ``kelix tokenize``, ``kelix precompute-dit``)."""
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("job") != fp or any(rec.get(k) != v for k, v in expect.items()):
        return None
    for name, info in rec.get("shards", {}).items():
        p = os.path.join(out_dir, name)
        if not os.path.isfile(p) or os.path.getsize(p) != info.get("bytes"):
            return None
    return rec


def _is_done(job: Job, index: int, fp: str, rows: list[int]) -> dict | None:
    return load_record(os.path.join(_record_dir(job), f"{index:05d}.json"), fp, job.out_dir, rows=rows)


def summarize(records: list[dict]) -> dict:
    """The manifest's ``shards``, ``totals`` (samples, bytes, shards, skipped), ``skipped_by_reason`` and
    ``skipped`` over the completion records ``{"shards": {name: {samples, bytes}}, "skipped": [...]}``."""
    shards = {name: info for rec in records for name, info in rec["shards"].items()}
    skipped = [s for rec in records for s in rec["skipped"]]
    return {
        "shards": shards,
        "totals": {"samples": sum(s["samples"] for s in shards.values()),
                   "bytes": sum(s["bytes"] for s in shards.values()), "shards": len(shards), "skipped": len(skipped)},
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "skipped": skipped,
    }


def _json_slices(job: Job, plan, index: int) -> dict:
    """The rows of shard ``index`` from JSON-list inputs, sent to the worker with the task: a JSON list
    must be parsed whole, and parsing it in every worker would hold a copy of it per process."""
    from kelix.data.convert.readers import _json_list, kind_of

    rows = (index * job.shard_size, min((index + 1) * job.shard_size, sum(n for _, n, _ in plan)))
    return {path: _json_list(path)[lo:hi] for path, _, lo, hi, _ in _segments(plan, *rows) if kind_of(path) == "json"}


def convert_shard(job: Job, plan, index: int, fp: str, json_rows: dict | None = None) -> dict:
    """Write shard ``index`` and its record; return the record. ``json_rows``: see :func:`_json_slices`."""
    rows = [index * job.shard_size, min((index + 1) * job.shard_size, sum(n for _, n, _ in plan))]
    record_path = os.path.join(_record_dir(job), f"{index:05d}.json")
    convert = FORMATS[job.format]
    skipped = []
    sink = RecordedSink(job.out_dir, job.prefix, index, record_path, job.shard_size)
    for path, seek, lo, hi, g0 in _segments(plan, *rows):
        given = (json_rows or {}).get(path)
        rows_in = zip(range(lo, hi), given) if given is not None else read_rows(path, lo, hi, job.hf_split, seek,
                                                                                 job.shard_size)
        for local, row in rows_in:
            try:
                meta, files = convert(row, job.opts)
                meta.setdefault("source", f"{os.path.basename(path)}:{local}")
                sink.write(make_record(f"{job.prefix}-{g0 + local - lo:09d}", meta, files))
            except RowError as e:
                skipped.append({"source": path, "row": local, "reason": e.reason, "message": str(e)})
    sink.close()
    shards = {os.path.basename(p): {"samples": sink.counts[os.path.basename(p)], "bytes": os.path.getsize(p)}
              for p in sink.paths}
    rec = {"version": MANIFEST_VERSION, "job": fp, "rows": rows, "shards": shards, "skipped": skipped}
    write_json_atomic(record_path, rec)
    return rec


def run(job: Job, workers: int = 1, progress: bool = True) -> dict:
    """Convert (or finish converting) ``job``; return the manifest it writes."""
    from tqdm import tqdm

    plan = _plan(job)
    total = sum(n for _, n, _ in plan)
    if total == 0:
        raise ValueError(f"inputs {', '.join(job.inputs)}: no rows to convert")
    fp = _fingerprint(job, plan)
    os.makedirs(_record_dir(job), exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(_record_dir(job)), "*.json")):
        try:
            with open(stale, encoding="utf-8") as f:
                other = json.load(f).get("job")
        except (OSError, ValueError, AttributeError):
            other = None  # unreadable: that shard is redone
        if other is not None and other != fp:  # None: ShardSink's own count, the job killed before its record
            raise ValueError(f"{job.out_dir}: holds shards '{job.prefix}-*' of another conversion (other inputs or "
                             "options); convert into a new --out, or delete them")
    n_shards = -(-total // job.shard_size)
    records, todo = {}, []
    for i in range(n_shards):
        rows = [i * job.shard_size, min((i + 1) * job.shard_size, total)]
        rec = _is_done(job, i, fp, rows)
        if rec is None:
            todo.append(i)
        else:
            records[i] = rec
    done_rows = sum(r["rows"][1] - r["rows"][0] for r in records.values())
    bar = tqdm(total=total, initial=done_rows, unit="row", desc=f"{job.format} -> shards", disable=not progress)
    try:
        if workers <= 1 or len(todo) <= 1:
            for i in todo:
                records[i] = convert_shard(job, plan, i, fp)
                bar.update(records[i]["rows"][1] - records[i]["rows"][0])
        else:
            import multiprocessing
            import signal
            import threading
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # spawn: the parent may hold threads (tqdm's monitor), which fork would copy mid-state
            ex = ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"))
            # The workers start with Ctrl-C ignored (an ignored signal stays ignored in a spawned Python), so
            # the parent alone is interrupted: it cancels the shards not started, the running ones finish
            # (whole shards, kept on resume), and it reports in one line instead of one traceback per worker.
            main = threading.current_thread() is threading.main_thread()
            old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
            try:
                futures = {ex.submit(convert_shard, job, plan, i, fp, _json_slices(job, plan, i)): i for i in todo}
            finally:
                if main:
                    signal.signal(signal.SIGINT, old)
            try:
                for fut in as_completed(futures):
                    rec = records[futures[fut]] = fut.result()
                    bar.update(rec["rows"][1] - rec["rows"][0])
            except BaseException:
                ex.shutdown(wait=False, cancel_futures=True)
                raise
            ex.shutdown()
    finally:
        bar.close()
    return _write_manifest(job, plan, fp, [records[i] for i in range(n_shards)], resumed=n_shards - len(todo))


def _write_manifest(job: Job, plan, fp: str, records: list[dict], resumed: int) -> dict:
    summary = summarize(records)
    summary["totals"].update(rows=sum(n for _, n, _ in plan), resumed_shards=resumed)
    manifest = {"version": MANIFEST_VERSION, "format": job.format, "job": fp, "shard_size": job.shard_size,
                "inputs": [{"path": p, "rows": n} for p, n, _ in plan], **summary}
    write_json_atomic(os.path.join(job.out_dir, job.prefix + MANIFEST_SUFFIX), manifest)
    return manifest
