"""What the guard tests share: the rails directories a Guard is built from, and a runner
for the Guard's coroutines in plain (sync) tests."""

from __future__ import annotations

import asyncio

from server.config import PROJECT_ROOT

RAILS = PROJECT_ROOT / "rails"
# The support desk's rails on top of the base: every rail, topic scoping included.
SUPPORT = [RAILS, PROJECT_ROOT / "deployments" / "support" / "rails"]


def run(coro):
    return asyncio.run(coro)
