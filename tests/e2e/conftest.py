"""Fixtures for end-to-end tests: a ``server`` that is always killed afterwards."""

import pytest

from tests.e2e.harness import Server


@pytest.fixture
def server(tmp_path):
    """A configured, not yet started Server; killed at teardown if still running."""
    s = Server(tmp_path)
    yield s
    s.kill()
