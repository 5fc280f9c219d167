from __future__ import annotations

from pathlib import Path

import pytest

from server.config import load_settings
from server.errors import ConfigError
from server.profiles import expand_path, find_profile


def test_load_settings_precedence_flag_over_env_over_file(tmp_path, monkeypatch):
    config = tmp_path / "enclave.yaml"
    config.write_text("port: 9001\nhost: 127.0.0.2\nmax_request_bytes: 4096\n")
    monkeypatch.setenv("ENCLAVE_PORT", "9002")
    settings = load_settings(config)
    assert (settings.port, settings.host, settings.max_request_bytes) == (9002, "127.0.0.2", 4096)
    assert load_settings(config, port=9003).port == 9003


def test_load_settings_rejects_unknown_file_key(tmp_path):
    config = tmp_path / "enclave.yaml"
    config.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_settings(config)


def test_keys_file_defaults_into_data_dir(tmp_path):
    assert load_settings(data_dir=tmp_path).resolved_keys_file == tmp_path / "keys.json"


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False), ("10.1.2.3", False)])
def test_is_loopback(host, loopback):
    assert load_settings(host=host).is_loopback is loopback


def test_expand_path_supports_shell_defaults(monkeypatch):
    monkeypatch.delenv("ENCLAVE_LLAMA_DIR", raising=False)
    assert expand_path("${ENCLAVE_LLAMA_DIR:-/models/llama}") == Path("/models/llama")
    monkeypatch.setenv("ENCLAVE_LLAMA_DIR", "/mnt/w")
    assert expand_path("${ENCLAVE_LLAMA_DIR:-/models/llama}") == Path("/mnt/w")


def test_profiles_resolve_by_alias():
    settings = load_settings()
    assert find_profile(settings.profiles_dir, "smollm2").name == "smollm2-135m-instruct"
    llama = find_profile(settings.profiles_dir, "llama-3.1-8b")
    assert llama.tier == "large" and llama.device == "gpu" and llama.source.kind == "local_dir"
