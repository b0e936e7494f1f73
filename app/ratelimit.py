"""Rate limits: fixed windows counted by the `limits` library, in Redis when the service has one
(so that every API process counts the same calls), else in this process.

A limit that is reached gives the caller the seconds until its window ends (Retry-After). When
Redis cannot be reached, the limits are counted in this process for a while rather than
refused or skipped: losing the broker must not stop the intake of deletion requests.
"""

import math
import time
from dataclasses import dataclass

import structlog
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string

from app.settings import Settings

REDIS_TIMEOUT_SECONDS = 0.25  # a counter that takes longer is counted locally instead
LOCAL_FALLBACK_SECONDS = 10.0  # how long to count locally after Redis failed
log = structlog.get_logger("lethe.ratelimit")


@dataclass(frozen=True)
class Limits:
    per_key: RateLimitItem
    per_address: RateLimitItem
    failed_auth_per_address: RateLimitItem
    unknown_samples_per_key: RateLimitItem

    @classmethod
    def of(cls, settings: Settings) -> "Limits":
        return cls(
            parse(settings.rate_limit_per_key),
            parse(settings.rate_limit_per_address),
            parse(settings.rate_limit_failed_auth_per_address),
            parse(settings.rate_limit_unknown_samples_per_key),
        )


def _storage(url: str, key_prefix: str) -> Storage:
    if url.startswith(("redis://", "rediss://")):
        shared = storage_from_string(
            f"async+{url}",
            implementation="redispy",
            key_prefix=f"{key_prefix}lethe-rate",
            wrap_exceptions=True,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        )
    else:
        shared = storage_from_string(f"async+{url}", wrap_exceptions=True)
    assert isinstance(shared, Storage)  # an async+ scheme gives an asyncio storage
    return shared


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        self.limits = Limits.of(settings)
        self._shared = FixedWindowRateLimiter(
            _storage(settings.resolved_rate_limit_storage_url, settings.broker_key_prefix)
        )
        self._local = FixedWindowRateLimiter(MemoryStorage())
        self._shared_down_until = 0.0
        self._probing: dict[int, float] = {}  # key ID -> when its filing calls are served again

    def _limiter(self) -> FixedWindowRateLimiter:
        return self._local if time.monotonic() < self._shared_down_until else self._shared

    def _shared_failed(self, error: StorageError) -> None:
        log.warning("ratelimit.storage_unavailable", error=str(error.storage_error)[:200])
        self._shared_down_until = time.monotonic() + LOCAL_FALLBACK_SECONDS

    async def hit(self, limit: RateLimitItem, *identity: str, cost: int = 1) -> int | None:
        """Counts ``cost`` calls of ``identity`` (a kind and a value, e.g. "key", "3"): None
        when within ``limit``, else the seconds to wait (nothing is counted then)."""
        limiter = self._limiter()
        try:
            if await limiter.hit(limit, *identity, cost=cost):
                return None
            reset_at, _remaining = await limiter.get_window_stats(limit, *identity)
        except StorageError as error:
            self._shared_failed(error)
            return await self.hit(limit, *identity, cost=cost)
        return max(1, math.ceil(reset_at - time.time()))

    async def exhausted(self, limit: RateLimitItem, *identity: str) -> int | None:
        """Like hit, without counting: the seconds to wait when ``limit`` is used up."""
        limiter = self._limiter()
        try:
            if await limiter.test(limit, *identity):
                return None
            reset_at, _remaining = await limiter.get_window_stats(limit, *identity)
        except StorageError as error:
            self._shared_failed(error)
            return await self.exhausted(limit, *identity)
        return max(1, math.ceil(reset_at - time.time()))

    async def count_unknown_samples(self, key_id: int, count: int) -> int | None:
        """Counts the unknown samples a key named; past its limit, refuses the key's filing
        calls (see probing) until the window ends, and returns the seconds until then."""
        retry = await self.hit(
            self.limits.unknown_samples_per_key, "unknown", str(key_id), cost=count
        )
        if retry:
            self._probing[key_id] = time.monotonic() + retry
        return retry

    def probing(self, key_id: int) -> int | None:
        """Seconds until the key may file again, when it named too many unknown samples: known
        here, with no I/O, so that a refused key cannot tell known samples from unknown ones by
        the answers it keeps getting."""
        until = self._probing.get(key_id)
        if until is None:
            return None
        left = until - time.monotonic()
        if left <= 0:
            del self._probing[key_id]
            return None
        return max(1, math.ceil(left))
