"""docs/data.md: a section per format, and every command in it parses with the real options."""

import os
import re
import shlex

from kelix.data.convert.cli import convert_parser
from kelix.data.convert.formats import FORMATS

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "data.md")


def test_every_format_has_a_section_with_a_command_that_parses():
    text = open(DOC, encoding="utf-8").read()
    commands = [line for line in text.splitlines() if line.startswith("kelix data convert ")]
    formats = set()
    for line in commands:
        a = convert_parser().parse_args(shlex.split(line)[3:])  # exits (fails the test) on an unknown option
        formats.add(a.format)
    assert formats == set(FORMATS), set(FORMATS) - formats
    for name in ("pairs", "llava", "obelics", "text", "t2i", "img2dataset", "hf"):
        assert re.search(rf"^## {name}\b", text, re.M), name
    assert "kelix data validate '" in text and "kelix data stats '" in text
