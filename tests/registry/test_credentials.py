"""Credentials from docker's config.json and REGISTRY_AUTH_FILE: keys, precedence, errors."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from microagent.errors import EXIT_USAGE, UsageError
from microagent.images.credentials import (
    Credentials,
    credential_files,
    find_auth_key,
    load_credentials,
    normalize_registry_host,
)


def _auth(username: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}


def _docker_config(document: dict[str, Any]) -> Path:
    path = Path(os.environ["DOCKER_CONFIG"]) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def _auth_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, document: Any) -> Path:
    path = tmp_path / "auth.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(path))
    return path


@pytest.mark.parametrize(("key", "host"), [
    ("registry.example.com", "registry.example.com"),
    ("https://registry.example.com", "registry.example.com"),
    ("http://127.0.0.1:5000", "127.0.0.1:5000"),
    ("https://Registry.Example.com:5000/v1/", "registry.example.com:5000"),
    ("https://index.docker.io/v1/", "docker.io"),
    ("registry-1.docker.io", "docker.io"),
    ("docker.io", "docker.io"),
])
def test_normalize_registry_host(key: str, host: str) -> None:
    assert normalize_registry_host(key) == host


def test_an_exact_key_beats_a_url_form() -> None:
    entries: dict[str, Any] = {"https://example.com/v1/": {}, "example.com": {}}
    assert find_auth_key(entries, "example.com") == "example.com"
    assert find_auth_key({"https://example.com/v1/": {}}, "example.com") == \
        "https://example.com/v1/"
    assert find_auth_key({"example.com:5000": {}}, "example.com") is None


@pytest.mark.parametrize("host", ["registry-1.docker.io", "docker.io", "index.docker.io"])
def test_docker_hub_key_serves_every_hub_alias(host: str) -> None:
    _docker_config({"auths": {"https://index.docker.io/v1/": _auth("hubuser", "secret")}})
    assert load_credentials(host) == Credentials("hubuser", "secret")


def test_docker_config_dir_from_environment_and_home(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    assert credential_files() == [Path(os.environ["DOCKER_CONFIG"]) / "config.json"]
    monkeypatch.delenv("DOCKER_CONFIG")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert credential_files() == [tmp_path / ".docker" / "config.json"]
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    assert credential_files()[0] == tmp_path / "auth.json"


def test_passwords_may_hold_colons_and_username_password_keys_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _docker_config({"auths": {"http://a.example": _auth("u", "p:a:ss"),
                              "b.example": {"username": "bee", "password": "pw"}}})
    assert load_credentials("a.example") == Credentials("u", "p:a:ss")
    assert load_credentials("b.example") == Credentials("bee", "pw")
    assert load_credentials("c.example") is None


def test_registry_auth_file_first_then_docker_config(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _docker_config({"auths": {"a.example": _auth("docker", "1"),
                              "b.example": _auth("docker", "2")}})
    _auth_file(tmp_path, monkeypatch, {"auths": {"a.example": _auth("podman", "3")}})
    assert load_credentials("a.example") == Credentials("podman", "3")
    assert load_credentials("b.example") == Credentials("docker", "2")


def test_no_files_means_anonymous() -> None:
    assert not Path(os.environ["DOCKER_CONFIG"]).exists()
    assert load_credentials("registry.example.com") is None


@pytest.mark.parametrize("document", [
    {"auths": {"a.example": {}}, "credsStore": "desktop"},
    {"auths": {}, "credHelpers": {"a.example": "ecr-login"}},
    {"auths": {"a.example": {"auth": "", "identitytoken": "opaque"}}},
])
def test_helpers_and_identity_tokens_are_not_supported_yet(
        document: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _docker_config({"auths": {"a.example": _auth("docker", "1")}})
    _auth_file(tmp_path, monkeypatch, document)
    assert load_credentials("a.example") is None  # the first file with an entry wins


def test_credentials_do_not_show_the_password() -> None:
    assert "hunter2" not in repr(Credentials("me", "hunter2"))


@pytest.mark.parametrize(("document", "why"), [
    ("{not json", "not valid JSON"),
    ("[]", "not a JSON object"),
    ({"auths": []}, "must be JSON objects"),
    ({"auths": {"a.example": "x"}}, "not a JSON object"),
    ({"auths": {"a.example": {"auth": "%%%"}}}, "not base64"),
    ({"auths": {"a.example": {"auth": base64.b64encode(b"nocolon").decode()}}}, "not base64"),
])
def test_malformed_files_are_usage_errors_naming_the_file(
        document: Any, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _auth_file(tmp_path, monkeypatch, document)
    with pytest.raises(UsageError) as caught:
        load_credentials("a.example")
    assert caught.value.exit_code == EXIT_USAGE
    assert str(path) in caught.value.message and why in caught.value.message
