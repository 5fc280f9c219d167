"""Start-up checks of `enclave serve` and the key/model commands; no engine is loaded."""

from __future__ import annotations

import json
import os
import shutil

from server.config import PROJECT_ROOT
from tests.e2e.conftest import enclave


def env_with(**values: str) -> dict[str, str]:
    return {**os.environ, **values}


def test_serve_refuses_non_loopback_without_keys(tmp_path):
    done = enclave("serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path), timeout=60)
    assert done.returncode == 2
    assert "without API keys" in done.stderr and "enclave keys create" in done.stderr


def test_serve_with_unprepared_model_says_what_to_run(tmp_path):
    done = enclave("serve", "--data-dir", str(tmp_path), env=env_with(ENCLAVE_MODELS_DIR=str(tmp_path / "empty")), timeout=60)
    assert done.returncode == 2
    assert "enclave models prepare smollm2-135m-instruct" in done.stderr


def test_serve_with_corrupt_model_says_what_to_run(tmp_path):
    model = tmp_path / "models" / "smollm2-135m-instruct"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"truncated")
    (model / "enclave-manifest.json").write_text(json.dumps({"files": {"model.safetensors": "0" * 64}}))
    done = enclave("serve", "--data-dir", str(tmp_path), env=env_with(ENCLAVE_MODELS_DIR=str(tmp_path / "models")), timeout=60)
    assert done.returncode == 2
    assert "corrupt" in done.stderr and "--force" in done.stderr


def test_serve_with_invalid_setting_names_the_key(tmp_path):
    done = enclave("serve", "--data-dir", str(tmp_path), env=env_with(ENCLAVE_PORT="eighty"), timeout=60)
    assert done.returncode == 2
    assert "ENCLAVE_PORT" in done.stderr


def test_serve_with_broken_rails_stops_with_a_message_naming_them(tmp_path):
    rails = tmp_path / "rails"
    shutil.copytree(PROJECT_ROOT / "rails", rails, ignore=shutil.ignore_patterns("__pycache__"))
    (rails / "flows.co").write_text((rails / "flows.co").read_text() + "\ndefine subflow broken\n  if\n")
    done = enclave("serve", "--data-dir", str(tmp_path), env=env_with(ENCLAVE_RAILS_DIR=str(rails)), timeout=120)
    assert done.returncode == 2
    assert "guardrails: the configuration in" in done.stderr and str(rails) in done.stderr


def test_unknown_model_profile_lists_known_ones(tmp_path):
    done = enclave("models", "path", "gpt-5", timeout=60)
    assert done.returncode == 2 and "smollm2-135m-instruct" in done.stderr


def test_models_path_prints_checkpoint_dir(tmp_path):
    done = enclave("models", "path", "smollm2", env=env_with(ENCLAVE_MODELS_DIR=str(tmp_path)), timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == str(tmp_path / "smollm2-135m-instruct")


def test_keys_create_list_revoke(tmp_path):
    created = enclave("keys", "create", "--tenant", "t1", "--user", "u1", "--scope", "chat", "--data-dir", str(tmp_path))
    record = json.loads(created.stdout)
    assert record["key"].startswith("sk-enclave-") and record["scopes"] == ["chat"]
    stored = (tmp_path / "keys.json").read_text()
    assert record["key"] not in stored  # only the hash is kept
    listed = json.loads(enclave("keys", "list", "--data-dir", str(tmp_path)).stdout)
    assert [r["id"] for r in listed] == [record["id"]]
    assert enclave("keys", "revoke", record["id"], "--data-dir", str(tmp_path)).returncode == 0
    assert enclave("keys", "revoke", record["id"], "--data-dir", str(tmp_path)).returncode == 2


def test_keys_default_to_an_end_users_scopes_and_can_be_narrowed(tmp_path):
    env = env_with(ENCLAVE_TOOL_PACKS='["support"]')
    record = json.loads(enclave("keys", "create", "--tenant", "t1", "--user", "u1", "--data-dir", str(tmp_path), env=env).stdout)
    assert record["scopes"] == ["chat", "embeddings", "models", "knowledge", "memory", "usage", "tools:support"]
    legacy = json.loads(enclave("keys", "create", "--tenant", "t1", "--user", "ops", "--scope", "*", "--data-dir", str(tmp_path)).stdout)
    narrowed = enclave("keys", "scopes", legacy["id"], "--scope", "chat", "--scope", "actions", "--data-dir", str(tmp_path))
    assert narrowed.returncode == 0, narrowed.stderr
    listed = {r["id"]: r["scopes"] for r in json.loads(enclave("keys", "list", "--data-dir", str(tmp_path)).stdout)}
    assert listed[legacy["id"]] == ["chat", "actions"]
    assert enclave("keys", "scopes", legacy["id"], "--data-dir", str(tmp_path)).returncode == 2  # no scopes given
    typo = enclave("keys", "create", "--tenant", "t1", "--user", "u2", "--scope", "chats", "--data-dir", str(tmp_path))
    assert typo.returncode == 2 and "unknown scope(s): chats" in typo.stderr


def test_tools_check_passes_the_shipped_packs_and_fails_a_leaky_one(tmp_path):
    fine = enclave("tools", "check", "--data-dir", str(tmp_path), timeout=120)
    assert fine.returncode == 0 and "0 finding(s)" in fine.stdout, fine.stdout + fine.stderr
    leaky = enclave("tools", "check", "--pack", "tests.server.leaky_tools", "--data-dir", str(tmp_path), timeout=120)
    assert leaky.returncode == 1 and "crossing: leaky_tools.read_note" in leaky.stdout, leaky.stdout + leaky.stderr
