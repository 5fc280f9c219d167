"""Runs server-side tool calls: validation, scopes, rate limits, timeouts and retries,
confirmation of destructive actions, concurrency, and the audit log.

Whatever goes wrong in a tool becomes a result the model reads (`{"error": ...}`), never
an HTTP error: the turn goes on and the model can apologise, retry or hand off.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine as Database

from server.auth import Principal
from server.db import pending_actions
from server.errors import ConflictError, NotFoundError
from server.ids import new_id
from server.telemetry import tracing
from server.telemetry.redaction import redact
from server.toolcalls.audit import ToolAudit
from server.toolcalls.registry import Registry, Tool, ToolContext, ToolError

log = logging.getLogger(__name__)

# Statuses that count against a rate limit: the tool was (or would have been) run.
_COUNTED = ("ok", "error", "timeout", "pending_confirmation")
TERMINAL = ("succeeded", "failed", "cancelled", "expired")


@dataclass
class ToolResult:
    call_id: str
    name: str
    arguments: str
    status: str  # ok | error | timeout | invalid | denied | rate_limited | pending_confirmation
    content: str  # what the model reads as the tool message
    action: dict[str, Any] | None = None
    guard_events: list[Any] = field(default_factory=list)  # the tool rails' (guard.GuardEvent)

    def public(self) -> dict[str, Any]:
        out = {"id": self.call_id, "name": self.name, "arguments": self.arguments, "status": self.status, "output": self.content}
        if self.action is not None:
            out["action_id"] = self.action["id"]
        return out


def public_action(row: dict[str, Any]) -> dict[str, Any]:
    """An action as the API shows it (routes and the chat extension alike)."""
    out = {k: row.get(k) for k in ("id", "tool", "summary", "status", "created_at", "expires_at", "decided_at", "decided_by", "user")}
    out["object"] = "action"
    out["arguments"] = json.loads(row["arguments"])
    result = row.get("result")
    try:
        out["result"] = json.loads(result) if result else None
    except ValueError:  # a tool may return plain text
        out["result"] = result
    return out


def _error(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


def _output(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


class Executor:
    def __init__(self, registry: Registry, db: Database, action_ttl_s: float = 900.0, *, guard: Any = None, metrics: Any = None):
        self.registry = registry
        self.db = db
        self.audit_log = ToolAudit(db)
        self.action_ttl_s = action_ttl_s
        self.guard = guard  # server.guard.Guard: the tool rails
        self.metrics = metrics  # telemetry.metrics.Metrics

    # ------------------------------------------------------------ calls from the model

    async def run(self, calls: list[tuple[str, str, str]], principal: Principal, ctx: ToolContext, confirm: Collection[str] = ()) -> list[ToolResult]:
        """Run (call id, name, raw JSON arguments) calls; independent calls run concurrently.
        Tools named in `confirm` wait for confirmation, as destructive ones always do."""
        return list(await asyncio.gather(*(self._one(cid, name, raw, principal, ctx, name in confirm) for cid, name, raw in calls)))

    async def _one(self, call_id: str, name: str, raw: str, principal: Principal, ctx: ToolContext, confirm: bool = False) -> ToolResult:
        audit: list[tuple] = []
        with tracing.span(f"execute_tool {name}", **_tool_attributes(name, call_id)) as span:
            result = await self._decide(call_id, name, raw, principal, ctx, audit, confirm)
            tracing.set_attributes(span, enclave__tool__outcome=result.status)
            await asyncio.to_thread(self._audit, *audit[0])
            if self.guard is not None and result.status == "ok":
                # What a tool returns is data: instructions in it are neutralised and
                # personal data masked before the model reads it.
                result.content, events = await self.guard.tool_result(result.content)
                result.guard_events += events
        return result

    async def _decide(self, call_id: str, name: str, raw: str, principal: Principal, ctx: ToolContext, audit: list[tuple], confirm: bool = False) -> ToolResult:
        started = time.perf_counter()
        tool = self.registry.get(name)

        def result(status: str, content: str, *, attempts: int = 0, error: str | None = None, action: dict | None = None, args: Any = None) -> ToolResult:
            audit.append((ctx, principal, name, args if args is not None else raw, status, error, started, attempts, action))
            return ToolResult(call_id, name, raw, status, content, action)

        if tool is None:
            return result("invalid", _error(f"there is no tool named {name}"), error="unknown tool")
        if not principal.allows(tool.scope):
            return result("denied", _error(f"permission denied: this caller may not use {name}"), error="missing scope")
        try:
            arguments = tool.validate(json.loads(raw))
        except (ValueError, ToolError) as exc:
            return result("invalid", _error(str(exc)), error=str(exc))
        if self.guard is not None and self.guard.has("tool_call"):
            verdict = await self.guard.check("tool_call", f"{name} {raw}")
            if verdict.blocked:
                res = result("blocked", _error(f"the guardrails refused this call to {name}"), error=f"rail {verdict.rail}: {verdict.reason}", args=arguments)
                res.guard_events += verdict.events
                return res
        if tool.rate_limit and await asyncio.to_thread(self._over_limit, tool, principal):
            calls, per = tool.rate_limit
            return result("rate_limited", _error(f"rate limit reached for {name} ({calls} per {per:g} s); try again later"), error="rate limited", args=arguments)
        if tool.destructive or confirm:
            try:
                if tool.precheck is not None:
                    await asyncio.to_thread(tool.precheck, tool.bind(ctx), **arguments)
            except ToolError as exc:
                return result("error", _error(str(exc)), error=str(exc), args=arguments)
            action = await asyncio.to_thread(self._create_action, tool, arguments, principal)
            content = json.dumps(
                {"status": "awaiting_confirmation", "action_id": action["id"], "summary": action["summary"]}, ensure_ascii=False
            )
            return result("pending_confirmation", content, action=action, args=arguments)
        status, content, attempts, error = await self._execute(tool, ctx, arguments)
        return result(status, content, attempts=attempts, error=error, args=arguments)

    async def _execute(self, tool: Tool, ctx: ToolContext, arguments: dict[str, Any]) -> tuple[str, str, int, str | None]:
        attempts = 1 + (tool.retries if tool.idempotent else 0)
        error = ""
        for attempt in range(1, attempts + 1):
            try:
                if inspect.iscoroutinefunction(tool.fn):
                    value = await asyncio.wait_for(tool.call(ctx, arguments), tool.timeout)
                else:
                    # A timed-out thread cannot be killed; it finishes in the background
                    # and its result is dropped. Tools with side effects use the
                    # idempotency key so that a late finish does no harm.
                    value = await asyncio.wait_for(asyncio.to_thread(tool.call, ctx, arguments), tool.timeout)
                return "ok", _output(value), attempt, None
            except ToolError as exc:  # a refusal is an answer, not a fault: never retried
                return "error", _error(str(exc)), attempt, str(exc)
            except TimeoutError:
                status, error = "timeout", f"{tool.name} did not finish within {tool.timeout:g} s"
            except Exception as exc:
                log.warning("tool %s failed: %s", tool.name, exc, exc_info=True)
                status, error = "error", f"{tool.name} failed: {type(exc).__name__}"
            if attempt < attempts:
                await asyncio.sleep(0.1 * 2 ** (attempt - 1))
        return status, _error(error), attempts, error

    # ------------------------------------------------------------ rate limits and audit

    def _over_limit(self, tool: Tool, principal: Principal) -> bool:
        assert tool.rate_limit is not None
        calls, per = tool.rate_limit
        return self.audit_log.recent_calls(tool.name, principal, per, _COUNTED) >= calls

    def _audit(self, ctx: ToolContext, principal: Principal, name: str, args: Any, status: str, error: str | None, started: float, attempts: int, action: dict | None) -> None:
        # Every outcome of every call passes here (model calls and confirmed actions alike).
        if self.metrics is not None:
            self.metrics.tool_calls.labels(tool=name, outcome=status).inc()
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        row = {
            "at": time.time(),
            "request_id": ctx.request_id,
            "tenant": principal.tenant,
            "user": principal.user,
            "key_id": principal.key_id,
            "tool": name,
            "arguments": json.dumps(redact(args), ensure_ascii=False, default=str),
            "status": status,
            "error": error,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            "attempts": attempts,
            "action_id": action["id"] if action else None,
        }
        self.audit_log.write(row)

    def audit_rows(self, **where: Any) -> list[dict[str, Any]]:
        return self.audit_log.rows(**where)

    # ------------------------------------------------------------ pending actions

    def _create_action(self, tool: Tool, arguments: dict[str, Any], principal: Principal) -> dict[str, Any]:
        now = time.time()
        row = {
            "id": new_id("action"),
            "tenant": principal.tenant,
            "user": principal.user,
            "key_id": principal.key_id,
            "tool": tool.name,
            "arguments": json.dumps(arguments, ensure_ascii=False, default=str),
            "summary": tool.summary(arguments),
            "status": "pending",
            "created_at": now,
            "expires_at": now + self.action_ttl_s,
        }
        with self.db.begin() as conn:
            conn.execute(insert(pending_actions).values(**row))
        return row

    def _load(self, action_id: str) -> dict[str, Any] | None:
        with self.db.connect() as conn:
            row = conn.execute(select(pending_actions).where(pending_actions.c.id == action_id)).first()
        return dict(row._mapping) if row else None

    def _expire(self, action_id: str) -> None:
        with self.db.begin() as conn:
            conn.execute(
                update(pending_actions)
                .where(pending_actions.c.id == action_id, pending_actions.c.status == "pending", pending_actions.c.expires_at <= time.time())
                .values(status="expired", decided_at=time.time())
            )

    def get_action(self, action_id: str, principal: Principal, *, operator: bool = False) -> dict[str, Any]:
        """The action if `principal` may see it: its owner, or an operator of its tenant."""
        self._expire(action_id)
        row = self._load(action_id)
        if row is None or row["tenant"] != principal.tenant or (not operator and row["user"] != principal.user):
            raise NotFoundError(f"no action with id {action_id}", param="action_id")
        return row

    def list_actions(self, principal: Principal, status: str | None = None) -> list[dict[str, Any]]:
        query = select(pending_actions).where(pending_actions.c.tenant == principal.tenant).order_by(pending_actions.c.created_at.desc()).limit(100)
        if status:
            query = query.where(pending_actions.c.status == status)
        with self.db.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    @staticmethod
    def forget(conn: Connection, tenant: str, user: str) -> dict[str, int]:
        """The user's pending actions (server/forgetting.py)."""
        return {"pending_actions": conn.execute(delete(pending_actions).where(pending_actions.c.tenant == tenant, pending_actions.c.user == user)).rowcount or 0}

    def _claim(self, action_id: str, by: str) -> bool:
        # The one atomic step that makes duplicate, replayed and concurrent approvals
        # execute the action once: only the caller whose UPDATE flips `pending` wins.
        now = time.time()
        with self.db.begin() as conn:
            res = conn.execute(
                update(pending_actions)
                .where(pending_actions.c.id == action_id, pending_actions.c.status == "pending", pending_actions.c.expires_at > now)
                .values(status="executing", decided_at=now, decided_by=by)
            )
        return res.rowcount == 1

    def _finish(self, action_id: str, status: str, result: str) -> None:
        with self.db.begin() as conn:
            conn.execute(update(pending_actions).where(pending_actions.c.id == action_id).values(status=status, result=result))

    async def approve(
        self, action_id: str, principal: Principal, *, operator: bool = False, request_id: str = "", messages: list | None = None, mcp_headers: Any = None
    ) -> dict[str, Any]:
        """Execute a pending action exactly once and return its final state (an MCP tool's
        with the approving request's `mcp_headers`, if it sends any)."""
        row = await asyncio.to_thread(self.get_action, action_id, principal, operator=operator)
        by = f"{'operator' if operator else 'user'}:{principal.user}"
        if await asyncio.to_thread(self._claim, action_id, by):
            tool = self.registry.get(row["tool"])
            owner = Principal(tenant=row["tenant"], user=row["user"], scopes=("*",), key_id=row["key_id"])
            ctx = ToolContext(row["tenant"], row["user"], row["key_id"], request_id, messages or [], idempotency_key=action_id, mcp_headers=mcp_headers or {})
            started = time.perf_counter()
            with tracing.span(f"execute_tool {row['tool']}", **_tool_attributes(row["tool"], "call_" + action_id.removeprefix("act_"))) as span:
                if tool is None:
                    status, content, attempts, error = "error", _error(f"tool {row['tool']} is no longer enabled"), 0, "tool disabled"
                else:
                    status, content, attempts, error = await self._execute(tool, ctx, json.loads(row["arguments"]))
                tracing.set_attributes(span, enclave__tool__outcome=status, enclave__action__id=action_id)
            await asyncio.to_thread(self._finish, action_id, "succeeded" if status == "ok" else "failed", content)
            await asyncio.to_thread(self._audit, ctx, owner, row["tool"], row["arguments"], status, error, started, attempts, row)
        return await self._settled(action_id, principal, operator)

    async def _settled(self, action_id: str, principal: Principal, operator: bool, wait_s: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + wait_s
        while True:
            row = await asyncio.to_thread(self.get_action, action_id, principal, operator=operator)
            if row["status"] in ("succeeded", "failed"):
                return row
            if row["status"] in ("cancelled", "expired"):
                raise ConflictError(f"action {action_id} is {row['status']} and can no longer be approved", param="action_id", code=f"action_{row['status']}")
            if time.monotonic() > deadline:
                return row
            await asyncio.sleep(0.05)

    def cancel(self, action_id: str, principal: Principal, *, operator: bool = False) -> dict[str, Any]:
        row = self.get_action(action_id, principal, operator=operator)
        with self.db.begin() as conn:
            res = conn.execute(
                update(pending_actions)
                .where(pending_actions.c.id == action_id, pending_actions.c.status == "pending")
                .values(status="cancelled", decided_at=time.time(), decided_by=f"{'operator' if operator else 'user'}:{principal.user}")
            )
        row = self.get_action(action_id, principal, operator=operator)
        if res.rowcount == 0 and row["status"] != "cancelled":
            raise ConflictError(f"action {action_id} is {row['status']} and can no longer be cancelled", param="action_id", code=f"action_{row['status']}")
        return row


def _tool_attributes(name: str, call_id: str) -> dict[str, Any]:
    """GenAI semantic conventions of an execute_tool span (arguments and results are
    opt-in content there, and never recorded here)."""
    return {"gen_ai__operation__name": "execute_tool", "gen_ai__tool__name": name, "gen_ai__tool__call__id": call_id, "gen_ai__tool__type": "function"}
