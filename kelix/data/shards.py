"""Shard lists (brace patterns, globs and URLs, expanded and checked before any work starts) and
reading one shard as raw samples.

A shard written by the kit (:class:`kelix.data.writer.ShardSink`) is listed with its sample count
in ``{prefix}.manifest.json`` beside it; when such a manifest is present the reader checks the
count, so a tar cut exactly at a member boundary (which reads as a valid, shorter tar) is reported.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from kelix.data.decode import is_wanted
from kelix.data.schema import SampleError

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")
MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_VERSION = 1
DEFAULT_MAX_MEMBER_BYTES = 64 * 2**20


@dataclass
class Source:
    """One data source of a mixture.

    Args:
        shards: a pattern or a list of patterns. Brace ranges (``data-{000..099}.tar``), globs
            (``data/*.tar``) and URLs (``pipe:...``, ``https://...``) are accepted; local patterns
            must match at least one file.
        weight: relative sampling weight in the mixture (normalised over sources).
        name: label used in logs and errors (defaults to the first pattern).
    """

    shards: str | list[str]
    weight: float = 1.0
    name: str | None = None
    urls: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        if not self.shards:
            raise ValueError(f"data source {self.name!r} lists no shards")
        if not self.weight > 0:
            raise ValueError(f"data source {self.label!r}: weight must be > 0, got {self.weight}")

    @property
    def label(self) -> str:
        return self.name or self.shards[0]

    def expand(self) -> list[str]:
        """Expand the patterns into shard URLs; raise FileNotFoundError naming the empty pattern."""
        urls = []
        for pattern in self.shards:
            found = []
            for item in expand_urls(os.path.expanduser(pattern)):
                if item.startswith(REMOTE_PREFIXES):
                    found.append(item)
                elif glob.has_magic(item):
                    found.extend(sorted(glob.glob(item)))
                elif os.path.isfile(item):
                    found.append(item)
            if not found:
                raise FileNotFoundError(f"data source {self.label!r}: pattern {pattern!r} matches no file")
            urls.extend(found)
        self.urls = urls
        return urls


def as_sources(spec) -> list[Source]:
    """Accept a Source, a list of Sources, a pattern string, or a list of dicts/strings."""
    if spec is None:
        return []
    if isinstance(spec, (Source, str, dict)):
        spec = [spec]
    out = []
    for s in spec:
        if isinstance(s, Source):
            out.append(s)
        elif isinstance(s, str):
            out.append(Source(s))
        elif isinstance(s, dict):
            out.append(Source(**s))
        else:
            raise TypeError(f"cannot read a data source from {type(s).__name__}: {s!r}")
    if not out:
        raise ValueError("no data source given")
    return out


# -- manifests: sample counts of the shards the kit wrote
def read_manifests(urls: list[str]) -> dict[str, int]:
    """Expected sample count of each local shard in ``urls`` listed in a ``*.manifest.json`` beside it."""
    by_dir: dict[str, dict[str, int]] = {}
    out = {}
    for url in urls:
        if url.startswith(REMOTE_PREFIXES):
            continue
        d = os.path.dirname(url) or "."
        if d not in by_dir:
            by_dir[d] = {}
            for path in sorted(glob.glob(os.path.join(glob.escape(d), "*" + MANIFEST_SUFFIX))):
                by_dir[d].update(load_manifest(path))
        n = by_dir[d].get(os.path.basename(url))
        if n is not None:
            out[url] = n
    return out


def load_manifest(path: str) -> dict[str, int]:
    """``{shard file name: samples}`` of one manifest; a malformed one fails naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
        if m.get("version") != MANIFEST_VERSION:
            raise ValueError(f"version {m.get('version')!r} is not {MANIFEST_VERSION}")
        return {str(k): int(v["samples"]) for k, v in m["shards"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"shard manifest {path}: cannot be read ({type(e).__name__}: {e}); fix or delete it") from e


# -- reading one shard
def _open_tar(url: str):
    """A local file is opened for random access (a member's data is skipped by a seek, not read);
    anything else (URLs, pipes) as a stream."""
    if not url.startswith(REMOTE_PREFIXES) and os.path.isfile(url):
        return contextlib.nullcontext(), tarfile.open(url, mode="r:*")
    stream = gopen(url, "rb")
    return stream, tarfile.open(fileobj=stream, mode="r|*")


def _members(url: str) -> Iterator[tuple[str, int, Callable[[], bytes]]]:
    """``(name, size, read)`` of the wanted regular members; ``read()`` returns the data (call it
    before the next member, or never: an unread member of a local file is skipped by a seek).

    Own tar loop rather than webdataset's ``tar_file_iterator``: the size check needs the member's
    header before its data is read, and samples before a resume point need no data at all.
    """
    stream, tar = _open_tar(url)
    with stream, tar:
        for info in tar:
            if info.isreg() and is_wanted(info.name):
                yield info.name, info.size, lambda info=info: tar.extractfile(info).read()
            tar.members = []  # keep no member history


def read_shard(url: str, start: int = 0, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
               expected: int | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(index, raw_sample)`` of one shard from sample ``start`` on, pickle members unread.

    A raw sample is ``{"__key__", "__url__", field: bytes...}``. A sample that cannot be used whole
    carries ``"__error__": (reason, message)`` instead of its fields and keeps its index, so the
    indices of the others never move: a key seen before in the shard (``duplicate_key``; the first
    one is kept), a member larger than ``max_member_bytes`` (``oversized_member``). With
    ``expected`` (the manifest's count), a shard that ends early raises
    :class:`SampleError` ``truncated_shard`` after its last sample. The samples before ``start``
    are counted from the member names alone: their data is never read (a resumed or restored
    stream does not re-read a local shard's first part, only its headers).
    """
    seen: set[str] = set()
    n, current, suffixes = 0, None, set()
    for name, size, read in _members(url):
        key, suffix = base_plus_ext(name)
        if key is None:
            continue
        suffix = suffix.lower()
        if current is None or key != current["__key__"] or suffix in suffixes:
            if current is not None:
                if n >= start:
                    yield n, current
                n += 1
            current, suffixes = {"__key__": key, "__url__": url}, set()
            if key in seen:  # webdataset raises here, which would lose the rest of the shard
                current["__error__"] = ("duplicate_key", f"key {key!r} appears again in the shard (member {name})")
            seen.add(key)
        suffixes.add(suffix)
        if n < start:
            continue
        if size > max_member_bytes:
            if "__error__" not in current:
                current = {"__key__": key, "__url__": url, "__error__": (
                    "oversized_member", f"member {name} is {size} bytes, over max_member_bytes = {max_member_bytes}")}
            continue
        data = read()
        if "__error__" not in current:
            current[suffix] = data
    if current is not None:
        if n >= start:
            yield n, current
        n += 1
    if expected is not None and n != expected:
        raise SampleError("truncated_shard", f"{url}: {n} sample(s) but its manifest lists {expected}: the shard was "
                                             "cut short (or rewritten); rewrite it")
