"""Batches in SQL: the one owner of the `batches` and `batch_lines` tables.

The API's side (create, get, list, cancel) and the worker's (claim a batch by lease, read
its input once into lines, record each line's result as it finishes, write the output
and error files at the end). A line's result is recorded once: a line already answered
is never recorded again, so a batch taken up again after a restart goes on from the
first line not done and its counts stay exact.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine as Database

from server import scopes as S
from server.auth import Principal
from server.batches.lines import ENDPOINTS, Line
from server.db import batch_lines, batches, usage_records
from server.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from server.ids import new_id

COMPLETION_WINDOWS = {"24h": 24 * 3600.0}
# Statuses a worker still has work in; the others are final.
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
MAX_METADATA = 16  # pairs, each key at most 64 characters and value at most 512 (OpenAI's limits)
LEASE_S = 30.0

_TIMES = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at")


@dataclass(frozen=True)
class Batch:
    """What the worker needs of a batch it holds."""

    id: str
    tenant: str
    user: str
    key_id: str | None
    endpoint: str
    input_file_id: str
    status: str
    expires_at: float


@dataclass(frozen=True)
class Result:
    """A line's outcome: the response it got (status and body), or an error without one."""

    status_code: int | None
    body: dict[str, Any] | None
    request_id: str | None = None
    error: dict[str, str] | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def tokens(self) -> tuple[int, int]:
        usage = (self.body or {}).get("usage") if self.ok else None
        if not isinstance(usage, dict):
            return 0, 0
        # Chat completions and embeddings say prompt/completion, Responses input/output.
        return int(usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0), int(usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0)


def _check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA:
        raise InvalidRequestError(f"metadata must be an object of at most {MAX_METADATA} pairs", param="metadata", code="invalid_value")
    for k, v in metadata.items():
        if not isinstance(v, str) or len(k) > 64 or len(v) > 512:
            raise InvalidRequestError("metadata keys are at most 64 characters and values strings of at most 512", param="metadata", code="invalid_value")
    return metadata


