"""The compliance dashboard: served without a key, and, in headless Chromium, it shows a seeded
ledger (overdue and completed requests, the serving lineage, an audit with its plot).

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``make system-deps``) and
the ``selenium`` package. It keeps a screenshot in its tmp dir; with
``LETHE_DOCS_SCREENSHOT=docs/img/dashboard.png`` it also refreshes the one in the docs.
"""

import os
import shutil
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from app.ledger.clock import utcnow
from app.ledger.db import make_engine, session_scope
from app.ledger.filing import file_requests
from app.ledger.jobs import coalesce_pending_requests, requests_of_job
from app.ledger.keys import create_key
from app.ledger.requests import transition_requests
from app.ledger.samples import SampleRecord, register_samples
from app.ledger.tables import Audit, RequestState, Split, VersionState
from app.ledger.versions import create_version, promote
from app.main import create_app
from app.settings import Settings
from tests.api.conftest import Api

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
PLOT = "roc_loss_attack.png"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1800",
)


def test_page_and_assets_are_public_and_locked_down(api: Api) -> None:
    page = api.client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert "form-action 'none'" in page.headers["Content-Security-Policy"]
    for asset, media_type in (("dashboard.js", "javascript"), ("dashboard.css", "text/css")):
        response = api.client.get(f"/dashboard/{asset}")
        assert response.status_code == 200 and media_type in response.headers["content-type"]
    assert api.client.get("/dashboard/..%2Fsettings.py").status_code == 404
    assert api.client.get("/dashboard/dashboard.html").status_code == 404
    assert not [p for p in api.client.get("/openapi.json").json()["paths"] if "dashboard" in p]


def roc_png(size: int = 240) -> bytes:
    """A real PNG (stdlib only): axes, the chance diagonal and a ROC-like curve."""
    white, grey, ink, blue = b"\xff\xff\xff", b"\xbb\xbb\xbb", b"\x20\x20\x20", b"\x2f\x5f\xb3"
    margin, span = 20, size - 40
    rows = []
    for row in range(size):
        y = (size - margin - row) / span  # 0 at the x axis, 1 at the top
        pixels = []
        for column in range(size):
            x = (column - margin) / span
            inside = 0 <= x <= 1 and 0 <= y <= 1
            if inside and abs(y - x**0.3) < 0.012:
                pixels.append(blue)
            elif inside and abs(y - x) < 0.006:
                pixels.append(grey)
            elif (column == margin or row == size - margin) and x >= -0.02 and y <= 1.02:
                pixels.append(ink)
            else:
                pixels.append(white)
        rows.append(b"\x00" + b"".join(pixels))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


def seed_ledger(url: str, store: Path) -> str:
    """v1 trained, v2 unlearned from it (audit passed, serving); digits-0001 erased by v2,
    digits-0002 pending, digits-0003 pending past its deadline. Returns a read-only key."""
    (store / "audits" / "v2").mkdir(parents=True)
    (store / "audits" / "v2" / PLOT).write_bytes(roc_png())
    engine = make_engine(url)
    with session_scope(engine) as session:
        samples = [f"digits-{i:04d}" for i in range(1, 4)]
        register_samples(
            session,
            "digits",
            [SampleRecord(sid, Split.train, i, f"{i:064x}") for i, sid in enumerate(samples)],
        )
        key = create_key(session, "dashboard", ["status:read", "audit:read"], actor="test")
        file_requests(session, samples[:1], actor="test", note=None, deadline_days=30)
        job = coalesce_pending_requests(
            session, window_seconds=0, max_requests=1, max_attempts=3, actor="scheduler"
        )
        assert job is not None
        file_requests(session, samples[1:2], actor="test", note=None, deadline_days=30)
        file_requests(session, samples[2:], actor="test", note=None, deadline_days=-2)
        v1 = create_version(session, method="train", state=VersionState.candidate)
        promote(session, v1, moved_by="lethe train", reason="initial model")
        v2 = create_version(
            session, method="amnesiac", state=VersionState.auditing, parent_id=v1.id, job_id=job.id
        )
        session.add(
            Audit(
                version_id=v2.id,
                job_id=job.id,
                state="done",
                decision="pass",
                metrics={"test_accuracy": 0.9712, "loss_attack": {"auc_forget_vs_heldout": 0.51}},
                thresholds={"max_test_accuracy_drop": 1.0, "max_auc_forget_vs_heldout": 0.6},
                reasons=[
                    {
                        "rule": "auc_forget_vs_heldout",
                        "passed": True,
                        "reason": "AUC 0.510 [0.420, 0.600] does not lie above 0.6",
                    }
                ],
                artifacts={PLOT: f"audits/v2/{PLOT}"},
                finished_at=utcnow(),
            )
        )
        promote(session, v2, moved_by="gate", reason="audit passed")
        (erased,) = requests_of_job(session, job.id)
        transition_requests(
            session,
            [erased.id],
            RequestState.processing,
            RequestState.completed,
            completed_version_id=v2.id,
            certificate={"request_id": erased.id, "version": "v2", "method": "amnesiac"},
        )
    engine.dispose()
    return key


@dataclass
class LiveDashboard:
    base_url: str
    key: str


@pytest.fixture
def live_dashboard(sqlite_url: str, tmp_path: Path) -> Iterator[LiveDashboard]:
    """The API on a real socket (the browser needs one), over a seeded SQLite ledger."""
    store = tmp_path / "store"
    key = seed_ledger(sqlite_url, store)
    app = create_app(
        Settings(database_url=sqlite_url, store_url=str(store)),
        make_engine(sqlite_url),
        enqueue=lambda _job_id: None,
    )
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield LiveDashboard(f"http://127.0.0.1:{listener.getsockname()[1]}", key)
    server.should_exit = True
    thread.join(timeout=10)
    listener.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver: run `make system-deps`")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs the selenium package")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def text_of(driver: Any, element_id: str) -> str:
    text: str = driver.execute_script(f"return document.getElementById('{element_id}').innerText")
    return text


@pytest.mark.slow
def test_dashboard_shows_the_ledger_in_chromium(
    live_dashboard: LiveDashboard, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{live_dashboard.base_url}/dashboard")
    browser.find_element(By.ID, "key-input").send_keys(live_dashboard.key)
    browser.find_element(By.ID, "connect").click()
    WebDriverWait(browser, 30).until(
        lambda d: (
            "digits-0001" in text_of(d, "completed")
            and d.execute_script(
                "const img = document.querySelector('img.audit-plot');"
                "return img !== null && img.complete && img.naturalWidth === 240"
            )
        )
    )
    assert "digits-0003" in text_of(browser, "overdue")
    assert "digits-0002" in text_of(browser, "open")
    assert "Lineage: v2 (amnesiac) ← v1 (train)" in text_of(browser, "serving")
    assert "max_auc_forget_vs_heldout" in text_of(browser, "audits")
    assert "auc_forget_vs_heldout: AUC 0.510" in text_of(browser, "audits")
    assert browser.find_elements(By.CSS_SELECTOR, "#audits .badge.pass")
    # The key stays in this tab's sessionStorage and never reaches a URL.
    assert live_dashboard.key not in browser.current_url
    stored = browser.execute_script("return sessionStorage.getItem('lethe.apiKey')")
    assert stored == live_dashboard.key
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors  # e.g. a Content-Security-Policy violation

    screenshot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(screenshot))
    if docs_copy := os.environ.get("LETHE_DOCS_SCREENSHOT"):
        shutil.copyfile(screenshot, docs_copy)
