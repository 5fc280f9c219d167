"""Scopes: the one table of what every route needs, what a new key gets, and which
scopes are for operators only.

Every HTTP route of the app has its line in ROUTE_SCOPES. `create_app` refuses to start
when a route has none, and one dependency (`server.auth.authorize`) checks the table on
every request, so a route cannot forget its check and a new route is closed until it is
given one. Tool packs are checked by the tool executor against `tools:<pack>`.
"""

from __future__ import annotations

from collections.abc import Iterable

# Not scopes, markers: a route anyone may call (probes), and one any valid key may call.
PUBLIC = "<public>"
ANY_KEY = "<any key>"
# A console page any signed-in key may open (it shows only what the key's scopes allow).
SIGNED_IN = "<signed in>"

CHAT = "chat"
EMBEDDINGS = "embeddings"
MODELS = "models"
KNOWLEDGE = "knowledge"
MEMORY = "memory"
USAGE = "usage"
# Operators' scopes: they reach other users' data (approve their refunds, read their
# traces, forget them) or every tenant's (usage, metrics labelled by tenant).
ACTIONS = "actions"
TRACES = "traces"
METRICS = "metrics"
USAGE_ADMIN = "usage:admin"
MEMORY_ADMIN = "memory:admin"

ALL = "*"
# What an end user's key needs; a key made without --scope gets these, plus
# `tools:<pack>` for each tool pack the deployment enables.
USER_SCOPES = (CHAT, EMBEDDINGS, MODELS, KNOWLEDGE, MEMORY, USAGE)
# Granted only by name: neither "*" nor a family wildcard ("memory:*") includes them.
ADMIN_SCOPES = frozenset({ACTIONS, TRACES, METRICS, USAGE_ADMIN, MEMORY_ADMIN})
# An admin scope includes the end-user scope it widens.
IMPLIED = {USAGE_ADMIN: (USAGE,), MEMORY_ADMIN: (MEMORY,)}

