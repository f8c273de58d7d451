"""Shared pytest setup: trial's ``mktemp()`` writes below the working directory,
so every test session runs from a fresh temporary folder, never the source tree."""

import os

import pytest
from hypothesis import settings

# Property tests check behaviour, not speed: no per-example deadline, which a
# loaded CI machine can overrun (hypothesis reports that as a failure).
settings.register_profile("mailstack", deadline=None)
settings.load_profile("mailstack")


@pytest.fixture(autouse=True, scope="session")
def _scratch_cwd(tmp_path_factory):
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


_E2E = os.path.join(os.path.dirname(os.path.abspath(__file__)), "e2e") + os.sep


def pytest_collection_modifyitems(config, items):
    """Everything under tests/e2e starts a real ``twistd``: mark it ``e2e`` so
    that ``pytest -m "not e2e"`` runs the unit tests alone."""
    for item in items:
        if str(item.path).startswith(_E2E):
            item.add_marker(pytest.mark.e2e)
