"""A user's input error as one line: the key, the value and what to run first; no traceback.

``kelix fit|validate|test|predict`` and the kit verbs run under :func:`one_line_errors`. An input error
(a missing file or directory, an unknown or misspelled key, a value of the wrong type, an overlay recipe
given without its base, a ValueError a kit verb raises itself) prints ``kelix <verb>: <line>`` on stderr and
exits 2. Anything raised once training runs, and any other exception (a ValueError from inside a library
included: a bug), keeps its traceback. ``--debug`` or ``KELIX_DEBUG=1`` shows every traceback.

Stdlib only: ``kelix --help`` imports this.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import glob
import os
import re
import sys
from pathlib import Path

# Raised by a missing path (the kit's loaders raise these for init_from, codebook, shards, tokenizers, ...).
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
# The kit's own input errors (kelix.eval.base.DataError, kelix.official.config.ReleaseError, ...).
_INPUT_ERROR_NAMES = {"DataError", "ReleaseError", "SampleError", "RowError", "InputError", "ArgumentError",
                      "MisconfigurationException", "PathError", "NSKeyError"}


class InputError(ValueError):
    """A user's input is wrong; the message is the whole story (printed as one line)."""


class RunFailed(SystemExit):
    """A run failed (a stage's process, an export not written): its message, exit 1. Not the user's input,
    which a verb reports with ``raise SystemExit("kelix verb: ...")`` (one line, exit 2 under
    :func:`one_line_errors`)."""


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` in ``argv`` (removed from it) or ``KELIX_DEBUG=1``."""
    found = "--debug" in argv
    while "--debug" in argv:
        argv.remove("--debug")
    return found or os.environ.get("KELIX_DEBUG", "") not in ("", "0")


def chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it, outermost first (``__cause__``, else ``__context__``)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def is_input_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the user's (one line) rather than the code's (a traceback)."""
    if getattr(exc, "kelix_in_run", False):  # raised once training ran: a bug must stay visible
        return False
    if getattr(exc, "kelix_setup", False):  # raised while the Lightning CLI parsed or built the recipe
        return isinstance(chain(exc)[-1], (OSError, ValueError)) or _named_input_error(exc)
    if any(isinstance(e, _PATH_ERRORS) or type(e).__name__ in _INPUT_ERROR_NAMES for e in chain(exc)):
        return True
    root = chain(exc)[-1]  # a ValueError the kit raised itself checks an input; one from a library is a bug
    return isinstance(root, ValueError) and _raised_by_kit(root)


def _raised_by_kit(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    kit = str(Path(__file__).resolve().parents[1])
    return tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(kit)


def _named_input_error(exc: BaseException) -> bool:
    return any(type(e).__name__ in _INPUT_ERROR_NAMES for e in chain(exc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().strip('"').strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _parser_key(errors: list[BaseException]) -> str:
    """The dotted key jsonargparse names along the chain (``model.init_args.optim.init_args.lr``)."""
    keys: list[str] = []
    for e in errors:
        text = str(e).lstrip()
        m = re.match(r'Parser key "([^"]+)"', text)
        if m and (not keys or keys[-1] != m.group(1)):
            keys.append(m.group(1))
        elif text.startswith("Problem with given class_path") and keys and keys[-1] != "init_args":
            keys.append("init_args")
    return ".".join(keys)


def _class_params(errors: list[BaseException]) -> list[str]:
    """The parameters of the innermost class jsonargparse was building (for a did-you-mean)."""
    import importlib
    import inspect

    for e in reversed(errors):
        m = re.match(r"Problem with given class_path '([\w.]+)'", str(e).lstrip())
        if m:
            module, _, name = m.group(1).rpartition(".")
            with contextlib.suppress(Exception):
                return list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    return []


def _find_key(config, value: str, prefix: str = "") -> str | None:
    """The dotted key of ``config`` (a jsonargparse Namespace or dict) whose value is ``value``."""
    items = vars(config).items() if hasattr(config, "__dict__") and not isinstance(config, dict) else (
        config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ())
    for k, v in items:
        key = f"{prefix}.{k}" if prefix and not isinstance(k, int) else f"{prefix}[{k}]" if prefix else str(k)
        if isinstance(v, str | os.PathLike) and str(v) == value:
            return key
        if isinstance(v, dict | list) or hasattr(v, "__dict__") and not isinstance(v, str | os.PathLike):
            found = _find_key(v, value, key)
            if found:
                return found
    return None


def _recipes_dirs(configs: list[str]) -> list[Path]:
    dirs = []
    for c in configs:
        for parent in Path(c).resolve().parents:
            if parent.name == "recipes":
                dirs.append(parent)
                break
    dirs.append(Path(__file__).resolve().parents[2] / "recipes")
    return [d for i, d in enumerate(dirs) if d.is_dir() and d not in dirs[:i]]


def _header(path: str | Path) -> dict[str, str]:
    """A recipe's ``# Reads:`` / ``# Writes:`` / ``# Run:`` header fields, continuation lines joined."""
    fields: dict[str, str] = {}
    field = None
    with contextlib.suppress(OSError), open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            m = re.match(r"#\s*(Reads|Writes|Run):\s*(.*)", line)
            if m:
                field = m.group(1)
                fields[field] = m.group(2).strip()
            elif field and re.match(r"#\s{3,}\S", line):
                fields[field] += " " + line[1:].strip()
            else:
                field = None
    return fields


def _mentions(text: str, path: str) -> int:
    """Where ``text`` names ``path`` as a whole token (-1 if nowhere)."""
    m = re.search(r"(?<![\w/.])" + re.escape(path.rstrip("/")) + r"(?![\w/-])", text)
    return m.end() if m else -1


def hint(path: str, configs: list[str]) -> str:
    """What to run first to make ``path``: the recipe whose header writes it, else the running recipe's note."""
    for d in _recipes_dirs(configs):
        for recipe in sorted(glob.glob(str(d / "**" / "*.yaml"), recursive=True)):
            head = _header(recipe)
            if _mentions(head.get("Writes", ""), path) >= 0:
                rel = os.path.relpath(recipe, d.parent)
                commands = re.findall(r"kelix \S+[^()]*?(?= kelix |\s\(|$)", head.get("Run", ""))
                if not commands:
                    return f"run {rel} first"
                more = ", then the rest of its Run: line" if len(commands) > 1 else ""
                return f"run {rel} first ({commands[0].strip()}{more})"
    from kelix.cli import KIT_VERBS  # light: the verb table only

    verbs = "|".join(re.escape(v) for v in KIT_VERBS)
    for c in configs:
        reads = _header(c).get("Reads", "")
        end = _mentions(reads, path)
        m = re.match(r"\s*\(([^()]*)\)", reads[end:]) if end >= 0 else None
        if m and re.search(rf"kelix|recipes/|\.yaml|\b({verbs})\b", m.group(1)):
            how = f"kelix {m.group(1)}" if m.group(1) in KIT_VERBS else m.group(1)  # a bare verb name
            return f"make it first ({how})"
    return ""


def _quoted_path(text: str) -> str | None:
    m = re.search(r"'([^']+)'", text) or re.search(r"No such file or directory:\s*(\S+)", text)
    return m.group(1).rstrip(".,") if m else None


def _overlay_line(configs: list[str]) -> str | None:
    """An overlay recipe (no ``model: class_path`` of its own) given without its base."""
    import yaml

    def model_class(c: str) -> bool:
        with contextlib.suppress(Exception), open(c, encoding="utf-8") as f:
            return bool(((yaml.safe_load(f) or {}).get("model") or {}).get("class_path"))
        return False

    if not configs or any(model_class(c) for c in configs):
        return None
    run = _header(configs[0]).get("Run", "")
    run = re.findall(r"kelix \S+[^()]*?(?= kelix |\s\(|$)", run)
    run = run[0].strip() if run else ""
    has_base = any(Path(b).name != Path(configs[0]).name for b in re.findall(r"--config\s+(\S+)", run))
    what = f"give its base first: {run}" if has_base else "give its base recipe first (--config BASE --config OVERLAY)"
    return f"{configs[0]} is an overlay (it sets no model class_path): {what}"


def explain(exc: BaseException, configs: list[str] = (), options: list[str] = ()) -> str:
    """One line for an input error: the key, the value, and what to do."""
    errors = chain(exc)
    root = errors[-1]
    line = _first_line(root)
    key = _parser_key(errors)
    m = re.match(r"[Uu]nrecognized arguments: (\S+)", line)
    if m:
        bad = m.group(1).split("=")[0]
        return f"unknown option {bad}" + _did_you_mean(bad, options)
    m = re.search(r"does not accept option '([^']+)'", line)  # a misspelled key in a config file
    if m:
        near = _did_you_mean(f"--{m.group(1)}", options).replace("--", "")
        return f"unknown key {m.group(1)}" + near
    m = re.match(r"Option '([^']+)' is not accepted", line)
    if m:
        overlay = _overlay_line(configs)
        if overlay:
            return overlay
        near = difflib.get_close_matches(m.group(1).split(".")[0], _class_params(errors), n=1)
        full = f"{key}.{m.group(1)}" if key else m.group(1)
        tip = f": did you mean {key + '.' if key else ''}{near[0]}?" if near else ""
        return f"unknown key {full}{tip}"
    m = re.match(r"Expected a <class '(\w+)'>\. Got value: (.*)", line)
    if m:
        return f"{key or 'value'}: expected {m.group(1)}, got {m.group(2)!r}"
    if isinstance(root, _PATH_ERRORS) or type(root).__name__ == "PathError" or re.search(
            r"does not exist|not a (local )?directory|No such file", line):
        path = getattr(root, "filename", None) or _quoted_path(line)
        config = getattr(exc, "kelix_config", None)
        at = _find_key(config, str(path)) if path and config is not None else None
        todo = [t for t in (hint(str(path), configs) if path else "", f"set {at}" if at else "") if t]
        if path and re.match(r"(\[Errno \d+\] )?No such file or directory", line):
            line = f"{at.rsplit('.', 1)[-1] + ' ' if at else ''}{str(path)!r} does not exist"
        return line + (": " + " or ".join(todo) if todo else "")
    return f"{key}: {line}" if key and not line.startswith(f'Parser key "{key}"') else line


def _did_you_mean(bad: str, options: list[str]) -> str:
    """``--modell.init_args.lr`` -> ``--model.init_args.lr``: the nearest option, else the nearest head."""
    near = difflib.get_close_matches(bad, options, n=1)
    if near:
        return f": did you mean {near[0]}?"
    head, _, rest = bad.partition(".")
    heads = sorted({o.split(".")[0] for o in options})
    near = difflib.get_close_matches(head, heads, n=1)
    return f": did you mean {near[0]}{'.' + rest if rest else ''}?" if near else ""


def _one_line_argparse_error(self: argparse.ArgumentParser, message: str):
    tip = ""
    m = re.match(r"unrecognized arguments: (\S+)", message)
    if m:
        opts = [s for a in self._actions for s in a.option_strings]
        tip = _did_you_mean(m.group(1).split("=")[0], opts)
    self.exit(2, f"{self.prog}: error: {message}{tip} ({self.prog} --help lists the options)\n")


@contextlib.contextmanager
def one_line_errors(verb: str, argv: list[str], debug: bool):
    """Run a verb; an input error prints one line and exits 2 (``debug``: the traceback, as raised)."""
    if debug:
        yield
        return
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    configs += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    from unittest import mock

    # argparse's usage dump in front of a one-word mistake says less than one line with the nearest option
    patch = mock.patch.object(argparse.ArgumentParser, "error", _one_line_argparse_error)
    try:
        with patch:
            yield
    except SystemExit as e:  # a verb's own check, raise SystemExit("kelix verb: ..."): the user's input
        if not isinstance(e.code, str) or isinstance(e, RunFailed):
            raise
        print(e.code if e.code.startswith("kelix") else f"kelix {verb}: {e.code}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:  # noqa: BLE001  (sorted into the user's and the code's below)
        if not is_input_error(e):
            raise
        options = getattr(e, "kelix_options", [])
        print(f"kelix {verb}: {explain(e, configs, options)}", file=sys.stderr)
        raise SystemExit(2) from None
