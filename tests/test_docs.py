"""docs/architecture.md stays true to the tree: every file, class and layering claim it makes."""

import ast
import importlib
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent
DOC = (REPO / "docs" / "architecture.md").read_text()


def _expand(path: str) -> list[str]:
    m = re.search(r"\{([^}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",") for p in _expand(path[: m.start()] + alt + path[m.end():])]


def named_paths() -> list[str]:
    return [p for span in re.findall(r"`((?:kelix|recipes|docs)/[^`\s]*)`", DOC) for p in _expand(span)]


def test_every_path_and_class_the_architecture_names_exists():
    paths = named_paths()
    assert len(paths) > 40
    missing = [p for p in paths if not (REPO / p).exists()]
    assert missing == []
    for dotted in re.findall(r"`(kelix(?:\.\w+)+\.[A-Z]\w+)`", DOC):
        module, name = dotted.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name), dotted


def test_the_docs_explain_the_repository_from_inside_it():
    developing = (REPO / "docs" / "DEVELOPING.md").read_text()
    assert "(architecture.md)" in developing
    for text in (DOC, developing):
        assert "shared/" not in text and "DESIGN.md" not in text and "](../" not in text


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_model_files_import_no_lightning_directly_or_through_the_kit():
    """The layering rule, for the files the document lists as model math (imports inside functions too)."""
    span = DOC[DOC.index("**model files**"): DOC.index("**`module.py`**")]
    files = [p for s in re.findall(r"`(kelix/[^`\s]*\.py)`", span) for p in _expand(s)]
    assert len(files) == 22  # with kelix/pipeline.py
    seen, todo, bad = set(), [REPO / f for f in files], []
    while todo:  # follow kelix imports transitively
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        for mod in _imports(path):
            if mod.split(".")[0] in ("lightning", "pytorch_lightning"):
                bad.append(f"{path.relative_to(REPO)}: {mod}")
            elif mod.startswith("kelix."):
                base = REPO / mod.replace(".", "/")
                todo += [base.with_suffix(".py"), base / "__init__.py"]
    assert bad == []
