"""The compliance dashboard: served without a key, and, in headless Chromium, one screen that
answers at a glance: on a seeded ledger (overdue, failed and completed requests, a rejected and a
serving candidate with per-sample decisions, a purged plot) and after real deletions (``lethe
demo``'s ledger: training, unlearning, audits and the purge of the audit's inversion image).

The browser tests need Debian's ``chromium`` and ``chromium-driver`` (``make system-deps``) and
the ``selenium`` package. The test after real deletions keeps a screenshot in its tmp dir; with
``LETHE_DOCS_SCREENSHOT=docs/img/dashboard.png`` it also refreshes the one in the docs.
"""

import os
import re
import shutil
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy import select

from app.api.dashboard import STATIC
from app.ledger.clock import utcnow
from app.ledger.db import make_engine, session_scope
from app.ledger.filing import file_requests
from app.ledger.jobs import coalesce_pending_requests, requests_of_job
from app.ledger.keys import create_key
from app.ledger.requests import transition_requests
from app.ledger.samples import SampleRecord, register_samples, sample_ids
from app.ledger.tables import (
    Audit,
    DeletionRequest,
    RequestState,
    SampleState,
    Split,
    VersionState,
)
from app.ledger.versions import alias_target, create_version, promote
from app.main import create_app
from app.settings import Settings
from tests.api.conftest import Api
from tests.conftest import DemoRun

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
PLOT = "roc.png"
PURGED_PLOT = "unlearning_inversion.png"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
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


