"""Durable conversations in SQL: a tree of turns, so any stored response can be continued.

A turn row holds the chat-shaped messages it added (the new input and the answer); the
history of a turn is its chain of ancestors, read with one recursive query. The running
summary is stored on the turn that wrote it and covers its branch up to a depth, so
forks of a conversation never share a summary that describes the other branch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine as Database
from sqlalchemy.exc import IntegrityError

from server.auth import Principal
from server.db import conversations, turns
from server.errors import InvalidRequestError, NotFoundError
from server.ids import new_id


@dataclass
class Thread:
    """Where a new turn attaches: its conversation and parent turn (None: the first)."""

    conversation_id: str
    parent_id: str | None = None
    depth: int = 0  # the parent's depth


@dataclass
class History:
    turns: list[tuple[int, list[dict[str, str]]]] = field(default_factory=list)  # (depth, messages), oldest first
    summary: str = ""
    summary_through: int = 0


class ConversationStore:
    def __init__(self, db: Database):
        self.db = db

    # ---------------------------------------------------------------- where a turn goes

    def thread(self, principal: Principal, *, conversation: str | None = None, previous_response_id: str | None = None) -> Thread:
        if previous_response_id:
            row = self._turn_row(principal, previous_response_id, param="previous_response_id")
            if conversation and conversation not in (row["conversation_id"], self._name_of(row["conversation_id"])):
                raise InvalidRequestError(
                    "previous_response_id belongs to another conversation than `conversation`", param="conversation"
                )
            return Thread(row["conversation_id"], row["id"], row["depth"])
        if conversation:
            return self._named(principal, conversation)
        conv_id = self._create(principal, None)
        return Thread(conv_id)

    def _name_of(self, conversation_id: str) -> str | None:
        with self.db.connect() as conn:
            return conn.execute(select(conversations.c.name).where(conversations.c.id == conversation_id)).scalar()

    def _named(self, principal: Principal, name: str) -> Thread:
        if len(name) > 256:
            raise InvalidRequestError("conversation names are at most 256 characters", param="conversation")
        owner = (conversations.c.tenant == principal.tenant) & (conversations.c.user == principal.user)
        for _ in range(2):
            with self.db.connect() as conn:
                row = conn.execute(
                    select(conversations).where(owner, or_(conversations.c.id == name, conversations.c.name == name))
                ).mappings().first()
            if row is not None:
                depth = 0
                if row["head"]:
                    with self.db.connect() as conn:
                        depth = conn.execute(select(turns.c.depth).where(turns.c.id == row["head"])).scalar() or 0
                return Thread(row["id"], row["head"], depth)
            try:
                self._create(principal, name)
            except IntegrityError:  # another request created it at the same moment: read it
                continue
        raise NotFoundError(f"conversation {name!r} could not be opened", param="conversation")

    def _create(self, principal: Principal, name: str | None) -> str:
        conv_id = new_id("conversation")
        with self.db.begin() as conn:
            conn.execute(
                insert(conversations).values(id=conv_id, tenant=principal.tenant, user=principal.user, name=name, created_at=time.time())
            )
        return conv_id

    def holder(self, principal: Principal, conversation: str | None, previous_response_id: str | None) -> tuple[str | None, str | None]:
        """(the agent or workflow that answered the turn a new one continues from (the
        response it names, else the conversation's head), that turn's conversation id);
        Nones for anything unknown (the turn itself reports unknown ids)."""
        t, c = turns.c, conversations.c
        owner = (t.tenant == principal.tenant) & (t.user == principal.user)
        with self.db.connect() as conn:
            if previous_response_id:
                row = conn.execute(select(t.agent, t.conversation_id).where(owner, t.id == previous_response_id)).first()
            else:
                head = select(c.head).where(c.tenant == principal.tenant, c.user == principal.user, or_(c.id == conversation, c.name == conversation))
                row = conn.execute(select(t.agent, t.conversation_id).where(owner, t.id == head.scalar_subquery())).first()
        return (row.agent, row.conversation_id) if row is not None else (None, None)

    # ---------------------------------------------------------------- history

    def history(self, thread: Thread) -> History:
        """The chain of turns up to the thread's parent, from the latest summary on."""
        if thread.parent_id is None:
            return History()
        chain = select(turns.c.id, turns.c.parent_id).where(turns.c.id == thread.parent_id).cte("chain", recursive=True)
        chain = chain.union_all(select(turns.c.id, turns.c.parent_id).join(chain, turns.c.id == chain.c.parent_id))
        with self.db.connect() as conn:
            spine = conn.execute(
                select(turns.c.id, turns.c.depth, turns.c.summary_through).join(chain, turns.c.id == chain.c.id).order_by(turns.c.depth)
            ).all()
            summarised = [(r.depth, r.id) for r in spine if r.summary_through]
            history = History()
            if summarised:
                _, summary_id = max(summarised)
                row = conn.execute(select(turns.c.summary, turns.c.summary_through).where(turns.c.id == summary_id)).one()
                history.summary, history.summary_through = row.summary or "", row.summary_through
            needed = [r.id for r in spine if r.depth > history.summary_through]
            if needed:
                rows = conn.execute(select(turns.c.depth, turns.c.messages).where(turns.c.id.in_(needed)).order_by(turns.c.depth)).all()
                history.turns = [(r.depth, json.loads(r.messages)) for r in rows]
        return history

    # ---------------------------------------------------------------- writing

    def save_turn(
        self,
        principal: Principal,
        thread: Thread,
        turn_id: str,
        model: str,
        messages: list[dict[str, str]],
        response: dict[str, Any] | None = None,
        input_items: list[dict[str, Any]] | None = None,
        summary: tuple[str, int] | None = None,
        agent: str | None = None,
    ) -> None:
        with self.db.begin() as conn:
            conn.execute(
                insert(turns).values(
                    id=turn_id,
                    conversation_id=thread.conversation_id,
                    parent_id=thread.parent_id,
                    depth=thread.depth + 1,
                    tenant=principal.tenant,
                    user=principal.user,
                    model=model,
                    agent=agent,
                    created_at=time.time(),
                    messages=json.dumps(messages, ensure_ascii=False),
                    response=json.dumps(response, ensure_ascii=False) if response is not None else None,
                    input_items=json.dumps(input_items, ensure_ascii=False) if input_items is not None else None,
                    summary=summary[0] if summary else None,
                    summary_through=summary[1] if summary else None,
                )
            )
            conn.execute(update(conversations).where(conversations.c.id == thread.conversation_id).values(head=turn_id))

    # ---------------------------------------------------------------- reading and deleting

    def _turn_row(self, principal: Principal, turn_id: str, param: str = "response_id") -> dict[str, Any]:
        with self.db.connect() as conn:
            row = conn.execute(
                select(turns).where(turns.c.id == turn_id, turns.c.tenant == principal.tenant, turns.c.user == principal.user)
            ).mappings().first()
        if row is None:
            raise NotFoundError(f"Response with id '{turn_id}' not found.", param=param)
        return dict(row)

    def get_response(self, principal: Principal, response_id: str) -> dict[str, Any]:
        row = self._turn_row(principal, response_id)
        if row["response"] is None:
            raise NotFoundError(f"Response with id '{response_id}' not found.", param="response_id")
        return json.loads(row["response"])

    def input_items(self, principal: Principal, response_id: str) -> list[dict[str, Any]]:
        row = self._turn_row(principal, response_id)
        return json.loads(row["input_items"] or "[]")

    def delete_response(self, principal: Principal, response_id: str) -> None:
        """Delete one turn. Its children keep their own messages; their history now
        starts after the gap (a deleted turn is gone for every branch)."""
        row = self._turn_row(principal, response_id)
        with self.db.begin() as conn:
            conn.execute(update(turns).where(turns.c.parent_id == response_id).values(parent_id=row["parent_id"]))
            conn.execute(delete(turns).where(turns.c.id == response_id))
            conn.execute(update(conversations).where(conversations.c.head == response_id).values(head=row["parent_id"]))

    @staticmethod
    def forget(conn: Connection, tenant: str, user: str) -> dict[str, int]:
        """The user's turns and conversations (server/forgetting.py)."""
        return {name: conn.execute(delete(table).where(table.c.tenant == tenant, table.c.user == user)).rowcount or 0 for name, table in (("turns", turns), ("conversations", conversations))}

    def conversation_id(self, principal: Principal, previous_response_id: str | None = None, name: str | None = None) -> str | None:
        """The user's conversation that a response belongs to, or that a client names
        (its name, from chat completions, or its id, from the Responses API)."""
        with self.db.connect() as conn:
            if previous_response_id:
                query = select(turns.c.conversation_id).where(turns.c.id == previous_response_id, turns.c.tenant == principal.tenant, turns.c.user == principal.user)
            else:
                named = or_(conversations.c.name == name, conversations.c.id == name)
                query = select(conversations.c.id).where(conversations.c.tenant == principal.tenant, conversations.c.user == principal.user, named).limit(1)
            return conn.execute(query).scalar()
