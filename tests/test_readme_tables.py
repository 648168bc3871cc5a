"""The README's config tables are generated from the dataclasses: fail when they drift."""

from pathlib import Path

import pytest

from ultramem.confbase import field_table, render_field_tables
from ultramem.config import UltraMemConfig
from ultramem.readme_tables import CONFIG_CLASSES

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_tables_match_the_dataclasses():
    text = README.read_text()
    assert render_field_tables(text, CONFIG_CLASSES) == text, (
        "README config tables are stale: run `python scripts/gen_config_tables.py`")


def test_every_field_has_a_doc_line():
    for name, cls in CONFIG_CLASSES.items():
        for line in field_table(cls).splitlines()[2:]:
            assert not line.endswith("|  |"), f"{name}: field without a doc line: {line}"


def test_render_replaces_only_between_markers_and_refuses_missing_ones():
    text = "a\n<!-- config-table: U -->\nold\n<!-- /config-table -->\nb\n"
    out = render_field_tables(text, {"U": UltraMemConfig})
    assert out.startswith("a\n<!-- config-table: U -->\n| field |")
    assert out.endswith("<!-- /config-table -->\nb\n")
    assert "| `topk` | `32` |" in out
    with pytest.raises(ValueError, match="no '<!-- config-table: X -->' marker"):
        render_field_tables(text, {"X": UltraMemConfig})