def test_the_page_has_no_inline_script_or_style() -> None:
    """What the Content-Security-Policy (script-src 'self', style-src 'self') would block."""
    html = (STATIC / "dashboard.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)|<style|\sstyle=|\son[a-z]+=", html)
    script = (STATIC / "dashboard.js").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|\.style\b|\beval\(", script)


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
    """v1 trained; v2 (amnesiac) rejected by its audit; v3 (amnesiac + repair) passed, serves,
    and its audit's inversion image is purged. digits-0001 erased by v3, digits-0002 pending,
    digits-0003 pending past its deadline, digits-0004 failed. Returns a read-only key."""
    (store / "audits" / "v3").mkdir(parents=True)
    (store / "audits" / "v3" / PLOT).write_bytes(roc_png())  # the inversion image: purged
    engine = make_engine(url)
    with session_scope(engine) as session:
        samples = [f"digits-{i:04d}" for i in range(1, 5)]
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
        file_requests(session, samples[2:3], actor="test", note=None, deadline_days=-2)
        (failed,) = file_requests(session, samples[3:], actor="test", note=None, deadline_days=30)
        transition_requests(
            session,
            [failed.request.id],
            RequestState.pending,
            RequestState.failed,
            error="every rung failed its audit: retrain-exact (v9): lira_tpr",
        )
        v1 = create_version(
            session, method="train", state=VersionState.candidate, details={"test_accuracy": 0.97}
        )
        promote(session, v1, moved_by="lethe train", reason="initial model")
        v2 = create_version(
            session, method="amnesiac", state=VersionState.rejected, parent_id=v1.id, job_id=job.id
        )
        session.add(audit(v2.id, job.id, "fail", drop=3.4, samples={"fail-leak": 1}))
        v3 = create_version(
            session,
            method="amnesiac+repair",
            state=VersionState.auditing,
            parent_id=v1.id,
            job_id=job.id,
        )
        session.add(audit(v3.id, job.id, "pass", drop=0.3, samples={"pass": 2, "no-signal": 1}))
        promote(session, v3, moved_by=f"job:{job.id}", reason="audit passed")
        (erased,) = requests_of_job(session, job.id)
        transition_requests(
            session,
            [erased.id],
            RequestState.processing,
            RequestState.completed,
            completed_version_id=v3.id,
            certificate={"request_id": erased.id, "version": "v3", "method": "amnesiac+repair"},
        )
    engine.dispose()
    return key


def audit(
    version_id: int, job_id: int, decision: str, drop: float, samples: dict[str, int]
) -> Audit:
    """A finished audit as the worker records it; its rules and per-sample decisions are data."""
    passed = decision == "pass"
    per_sample = [
        {"sample_id": f"digits-{9000 + n:04d}-{kind}", "decision": kind, "reason": f"{kind} here"}
        for kind, count in samples.items()
        for n in range(count)
    ]
    return Audit(
        version_id=version_id,
        job_id=job_id,
        state="done",
        decision=decision,
        metrics={
            "utility": {
                "test": {"parent": 0.97, "candidate": 0.97 - drop / 100, "drop_points": drop}
            },
            "calibrated": {"definition": "AUC of F vs H", "auc": 0.51},
            "per_sample": {"samples": per_sample},
        },
        thresholds={"max_test_accuracy_drop_points": 1.0, "max_auc_forget_vs_heldout": 0.6},
        reasons=[
            {
                "rule": "test_accuracy_drop",
                "passed": passed,
                "reason": f"test accuracy fell {drop:.2f} points vs the parent (at most 1 allowed)",
            },
            {"rule": "auc_forget_vs_heldout", "passed": True, "reason": "AUC 0.510 [0.420, 0.600]"},
        ],
        artifacts={PLOT: f"audits/v3/{PLOT}", PURGED_PLOT: f"audits/v3/{PURGED_PLOT}"},
        finished_at=utcnow(),
    )


@contextmanager
def serving_api(database_url: str, store: Path) -> Iterator[str]:
    """The API on a real socket (the browser needs one); yields its base URL."""
    engine = make_engine(database_url)
    settings = Settings(database_url=database_url, store_url=str(store))
    app = create_app(settings, engine, enqueue=lambda _job_id: None)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()
        engine.dispose()


@dataclass
class LiveDashboard:
    base_url: str
    key: str


@pytest.fixture
def live_dashboard(sqlite_url: str, tmp_path: Path) -> Iterator[LiveDashboard]:
    store = tmp_path / "store"
    key = seed_ledger(sqlite_url, store)
    with serving_api(sqlite_url, store) as base_url:
        yield LiveDashboard(base_url, key)


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


def text_of(driver: Any, css: str) -> str:
    text: str = driver.execute_script(
        "const found = document.querySelectorAll(arguments[0]);"
        "return Array.from(found).map(e => e.innerText).join('\\n')",
        css,
    )
    return text


def wait_for(driver: Any, condition: Any, timeout: float = 30) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(condition)


def connect(driver: Any, base_url: str, key: str) -> None:
    """Opens the page, enters the key once and waits for the version cards."""
    from selenium.webdriver.common.by import By

    driver.get(f"{base_url}/dashboard")
    driver.find_element(By.ID, "key-input").send_keys(key)
    driver.find_element(By.ID, "connect").click()
    wait_for(
        driver,
        lambda d: text_of(d, "#versions article.card") and "Updated" in text_of(d, "#status"),
    )


def open_plots(driver: Any, version: str) -> None:
    """Opens the version's plots; waits until each shows its image or says it is purged."""
    driver.execute_script(
        "document.querySelector(`article[data-version='${arguments[0]}'] "
        "details[data-panel$=':plots'] summary`).click()",
        version,
    )
    figures = f"article[data-version='{version}'] figure"
    wait_for(
        driver,
        lambda d: d.execute_script(
            "const figures = document.querySelectorAll(arguments[0]);"
            "return figures.length > 0 && Array.from(figures).every(f =>"
            "  f.classList.contains('purged') || (f.querySelector('img') || {}).complete)",
            figures,
        ),
    )


def severe_errors(driver: Any, allowed: str) -> list[dict[str, Any]]:
    """The console's errors, but the 404 of an artifact the purge deleted (a failed fetch is
    logged by the browser itself, however the page handles it)."""
    return [
        e
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and allowed not in e["message"]
    ]


@pytest.mark.slow
def test_one_screen_answers_at_a_glance_and_survives_a_purged_plot(
    live_dashboard: LiveDashboard, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    connect(browser, live_dashboard.base_url, live_dashboard.key)
    assert not browser.find_element(By.ID, "key-input").is_displayed()
    tiles = text_of(browser, "#tiles")
    assert "2\nopen requests" in tiles and "1\noverdue" in tiles and "1\nfailed" in tiles
    open_rows = text_of(browser, "#open tbody tr").splitlines()
    assert "digits-0003" in open_rows[0] and "overdue by 2 d" in open_rows[0]  # the late first
    assert "digits-0002" in text_of(browser, "#open")
    assert "lira_tpr" in text_of(browser, "#failed")
    assert "digits-0001" in text_of(browser, "#completed")
    assert re.search(r"v3 amnesiac\+repair\s*←\s*v1 train", text_of(browser, "#serving .lineage"))

    cards = browser.find_elements(By.CSS_SELECTOR, "#versions article.card")
    assert [c.get_attribute("data-version") for c in cards] == ["v3", "v2", "v1"]
    rejected = text_of(browser, "article[data-version='v2']")
    assert "audit fail" in rejected and "97.0% → 93.6%" in rejected
    assert "test_accuracy_drop: test accuracy fell 3.40 points" in rejected  # the failed rule only
    assert "auc_forget_vs_heldout" not in rejected
    assert "per sample: 1 fail-leak" in rejected and "fail-leak here" in rejected
    serving = text_of(browser, "article[data-version='v3']")
    assert "audit pass" in serving and "All 2 rules passed." in serving
    assert "per sample: 2 pass · 1 no-signal" in serving and "no-signal here" in serving
    assert "max_auc_forget_vs_heldout" not in serving  # thresholds and figures: on demand

    open_plots(browser, "v3")
    plot = "article[data-version='v3'] img.audit-plot"
    assert browser.execute_script(f'return document.querySelector("{plot}").naturalWidth') == 240
    purged = text_of(browser, "article[data-version='v3'] figure.purged")
    assert "purged" in purged and PURGED_PLOT in purged
    status = browser.find_element(By.ID, "status")
    assert "Updated" in status.text and status.get_attribute("class") != "error"
    assert not severe_errors(browser, PURGED_PLOT)  # e.g. a Content-Security-Policy violation

    # The key: entered once, kept in this tab (never in a URL), until it is forgotten.
    assert live_dashboard.key not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('lethe.apiKey')") == (
        live_dashboard.key
    )
    browser.refresh()
    wait_for(browser, lambda d: "Updated" in text_of(d, "#status"))
    assert not browser.find_element(By.ID, "key-input").is_displayed()  # not asked again
    browser.find_element(By.ID, "forget-key").click()
    assert browser.execute_script("return sessionStorage.getItem('lethe.apiKey')") is None
    assert browser.find_element(By.ID, "key-input").is_displayed()


@pytest.mark.slow
def test_the_dashboard_after_real_deletions(
    demo_run: DemoRun, browser: Any, tmp_path: Path
) -> None:
    """``lethe demo``'s ledger and store: a model trained, samples forgotten and certified,
    and the serving version's inversion image purged; two requests left open (one overdue)."""
    from selenium.webdriver.common.by import By

    assert demo_run.result.returncode == 0, demo_run.result.stderr
    home = shutil.copytree(demo_run.home, tmp_path / "home")
    settings = Settings(home=home)
    engine = make_engine(settings.resolved_database_url)
    with session_scope(engine) as session:
        open_ids = sample_ids(session, "digits", Split.train, SampleState.active)[:2]
        file_requests(session, open_ids[:1], actor="test", note=None, deadline_days=30)
        file_requests(session, open_ids[1:], actor="test", note=None, deadline_days=-3)
        key = create_key(session, "dashboard", ["status:read", "audit:read"], actor="test")
        forgotten = session.scalars(
            select(DeletionRequest.sample_id).where(DeletionRequest.state == RequestState.completed)
        ).all()
        assert forgotten  # the lone sample's job, at least, served (or the demo test fails)
        serving = alias_target(session)
        assert serving is not None
    engine.dispose()

    with serving_api(settings.resolved_database_url, settings.home / "store") as base_url:
        connect(browser, base_url, key)
        assert all(sample in text_of(browser, "#completed") for sample in forgotten)
        assert open_ids[1] in text_of(browser, "#open tbody tr:first-child")
        card = text_of(browser, f"article[data-version='{serving.version}']")
        assert "audit pass" in card and "test accuracy" in card
        open_plots(browser, serving.version)
        assert PURGED_PLOT in text_of(
            browser, f"article[data-version='{serving.version}'] figure.purged"
        )
        assert browser.find_elements(By.CSS_SELECTOR, "img.audit-plot")  # the ROC still loads
        assert browser.find_element(By.ID, "status").get_attribute("class") != "error"
        assert not severe_errors(browser, PURGED_PLOT)
        height = browser.execute_script("return document.documentElement.scrollHeight")
        assert height < 2500, height  # compact: no card of flattened metrics

        screenshot = tmp_path / "dashboard.png"
        metrics = {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False}
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)  # the whole page
        assert browser.save_screenshot(str(screenshot))
        if docs_copy := os.environ.get("LETHE_DOCS_SCREENSHOT"):
            shutil.copyfile(screenshot, docs_copy)
