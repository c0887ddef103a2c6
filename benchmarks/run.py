"""Run every benchmark (or those named) and print one JSON line each: ``python -m benchmarks.run [names]``."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import traceback

import benchmarks


def main(argv=None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or sorted(
        m.name[len("bench_"):] for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))
    for name in names:
        try:
            importlib.import_module(f"benchmarks.bench_{name}").main([])
        except Exception:  # noqa: BLE001 - a benchmark that cannot run here reports and the rest go on
            print(f'{{"benchmark": "{name}", "error": {traceback.format_exc(limit=1).splitlines()[-1]!r}}}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
