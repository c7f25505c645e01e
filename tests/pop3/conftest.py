"""Fixtures for the engine tests."""

from __future__ import annotations

import pytest

from tests.pop3.helpers import SPLITS, Split


@pytest.fixture(params=SPLITS)
def split(request: pytest.FixtureRequest) -> Split:
    """Each transcript test runs once per way of re-cutting its octets (see ``run_split``)."""
    mode: Split = request.param
    return mode
