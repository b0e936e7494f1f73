"""``verify-erasure``: a completed request's certificate re-checked against the store, for the
CLI (``lethe verify-erasure``) and for auditors (``GET /forget/requests/{id}/verification``).

Three checks: the certificate carries this deployment's valid signature; every object it lists
as purged is gone; and nothing in the sample's erasure closure, recomputed now from the ledger
and the store's listings, is left, except what the certificate declares retained (a legal hold).
"""

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy.orm import Session

from app.artifacts import ObjectStore
from app.certificates import CertificateKey, verify_signature
from app.ledger.clock import utcnow
from app.ledger.erasure import ErasureGraph, Kind, deltas_in_ranges
from app.ledger.errors import StateConflict
from app.ledger.requests import get_request
from app.ledger.samples import get_sample
from app.ledger.versions import get_version


@dataclass(frozen=True)
class Leftover:
    kind: str
    key: str
    reason: str


@dataclass(frozen=True)
class Verification:
    request_id: str
    sample_id: str
    verified: bool
    signature_valid: bool
    key_id: str
    listed_checked: int
    listed_present: list[str]  # listed as purged, yet in the store
    derived_checked: int
    derived_present: list[Leftover]  # derived from the sample, in the store, not declared
    retained: list[str]  # declared retained by the certificate, and still there
    checked_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_erasure(
    session: Session, store: ObjectStore, request_id: str, key: CertificateKey
) -> Verification:
    request = get_request(session, request_id)
    certificate = request.certificate
    if certificate is None:
        raise StateConflict(
            f"request {request_id} is {request.state.value} and has no certificate to verify"
        )
    listed = listed_keys(session, certificate)
    listed_present = store.present(listed)
    declared = {entry["key"] for entry in certificate.get("retained", [])}
    held = [
        get_version(session, e["version"]).id
        for e in certificate.get("retained", [])
        if e.get("version")
    ]
    sample = get_sample(session, request.sample_id)
    closure = ErasureGraph(session, store).closure(sample, request.completed_version_id, held)
    derived = [(o.kind.value, o.key, o.reason) for o in closure.objects] + [
        (Kind.step_deltas.value, row.store_key, closure.delta_reasons[run])
        for run, rows in closure.deltas.items()
        for row in rows
    ]
    present = store.present(key for _, key, _ in derived)
    signature_valid = verify_signature(certificate, key.public) and (
        certificate.get("request_id"),
        certificate.get("sample_id"),
    ) == (request.id, request.sample_id)
    leftovers = [Leftover(*d) for d in derived if d[1] in present and d[1] not in declared]
    return Verification(
        request_id=request.id,
        sample_id=request.sample_id,
        verified=signature_valid and not listed_present and not leftovers,
        signature_valid=signature_valid,
        key_id=key.key_id,
        listed_checked=len(listed),
        listed_present=sorted(listed_present),
        derived_checked=len(derived),
        derived_present=leftovers,
        retained=sorted(declared & present),
        checked_at=utcnow().isoformat(),
    )


def listed_keys(session: Session, certificate: dict[str, Any]) -> set[str]:
    """The store keys a certificate lists as purged (its step-delta runs read from the ledger)."""
    keys: set[str] = set()
    for kind, entries in certificate.get("purged", {}).items():
        for entry in entries:
            if kind == Kind.step_deltas:
                rows = deltas_in_ranges(session, entry["run_id"], entry["steps"])
                keys.update(row.store_key for row in rows)
            else:
                keys.add(entry["key"])
    return keys
