"""Renders the worker policies' table in docs/gate.md from the policy models (the gate, the
audit, the planner, the methods), so the documentation and the code never drift.

``python -m worker.policy_doc`` rewrites the table; a test checks it is current.
"""

from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from app.settings_doc import between_markers
from worker.audit.config import AuditConfig
from worker.audit.gate import GatePolicy
from worker.config import PolicySettings
from worker.screening import ScreenPolicy
from worker.unlearning.methods import MethodOptions
from worker.unlearning.planner import PlannerPolicy

GATE_DOC = Path(__file__).resolve().parents[1] / "docs" / "gate.md"
START, END = "<!-- policy-table:start -->", "<!-- policy-table:end -->"
POLICIES: tuple[type[PolicySettings], ...] = (
    GatePolicy,
    AuditConfig,
    PlannerPolicy,
    MethodOptions,
    ScreenPolicy,
)


def _rows(variable: str, key: str, fields: dict[str, FieldInfo]) -> list[str]:
    rows = []
    for name, field in fields.items():
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            rows += _rows(f"{variable}{name.upper()}__", f"{key}{name}.", nested.model_fields)
            continue
        default = "" if field.default is None else str(field.default)
        rows.append(
            f"| `{variable}{name.upper()}` | `{key}{name}` | `{default}` | "
            f"{field.description or ''} |"
        )
    return rows


def policy_table() -> str:
    rows = ["| variable | policy-file key | default | meaning |", "|---|---|---|---|"]
    for policy in POLICIES:
        prefix = str(policy.model_config.get("env_prefix", ""))
        rows += _rows(prefix, f"{policy.section}.", policy.model_fields)
    return "\n".join(rows)


def render(document: str) -> str:
    return between_markers(document, START, END, policy_table())


if __name__ == "__main__":
    GATE_DOC.write_text(render(GATE_DOC.read_text()))
