"""Deployments: what the server is for, chosen by one setting (ENCLAVE_DEPLOYMENT).

A deployment is a directory, deployments/<name>/, holding:

* `deployment.yaml`: a description, `settings` (defaults under the operator's own: the
  settings file, ENCLAVE_* variables and flags all win over them) and, optionally, the
  `routing_examples` the routing classifier starts from;
* `rails/` (optional): guardrails on top of the base configuration in rails/. Its
  config.yml replaces the base's values key by key (mappings merge, lists are replaced
  whole, so a deployment states each stage's complete list of flows); its flows.co
  replaces the base's flows and bot messages of the same name (the refusal voice).
* `agents/` and `workflows/` (optional): one YAML file each, served as the models
  `agent:<name>` and `workflow:<name>` (server/agents, server/workflows; `load_named`).

`general` (the default) is a general-purpose assistant: every safety rail, no topic
scoping, no tool pack. `support` is the customer-support desk. Operators add their own
directories beside them (ENCLAVE_DEPLOYMENTS_DIR) or in place of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.errors import ConfigError

# A plain directory name: no path separators, no leading dot.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class RoutingExamples(BaseModel):
    model_config = ConfigDict(extra="forbid")

    escalation: list[str] = Field(min_length=1)
    routine: list[str] = Field(min_length=1)


class _DeploymentFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    settings: dict[str, Any] = Field(default_factory=dict)
    routing_examples: RoutingExamples | None = None


@dataclass(frozen=True)
class Deployment:
    name: str
    path: Path
    description: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    routing_examples: RoutingExamples | None = None

    @property
    def rails_dir(self) -> Path | None:
        rails = self.path / "rails"
        return rails if rails.is_dir() else None


Named = TypeVar("Named", bound=BaseModel)


def load_named(deployment_dir: Path, folder: str, model: type[Named], what: str) -> dict[str, Named]:
    """The things a deployment declares one YAML file each in `folder/` (its agents, its
    workflows), by their `name`; none without the folder. ConfigError naming the file
    for anything wrong."""
    out: dict[str, Named] = {}
    if not (deployment_dir / folder).is_dir():
        return out
    for path in sorted((deployment_dir / folder).glob("*.yaml")):
        try:
            item = model.model_validate(yaml.safe_load(path.read_text()) or {})
        except (yaml.YAMLError, ValidationError) as exc:
            raise ConfigError(f"{what} file {path.name} (deployment {deployment_dir.name}) is invalid: {exc}") from None
        name = item.name  # type: ignore[attr-defined]
        if name in out:
            raise ConfigError(f"{what} file {path.name}: a {what} named {name!r} is declared twice")
        out[name] = item
    return out


def available(deployments_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in deployments_dir.glob("*/deployment.yaml"))


def load_deployment(deployments_dir: Path, name: str) -> Deployment:
    """The deployment `name`; ConfigError naming the setting and what exists otherwise."""
    if not NAME.fullmatch(name):
        raise ConfigError(f"invalid settings: deployment (ENCLAVE_DEPLOYMENT): {name!r} is not a deployment name")
    path = deployments_dir / name
    spec = path / "deployment.yaml"
    if not spec.is_file():
        known = ", ".join(available(deployments_dir)) or "none"
        raise ConfigError(f"no deployment named {name!r} in {deployments_dir} (ENCLAVE_DEPLOYMENT; deployments: {known})")
    try:
        data = _DeploymentFile.model_validate(yaml.safe_load(spec.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"deployment {name}: {spec.name} is invalid: {exc}") from None
    if "deployment" in data.settings or "deployments_dir" in data.settings:
        raise ConfigError(f"deployment {name}: its settings cannot choose a deployment")
    return Deployment(name, path, data.description, data.settings, data.routing_examples)
