"""How an operator declares an MCP server (setting `mcp_servers`, usually in a
deployment's deployment.yaml): a label, how to reach it, and what of it may be used.

    mcp_servers:
      - label: helpdesk                       # tools:mcp:helpdesk is the scope
        command: [python, -m, helpdesk_mcp]   # stdio: the server runs as a child process
        env_from: {HELPDESK_TOKEN: HELPDESK_TOKEN}
      - label: crm
        url: http://crm.internal:8080/mcp     # streamable HTTP
        headers_from: {Authorization: CRM_MCP_AUTHORIZATION}
        allowed_tools: [find_customer, close_case]
        destructive: [close_case]             # confirmed before it runs, whatever it says
        request_headers: [X-User-Token]       # headers a request may set (the Responses mcp tool's `headers`)
        timeout_s: 10

Secrets never sit in the file: `env_from` and `headers_from` name environment variables of
the Enclave process whose values are passed on (a missing one stops start-up). A request
may send headers of its own (a user's token for the server) only where the operator
names them in `request_headers` (HTTP servers only); they are used for that request's
calls and never stored.
"""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.errors import ConfigError, InvalidRequestError

LABEL = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
HEADER = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")


class MCPServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str
    command: list[str] = Field(default_factory=list)  # stdio: the program and its arguments
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)  # plain values (no secrets)
    env_from: dict[str, str] = Field(default_factory=dict)  # variable → the Enclave variable holding its value
    url: str | None = None  # streamable HTTP endpoint
    headers: dict[str, str] = Field(default_factory=dict)
    headers_from: dict[str, str] = Field(default_factory=dict)  # header → the Enclave variable holding its value
    allowed_tools: list[str] | None = None  # None: every tool the server lists
    destructive: list[str] = Field(default_factory=list)  # confirmed before running, beside those annotated destructive
    timeout_s: float = Field(10.0, gt=0)
    rate_limits: dict[str, str] = Field(default_factory=dict)  # tool → "N/minute"
    request_headers: list[str] = Field(default_factory=list)  # headers a request may set for its own calls

    @model_validator(mode="after")
    def _one_transport(self) -> MCPServerConfig:
        if not LABEL.fullmatch(self.label):
            raise ValueError(f"MCP server label {self.label!r}: lower-case letters, digits, '-' and '_', at most 32")
        if bool(self.command) == bool(self.url):
            raise ValueError(f"MCP server `{self.label}`: give either `command` (stdio) or `url` (streamable HTTP)")
        if self.request_headers and not self.url:
            raise ValueError(f"MCP server `{self.label}`: request_headers need a `url` (a stdio server has no headers)")
        bad = [h for h in self.request_headers if not HEADER.fullmatch(h)]
        if bad:
            raise ValueError(f"MCP server `{self.label}`: request_headers {bad} are not header names")
        return self

    def request_headers_from(self, headers: Any, param: str) -> dict[str, str]:
        """A request's headers for this server, if the operator allows each; a 400 otherwise."""
        if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise InvalidRequestError(f"{param} must map header names to strings", param=param)
        allowed = {h.lower(): h for h in self.request_headers}
        refused = [k for k in headers if k.lower() not in allowed]
        if refused:
            allows = ", ".join(self.request_headers) or "none"
            raise InvalidRequestError(
                f"{param}: the MCP server `{self.label}` takes no header {', '.join(map(repr, refused))} from a request "
                f"(the operator allows: {allows}); its credentials are in the operator's configuration",
                param=param,
                code="unsupported_parameter",
            )
        return {allowed[k.lower()]: v for k, v in headers.items()}

    @property
    def pack(self) -> str:
        """The registry pack its tools form; `tools:<pack>` is their scope."""
        return f"mcp:{self.label}"

    def resolved_env(self) -> dict[str, str]:
        return self.env | {k: _secret(self.label, v) for k, v in self.env_from.items()}

    def resolved_headers(self) -> dict[str, str]:
        return self.headers | {k: _secret(self.label, v) for k, v in self.headers_from.items()}


def _secret(label: str, variable: str) -> str:
    value = os.environ.get(variable)
    if value is None:
        raise ConfigError(f"MCP server `{label}`: environment variable {variable} is not set")
    return value


def parse(raw: Any) -> list[MCPServerConfig]:
    configs = [c if isinstance(c, MCPServerConfig) else MCPServerConfig.model_validate(c) for c in raw or []]
    labels = [c.label for c in configs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"mcp_servers: labels must be unique ({', '.join(labels)})")
    return configs
