"""One MCP server's connection, kept open between calls (a stdio server is a child process
that would otherwise start for every call), with the official SDK's `Client`.

The SDK's sessions are anyio contexts: they must be entered and left in one task. So each
connection has a holder task that opens the session and runs the calls handed to it through
a queue, each in a task of its own (calls run concurrently). When the server dies (its
process exits, its HTTP endpoint goes away) every call in flight or waiting fails with
`MCPUnavailable`, which the tool executor turns into an error result the model reads; the
next call opens a new session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import Any

from server.mcp.config import MCPServerConfig

log = logging.getLogger(__name__)


class MCPUnavailable(Exception):
    """The MCP server could not be reached, or went away during the call."""


def client_for(config: MCPServerConfig, timeout_s: float, request_headers: dict[str, str] | None = None) -> Any:
    """The SDK client of one configured server (not yet connected); `request_headers`
    (a request's own, over the operator's) for an HTTP server."""
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    if config.command:
        command = sys.executable if config.command[0] in ("python", "python3") else config.command[0]
        params = StdioServerParameters(command=command, args=config.command[1:], env=config.resolved_env() or None, cwd=config.cwd)
        return Client(params, read_timeout_seconds=timeout_s)
    assert config.url is not None
    http = create_mcp_http_client(headers=(config.resolved_headers() | (request_headers or {})) or None)
    return Client(streamable_http_client(config.url, http_client=http), read_timeout_seconds=timeout_s)


async def list_tools(config: MCPServerConfig) -> list[Any]:
    """The server's tools (every page), over a connection of its own."""
    async with client_for(config, config.timeout_s) as client:
        tools: list[Any] = []
        cursor = None
        while True:
            page = await client.list_tools(cursor=cursor)
            tools += page.tools
            cursor = page.next_cursor
            if not cursor:
                return tools


async def call_with_headers(config: MCPServerConfig, headers: dict[str, str], name: str, arguments: dict[str, Any]) -> Any:
    """One call with a request's own headers (over the operator's), on a connection of its
    own that ends with it: the shared one carries the operator's credentials only."""
    try:
        async with client_for(config, config.timeout_s, headers) as client:
            return await client.call_tool(name, arguments)
    except Exception as exc:  # noqa: BLE001 - the SDK reports a failed connection as an exception group
        raise MCPUnavailable(f"MCP server `{config.label}` failed during the call: {first_error(exc)}") from None


class MCPConnection:
    def __init__(self, config: MCPServerConfig, listed: dict[str, Any] | None = None):
        self.config = config
        self.listed = listed or {}  # the server's own listing of the tools kept, by name
        self._jobs: asyncio.Queue | None = None
        self._holder: asyncio.Task | None = None

    async def call(self, name: str, arguments: dict[str, Any]) -> Any:
        """The server's CallToolResult of one call; MCPUnavailable when it cannot be had."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._running().put_nowait((name, arguments, future))
        return await future

    def _running(self) -> asyncio.Queue:
        if self._holder is None or self._holder.done() or self._jobs is None:
            self._jobs = asyncio.Queue()
            self._holder = asyncio.get_running_loop().create_task(self._hold(self._jobs), name=f"mcp {self.config.label}")
        return self._jobs

    async def _hold(self, jobs: asyncio.Queue) -> None:
        import anyio

        in_flight: set[asyncio.Future] = set()
        why = "the connection closed"
        try:
            async with client_for(self.config, self.config.timeout_s) as client, anyio.create_task_group() as tasks:
                while True:
                    name, arguments, future = await jobs.get()
                    in_flight.add(future)
                    tasks.start_soon(self._one, client, name, arguments, future, in_flight, lambda: self._retire(jobs, tasks.cancel_scope))
        except asyncio.CancelledError:
            why = "the server is shutting down"
            raise
        except Exception as exc:  # noqa: BLE001 - the SDK reports a dead server as an exception group
            why = f"the connection failed ({first_error(exc)})"
            log.warning("MCP server %s: %s", self.config.label, why)
        finally:
            # Nothing waits forever: calls in flight and those still queued fail now.
            pending = list(in_flight)
            while not jobs.empty():
                pending.append(jobs.get_nowait()[2])
            for future in pending:
                if not future.done():
                    future.set_exception(MCPUnavailable(f"MCP server `{self.config.label}` is unavailable: {why}"))

    def _retire(self, jobs: asyncio.Queue, scope: Any) -> None:
        """The server is gone: this session ends, and calls from now on open a new one
        (not queued behind the one closing)."""
        if self._jobs is jobs:
            self._jobs = None
        scope.cancel()

    async def _one(self, client: Any, name: str, arguments: dict[str, Any], future: asyncio.Future, in_flight: set, retire: Any) -> None:
        from mcp.shared.exceptions import MCPError
        from mcp_types import CONNECTION_CLOSED

        try:
            result = await client.call_tool(name, arguments)
        except MCPError as exc:
            if exc.error.code == CONNECTION_CLOSED:
                retire()
            if not future.done():
                future.set_exception(MCPUnavailable(f"MCP server `{self.config.label}` failed during the call: {exc.error.message}"))
        except Exception as exc:  # noqa: BLE001 - a transport failure: the connection is gone
            retire()
            if not future.done():
                future.set_exception(MCPUnavailable(f"MCP server `{self.config.label}` failed during the call: {first_error(exc)}"))
        else:
            if not future.done():
                future.set_result(result)
        finally:
            in_flight.discard(future)

    async def close(self) -> None:
        if self._holder is not None and not self._holder.done():
            self._holder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._holder


def first_error(exc: BaseException) -> str:
    """The first real error of an exception group (how the SDK reports a failed
    connection), as one line."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:200]
