"""The console's pages: server-rendered HTML over the server's own API.

Each page asks the JSON API in-process as the signed-in key (server/in_process.py), so
what a page shows and what a button does are exactly what that key may see and do
through the API: the same scopes, the same tenancy, the same exactly-once approval.
Each page's own scope is in server/scopes.py like every route's, and `authorize` checks
it (and the form's CSRF token on every POST) before a handler runs; a request without a
session is sent to the sign-in page (server/app.py's error handler).

Nothing here shows unmasked text: traces, rail events and memories are stored masked,
pending actions' arguments and results are masked for display, and turns' contents
are not shown at all.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from server import in_process
from server import scopes as S
from server.auth import Principal, authorize
from server.console import charts, evals, session
from server.errors import EnclaveError, InvalidRequestError
from server.telemetry.redaction import redact

router = APIRouter(prefix="/console")

HERE = Path(__file__).resolve().parent
TEMPLATES = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
STYLESHEET = (HERE / "static" / "console.css").read_bytes()

# The sections of the nav, each shown to keys holding its scope.
SECTIONS = [
    ("home", "/console", "Overview", S.SIGNED_IN),
    ("actions", "/console/actions", "Actions", S.SIGNED_IN),
    ("turns", "/console/turns", "Turns", S.TRACES),
    ("guardrails", "/console/guardrails", "Guardrails", S.TRACES),
    ("usage", "/console/usage", "Usage", S.USAGE),
    ("evals", "/console/evals", "Evals", S.TRACES),
    ("memory", "/console/memory", "Memory", S.MEMORY_ADMIN),
    ("batches", "/console/batches", "Batches", S.CHAT),
]


def _allowed(principal: Principal, scope: str) -> bool:
    return scope == S.SIGNED_IN or principal.allows(scope)


def _fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "–"


def _fmt_usd(v: float | None) -> str:
    return "–" if v is None else f"${v:.6f}"


TEMPLATES.filters["time"] = _fmt_time
TEMPLATES.filters["usd"] = _fmt_usd
# Action arguments and results are kept as given (they must run); shown, they are masked.
TEMPLATES.filters["masked"] = redact


def render(request: Request, name: str, principal: Principal | None, status_code: int = 200, **context: Any) -> HTMLResponse:
    nav = [(key, href, label) for key, href, label, scope in SECTIONS if principal is not None and _allowed(principal, scope)]
    html = TEMPLATES.get_template(name).render(
        request=request,
        principal=principal,
        nav=nav,
        csrf=session.csrf_token(session.form_secret(request)),
        csrf_field=session.CSRF_FIELD,
        flash=request.query_params.get("done"),
        **context,
    )
    # The pages hold operators' data: never cached, never framed, no scripts at all.
    headers = {
        "Cache-Control": "no-store",
        "X-Frame-Options": "DENY",
        "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        "Referrer-Policy": "same-origin",
    }
    return HTMLResponse(html, status_code=status_code, headers=headers)


class ApiError(EnclaveError):
    """The API refused what a page asked of it: shown on the console's error page."""


async def api(request: Request, principal: Principal, method: str, path: str, **kwargs: Any) -> Any:
    """The JSON API's answer to the signed-in key, asked in-process."""
    caller = in_process.Caller(principal, "console")
    async with in_process.client(request.app, lambda: caller) as client:
        r = await client.request(method, path, **kwargs)
    body = r.json()
    if r.status_code >= 400:
        error = body.get("error") or {}
        raise ApiError(error.get("message") or "the request failed", status_code=r.status_code, code=error.get("code"), param=error.get("param"))
    return body


def _back(path: str, done: str) -> RedirectResponse:
    return RedirectResponse(f"{path}?{urlencode({'done': done})}", status_code=303)


# ---------------------------------------------------------------- signing in


@router.get("/static/console.css", include_in_schema=False)
async def stylesheet() -> Response:
    return Response(STYLESHEET, media_type="text/css", headers={"Cache-Control": "max-age=3600"})


def _safe_next(target: str | None) -> str:
    """Only a console page of this server: never another site (an open redirect)."""
    if target and session.is_console(target.split("?", 1)[0]) and not target.startswith("//"):
        return target
    return "/console"


@router.get("/login", include_in_schema=False)
async def login_page(request: Request, next: str | None = Query(None)) -> HTMLResponse:
    return render(request, "login.html", None, next=_safe_next(next), error=None)


