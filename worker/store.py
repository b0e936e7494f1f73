"""The artifact store: tensors (safetensors) and other objects behind one fsspec URL.

Keys are relative, slash-separated paths, e.g. ``runs/7/deltas/0000042.safetensors``,
``versions/v3.safetensors`` or ``datasets/digits/manifest.json``. Every write returns the
object's sha256 and size, which the ledger keeps so that a read can be verified.
"""

import hashlib
import json
import math
import posixpath
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors


class IntegrityError(Exception):
    """An object's bytes no longer match the sha256 the ledger recorded."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    sha256: str
    num_bytes: int


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
}


Layout = list[tuple[str, list[int]]]  # (name, shape) of each tensor, in the buffer's order


def safetensors_header(layout: Layout, dtype: torch.dtype) -> bytes:
    """The safetensors prefix for one flat buffer holding the layout's tensors back to back:
    an 8-byte little-endian size, then a JSON header of dtypes, shapes and byte offsets."""
    item = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for name, shape in layout:
        size = math.prod(shape) * item
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": shape,
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded


def host_view(flat: torch.Tensor) -> memoryview:
    """The bytes of a flat tensor, copied to the host only if it is elsewhere."""
    return flat.detach().to("cpu").contiguous().view(torch.uint8).numpy().data


def to_safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """The safetensors encoding of the tensors. When they share a floating dtype, they are
    packed into one buffer on their device and copied to the host once, a quarter of the cost
    of the library's per-tensor serialisation."""
    dtypes = {t.dtype for t in tensors.values()}
    dtype = dtypes.pop()
    if dtypes or dtype not in SAFETENSORS_DTYPES:
        host = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        return save_safetensors(host)
    names = sorted(tensors)
    layout = [(name, list(tensors[name].shape)) for name in names]
    flat = torch.cat([tensors[name].detach().reshape(-1) for name in names])
    return safetensors_header(layout, dtype) + host_view(flat).tobytes()


class ArtifactStore:
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
        if expected_sha256 is not None and sha256_hex(data) != expected_sha256:
            raise IntegrityError(f"{key}: sha256 differs from the recorded {expected_sha256}")
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

    def put_json(self, key: str, value: Any) -> StoredObject:
        return self.put_bytes(key, json.dumps(value, sort_keys=True).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor]) -> StoredObject:
        return self.put_bytes(key, to_safetensors(tensors))

    def get_tensors(
        self, key: str, device: torch.device, expected_sha256: str | None = None
    ) -> dict[str, torch.Tensor]:
        tensors = load_safetensors(self.get_bytes(key, expected_sha256))
        return {name: t.to(device) for name, t in tensors.items()}
