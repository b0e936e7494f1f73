"""The README's settings table and docs/gate.md's policy table are generated from the code and
must be current."""

from app.settings_doc import README, render
from worker.policy_doc import GATE_DOC
from worker.policy_doc import render as render_policies


def test_readme_settings_table_is_current() -> None:
    text = README.read_text()
    assert render(text) == text, "run: .venv/bin/python -m app.settings_doc"


def test_gate_policy_table_is_current() -> None:
    text = GATE_DOC.read_text()
    assert render_policies(text) == text, "run: .venv/bin/python -m worker.policy_doc"
