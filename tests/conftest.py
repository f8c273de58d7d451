"""Shared pytest setup: trial's ``mktemp()`` writes below the working directory,
so every test session runs from a fresh temporary folder, never the source tree."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _scratch_cwd(tmp_path_factory):
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)
