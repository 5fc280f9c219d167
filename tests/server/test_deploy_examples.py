"""The deployment examples (deploy/, docs/deployment.md) stay in step with the code: they
parse, and every ENCLAVE_* variable and routing block they show is a setting the server
accepts."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from server.config import Settings
from server.profiles import load_profiles
from server.routing import RoutingConfig

ROOT = Path(__file__).resolve().parents[2]
PROFILES = load_profiles(ROOT / "models")
# ENCLAVE_* names the server reads: its settings, and the ${VARS} of profiles' paths.
KNOWN = {"ENCLAVE_" + name.upper() for name in Settings.model_fields} | {
    var for p in PROFILES.values() for var in re.findall(r"\$\{(\w+)", p.source.path or "")
}


def _check_env(env: object) -> dict[str, str]:
    """The ENCLAVE_* variables an example sets, each known; the model a profile's name."""
    if isinstance(env, dict):
        pairs = {k: str(v) for k, v in env.items()}
    else:  # Kubernetes: a list of {name, value | valueFrom}
        pairs = {item["name"]: str(item.get("value", "")) for item in env or []}
    used = {k: v for k, v in pairs.items() if k.startswith("ENCLAVE_")}
    assert used and set(used) <= KNOWN, set(used) - KNOWN
    assert used["ENCLAVE_MODEL"] in PROFILES
    return used


def test_the_compose_example_sets_only_real_settings():
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    enclave = compose["services"]["enclave"]
    used = _check_env(enclave["environment"])
    assert {"ENCLAVE_UPSTREAMS", "ENCLAVE_DATABASE_URL", "ENCLAVE_CHROMA_URL", "ENCLAVE_KEYS_FILE"} <= set(used)
    assert enclave["deploy"]["replicas"] >= 2 and "/ready" in " ".join(enclave["healthcheck"]["test"])


def test_the_kubernetes_example_sets_only_real_settings():
    documents = list(yaml.safe_load_all((ROOT / "deploy/kubernetes.yaml").read_text()))
    kinds = {(d["kind"], d["metadata"]["name"]) for d in documents}
    assert {("Deployment", "enclave"), ("StatefulSet", "vllm-70b"), ("StatefulSet", "chroma")} <= kinds
    enclave = next(d for d in documents if d["kind"] == "Deployment")
    container = enclave["spec"]["template"]["spec"]["containers"][0]
    _check_env(container["env"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    vllm = next(d for d in documents if d["metadata"]["name"] == "vllm-70b" and d["kind"] == "StatefulSet")
    assert "--tensor-parallel-size=4" in vllm["spec"]["template"]["spec"]["containers"][0]["args"]


def test_the_routing_examples_are_valid_settings():
    for doc in ("README.md", "docs/deployment.md"):
        text = (ROOT / doc).read_text()
        blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL) if "routing:" in b]
        assert blocks, doc
        for block in blocks:
            routing = RoutingConfig.model_validate(yaml.safe_load(block.replace("…", "more"))["routing"])
            assert set(routing.tiers.values()) <= set(PROFILES), routing.tiers
