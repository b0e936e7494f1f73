"""API-key authentication and scopes. Keys are looked up by hash, with a short in-process cache
so that a busy endpoint does not pay a database round trip per call."""

import time
from dataclasses import dataclass
from threading import Lock

from sqlalchemy import Engine

from app.ledger.db import open_session
from app.ledger.keys import find_active_key, hash_key


@dataclass(frozen=True)
class Principal:
    key_id: int
    name: str
    scopes: frozenset[str]

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}:{self.name}"


class KeyVerifier:
    def __init__(self, engine: Engine, cache_seconds: float) -> None:
        self._engine = engine
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = Lock()

    def cached(self, key: str) -> tuple[bool, Principal | None]:
        """(True, the verdict) when a fresh one is cached, else (False, None): no I/O."""
        with self._lock:
            cached = self._cache.get(hash_key(key))
        if cached and cached[0] > time.monotonic():
            return True, cached[1]
        return False, None

    def verify(self, key: str) -> Principal | None:
        hit, principal = self.cached(key)
        if hit:
            return principal
        digest, now = hash_key(key), time.monotonic()
        with open_session(self._engine) as session:
            found = find_active_key(session, key)
            principal = Principal(found.id, found.name, frozenset(found.scopes)) if found else None
        with self._lock:
            if len(self._cache) > 10_000:  # bounded: unknown keys must not grow it forever
                self._cache.clear()
            self._cache[digest] = (now + self._cache_seconds, principal)
        return principal

    def forget_cached(self) -> None:
        """Drops every cached verdict (after a revocation, when it must bite at once)."""
        with self._lock:
            self._cache.clear()
