"""The compliance dashboard: a static page that polls the JSON API with the viewer's own key.

The page itself is public and holds no data; every figure comes from the authenticated API, with
the key the viewer types in (kept in sessionStorage, never in a URL). Not in the OpenAPI schema.
"""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.api.errors import Problem

STATIC = Path(__file__).resolve().parents[1] / "static"
ASSETS = {"dashboard.js", "dashboard.css", "favicon.svg"}
# Only this origin's scripts, styles and API; images also from blob: (plots fetched with the
# key). The headers every answer gets (nosniff, frame denial, no referrer) are
# app.http_guard.SecurityHeaders'.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/dashboard")
def dashboard_page() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", headers=SECURITY_HEADERS)


@router.get("/dashboard/{asset}")
def dashboard_asset(asset: str) -> FileResponse:
    if asset not in ASSETS:
        raise Problem(404, f"the dashboard has no asset {asset!r}")
    return FileResponse(STATIC / asset, headers=SECURITY_HEADERS)