ROUTE_SCOPES: dict[tuple[str, str], str] = {
    ("GET", "/health"): PUBLIC,
    ("GET", "/ready"): PUBLIC,
    ("GET", "/metrics"): METRICS,
    # The API's own description: opened to anyone only by ENCLAVE_PUBLIC_DOCS.
    ("GET", "/openapi.json"): ANY_KEY,
    ("GET", "/docs"): ANY_KEY,
    ("GET", "/redoc"): ANY_KEY,
    ("GET", "/v1/models"): MODELS,
    ("GET", "/v1/models/{model_id:path}"): MODELS,
    ("POST", "/v1/chat/completions"): CHAT,
    ("POST", "/v1/responses"): CHAT,
    ("GET", "/v1/responses/{response_id}"): CHAT,
    ("GET", "/v1/responses/{response_id}/input_items"): CHAT,
    ("DELETE", "/v1/responses/{response_id}"): CHAT,
    ("POST", "/v1/embeddings"): EMBEDDINGS,
    ("POST", "/v1/files"): KNOWLEDGE,
    ("GET", "/v1/files"): KNOWLEDGE,
    ("GET", "/v1/files/{file_id}"): KNOWLEDGE,
    ("GET", "/v1/files/{file_id}/content"): KNOWLEDGE,
    ("DELETE", "/v1/files/{file_id}"): KNOWLEDGE,
    ("POST", "/v1/vector_stores"): KNOWLEDGE,
    ("GET", "/v1/vector_stores"): KNOWLEDGE,
    ("GET", "/v1/vector_stores/{store_id}"): KNOWLEDGE,
    ("DELETE", "/v1/vector_stores/{store_id}"): KNOWLEDGE,
    ("POST", "/v1/vector_stores/{store_id}/files"): KNOWLEDGE,
    ("GET", "/v1/vector_stores/{store_id}/files"): KNOWLEDGE,
    ("GET", "/v1/vector_stores/{store_id}/files/{file_id}"): KNOWLEDGE,
    ("DELETE", "/v1/vector_stores/{store_id}/files/{file_id}"): KNOWLEDGE,
    ("POST", "/v1/vector_stores/{store_id}/search"): KNOWLEDGE,
    # One's own memory; naming another user of the tenant also needs memory:admin.
    ("GET", "/v1/memory"): MEMORY,
    ("DELETE", "/v1/memory/{memory_id}"): MEMORY,
    ("DELETE", "/v1/memory"): MEMORY,
    # A batch needs chat, and at creation the scope of its endpoint; each line is then
    # checked as the request it is.
    ("POST", "/v1/batches"): CHAT,
    ("GET", "/v1/batches"): CHAT,
    ("GET", "/v1/batches/{batch_id}"): CHAT,
    ("POST", "/v1/batches/{batch_id}/cancel"): CHAT,
    ("GET", "/v1/actions"): ACTIONS,
    ("GET", "/v1/actions/{action_id}"): ACTIONS,
    ("POST", "/v1/actions/{action_id}/approve"): ACTIONS,
    ("POST", "/v1/actions/{action_id}/cancel"): ACTIONS,
    ("GET", "/v1/traces"): TRACES,
    ("GET", "/v1/traces/{trace_id}"): TRACES,
    ("GET", "/v1/guardrails/events"): TRACES,
    # The console (server/console): its sign-in page and stylesheet are open; each page
    # needs the scope of the API it shows, and shows only what the key may see there.
    ("GET", "/console/static/console.css"): PUBLIC,
    ("GET", "/console/login"): PUBLIC,
    ("POST", "/console/login"): PUBLIC,
    ("POST", "/console/logout"): SIGNED_IN,
    ("GET", "/console"): SIGNED_IN,
    ("GET", "/console/actions"): SIGNED_IN,
    ("POST", "/console/actions/{action_id}/approve"): ACTIONS,
    ("POST", "/console/actions/{action_id}/cancel"): ACTIONS,
    ("GET", "/console/turns"): TRACES,
    ("GET", "/console/traces/{trace_id}"): TRACES,
    ("GET", "/console/guardrails"): TRACES,
    ("GET", "/console/usage"): USAGE,
    ("GET", "/console/evals"): TRACES,
    ("GET", "/console/evals/{run}"): TRACES,
    ("GET", "/console/evals/{run}/charts/{chart}"): TRACES,
    ("GET", "/console/memory"): MEMORY_ADMIN,
    ("POST", "/console/memory/{memory_id}/delete"): MEMORY_ADMIN,
    ("POST", "/console/memory/forget"): MEMORY_ADMIN,
    ("GET", "/console/batches"): CHAT,
    # One's own tenant; usage:admin sees every tenant.
    ("GET", "/v1/usage"): USAGE,
}


def pack_scope(pack: str) -> str:
    return f"tools:{pack}"


def pack_name(ref: str) -> str:
    """The pack a tool-pack reference names: `support`, or the last part of a module path."""
    return ref.rsplit(".", 1)[-1]


def default_scopes(tool_packs: Iterable[str]) -> list[str]:
    """The scopes of a key created without --scope: an end user's, never an operator's."""
    return [*USER_SCOPES, *(pack_scope(pack_name(ref)) for ref in tool_packs)]


def grants(held: Iterable[str], scope: str) -> bool:
    """Whether a key holding `held` may use `scope`."""
    held = tuple(held)
    if scope in held or any(scope in IMPLIED.get(h, ()) for h in held):
        return True
    if scope in ADMIN_SCOPES:
        return False
    if ALL in held:
        return True
    # "tools:*" grants every "tools:<pack>".
    family, colon, _ = scope.partition(":")
    return bool(colon) and f"{family}:*" in held


def unknown(scopes: Iterable[str]) -> list[str]:
    """The names among `scopes` that no route or tool pack checks (typos)."""
    known = {ALL, *USER_SCOPES, *ADMIN_SCOPES}
    return [s for s in scopes if s not in known and not (s.startswith("tools:") and len(s) > len("tools:"))]


def route_scope(method: str, path: str) -> str | None:
    return ROUTE_SCOPES.get((method, path))
