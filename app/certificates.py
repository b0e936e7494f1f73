"""Erasure certificates that a third party can check (docs/erasure.md).

A certificate is signed with the deployment's Ed25519 key over its canonical JSON: the
certificate without its ``signature`` member, keys sorted, no whitespace, UTF-8. The public key
is published at ``GET /certificates/public-key``. The same key file also keys the digests of
erased content (HMAC-SHA256 with a key derived from it): a plain sha256 of a small input (an
8x8 digit) can be matched by anyone who guesses the input, a keyed digest only by the
deployment.
"""

import base64
import hashlib
import hmac
import json
import os
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FORMAT = "lethe-erasure-certificate/1"
SIGNATURE = "signature"
ALGORITHM = "Ed25519"
_DIGEST_KEY_INFO = b"lethe: keyed digests of erased content"


def canonical_json(value: Any) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, UTF-8 (Python's json.dumps)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def signed_payload(certificate: dict[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in certificate.items() if k != SIGNATURE})


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class CertificateKey:
    """The deployment's signing key, and the digest key derived from it."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key()
        self.key_id = key_id(self.public)
        raw = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        self._digest_key = HKDF(hashes.SHA256(), 32, None, _DIGEST_KEY_INFO).derive(raw)

    @property
    def public_pem(self) -> str:
        return self.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def sign(self, body: dict[str, Any]) -> dict[str, Any]:
        """The certificate: the body plus its signature."""
        signature = self._private.sign(signed_payload(body))
        return {
            **body,
            SIGNATURE: {
                "algorithm": ALGORITHM,
                "key_id": self.key_id,
                "value": base64.b64encode(signature).decode(),
            },
        }

    def keyed_digest(self, sha256_hex: str) -> str:
        """HMAC-SHA256 of a content digest: checkable only by whoever holds the key."""
        return hmac.new(self._digest_key, bytes.fromhex(sha256_hex), hashlib.sha256).hexdigest()


def verify_signature(certificate: dict[str, Any], public: Ed25519PublicKey) -> bool:
    """True when the certificate's signature is the given key's over its canonical JSON."""
    signature = certificate.get(SIGNATURE)
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        return False
    try:
        public.verify(base64.b64decode(str(signature.get("value"))), signed_payload(certificate))
    except (InvalidSignature, ValueError):
        return False
    return True


@lru_cache
def certificate_key(path: Path) -> CertificateKey:
    """The key in ``path``, created there (readable by its owner only) when there is none yet.
    Several processes may start at once: the file appears whole, and the first one wins."""
    if not path.exists():
        _create_key_file(path)
    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(private, Ed25519PrivateKey):
        raise ValueError(f"{path} holds no Ed25519 private key")
    return CertificateKey(private)


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    partial = path.with_name(f"{path.name}.partial-{uuid.uuid4().hex}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    try:
        os.link(partial, path)  # fails if another process created the key first
    except FileExistsError:
        pass
    finally:
        partial.unlink()
