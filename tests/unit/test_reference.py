"""docs/configuration.md is the rendering of the typed configs: a changed field without a regenerated reference fails."""

from pathlib import Path

from raymem.reference import render

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_reference_is_up_to_date():
    assert REFERENCE.read_text() == render(), "regenerate: python -m raymem.reference > docs/configuration.md"
