"""API-key authentication and scopes. Keys are looked up by hash, with a short in-process cache
so that a busy endpoint does not pay a database round trip per call."""

import time
from collections import OrderedDict
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
    """Verdicts are cached apart: valid keys (few: one per client) in a dict that nothing but
    time or forget_cached() empties, unknown and revoked ones in a bounded LRU, so that any
    number of bogus keys can never push a valid key out and send its calls to the database."""

    def __init__(self, engine: Engine, cache_seconds: float, refusals_cached: int) -> None:
        self._engine = engine
        self._cache_seconds = cache_seconds
        self._refusals_cached = refusals_cached
        self._valid: dict[str, tuple[float, Principal]] = {}
        self._refused: OrderedDict[str, float] = OrderedDict()
        self._lock = Lock()

    def cached(self, key: str) -> tuple[bool, Principal | None]:
        """(True, the verdict) when a fresh one is cached, else (False, None): no I/O."""
        digest, now = hash_key(key), time.monotonic()
        with self._lock:
            valid = self._valid.get(digest)
            refused_until = self._refused.get(digest)
        if valid and valid[0] > now:
            return True, valid[1]
        if refused_until and refused_until > now:
            return True, None
        return False, None

    def verify(self, key: str) -> Principal | None:
        hit, principal = self.cached(key)
        if hit:
            return principal
        digest = hash_key(key)
        with open_session(self._engine) as session:
            found = find_active_key(session, key)
            principal = Principal(found.id, found.name, frozenset(found.scopes)) if found else None
        until = time.monotonic() + self._cache_seconds
        with self._lock:
            if principal is not None:
                self._valid[digest] = (until, principal)
                self._refused.pop(digest, None)
            else:
                self._valid.pop(digest, None)  # revoked
                self._refused[digest] = until
                self._refused.move_to_end(digest)
                if len(self._refused) > self._refusals_cached:
                    self._refused.popitem(last=False)
        return principal

    def forget_cached(self) -> None:
        """Drops every cached verdict (after a revocation, when it must bite at once)."""
        with self._lock:
            self._valid.clear()
            self._refused.clear()
