"""The docs stay true: docs/architecture.md to the tree (every file, class and layering claim it makes), and
the README as a front page (short, its two commands first, every link of the README and docs/ alive)."""

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


# The README as a front page (issue 27): short, its links alive, its two commands first and run by CI.
README = (REPO / "README.md").read_text()
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_the_readme_is_a_front_page_of_under_1500_words():
    assert len(README.split()) < 1500


def test_every_relative_link_of_the_readme_and_the_docs_points_to_a_file():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken, checked = [], 0
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            checked += 1
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert checked > 20 and broken == []


def test_the_readme_commands_come_first_and_ci_runs_the_tests_one():
    blocks = re.findall(r"^```bash\n(.*?)^```", README, flags=re.S | re.M)
    assert [b.strip() for b in blocks[:2]] == ["pip install -e . && kelix quickstart",
                                              "pip install -e '.[dev]' && pytest -q"]
    assert "pip install -e '.[dev]' && pytest -q" in (REPO / ".ci" / "run").read_text()