@router.post("/login", include_in_schema=False)
async def login(request: Request, api_key: str = Form(""), next: str = Form("/console")) -> Response:
    keys = request.app.state.keys
    key = api_key.strip()
    principal = keys.authenticate(key) if key and keys.enabled else None
    if principal is None or not session.same_origin(request):
        return render(request, "login.html", None, status_code=401, next=_safe_next(next), error="That API key is not valid here.")
    response = RedirectResponse(_safe_next(next), status_code=303)
    session.sign_in(response, request, key)
    return response


@router.post("/logout", include_in_schema=False)
async def logout(request: Request, principal: Principal = Depends(authorize)) -> Response:
    response = RedirectResponse("/console/login", status_code=303)
    session.sign_out(response)
    return response


# ---------------------------------------------------------------- overview


ABOUT = {
    "actions": "Pending actions of destructive tools: approve or cancel.",
    "turns": "Every turn: who, which model, how it ended, what it cost, which rails acted.",
    "guardrails": "What the rails did, by stage and rail, over time.",
    "usage": "Cost and tokens per tenant, key, model and user; budgets.",
    "evals": "Eval runs and their comparison with the baseline.",
    "memory": "A user's memories: list, delete, forget the user.",
    "batches": "Your batches: status, counts, cost and files.",
}


@router.get("", include_in_schema=False)
async def overview(request: Request, principal: Principal = Depends(authorize)) -> HTMLResponse:
    sections = [(href, label, ABOUT[key], await _figure(request, principal, key)) for key, href, label, scope in SECTIONS[1:] if _allowed(principal, scope)]
    hidden = [(label, scope) for _, _, label, scope in SECTIONS[1:] if not _allowed(principal, scope)]
    return render(request, "home.html", principal, active="home", sections=sections, hidden=hidden)


async def _figure(request: Request, principal: Principal, section: str) -> str | None:
    """The one number a section's card shows, where the key may read it."""
    try:
        if section == "actions" and principal.allows(S.ACTIONS):
            pending = (await api(request, principal, "GET", "/v1/actions", params={"status": "pending"}))["data"]
            return f"{len(pending)} pending"
        if section == "usage":
            day = await api(request, principal, "GET", "/v1/usage", params={"group_by": "tenant", "start_time": time.time() - 86400, "limit": 1})
            return f"{_fmt_usd(day['total'].get('cost_usd') or 0.0)} in the last 24 h"
        if section == "batches":
            batches = (await api(request, principal, "GET", "/v1/batches", params={"limit": 100}))["data"]
            running = sum(1 for b in batches if b["status"] in ("validating", "in_progress", "finalizing", "cancelling"))
            return f"{running} running"
    except ApiError:  # the model still loading, say: the card shows no number
        return None
    return None


# ---------------------------------------------------------------- actions


@router.get("/actions", include_in_schema=False)
async def actions_page(request: Request, principal: Principal = Depends(authorize)) -> HTMLResponse:
    may_act = principal.allows(S.ACTIONS)
    rows: list[dict[str, Any]] = (await api(request, principal, "GET", "/v1/actions"))["data"] if may_act else []
    pending = [a for a in rows if a["status"] == "pending"]
    past = [a for a in rows if a["status"] != "pending"]
    return render(request, "actions.html", principal, active="actions", may_act=may_act, pending=pending, past=past)


@router.post("/actions/{action_id}/approve", include_in_schema=False)
async def approve(action_id: str, request: Request, principal: Principal = Depends(authorize)) -> Response:
    action = await api(request, principal, "POST", f"/v1/actions/{action_id}/approve")
    return _back("/console/actions", f"Action {action['id']} approved: {action['status']}.")


@router.post("/actions/{action_id}/cancel", include_in_schema=False)
async def cancel(action_id: str, request: Request, principal: Principal = Depends(authorize)) -> Response:
    action = await api(request, principal, "POST", f"/v1/actions/{action_id}/cancel")
    return _back("/console/actions", f"Action {action['id']} cancelled.")


# ---------------------------------------------------------------- turns and traces


@router.get("/turns", include_in_schema=False)
async def turns_page(
    request: Request,
    q: str = Query("", max_length=200),
    outcome: str = Query("", max_length=64),
    rail: str = Query("", max_length=128),
    principal: Principal = Depends(authorize),
) -> HTMLResponse:
    params = {k: v for k, v in {"q": q, "outcome": outcome, "rail": rail, "limit": 100}.items() if v}
    turns = (await api(request, principal, "GET", "/v1/traces", params=params))["data"]
    return render(request, "turns.html", principal, active="turns", turns=turns, q=q, outcome=outcome, rail=rail)


