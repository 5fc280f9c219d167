"""Deployments (server/deployments.py): chosen by one setting, their settings under the
operator's, their rails on top of the base rails."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import PROJECT_ROOT, load_settings
from server.deployments import available, load_deployment
from server.embedder import Embedder, packaged_model_dir
from server.engine.scripted import ScriptedEngine
from server.errors import ConfigError
from server.guard import Guard
from server.telemetry.metrics import Metrics

DEPLOYMENTS = PROJECT_ROOT / "deployments"
RAILS = PROJECT_ROOT / "rails"


def test_general_is_the_default_and_support_is_one_setting_away(monkeypatch):
    assert available(DEPLOYMENTS) == ["general", "support"]
    general = load_settings()
    assert general.deployment == "general" and general.tool_packs == []
    monkeypatch.setenv("ENCLAVE_DEPLOYMENT", "support")
    assert load_settings().tool_packs == ["support"]
    # The operator's own values win over the deployment's.
    monkeypatch.setenv("ENCLAVE_TOOL_PACKS", "[]")
    assert load_settings().tool_packs == []
    assert load_settings(deployment="general", tool_packs=["support"]).tool_packs == ["support"]


def test_an_unknown_deployment_stops_start_up_naming_the_setting_and_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"ENCLAVE_DEPLOYMENT; deployments: general, support"):
        load_settings(deployment="helpdesk")
    with pytest.raises(ConfigError, match="not a deployment name"):
        load_settings(deployment="../etc")
    bad = tmp_path / "mine"
    bad.mkdir()
    (bad / "deployment.yaml").write_text("settings: {deployment: support}\n")
    with pytest.raises(ConfigError, match="cannot choose a deployment"):
        load_settings(deployments_dir=tmp_path, deployment="mine")
    (bad / "deployment.yaml").write_text("colour: blue\n")
    with pytest.raises(ConfigError, match="deployment.yaml is invalid"):
        load_deployment(tmp_path, "mine")


def test_an_operators_own_deployment_directory(tmp_path):
    own = tmp_path / "legal"
    (own / "rails").mkdir(parents=True)
    (own / "deployment.yaml").write_text("description: legal desk\nsettings:\n  max_tool_steps: 2\n")
    (own / "rails" / "flows.co").write_text('define bot refuse to respond\n  "The legal desk cannot help with that."\n')
    settings = load_settings(deployments_dir=tmp_path, deployment="legal")
    assert settings.max_tool_steps == 2
    guard = Guard([RAILS, own / "rails"], Metrics())
    assert guard.refusal == "The legal desk cannot help with that."
    # Its flows.co replaced the base refusal by name; the base's other refusals stay.
    assert guard.config.bot_messages["refuse to respond"] == ["The legal desk cannot help with that."]
    assert "deflect off topic" in guard.config.bot_messages


def test_support_rails_add_topic_scoping_in_the_desks_voice_and_general_has_none():
    general = Guard(RAILS, Metrics())
    support = Guard([RAILS, DEPLOYMENTS / "support" / "rails"], Metrics())
    assert "enclave off topic" not in general.config.rails.input.flows
    assert support.config.rails.input.flows == ["enclave mask pii input", "regex check input", "enclave jailbreak heuristics", "enclave harmful intent", "enclave data owner", "enclave off topic"]
    assert "orders" in support.refusal and "orders" not in general.refusal
    # Mappings merge: the support desk keeps every base policy value and adds its topics.
    base, desk = general.config.custom_data["enclave"], support.config.custom_data["enclave"]
    assert desk["jailbreak"] == base["jailbreak"] and "topics" in desk and "topics" not in base
    # Both keep every other rail of every stage.
    for stage in ("output", "retrieval", "tool_output", "tool_input"):
        assert getattr(support.config.rails, stage).flows == getattr(general.config.rails, stage).flows


@pytest.fixture(scope="module")
def support_guard():
    guard = Guard([RAILS, DEPLOYMENTS / "support" / "rails"], Metrics())
    guard.bind(Embedder(packaged_model_dir(), "all-MiniLM-L6-v2"), None)
    return guard


@pytest.mark.parametrize("text", ["Capital of France?", "Tell me a joke.", "Who won the world cup?", "Write a haiku.", "Bake a cake?"])
def test_short_off_topic_messages_are_judged_like_long_ones(support_guard, text):
    verdict = asyncio.run(support_guard.check("input", text))
    assert verdict.blocked and verdict.rail == "enclave off topic", (text, verdict)


@pytest.mark.parametrize("text", ["Hi", "Thanks!", "Yes, go ahead.", "No, cancel it.", "Where's my parcel?", "Refund please", "Thank you so much"])
def test_small_talk_and_short_support_messages_pass(support_guard, text):
    verdict = asyncio.run(support_guard.check("input", text))
    assert not verdict.blocked, (text, verdict)


def test_routing_takes_its_classifier_examples_from_the_deployment(tmp_path):
    routing = {"tiers": {"small": "scripted"}}
    engine = ScriptedEngine(served_model="scripted", max_model_len=256)
    with TestClient(create_app(load_settings(data_dir=tmp_path, rails=False, routing=routing, deployment="support"), engine=engine)) as api:
        classifier = api.app.state.settings.routing.classifier
    support = load_deployment(DEPLOYMENTS, "support").routing_examples
    assert classifier.escalation == support.escalation and classifier.routine == support.routine
    general = load_deployment(DEPLOYMENTS, "general").routing_examples
    assert general.escalation != support.escalation
    # Examples the operator gives win.
    own = {"tiers": {"small": "scripted"}, "classifier": {"escalation": ["help now"], "routine": ["hello"]}}
    settings = load_settings(data_dir=tmp_path / "own", rails=False, routing=own, deployment="support")
    with TestClient(create_app(settings, engine=ScriptedEngine(served_model="scripted", max_model_len=256))):
        assert settings.routing.classifier.escalation == ["help now"]


def test_a_deployment_without_routing_examples_needs_the_operators(tmp_path):
    own = tmp_path / "bare"
    own.mkdir()
    (own / "deployment.yaml").write_text("description: bare\n")
    settings = load_settings(data_dir=tmp_path / "data", deployments_dir=tmp_path, deployment="bare", rails=False, routing={"tiers": {"small": "scripted"}})
    with pytest.raises(ConfigError, match="routing_examples"):
        create_app(settings, engine=ScriptedEngine(served_model="scripted", max_model_len=256))


def test_a_broken_deployment_rails_file_names_itself(tmp_path):
    rails = tmp_path / "rails"
    shutil.copytree(DEPLOYMENTS / "support" / "rails", rails)
    (rails / "config.yml").write_text("rails: [unclosed\n")
    with pytest.raises(ConfigError, match="config.yml is not valid YAML"):
        Guard([RAILS, rails], Metrics())
