"""Fixtures shared by the tests that run a real `serve` for a whole module."""

from collections.abc import AsyncIterator

import pytest

from tests.conftest import fresh_database


@pytest.fixture(scope="module")
async def database(server_url: str, template_name: str) -> AsyncIterator[str]:
    """A migrated database of the module's own, for a server the module's tests share."""
    async with fresh_database(server_url, template_name) as url:
        yield url
