"""Regenerate the config-field tables in README.md from the dataclasses (tests/test_readme_tables.py
fails when they drift): python scripts/gen_config_tables.py"""

from pathlib import Path

from ultramem.confbase import render_field_tables
from ultramem.readme_tables import CONFIG_CLASSES

readme = Path(__file__).resolve().parent.parent / "README.md"
readme.write_text(render_field_tables(readme.read_text(), CONFIG_CLASSES))
print(f"updated {readme}")
