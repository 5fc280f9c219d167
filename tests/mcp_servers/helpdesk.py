"""A real MCP server for the tests (the SDK's MCPServer, formerly FastMCP), over stdio by
default or streamable HTTP (`--http PORT`):

    python -m tests.mcp_servers.helpdesk [--http PORT] [--ledger FILE]

Its tools: a read-only article lookup, a destructive note deletion (annotated so) whose
every run is appended to the ledger file (tests count runs there), a tool that kills
the server's own process mid-call, and one that says whose token the call carried (the
request's own headers, over HTTP).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mcp.server.mcpserver import Context, MCPServer
from mcp_types import ToolAnnotations

ARTICLES = {
    "warranty": "The USB-C dock has a two-year warranty from the date of delivery.",
    "returns": "Items can be returned within 30 days in their original packaging.",
}

server = MCPServer("helpdesk")
LEDGER: Path | None = None


@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
def lookup_article(topic: str) -> str:
    """Look up the help-centre article on a topic (warranty, returns)."""
    return ARTICLES.get(topic.lower().strip(), f"No article on {topic!r}.")


@server.tool(annotations=ToolAnnotations(destructiveHint=True, readOnlyHint=False))
def delete_note(note_id: str) -> dict:
    """Delete a customer note by its id, for good."""
    if LEDGER is not None:
        with LEDGER.open("a") as f:
            f.write(json.dumps({"deleted": note_id}) + "\n")
    return {"deleted": note_id}


@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
def whoami(ctx: Context) -> str:
    """Say which user the help centre sees this call as (by its token)."""
    headers = ctx.headers or {}
    token = headers.get("x-user-token") or headers.get("authorization")
    return f"token: {token}" if token else "anonymous"


@server.tool()
def crash_server(reason: str) -> str:
    """Restart the help-centre index (test tool: the server process dies mid-call)."""
    os._exit(3)


def main() -> None:
    global LEDGER
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, default=0)
    parser.add_argument("--ledger", type=Path)
    args = parser.parse_args()
    LEDGER = args.ledger
    if args.http:
        server.run("streamable-http", host="127.0.0.1", port=args.http)
    else:
        server.run()


if __name__ == "__main__":
    main()