class BatchStore:
    def __init__(self, db: Database, knowledge: Any):
        self.db = db
        self.knowledge = knowledge  # KnowledgeBase: the input file's bytes, the output files

    # ---------------------------------------------------------------- the API's side

    def create(self, principal: Principal, input_file_id: str, endpoint: str, completion_window: str, metadata: Any = None) -> dict[str, Any]:
        if endpoint not in ENDPOINTS:
            raise InvalidRequestError(f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint", code="invalid_value")
        if completion_window not in COMPLETION_WINDOWS:
            raise InvalidRequestError("completion_window must be '24h'", param="completion_window", code="invalid_value")
        needed = S.route_scope("POST", endpoint)
        if needed is not None and not principal.allows(needed):
            raise PermissionDeniedError(f"this API key lacks the '{needed}' scope that {endpoint} needs")
        metadata = _check_metadata(metadata)
        try:
            file = self.knowledge.get_file(principal, input_file_id)  # another tenant's too
        except NotFoundError:
            raise NotFoundError(f"No such File object: {input_file_id}", param="input_file_id") from None
        if file["purpose"] != "batch":
            raise InvalidRequestError(f"file {input_file_id} has purpose {file['purpose']!r}; a batch's input file must be uploaded with purpose 'batch'", param="input_file_id")
        now = time.time()
        row = {
            "id": new_id("batch"),
            "tenant": principal.tenant,
            "user": principal.user,
            "key_id": principal.key_id,
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "status": "validating",
            "metadata": json.dumps(metadata) if metadata is not None else None,
            "total": 0,
            "completed": 0,
            "failed": 0,
            "input_tokens": 0,
            "output_tokens": 0,
            "created_at": now,
            "expires_at": now + COMPLETION_WINDOWS[completion_window],
        }
        with self.db.begin() as conn:
            conn.execute(insert(batches).values(**row))
        return self.public(row)

    def _row(self, conn: Connection, principal: Principal, batch_id: str) -> dict[str, Any]:
        b = batches.c
        row = conn.execute(select(batches).where(b.id == batch_id, b.tenant == principal.tenant, b.user == principal.user)).mappings().first()
        if row is None:
            raise NotFoundError(f"No such Batch object: {batch_id}", param="batch_id")
        return dict(row)

    def get(self, principal: Principal, batch_id: str) -> dict[str, Any]:
        with self.db.connect() as conn:
            return self.public(self._row(conn, principal, batch_id), self._cost(conn, batch_id))

    def list(self, principal: Principal, after: str | None, limit: int) -> dict[str, Any]:
        b = batches.c
        query = select(batches).where(b.tenant == principal.tenant, b.user == principal.user)
        with self.db.connect() as conn:
            if after:
                anchor = self._row(conn, principal, after)
                query = query.where(or_(b.created_at < anchor["created_at"], and_(b.created_at == anchor["created_at"], b.id < anchor["id"])))
            rows = [dict(r) for r in conn.execute(query.order_by(b.created_at.desc(), b.id.desc()).limit(limit + 1)).mappings()]
            costs = self._costs(conn, [r["id"] for r in rows[:limit]])
            data = [self.public(r, costs.get(r["id"], 0.0)) for r in rows[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}

    def cancel(self, principal: Principal, batch_id: str) -> dict[str, Any]:
        """Stop a batch: no line starts after this; those running finish, and the batch
        ends `cancelled` with the files of what was done."""
        with self.db.begin() as conn:
            row = self._row(conn, principal, batch_id)
            if row["status"] in ("validating", "in_progress"):
                now = time.time()
                conn.execute(update(batches).where(batches.c.id == batch_id, batches.c.status == row["status"]).values(status="cancelling", cancelling_at=now))
                row = self._row(conn, principal, batch_id)
            elif row["status"] != "cancelling":
                raise ConflictError(f"Cannot cancel a batch with status {row['status']!r}.", param="batch_id", code="batch_not_cancellable")
            return self.public(row, self._cost(conn, batch_id))

    @staticmethod
    def _cost(conn: Connection, batch_id: str) -> float:
        return BatchStore._costs(conn, [batch_id]).get(batch_id, 0.0)

    @staticmethod
    def _costs(conn: Connection, batch_ids: list[str]) -> dict[str, float]:
        """What each batch's lines were charged, from their turns' usage rows (one query)."""
        c, u = batch_lines.c, usage_records.c
        query = (
            select(c.batch_id, func.coalesce(func.sum(u.cost_usd), 0.0))
            .join(usage_records, u.request_id == c.request_id)
            .where(c.batch_id.in_(batch_ids))
            .group_by(c.batch_id)
        )
        return {batch_id: float(cost) for batch_id, cost in conn.execute(query)}

    @staticmethod
    def public(row: dict[str, Any], cost_usd: float = 0.0) -> dict[str, Any]:
        errors = json.loads(row["errors"]) if row.get("errors") else None
        out: dict[str, Any] = {
            "id": row["id"],
            "object": "batch",
            "endpoint": row["endpoint"],
            "errors": {"object": "list", "data": errors} if errors else None,
            "input_file_id": row["input_file_id"],
            "completion_window": row["completion_window"],
            "status": row["status"],
            "output_file_id": row.get("output_file_id"),
            "error_file_id": row.get("error_file_id"),
        }
        out |= {name: int(row[name]) if row.get(name) is not None else None for name in _TIMES}
        inputs, outputs = row.get("input_tokens") or 0, row.get("output_tokens") or 0
        out |= {
            "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
            "metadata": json.loads(row["metadata"]) if row.get("metadata") else None,
            "usage": {
                "input_tokens": inputs,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": outputs,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": inputs + outputs,
            },
            # --- extension: what its lines' turns were charged, as each turn's `cost`
            "cost": {"usd": cost_usd},
        }
        return out

    # ---------------------------------------------------------------- the worker's side

    def claim(self, owner: str) -> Batch | None:
        """The batch with work left that waited longest for its turn (never served
        first, then the least recently served, then the oldest) and that no other live
        worker holds, now held by `owner` (a lease it renews; a worker that died lets go
        when it runs out)."""
        b = batches.c
        now = time.time()
        free = or_(b.lease_owner.is_(None), b.lease_until < now, b.lease_owner == owner)
        turn = (b.served_at.is_not(None), b.served_at, b.created_at)
        with self.db.begin() as conn:
            for row in conn.execute(select(batches).where(b.status.in_(ACTIVE), free).order_by(*turn).limit(8)).mappings():
                taken = conn.execute(update(batches).where(b.id == row["id"], free).values(lease_owner=owner, lease_until=now + LEASE_S))
                if taken.rowcount == 1:
                    return Batch(row["id"], row["tenant"], row["user"], row["key_id"], row["endpoint"], row["input_file_id"], row["status"], row["expires_at"])
        return None

    def renew(self, batch_id: str, owner: str) -> str | None:
        """Extend the lease; the batch's status now, or None when it is no longer held."""
        b = batches.c
        with self.db.begin() as conn:
            held = conn.execute(update(batches).where(b.id == batch_id, b.lease_owner == owner).values(lease_until=time.time() + LEASE_S))
            if held.rowcount != 1:
                return None
            return conn.execute(select(b.status).where(b.id == batch_id)).scalar()

    def others_waiting(self, batch_id: str) -> bool:
        """Whether another batch with work left waits for a worker."""
        b = batches.c
        now = time.time()
        free = or_(b.lease_owner.is_(None), b.lease_until < now)
        with self.db.connect() as conn:
            return conn.execute(select(b.id).where(b.status.in_(ACTIVE), b.id != batch_id, free).limit(1)).first() is not None

    def yield_turn(self, batch_id: str, owner: str) -> None:
        """Give the batch back after its turn: it waits behind the others now."""
        b = batches.c
        with self.db.begin() as conn:
            conn.execute(update(batches).where(b.id == batch_id, b.lease_owner == owner).values(lease_owner=None, lease_until=None, served_at=time.time()))

    def release(self, owner: str) -> None:
        """Give back every batch held: the next server takes them up at once."""
        with self.db.begin() as conn:
            conn.execute(update(batches).where(batches.c.lease_owner == owner).values(lease_until=0.0))

    def status(self, batch_id: str) -> str | None:
        with self.db.connect() as conn:
            return conn.execute(select(batches.c.status).where(batches.c.id == batch_id)).scalar()

    def input_bytes(self, batch: Batch) -> bytes | None:
        try:
            return self.knowledge.read_bytes(batch.tenant, batch.input_file_id)
        except NotFoundError:
            return None

    def start(self, batch: Batch, lines: list[Line]) -> bool:
        """Validated: its lines stored and the batch in progress (unless it was
        cancelled meanwhile, which is then the worker's to finish)."""
        b = batches.c
        now = time.time()
        with self.db.begin() as conn:
            moved = conn.execute(update(batches).where(b.id == batch.id, b.status == "validating").values(status="in_progress", in_progress_at=now, total=len(lines)))
            if moved.rowcount != 1:
                return False
            rows = [{"batch_id": batch.id, "line": line.number, "custom_id": line.custom_id, "body": json.dumps(line.body, ensure_ascii=False)} for line in lines]
            for i in range(0, len(rows), 1000):
                conn.execute(insert(batch_lines), rows[i : i + 1000])
        return True

    def fail(self, batch: Batch, errors: list[dict[str, Any]]) -> None:
        """The input file broke the rules: the batch fails and nothing of it runs."""
        b = batches.c
        with self.db.begin() as conn:
            conn.execute(update(batches).where(b.id == batch.id, b.status.in_(ACTIVE)).values(status="failed", failed_at=time.time(), errors=json.dumps(errors)))

    def pending(self, batch_id: str, after: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Lines not done, after line number `after`, in file order."""
        c = batch_lines.c
        query = select(c.line, c.body).where(c.batch_id == batch_id, c.finished_at.is_(None), c.line > after).order_by(c.line).limit(limit)
        with self.db.connect() as conn:
            return [(r.line, json.loads(r.body)) for r in conn.execute(query)]

    def record(self, batch_id: str, line: int, result: Result) -> bool:
        """A line's outcome and the batch's counts, together; False when the line was
        already recorded (by an earlier holder of the batch)."""
        c, b = batch_lines.c, batches.c
        inputs, outputs = result.tokens()
        with self.db.begin() as conn:
            done = conn.execute(
                update(batch_lines)
                .where(c.batch_id == batch_id, c.line == line, c.finished_at.is_(None))
                .values(
                    status_code=result.status_code,
                    request_id=result.request_id,
                    response=json.dumps(result.body, ensure_ascii=False) if result.body is not None else None,
                    error=json.dumps(result.error) if result.error is not None else None,
                    finished_at=time.time(),
                )
            )
            if done.rowcount != 1:
                return False
            counts = {"completed": b.completed + 1} if result.ok else {"failed": b.failed + 1}
            conn.execute(update(batches).where(b.id == batch_id).values(input_tokens=b.input_tokens + inputs, output_tokens=b.output_tokens + outputs, **counts))
        return True

    def close_unrun(self, batch_id: str, code: str, message: str) -> int:
        """Lines that will not run (the window expired, the key was revoked): each gets
        an error instead of a response, and counts as failed."""
        c, b = batch_lines.c, batches.c
        with self.db.begin() as conn:
            closed = conn.execute(
                update(batch_lines).where(c.batch_id == batch_id, c.finished_at.is_(None)).values(error=json.dumps({"code": code, "message": message}), finished_at=time.time())
            ).rowcount
            conn.execute(update(batches).where(b.id == batch_id).values(failed=b.failed + closed))
        return closed

    def finish(self, batch: Batch, final: str) -> None:
        """Write the output file (answered lines) and the error file (lines answered with
        an error, or not run), then end the batch as `final`: completed, cancelled or
        expired. The files belong to the batch's tenant, like any uploaded file."""
        b = batches.c
        now = time.time()
        with self.db.begin() as conn:
            conn.execute(update(batches).where(b.id == batch.id, b.finalizing_at.is_(None)).values(finalizing_at=now))
            if final == "completed":
                moved = conn.execute(update(batches).where(b.id == batch.id, b.status.in_(("in_progress", "finalizing"))).values(status="finalizing"))
                if moved.rowcount != 1:  # cancelled after its last line started: it ends cancelled
                    final = "cancelled"
        output, errors = self._result_files(batch.id)
        owner = Principal(tenant=batch.tenant, user=batch.user, scopes=())
        output_id = self.knowledge.create_file(owner, f"{batch.id}_output.jsonl", output, "batch_output")["id"] if output else None
        error_id = self.knowledge.create_file(owner, f"{batch.id}_error.jsonl", errors, "batch_output")["id"] if errors else None
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[final]
        with self.db.begin() as conn:
            conn.execute(update(batches).where(b.id == batch.id).values(status=final, output_file_id=output_id, error_file_id=error_id, lease_owner=None, lease_until=None, **{stamp: time.time()}))

    def _result_files(self, batch_id: str) -> tuple[bytes, bytes]:
        c = batch_lines.c
        output: list[str] = []
        errors: list[str] = []
        with self.db.connect() as conn:
            rows = conn.execute(select(batch_lines).where(c.batch_id == batch_id, c.finished_at.is_not(None)).order_by(c.line)).mappings()
            for row in rows:
                item = {
                    "id": "batch_req_" + hashlib.sha256(f"{batch_id}:{row['line']}".encode()).hexdigest()[:24],
                    "custom_id": row["custom_id"],
                    "response": (
                        {"status_code": row["status_code"], "request_id": row["request_id"], "body": json.loads(row["response"]) if row["response"] else None}
                        if row["status_code"] is not None
                        else None
                    ),
                    "error": json.loads(row["error"]) if row["error"] else None,
                }
                ok = row["status_code"] is not None and 200 <= row["status_code"] < 300
                (output if ok else errors).append(json.dumps(item, ensure_ascii=False))
        return ("\n".join(output) + "\n").encode() if output else b"", ("\n".join(errors) + "\n").encode() if errors else b""

    # ---------------------------------------------------------------- forgetting

    @staticmethod
    def forget(conn: Connection, tenant: str, user: str) -> dict[str, int]:
        b = batches.c
        ids = select(b.id).where(b.tenant == tenant, b.user == user)
        lines = conn.execute(batch_lines.delete().where(batch_lines.c.batch_id.in_(ids))).rowcount
        rows = conn.execute(batches.delete().where(b.tenant == tenant, b.user == user)).rowcount
        return {"batches": rows, "batch_lines": lines}
