"""The audit battery and the promotion gate (DESIGN.md, "Audit battery").

``run_audit`` is the entry point the pipeline calls; ``AuditResult.passed`` decides promotion
and ``AuditResult.reasons`` gives the outcome and reason of every gate rule.
"""

from worker.audit.config import AuditConfig
from worker.audit.gate import GatePolicy
from worker.audit.runner import AuditResult, prepare_audits, run_audit, run_baseline_audit

__all__ = [
    "AuditConfig",
    "AuditResult",
    "GatePolicy",
    "prepare_audits",
    "run_audit",
    "run_baseline_audit",
]
