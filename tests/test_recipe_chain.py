"""The paper-scale recipes chain: every input of a stage is written by an earlier stage (its config or a
header command) or is a named external input of docs/recipes.md, and each header's Reads / Writes lines
say what the config reads and writes."""

import pytest

from tests import recipe_headers as rh

ROOT = rh.ROOT


def test_every_paper_scale_recipe_is_in_the_chain():
    on_disk = {str(p.relative_to(ROOT)) for d in ("tokenizer", "llm", "dit") for p in (ROOT / "recipes" / d).glob("*.yaml")}
    assert on_disk == set(rh.STAGES)


@pytest.mark.parametrize("path", rh.STAGES)
def test_reads_and_writes_lines_match_the_config(path):
    head, cfg = rh.header(path), rh.config(path)
    reads, writes = rh.paths_in(rh.section(head, "Reads")), rh.paths_in(rh.section(head, "Writes"))
    cmds = rh.commands(head)
    assert ["kelix", "fit", "--config", path] in cmds, f"{path}: no 'kelix fit --config {path}' command"
    ins, outs = set(), set()
    for cmd in cmds:
        i, o = rh.command_io(cmd, cfg)
        ins, outs = ins | i, outs | o
    fit_in, fit_out = rh.config_io(cfg)
    for p in sorted(fit_in):
        assert any(rh.within(p, r) for r in reads), f"{path}: the config reads {p}, its Reads line does not say so"
    for p in sorted(fit_out):
        assert any(rh.within(w, p) for w in writes), f"{path}: the config writes {p}, its Writes line does not say so"
    for r in sorted(reads):
        assert any(rh.within(p, r) or rh.within(r, p) for p in ins), f"{path}: Reads {r}, which no command reads"
    for w in sorted(writes):
        assert any(rh.within(w, o) for o in outs), f"{path}: Writes {w}, which no command writes"


def test_every_input_is_written_by_an_earlier_stage_or_is_external():
    external = rh.external_inputs()
    assert external, "docs/recipes.md has no External inputs table"
    written: list[tuple[str, str]] = []  # (path, by which recipe)
    for path in rh.STAGES:
        cfg, cmds = rh.config(path), rh.commands(rh.header(path))
        # the header's commands run in order: build-codebook / precompute-dit before fit, export after it
        for cmd in cmds:
            ins, outs = rh.command_io(cmd, cfg)
            for p in sorted(ins):
                ok = any(rh.within(p, w) for w, _ in written) or any(rh.within(p, e) for e in external)
                assert ok, f"{path}: {' '.join(cmd[:2])} reads {p}, which no earlier stage writes and docs/recipes.md does not list"
            written += [(o, path) for o in outs]
    # an external input never stands for a hand-off: nothing a stage writes is listed as external
    for w, by in written:
        clash = [e for e in external if rh.within(w, e) or rh.within(e, w)]
        assert not clash, f"{by} writes {w}, but docs/recipes.md lists {clash} as an external input"


def test_the_tokenizer_export_is_where_the_llm_and_dit_read_it():
    tok = rh.config("recipes/tokenizer/stage3_anneal.yaml")["model"]["init_args"]["export_dir"]
    for path in rh.STAGES:
        if path.startswith(("recipes/llm/", "recipes/dit/")):
            cfg = rh.config(path)
            model = cfg["model"]["init_args"]
            got = (model.get("image_tokenizer") or model.get("lm", {}).get("image_tokenizer")
                   or model.get("condition", {}).get("init_args", {}).get("tokenizer"))
            if got is None:  # pre-computed conditions: the tokenizer ran in the header's precompute-dit
                got = next(c[c.index("--tokenizer") + 1] for c in rh.commands(rh.header(path)) if "--tokenizer" in c)
            assert got == tok, f"{path} reads the tokenizer from {got}, the tokenizer recipe exports to {tok}"
