"""Scratch directories outside the source tree."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any


def scratch_dir(case: Any, prefix: str = "mailstack-test-") -> str:
    """A fresh, empty directory, removed after the test.

    Unlike ``TestCase.mktemp`` under pytest, nothing is created in the source tree.
    """
    path = tempfile.mkdtemp(prefix=prefix)
    case.addCleanup(shutil.rmtree, path, True)
    return path


def scratch_path(case: Any) -> str:
    """A fresh, not yet existing path in a private scratch directory."""
    return os.path.join(scratch_dir(case), "t")
