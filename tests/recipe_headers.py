"""What a paper-scale recipe reads and writes, from its config and from its header, for the chain test.

A recipe's header lists ``# Reads:`` and ``# Writes:`` (continued on indented ``#`` lines) and commands
(``kelix ...``, continued by a trailing ``\\``). Paths are those under ``/models``, ``/data``, ``runs`` and
``exports``; the config's are every such string value (``${...}`` resolved), its outputs being the run
directory ``runs/<name>`` and ``export_dir``.
"""

from __future__ import annotations

import pathlib
import re
import shlex

ROOT = pathlib.Path(__file__).resolve().parent.parent
# the order a user runs them in (docs/recipes.md); the precomputed DiT recipe is the cheaper
# alternative of pretrain.yaml, so both come before the SFT
STAGES = [f"recipes/tokenizer/{s}.yaml" for s in ("stage1_align", "stage2_pretrain", "stage3_anneal")] + [
    f"recipes/llm/{s}.yaml" for s in ("stage1_align", "stage2_1_interleaved", "stage2_2_multitask", "stage3_anneal",
                                      "stage4_sft")] + [
    f"recipes/dit/{s}.yaml" for s in ("pretrain", "pretrain_precomputed", "sft")]
PATH = re.compile(r"(?<![\w.])(?:/models|/data|runs|exports)/[^\s,;()'\"]*")
INPUT_FLAGS = ("--ckpt", "--shards", "--lm", "--tokenizer", "--vae", "--config")


def clean(p: str) -> str:
    return p.rstrip(".,:;/")


def paths_in(text: str) -> set[str]:
    return {clean(m) for m in PATH.findall(text)}


def header(path: str) -> list[str]:
    return [ln.rstrip("\n") for ln in open(ROOT / path) if ln.startswith("#")]


def section(head: list[str], name: str) -> str:
    """The text of ``# Name:`` and its indented continuation lines."""
    out, on = [], False
    for ln in head:
        if ln.startswith(f"# {name}:"):
            on = True
            out.append(ln[len(f"# {name}:"):])
        elif on and re.match(r"#\s{2,}", ln):
            out.append(ln[1:])
        else:
            on = False
    return " ".join(out)


def commands(head: list[str]) -> list[list[str]]:
    """The header's ``kelix ...`` commands (``# Run:`` and the others), as argument lists."""
    text, cmds, cur = [ln.lstrip("#").strip() for ln in head], [], None
    for ln in text:
        if ln.startswith("Run:"):
            ln = ln[len("Run:"):].strip()
        if cur is not None:
            cur += " " + ln.rstrip("\\").strip()
            if not ln.endswith("\\"):
                cmds.append(cur)
                cur = None
            continue
        if ln.startswith("kelix "):
            if ln.endswith("\\"):
                cur = ln.rstrip("\\").strip()
            else:
                cmds.append(ln)
    return [shlex.split(c) for c in cmds]


def config(path: str) -> dict:
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(ROOT / path), resolve=False)
    return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)


def _strings(node, key=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v, key)
    elif isinstance(node, str):
        yield key, node


def config_io(cfg: dict) -> tuple[set[str], set[str]]:
    """(inputs, outputs) of ``kelix fit`` on this config."""
    outputs = {f"runs/{cfg['name']}"}
    inputs = set()
    for key, value in _strings(cfg):
        for p in paths_in(value):
            (outputs if key == "export_dir" else inputs).add(p)
    return inputs, outputs


def command_io(cmd: list[str], cfg: dict) -> tuple[set[str], set[str]]:
    """(inputs, outputs) of one header command; ``kelix fit`` is the config's."""
    if cmd[:2] == ["kelix", "fit"]:
        return config_io(cfg)
    ins, outs = set(), set()
    for i, w in enumerate(cmd[:-1]):
        if w in INPUT_FLAGS:
            ins |= paths_in(cmd[i + 1])
        if w == "--out":
            outs |= paths_in(cmd[i + 1])
    if cmd[1] == "build-codebook" and "--out" not in cmd:  # writes the recipe's tokenizer.codebook
        outs.add(cfg["model"]["init_args"]["tokenizer"]["codebook"])
    return ins, outs


def within(path: str, root: str) -> bool:
    """``path`` is ``root`` or inside it; a shard pattern's directory counts (``/d/x-{0..9}.tar`` in ``/d``)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def external_inputs() -> set[str]:
    """The named external inputs of docs/recipes.md (its "External inputs" table: backticked paths)."""
    text = (ROOT / "docs/recipes.md").read_text()
    part = text.split("## External inputs", 1)[1].split("\n## ", 1)[0]
    return {clean(p) for p in re.findall(r"`([^`]+)`", part) if PATH.fullmatch(p)}
