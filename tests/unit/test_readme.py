"""The README's configuration table is generated from the settings and must be current."""

from app.settings_doc import README, render


def test_readme_settings_table_is_current() -> None:
    text = README.read_text()
    assert render(text) == text, "run: .venv/bin/python -m app.settings_doc"