@router.get("/traces/{trace_id}", include_in_schema=False)
async def trace_page(trace_id: str, request: Request, principal: Principal = Depends(authorize)) -> HTMLResponse:
    trace = await api(request, principal, "GET", f"/v1/traces/{trace_id}")
    spans = trace["spans"]
    start = min(s["start_time"] for s in spans)
    end = max(s["end_time"] for s in spans)
    total = max(end - start, 1e-6)
    depth = _depths(spans)
    rows = [
        {
            **s,
            "depth": depth[s["span_id"]],
            "left": 100 * (s["start_time"] - start) / total,
            "width": max(0.3, 100 * (s["end_time"] - s["start_time"]) / total),
            "offset_ms": (s["start_time"] - start) * 1000,
        }
        for s in _tree_order(spans)
    ]
    root = next((s for s in spans if s["parent_id"] is None), spans[0])
    turn = await api(request, principal, "GET", "/v1/traces", params={"trace_id": trace["id"], "limit": 1})
    rails = turn["data"][0]["rails"] if turn["data"] else []
    return render(request, "trace.html", principal, active="turns", trace=trace, rows=rows, root=root, rails=rails, total_ms=total * 1000)


def _depths(spans: list[dict[str, Any]]) -> dict[str, int]:
    parents = {s["span_id"]: s["parent_id"] for s in spans}
    depth: dict[str, int] = {}
    for sid, parent in parents.items():
        d, cur = 0, parent
        while cur in parents and d < 32:
            d, cur = d + 1, parents[cur]
        depth[sid] = d
    return depth


def _tree_order(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parents before their children, siblings by start time: the timeline's rows."""
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for s in spans:
        children.setdefault(s["parent_id"] if s["parent_id"] in ids else None, []).append(s)
    out: list[dict[str, Any]] = []

    def walk(parent: str | None) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: s["start_time"]):
            out.append(s)
            walk(s["span_id"])

    walk(None)
    return out


# ---------------------------------------------------------------- guardrails


@router.get("/guardrails", include_in_schema=False)
async def guardrails_page(request: Request, hours: float = Query(24.0, gt=0, le=24 * 90), principal: Principal = Depends(authorize)) -> HTMLResponse:
    bucket_s = 3600.0 if hours <= 48 else 86400.0
    events = await api(request, principal, "GET", "/v1/guardrails/events", params={"hours": hours, "bucket_s": bucket_s})
    rows = events["data"]
    starts = sorted({r["bucket_start"] for r in rows})
    labels = [time.strftime("%m-%d %H:00" if bucket_s < 86400 else "%Y-%m-%d", time.gmtime(b)) for b in starts]
    series: dict[str, list[int]] = {}
    totals: dict[tuple[str, str], dict[str, int]] = {}
    for r in rows:
        name = f"{r['stage']}: {r['rail']}"
        series.setdefault(name, [0] * len(starts))[starts.index(r["bucket_start"])] += r["count"]
        by = totals.setdefault((r["stage"], r["rail"]), {})
        by[r["action"]] = by.get(r["action"], 0) + r["count"]
    chart = charts.stacked_columns(labels, series, f"Guardrail events per {'hour' if bucket_s < 86400 else 'day'}, by stage and rail")
    table = sorted(((stage, rail, actions, sum(actions.values())) for (stage, rail), actions in totals.items()), key=lambda t: -t[3])
    return render(request, "guardrails.html", principal, active="guardrails", chart=chart, table=table, hours=hours)


# ---------------------------------------------------------------- usage and budgets


@router.get("/usage", include_in_schema=False)
async def usage_page(request: Request, hours: float = Query(24.0 * 30, gt=0), principal: Principal = Depends(authorize)) -> HTMLResponse:
    since = time.time() - hours * 3600
    groups = ["tenant", "key", "model"] if principal.allows(S.USAGE_ADMIN) else ["key", "model", "user"]
    tables = {}
    for group in groups:
        data = await api(request, principal, "GET", "/v1/usage", params={"group_by": group, "start_time": since, "limit": 50})
        rows = sorted(data["data"], key=lambda r: -(r.get("cost_usd") or 0))
        chart = charts.bars([(str(r.get(group + "_id") or "–"), float(r.get("cost_usd") or 0.0)) for r in rows[:12]], f"Cost per {group}", unit=" USD", digits=6)
        tables[group] = {"rows": rows, "chart": chart}
        budget = data.get("budget")
    budgets = await asyncio.to_thread(_budgets, request, principal) if principal.allows(S.USAGE_ADMIN) else []
    return render(request, "usage.html", principal, active="usage", tables=tables, budget=budget, budgets=budgets, hours=hours)


