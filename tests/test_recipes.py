"""Every YAML recipe in recipes/ is parsed by a test (the component suites check their own values)."""

import pathlib

from tests import test_ablate as ablate
from tests.dit import test_recipes as dit
from tests.estimate import test_official_recipes as official
from tests.llm import test_recipes as llm
from tests.tokenizer import test_recipes as tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
OVERLAYS = {"recipes/quickstart/dit_on_llm.yaml"}  # parsed over its base in tests/dit/test_recipes.py


def test_every_recipe_is_checked():
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml")}
    checked = {str(pathlib.Path(p).resolve().relative_to(ROOT)) for p in [*dit.RECIPES, *llm.RECIPES, *tokenizer.RECIPES,
                                                                               *ablate.RECIPES, *official.RECIPES]}
    assert on_disk - checked - OVERLAYS == set()
