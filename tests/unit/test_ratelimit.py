"""The rate limiter's own rules, without a server: fixed windows, Retry-After, the probing
block, and counting in the process while Redis is unreachable."""

import asyncio

from sqlalchemy import Engine

from app.ledger.db import session_scope
from app.ledger.keys import create_key
from app.ratelimit import RateLimiter
from app.security import KeyVerifier
from app.settings import Settings


def limiter(**settings: str) -> RateLimiter:
    return RateLimiter(Settings(rate_limit_storage_url="memory://", **settings))


def test_a_limit_refuses_past_its_count_with_the_seconds_to_wait() -> None:
    async def scenario() -> list[int | None]:
        rates = limiter(rate_limit_per_key="3/minute")
        return [await rates.hit(rates.limits.per_key, "key", "1") for _ in range(4)] + [
            await rates.hit(rates.limits.per_key, "key", "2")
        ]

    *first, refused, other = asyncio.run(scenario())
    assert first == [None, None, None] and other is None
    assert refused is not None and 1 <= refused <= 60


def test_naming_too_many_unknown_samples_blocks_the_key_until_the_window_ends() -> None:
    async def scenario() -> tuple[int | None, int | None, int | None, int | None]:
        rates = limiter(rate_limit_unknown_samples_per_key="5/hour")
        within = await rates.count_unknown_samples(7, 5)
        before = rates.probing(7)
        past = await rates.count_unknown_samples(7, 1)
        return within, before, past, rates.probing(7)

    within, before, past, blocked = asyncio.run(scenario())
    assert within is None and before is None
    assert past is not None and blocked is not None and 60 < blocked <= 3600


def test_an_unreachable_redis_is_counted_in_the_process() -> None:
    """Nothing listens on port 1: the calls are neither refused nor let through uncounted."""

    async def scenario() -> list[int | None]:
        rates = RateLimiter(
            Settings(rate_limit_storage_url="redis://127.0.0.1:1/0", rate_limit_per_key="2/minute")
        )
        return [await rates.hit(rates.limits.per_key, "key", "1") for _ in range(3)]

    first, second, third = asyncio.run(scenario())
    assert first is None and second is None and third is not None


def test_bogus_keys_never_push_a_valid_key_out(engine: Engine) -> None:
    with session_scope(engine) as session:
        valid = create_key(session, "valid", ["status:read"], actor="test")
    verifier = KeyVerifier(engine, cache_seconds=60, refusals_cached=50)
    assert verifier.verify(valid) is not None
    for i in range(120):
        assert verifier.verify(f"lethe_bogus-{i}") is None
    assert verifier.cached(valid)[0]  # still cached: no lookup needed
    assert not verifier.cached("lethe_bogus-0")[0]  # the oldest refusals were forgotten
    assert verifier.cached("lethe_bogus-119") == (True, None)
