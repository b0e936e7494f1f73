"""Limits met before authentication: body size (by Content-Length and while streaming), slow
heads and bodies, oversized heads, batch size; and a client that walks away mid-body."""

import json
import re
import select
import socket
import time
from collections.abc import Iterator

import pytest

from tests.security.conftest import Serve, Service, closed_by_peer, read_answer

pytestmark = pytest.mark.integration
MB = 1024 * 1024


@pytest.fixture(scope="module")
def service(serve: Serve) -> Iterator[Service]:
    with serve(header_timeout_seconds="1", body_timeout_seconds="1") as running:
        yield running


def head(path: str, *lines: str) -> bytes:
    return "\r\n".join([f"POST {path} HTTP/1.1", "Host: lethe", *lines, "", ""]).encode()


def test_a_200_mb_body_without_a_key_is_refused_before_it_is_sent(service: Service) -> None:
    """The 413 comes back on the headers alone: the client has not sent a byte of the body."""
    with service.connect() as sock:
        sock.sendall(head("/forget", f"Content-Length: {200 * MB}", "Content-Type: x/y"))
        answer = read_answer(sock)
    assert answer.status == 413
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["connection"] == "close"
    assert "at most 1048576" in json.loads(answer.body)["detail"]


def test_a_200_mb_upload_is_cut_short_and_never_held(service: Service) -> None:
    """A client that sends the body anyway: the server closes the connection long before the
    200 MB are through, and its memory does not grow by anything near the body's size."""
    before = service.rss_bytes()
    sent = 0
    with service.connect() as sock:
        sock.sendall(head("/forget", f"Content-Length: {200 * MB}"))
        chunk = b"x" * MB
        try:
            while sent < 200 * MB:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert sent < 50 * MB, f"{sent / MB:.0f} MB went through"
    assert service.rss_bytes() - before < 20 * MB


def test_a_chunked_body_is_refused_as_it_grows_past_the_limit(service: Service) -> None:
    """The 413 arrives while the client is still sending: long before the end of a 64 MB body
    (the kernel's socket buffers on loopback take a few MB of it before the server refuses)."""
    with service.connect() as sock:
        sock.sendall(head("/forget", "Transfer-Encoding: chunked", "X-API-Key: whatever"))
        chunk = b"x" * 65536
        sent = 0
        try:
            while sent < 64 * MB and not select.select([sock], [], [], 0)[0]:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < 32 * MB  # refused on the way, not at the end
        answer = read_answer(sock)
    assert answer.status == 413
    assert "larger than the 1048576 bytes" in json.loads(answer.body)["detail"]


def test_a_slowly_sent_body_is_cut_off(service: Service) -> None:
    with service.connect() as sock:
        sock.sendall(head("/forget", "Content-Length: 100", "Content-Type: application/json"))
        started = time.monotonic()
        sock.sendall(b'{"sample_ids": [')
        answer = read_answer(sock)
        assert closed_by_peer(sock, 2)
    assert answer.status == 408
    assert "within 1 s" in json.loads(answer.body)["detail"]
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("sent", [b"", b"POST /forget HTTP/1.1\r\nHost: lethe\r\n"])
def test_a_head_that_never_ends_is_cut_off(service: Service, sent: bytes) -> None:
    """Nothing at all, or a request line and half its headers: 408 within the timeout."""
    with service.connect() as sock:
        started = time.monotonic()
        sock.sendall(sent)
        answer = read_answer(sock)
        assert closed_by_peer(sock, 2)
    assert answer.status == 408
    assert answer.headers["content-type"] == "application/problem+json"
    assert time.monotonic() - started < 5


def test_an_oversized_head_is_431(service: Service) -> None:
    with service.connect() as sock:
        sock.sendall(head("/forget/sec-000", "X-Padding: " + "a" * 20_000))
        answer = read_answer(sock)
    assert answer.status == 431
    assert "16384 bytes" in json.loads(answer.body)["detail"]


def test_a_batch_over_the_limit_is_413(service: Service) -> None:
    ids = [f"sec-{i % 200:03d}" for i in range(1001)]
    response = service.client.post("/forget", headers=service.headers(), json={"sample_ids": ids})
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert "at most 1000 sample IDs" in response.json()["detail"]


def test_a_client_that_leaves_mid_body_is_not_a_server_error(service: Service) -> None:
    """Logged as 499 (client closed request) and counted as a 4xx, never as a 500."""
    with service.connect() as sock:
        sock.sendall(head("/forget", "Content-Length: 1000", "Content-Type: application/json"))
        sock.sendall(b'{"sample_ids": ["sec-001"')
        time.sleep(0.2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    time.sleep(0.5)
    metrics = service.client.get("/metrics").text
    counted = re.findall(
        r'http_requests_total\{handler="([^"]*)",method="POST",status="(\dxx)"\}', metrics
    )
    assert ("none", "4xx") in counted or ("/forget", "4xx") in counted, counted
    assert not [c for c in counted if c[1] == "5xx"], counted
    log = service.server.log_path.read_text()
    assert '"status": 499' in log and '"status": 500' not in log
    assert "Exception in ASGI application" not in log
