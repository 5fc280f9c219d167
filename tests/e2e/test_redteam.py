"""A bounded slice of the red-team run (scripts/redteam.py) in every `make test`: held-out
prompts of every outside corpus and of the benign set, against the live server (the
support desk) on the real engine, through the official client. The full run's figures
are in docs/redteam.md; the general deployment's slice is in test_general.py."""

from __future__ import annotations

import pytest

from tests.e2e.redteam_slice import check, red_team

pytestmark = pytest.mark.e2e


def test_held_out_outside_attacks_are_stopped_and_benign_requests_answered(live_server):
    check(red_team(live_server.base_url, live_server.key, "support"), 0.9)
