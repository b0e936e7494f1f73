"""Renders the README's configuration table from the Settings object, so the two never drift.

``python -m app.settings_doc`` rewrites the table in README.md; a test checks it is current.
"""

from pathlib import Path

from app.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def settings_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "" if field.default is None else str(field.default)
        if field.annotation is not None and "Secret" in str(field.annotation):
            default = "(unset)"
        rows.append(f"| `LETHE_{name.upper()}` | `{default}` | {field.description or ''} |")
    return "\n".join(rows)


def between_markers(document: str, start: str, end: str, table: str) -> str:
    """``document`` with the text between the two markers replaced by ``table``."""
    head, rest = document.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{table}\n{end}{tail}"


def render(readme: str) -> str:
    return between_markers(readme, START, END, settings_table())


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
