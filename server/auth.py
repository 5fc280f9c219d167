"""API keys → principals (tenant, user, scopes).

Keys are random 256-bit secrets; only their SHA-256 is stored (a slow password hash
buys nothing for secrets of that entropy and would cost every request). The file is
re-read when it changes, so `enclave keys create|revoke` take effect on a running server.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request

from server import scopes as S
from server.console import session as console
from server.errors import AuthenticationError, ConfigError, PermissionDeniedError

KEY_PREFIX = "sk-enclave-"


@dataclass(frozen=True)
class Principal:
    tenant: str
    user: str
    scopes: tuple[str, ...]
    key_id: str | None = None
    # Knowledge retrieved for this key's chat completions unless a request names stores.
    vector_store_ids: tuple[str, ...] = ()
    # Most this key may spend on engine time (USD); None: no budget.
    budget_usd: float | None = None

    def allows(self, scope: str) -> bool:
        return S.grants(self.scopes, scope)


# The ASGI scope key of a request this server sends itself (server/in_process.py).
IN_PROCESS_CALLER = "enclave.caller"

# Who is calling when the deployment has no keys (loopback only, or --insecure): the
# operator at the machine, with every scope.
ANONYMOUS = Principal(tenant="default", user="local", scopes=(S.ALL, *sorted(S.ADMIN_SCOPES)))


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._by_hash: dict[str, dict[str, Any]] = {}

    # -- reading

    def _records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text() or "{}")
        except json.JSONDecodeError as exc:
            raise ConfigError(f"keys file {self.path} is not valid JSON: {exc}") from None
        return list(data.get("keys", []))

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        with self._lock:
            self._by_hash = {r["hash"]: r for r in self._records() if not r.get("revoked")}
            self._stamp = stamp

    @property
    def enabled(self) -> bool:
        self._refresh()
        return bool(self._by_hash)

    def authenticate(self, secret: str) -> Principal | None:
        self._refresh()
        record = self._by_hash.get(_digest(secret))
        if record is None:
            return None
        return self._principal(record)

    @staticmethod
    def _principal(record: dict[str, Any]) -> Principal:
        return Principal(
            tenant=record["tenant"],
            user=record["user"],
            scopes=tuple(record["scopes"]),
            key_id=record["id"],
            vector_store_ids=tuple(record.get("vector_store_ids") or ()),
            budget_usd=record.get("budget_usd"),
        )

    def principal_for(self, key_id: str | None) -> Principal | None:
        """Who a key is now (its scopes and budget as the file says), by its id; None when
        it was revoked. Without keys (loopback), the anonymous operator."""
        self._refresh()
        if not self._by_hash:
            return ANONYMOUS
        record = next((r for r in self._by_hash.values() if r["id"] == key_id), None)
        return self._principal(record) if record is not None else None

    def list(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "hash"} for r in self._records()]

    # -- writing (the CLI)

    def _write(self, records: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"keys": records}, fh, indent=2)
        os.replace(tmp, self.path)

    def create(
        self, tenant: str, user: str, scopes: list[str], vector_store_ids: list[str] | None = None, budget_usd: float | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Add a key; the secret is returned once and never stored."""
        if not scopes:
            raise ConfigError("a key needs at least one scope")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        record = {
            "id": "key_" + secrets.token_hex(6),
            "hash": _digest(secret),
            "prefix": secret[: len(KEY_PREFIX) + 4],
            "tenant": tenant,
            "user": user,
            "scopes": list(dict.fromkeys(scopes)),
            "created_at": int(time.time()),
        }
        if vector_store_ids:
            record["vector_store_ids"] = list(vector_store_ids)
        if budget_usd is not None:
            record["budget_usd"] = budget_usd
        with self._lock:
            self._write(self._records() + [record])
        return secret, {k: v for k, v in record.items() if k != "hash"}

    def set_budget(self, key_id: str, budget_usd: float | None) -> bool:
        """Set (or with None remove) a key's budget; the running server re-reads the file."""
        with self._lock:
            records = self._records()
            hit = [r for r in records if r["id"] == key_id and not r.get("revoked")]
            for r in hit:
                if budget_usd is None:
                    r.pop("budget_usd", None)
                else:
                    r["budget_usd"] = budget_usd
            if hit:
                self._write(records)
        return bool(hit)

    def set_scopes(self, key_id: str, scopes: list[str]) -> bool:
        """Replace a key's scopes (narrow a `*` key, or grant an operator scope by name)."""
        if not scopes:
            raise ConfigError("a key needs at least one scope")
        with self._lock:
            records = self._records()
            hit = [r for r in records if r["id"] == key_id and not r.get("revoked")]
            for r in hit:
                r["scopes"] = list(dict.fromkeys(scopes))
            if hit:
                self._write(records)
        return bool(hit)

    def revoke(self, key_id: str) -> bool:
        with self._lock:
            records = self._records()
            hit = [r for r in records if r["id"] == key_id and not r.get("revoked")]
            for r in hit:
                r["revoked"] = int(time.time())
            if hit:
                self._write(records)
        return bool(hit)


async def authorize(request: Request) -> Principal | None:
    """The one check of every route (installed app-wide): the route's scope from
    server.scopes.ROUTE_SCOPES, then the caller's key. Routes that need the caller
    depend on this same function, so it runs once per request."""
    route = request.scope.get("route")
    needed = S.route_scope(request.method, getattr(route, "path", ""))
    if needed is None:  # a route without a line in the table stays closed
        raise PermissionDeniedError("this route declares no scope", code="route_without_scope")
    if needed == S.PUBLIC or (needed == S.ANY_KEY and request.app.state.settings.public_docs):
        return None
    caller = request.scope.get(IN_PROCESS_CALLER)
    if caller is not None:
        # Sent by this server to itself as one of its callers (server/in_process.py): a
        # batch's line as its creator, a console page as the signed-in key.
        return _admit(request, caller.principal, needed)
    store: KeyStore = request.app.state.keys
    if console.is_console(request.url.path):
        return _admit(request, await _console_principal(request, store), needed)
    if not store.enabled:
        return ANONYMOUS
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise AuthenticationError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.", code="missing_api_key"
        )
    principal = store.authenticate(secret.strip())
    if principal is None:
        raise AuthenticationError("Incorrect API key provided.")
    return _admit(request, principal, needed)


def _admit(request: Request, principal: Principal, needed: str) -> Principal:
    """The caller, once known, against the route's scope."""
    if needed not in (S.ANY_KEY, S.SIGNED_IN) and not principal.allows(needed):
        raise PermissionDeniedError(f"this API key lacks the '{needed}' scope")
    request.state.principal = principal
    return principal


async def _console_principal(request: Request, store: KeyStore) -> Principal:
    """A console page's caller: the key of its session cookie (server/console/session.py),
    checked like a bearer key; a form post must also carry its CSRF token."""
    if not store.enabled:  # no keys (loopback only): the operator at the machine
        principal, key = ANONYMOUS, console.ANONYMOUS_SECRET
    else:
        key = console.secret(request) or ""
        principal = store.authenticate(key) if key else None
        if principal is None:
            raise AuthenticationError("Sign in to the console with an API key.", code="console_sign_in")
    request.state.console_secret = key  # what the page's form tokens derive from
    if request.method not in ("GET", "HEAD"):
        await console.check_csrf(request, key)
    return principal
