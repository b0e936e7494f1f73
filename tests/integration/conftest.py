"""Fixtures for the job tests: a stack of real processes per test (see stack.py), skipped with
the reason when PostgreSQL or Redis is not reachable."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import postgres_available
from tests.integration.stack import REDIS_URL, Stack, open_stack, redis_unavailable


def require_services() -> None:
    reason = postgres_available() or redis_unavailable(REDIS_URL)
    if reason:
        pytest.skip(reason)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    require_services()
    with open_stack(tmp_path) as opened:
        yield opened
