from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.agent_attestor.harness import Harness


@pytest.fixture
def agent() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()
