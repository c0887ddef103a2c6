"""Shard lists: brace patterns, globs and URLs, expanded and checked before any work starts."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

from webdataset.shardlists import expand_urls

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")


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
