"""Certificates a third party can check: the signing key, the canonical JSON, the keyed digest,
and the verification snippets of docs/erasure.md run as an outsider would run them."""

import json
import re
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from app.certificates import CertificateKey, canonical_json, certificate_key, verify_signature

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "erasure.md"


def snippet(name: str) -> str:
    """The code block between the doc's ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    block = re.search(
        rf"<!-- {name}:start -->\n```\w+\n(.*?)```\n<!-- {name}:end -->", DOC.read_text(), re.S
    )
    assert block is not None, f"docs/erasure.md has no {name} snippet"
    return block.group(1)


@pytest.fixture
def key(tmp_path: Path) -> CertificateKey:
    return certificate_key(tmp_path / "keys" / "certificate.pem")


def certificate(key: CertificateKey) -> dict[str, Any]:
    return key.sign(
        {
            "request_id": "0b5c",
            "sample_id": "digits-0042 é",  # non-ASCII survives the canonical form
            "audit": {"sample": {"p_leak": 0.123456789, "p_over": 1e-05}},
            "purged": {"weights": [{"key": "versions/v1.safetensors", "sha256": "ab" * 32}]},
        }
    )


def test_the_key_is_created_once_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "certificate.pem"
    with ThreadPoolExecutor(4) as pool:  # several processes may start at once
        keys = list(pool.map(lambda _: certificate_key.__wrapped__(path), range(8)))
    assert len({k.key_id for k in keys}) == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial file left


def test_a_signature_holds_for_the_certificate_and_for_nothing_else(
    key: CertificateKey, tmp_path: Path
) -> None:
    signed = certificate(key)
    assert verify_signature(signed, key.public)
    # The ledger's JSON column and the store give it back re-serialised: still valid.
    assert verify_signature(json.loads(json.dumps(signed)), key.public)
    altered = json.loads(json.dumps(signed))
    altered["purged"]["weights"] = []
    assert not verify_signature(altered, key.public)
    other = certificate_key(tmp_path / "other.pem")  # another deployment's key
    assert not verify_signature(signed, other.public)
    assert not verify_signature({k: v for k, v in signed.items() if k != "signature"}, key.public)


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": ["é", 0.5]}) == '{"a":["é",0.5],"b":1}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"a": float("nan")})


def test_the_keyed_digest_is_not_the_plain_digest_and_depends_on_the_key(
    key: CertificateKey, tmp_path: Path
) -> None:
    content = "ab" * 32
    other = certificate_key(tmp_path / "other.pem")
    assert key.keyed_digest(content) == key.keyed_digest(content)
    assert key.keyed_digest(content) not in (content, other.keyed_digest(content))


def _outsider(tmp_path: Path, key: CertificateKey, signed: dict[str, Any]) -> Path:
    folder = tmp_path / "auditor"
    folder.mkdir()
    (folder / "certificate.json").write_text(json.dumps(signed, ensure_ascii=False))
    (folder / "lethe-certificates.pem").write_text(key.public_pem)
    return folder


@pytest.mark.parametrize("altered", [False, True])
def test_the_documented_python_check(key: CertificateKey, tmp_path: Path, altered: bool) -> None:
    signed = certificate(key)
    if altered:
        signed["sample_id"] = "digits-0043 é"
    folder = _outsider(tmp_path, key, signed)
    run = subprocess.run(
        [sys.executable, "-c", snippet("verify-python")],
        cwd=folder,
        capture_output=True,
        text=True,
    )
    assert (run.returncode == 0) is not altered, run.stderr
    assert ("signature valid" in run.stdout) is not altered


@pytest.mark.parametrize("altered", [False, True])
def test_the_documented_openssl_check(key: CertificateKey, tmp_path: Path, altered: bool) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    signed = certificate(key)
    if altered:
        signed["audit"]["sample"]["p_leak"] = 0.5
    folder = _outsider(tmp_path, key, signed)
    run = subprocess.run(
        ["bash", "-e", "-c", snippet("verify-openssl").replace("python3", sys.executable)],
        cwd=folder,
        capture_output=True,
        text=True,
    )
    assert (run.returncode == 0) is not altered, run.stdout + run.stderr
