"""What the guard tests share: the rails directories a Guard is built from, a copy of
the base rails with lines of its config changed, and a runner for the Guard's coroutines
in plain (sync) tests."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from server.config import PROJECT_ROOT

RAILS = PROJECT_ROOT / "rails"
# The support desk's rails on top of the base: every rail, topic scoping included.
SUPPORT = [RAILS, PROJECT_ROOT / "deployments" / "support" / "rails"]


def rails_copy(into: Path, edits: dict[str, str]) -> Path:
    """rails/ copied into `into`, each `edits` key of its config.yml (a whole line, which
    must be there) replaced by its value."""
    rails = into / "rails"
    shutil.copytree(RAILS, rails, ignore=shutil.ignore_patterns("__pycache__"))
    cfg = rails / "config.yml"
    text = cfg.read_text()
    for old, new in edits.items():
        assert old in text, f"rails/config.yml has no {old!r}"
        text = text.replace(old, new)
    cfg.write_text(text)
    return rails


def run(coro):
    return asyncio.run(coro)
