"""A runtime for unit tests: the real ``Runtime`` class over fakes."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.task import Clock

from mailstack.pipeline import Pipeline
from mailstack.runtime import Runtime
from mailstack.sendlimits import SendLimits
from tests.support.fakes import (
    FakeAliases,
    FakeChecker,
    FakeIntake,
    FakeMaildirs,
    FakeRouter,
    FakeThrottle,
    FakeTLS,
    FakeUsers,
    run_blocking,
)


def fake_runtime(config: Any, root: str = "", **parts: Any) -> Runtime:
    """A ``Runtime`` (so ``IRuntime`` holds) on a ``Clock``, with a fake for every part.

    ``parts`` replace single fakes (``throttle=FakeThrottle(delay=2.0)``);
    ``root`` is where ``FakeMaildirs`` puts mailboxes.
    """
    clock = Clock()
    checker = FakeChecker()
    fields: dict[str, Any] = {
        "config": config,
        "reactor": clock,
        "run_blocking": run_blocking,
        "users": FakeUsers(checker.users),
        "aliases": FakeAliases(),
        "checker": checker,
        "throttle": FakeThrottle(),
        "tls": FakeTLS(),
        "router": FakeRouter(),
        "store": None,
        "intake": FakeIntake(),
        "manager": None,
        "maildirs": FakeMaildirs(os.path.join(root, "mail")),
        "pipeline": Pipeline([], clock),
        # Not started: counts stay in memory (nothing is written to data_dir).
        "send_limits": SendLimits(
            clock, run_blocking, config.data_dir, config.limits.messages_per_hour, config.limits.messages_per_day
        ),
    }
    fields.update(parts)
    return Runtime(**fields)
