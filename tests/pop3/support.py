"""POP3 tests: a runtime over the shared fakes (``tests.support``) and a Maildir writer."""

from __future__ import annotations

import itertools
import os
from typing import Any

from mailstack import config as configmod
from mailstack.runtime import Runtime
from tests.support.dirs import scratch_dir
from tests.support.runtime import fake_runtime


def make_runtime(root: str, **config_overrides: Any) -> Runtime:
    """A runtime over fakes with mailboxes below ``root``; ``section__name=value`` sets config."""
    raw: dict[str, Any] = {"data_dir": root}
    for dotted, value in config_overrides.items():
        section, name = dotted.split("__")
        raw.setdefault(section, {})[name] = value
    return fake_runtime(configmod.from_mapping(raw, base=root), root)


_seq = itertools.count(1)


def write_message(maildir: str, data: bytes, sub: str = "new", when: int = 1700000000, info: str = "") -> str:
    """Write a message file the way a Maildir deliverer does; returns the file name."""
    for s in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, s), exist_ok=True)
    n = next(_seq)
    name = f"{when}.M{n}P100Q{n}.test,S={len(data)}{info}"
    with open(os.path.join(maildir, sub, name), "wb") as f:
        f.write(data)
    return name


def message_files(maildir: str) -> list[str]:
    """The message file names in new/ and cur/, sorted."""
    return sorted(n for sub in ("new", "cur") for n in os.listdir(os.path.join(maildir, sub)))


def message_path(maildir: str, unique: str) -> str:
    """The file of the message with this unique name, in new/ or cur/."""
    for sub in ("new", "cur"):
        for name in os.listdir(os.path.join(maildir, sub)):
            if name.partition(":")[0] == unique:
                return os.path.join(maildir, sub, name)
    raise FileNotFoundError(unique)


def temp_dir(case: Any) -> str:
    """A fresh directory outside the working tree, removed after the test."""
    return scratch_dir(case, "mailstack-pop3-")
