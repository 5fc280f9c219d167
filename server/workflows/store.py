"""Workflow runs in SQL (the workflow_runs table): one active run per conversation and
workflow, written after every node."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine as Database

from server.auth import Principal
from server.db import workflow_runs
from server.errors import ConflictError
from server.ids import new_id

ACTIVE = ("running", "waiting")


@dataclass
class Run:
    id: str
    workflow: str
    conversation_id: str
    node: str
    status: str
    state: dict[str, Any] = field(default_factory=dict)
    # What the user said since the run began (as the rails passed it): what its extract
    # nodes read, so a new run never takes an id from an earlier, finished one.
    said: list[str] = field(default_factory=list)
    action_id: str | None = None
    version: int = 0
    new: bool = False  # started by this turn

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "workflow": self.workflow, "node": self.node, "status": self.status, "state": self.state}


class WorkflowStore:
    """Blocking (SQL): call in a thread."""

    def __init__(self, db: Database):
        self.db = db

    def active(self, principal: Principal, conversation_id: str, workflow: str) -> Run | None:
        w = workflow_runs.c
        with self.db.connect() as conn:
            row = conn.execute(
                select(workflow_runs)
                .where(w.tenant == principal.tenant, w.user == principal.user, w.conversation_id == conversation_id, w.workflow == workflow, w.status.in_(ACTIVE))
                .order_by(w.created_at.desc())
                .limit(1)
            ).mappings().first()
        return _run(row) if row is not None else None

    def get(self, principal: Principal, run_id: str) -> Run | None:
        w = workflow_runs.c
        with self.db.connect() as conn:
            row = conn.execute(select(workflow_runs).where(w.id == run_id, w.tenant == principal.tenant, w.user == principal.user)).mappings().first()
        return _run(row) if row is not None else None

    def start(self, principal: Principal, conversation_id: str, workflow: str, node: str) -> Run:
        now = time.time()
        run = Run(new_id("workflow_run"), workflow, conversation_id, node, "running", version=1, new=True)
        with self.db.begin() as conn:
            conn.execute(
                insert(workflow_runs).values(
                    id=run.id, tenant=principal.tenant, user=principal.user, conversation_id=conversation_id, workflow=workflow,
                    node=node, status=run.status, state=_encoded(run), action_id=None, version=1, created_at=now, updated_at=now,
                )
            )
        return run

    def save(self, run: Run) -> None:
        """Write the run as it is now; ConflictError when another request moved it since it was read."""
        w = workflow_runs.c
        with self.db.begin() as conn:
            res = conn.execute(
                update(workflow_runs)
                .where(w.id == run.id, w.version == run.version)
                .values(node=run.node, status=run.status, state=_encoded(run), action_id=run.action_id, version=run.version + 1, updated_at=time.time())
            )
        if res.rowcount != 1:
            raise ConflictError(f"workflow run {run.id} was moved on by another request; send the message again", code="workflow_conflict")
        run.version += 1

    @staticmethod
    def forget(conn: Connection, tenant: str, user: str) -> dict[str, int]:
        res = conn.execute(workflow_runs.delete().where(workflow_runs.c.tenant == tenant, workflow_runs.c.user == user))
        return {"workflow_runs": res.rowcount}


def _encoded(run: Run) -> str:
    return json.dumps({"state": run.state, "said": run.said}, ensure_ascii=False)


def _run(row: Any) -> Run:
    saved = json.loads(row["state"])
    return Run(row["id"], row["workflow"], row["conversation_id"], row["node"], row["status"], saved.get("state", {}), saved.get("said", []), row["action_id"], row["version"])
