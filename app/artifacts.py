"""The artifact store's objects behind one fsspec URL, without tensors: the API reads plots and
checks erasures with it, and the worker's ``ArtifactStore`` adds the tensor formats on top.

Keys are relative, slash-separated paths, e.g. ``runs/7/deltas/0000042.safetensors``.
"""

import hashlib
import json
import mimetypes
import posixpath
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from app.ledger.errors import NotFound


class IntegrityError(Exception):
    """An object's bytes no longer match the sha256 the ledger recorded."""

    def __init__(self, key: str, expected_sha256: str, actual_sha256: str) -> None:
        super().__init__(
            f"{key}: sha256 {actual_sha256} differs from the recorded {expected_sha256}"
        )
        self.key, self.expected_sha256, self.actual_sha256 = key, expected_sha256, actual_sha256


@dataclass(frozen=True)
class StoredObject:
    key: str
    sha256: str
    num_bytes: int


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ObjectStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self._local = isinstance(self.fs, LocalFileSystem)

    def _path(self, key: str) -> str:
        return posixpath.join(self.root, key)

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        return self.put_parts(key, [data])

    def put_parts(self, key: str, parts: Sequence[bytes | memoryview]) -> StoredObject:
        """Writes the parts back to back as one object, hashing them on the way: no joined
        copy of a large tensor is made. The object appears whole or not at all: object stores
        publish an upload on close, and on a file system a temporary file is renamed, so a
        process killed mid-write never leaves a truncated object behind."""
        path = self._path(key)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        digest = hashlib.sha256()
        target = f"{path}.partial-{uuid.uuid4().hex}" if self._local else path
        with self.fs.open(target, "wb") as handle:
            for part in parts:
                digest.update(part)
                handle.write(part)
        if target != path:
            self.fs.mv(target, path)
        return StoredObject(key, digest.hexdigest(), sum(memoryview(p).nbytes for p in parts))

    def get_bytes(self, key: str, expected_sha256: str | None = None) -> bytes:
        data: bytes = self.fs.cat_file(self._path(key))
        if expected_sha256 is not None:
            actual = sha256_hex(data)
            if actual != expected_sha256:
                raise IntegrityError(key, expected_sha256, actual)
        return data

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def delete(self, key: str) -> None:
        if self.exists(key):
            self.fs.rm_file(self._path(key))

    def list(self, prefix: str) -> list[str]:
        """Keys of the objects under ``prefix`` (a folder), sorted."""
        folder = self._path(prefix)
        if not self.fs.exists(folder):
            return []
        root = self.root.rstrip("/") + "/"
        return sorted(path.removeprefix(root) for path in self.fs.find(folder))

    def present(self, keys: Iterable[str]) -> set[str]:
        """Which of the keys the store holds: one listing per folder, not one call per key."""
        by_folder: dict[str, set[str]] = {}
        for key in keys:
            by_folder.setdefault(posixpath.dirname(key), set()).add(key)
        found: set[str] = set()
        for folder, wanted in by_folder.items():
            found |= wanted & set(self.list(folder))
        return found

    def put_json(self, key: str, value: Any) -> StoredObject:
        return self.put_bytes(key, json.dumps(value, sort_keys=True).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))


def read_artifact(store_url: str, key: str) -> tuple[bytes, str]:
    """The artifact's bytes and media type; NotFound when the store no longer holds it."""
    try:
        content = ObjectStore(store_url).get_bytes(key)
    except FileNotFoundError as error:
        raise NotFound(f"artifact {key!r} is not in the store") from error
    media_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return content, media_type
