"""The deployment's certificate key, published so that anyone can check a certificate."""

from fastapi import APIRouter

from app.api.deps import SettingsDep
from app.certificates import ALGORITHM, certificate_key
from app.schemas import PublicKeyOut

router = APIRouter(prefix="/certificates", tags=["certificates"])


@router.get("/public-key", response_model=PublicKeyOut)
def public_key(settings: SettingsDep) -> PublicKeyOut:
    """The Ed25519 public key that signs erasure certificates. Public: no API key needed."""
    key = certificate_key(settings.resolved_certificate_key_file)
    return PublicKeyOut(
        algorithm=ALGORITHM,
        key_id=key.key_id,
        public_key_pem=key.public_pem,
        signed_payload="the certificate without `signature`, as JSON with sorted keys, no "
        "whitespace, UTF-8 (docs/erasure.md)",
    )
