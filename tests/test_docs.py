"""docs/: every page is reachable from design.rst, every cross-reference resolves,
and nothing points outside the repository."""

from __future__ import annotations

import os
import re

from twisted.trial.unittest import SynchronousTestCase

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def pages() -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(DOCS)):
        if name.endswith(".rst"):
            with open(os.path.join(DOCS, name), encoding="utf-8") as f:
                out[name[: -len(".rst")]] = f.read()
    return out


class DocsTests(SynchronousTestCase):
    def test_everyPageLinkedFromDesign(self) -> None:
        """design.rst is the entry point: it links every other page with :doc:."""
        docs = pages()
        linked = set(re.findall(r":doc:`([^`]+)`", docs["design"]))
        self.assertEqual(linked, set(docs) - {"design"})

    def test_referencesResolve(self) -> None:
        """Every :doc: target in docs/ is a page there."""
        docs = pages()
        for name, text in docs.items():
            for target in re.findall(r":doc:`([^`]+)`", text):
                self.assertIn(target, docs, f"{name}.rst links to missing {target}")

    def test_nothingOutsideTheRepository(self) -> None:
        """No page points at a file above the repository (``../``): a clone has everything."""
        for name, text in pages().items():
            self.assertNotIn("../", text, name)