def _budgets(request: Request, principal: Principal) -> list[dict[str, Any]]:
    """Every key with a budget, and what it has spent (usage:admin only)."""
    runtime = request.app.state.runtime
    accounting = runtime.accounting
    out = []
    for record in runtime.keys.list():
        if record.get("budget_usd") is None or record.get("revoked"):
            continue
        spent = accounting.budgets.status(record["id"]) if accounting is not None else {}
        out.append({"key_id": record["id"], "tenant": record["tenant"], "user": record["user"], "limit_usd": record["budget_usd"], **spent})
    return out


# ---------------------------------------------------------------- eval reports


def _reports_dir(request: Request) -> Path:
    return Path(request.app.state.settings.eval_reports_dir)


@router.get("/evals", include_in_schema=False)
async def evals_page(request: Request, principal: Principal = Depends(authorize)) -> HTMLResponse:
    runs = await asyncio.to_thread(evals.runs, _reports_dir(request))
    chart = charts.bars([(r["name"], float(r["overall"] or 0.0)) for r in runs[:12]], "Overall score per run", digits=3)
    return render(request, "evals.html", principal, active="evals", runs=runs, chart=chart)


@router.get("/evals/{run}", include_in_schema=False)
async def eval_report_page(run: str, request: Request, principal: Principal = Depends(authorize)) -> HTMLResponse:
    report = await asyncio.to_thread(evals.report, _reports_dir(request), run)
    return render(request, "eval_report.html", principal, active="evals", report=report)


@router.get("/evals/{run}/charts/{chart}", include_in_schema=False)
async def eval_chart(run: str, chart: str, request: Request, principal: Principal = Depends(authorize)) -> Response:
    data = await asyncio.to_thread(evals.chart, _reports_dir(request), run, chart)
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


# ---------------------------------------------------------------- memory (memory:admin)


@router.get("/memory", include_in_schema=False)
async def memory_page(request: Request, user: str = Query("", max_length=128), principal: Principal = Depends(authorize)) -> HTMLResponse:
    memories = (await api(request, principal, "GET", "/v1/memory", params={"user": user, "limit": 200}))["data"] if user else []
    return render(request, "memory.html", principal, active="memory", user=user, memories=memories)


@router.post("/memory/{memory_id}/delete", include_in_schema=False)
async def delete_memory(memory_id: str, request: Request, user: str = Form(...), principal: Principal = Depends(authorize)) -> Response:
    await api(request, principal, "DELETE", f"/v1/memory/{memory_id}")
    return RedirectResponse(f"/console/memory?{urlencode({'user': user, 'done': f'Memory {memory_id} deleted.'})}", status_code=303)


@router.post("/memory/forget", include_in_schema=False)
async def forget_user(request: Request, user: str = Form(...), confirm: str = Form(""), principal: Principal = Depends(authorize)) -> Response:
    if confirm != user:
        raise InvalidRequestError("To forget a user, type their user name again to confirm.", param="confirm")
    done = await api(request, principal, "DELETE", "/v1/memory", params={"user": user})
    removed = sum(done["deleted"].values()) if isinstance(done.get("deleted"), dict) else done.get("deleted")
    return RedirectResponse(f"/console/memory?{urlencode({'done': f'User {user} forgotten ({removed} records removed).'})}", status_code=303)


# ---------------------------------------------------------------- batches


@router.get("/batches", include_in_schema=False)
async def batches_page(request: Request, principal: Principal = Depends(authorize)) -> HTMLResponse:
    batches = (await api(request, principal, "GET", "/v1/batches", params={"limit": 100}))["data"]
    return render(request, "batches.html", principal, active="batches", batches=batches)


def error_page(request: Request, exc: EnclaveError) -> Response:
    """How a console request that failed is answered: no session sends the browser to
    sign in; anything else is a page naming what went wrong, with the status."""
    if exc.status_code == 401:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/console/login?{urlencode({'next': target})}", status_code=303)
    principal = getattr(request.state, "principal", None)
    return render(request, "error.html", principal, status_code=exc.status_code, error=exc)
