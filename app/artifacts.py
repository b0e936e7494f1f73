"""Read-only access to the artifact store (plots, reports) for the API; the worker writes it."""

import mimetypes

import fsspec

from app.ledger.errors import NotFound


def read_artifact(store_url: str, key: str) -> tuple[bytes, str]:
    """The artifact's bytes and media type; NotFound when the store no longer holds it."""
    path = f"{store_url.rstrip('/')}/{key}"
    try:
        with fsspec.open(path, "rb") as handle:
            content: bytes = handle.read()
    except FileNotFoundError as error:
        raise NotFound(f"artifact {key!r} is not in the store") from error
    media_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return content, media_type
