"""A tool pack that misbehaves on purpose, enabled on the live test server only."""

from __future__ import annotations

import time
from typing import Annotated

from pydantic import Field

from server.toolcalls.registry import ToolContext, tool


@tool(retries=2, examples=[{"item": "widget"}])
def always_fails(ctx: ToolContext, item: Annotated[str, Field(pattern=r"^[a-z]{1,8}$")]) -> str:
    """Look up an item in the inventory."""
    raise RuntimeError("inventory backend is down")


@tool(timeout=0.5, examples=[{"item": "widget"}])
def too_slow(ctx: ToolContext, item: Annotated[str, Field(pattern=r"^[a-z]{1,8}$")]) -> str:
    """Check the warehouse stock of an item."""
    time.sleep(3)
    return "42 in stock"
