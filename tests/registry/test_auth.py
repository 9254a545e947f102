"""Basic and bearer-token auth against real registries, with credentials from files."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import httpx
import pytest

from microagent.errors import EXIT_FAILURE, AuthError
from microagent.images.blobs import BlobStore
from microagent.images.credentials import Credentials, load_credentials
from microagent.images.registry import RegistryClient
from microagent.layout import StateLayout
from tests.support.push import push_layout
from tests.support.registry import RunningRegistry


def _auth(username: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}


def _write_docker_config(auths: dict[str, dict[str, str]]) -> Path:
    path = Path(os.environ["DOCKER_CONFIG"]) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths}))
    return path


def _pull_all(client: RegistryClient, repository: str, layout: StateLayout) -> None:
    manifest = json.loads(client.get_manifest(repository, "latest").data)
    for descriptor in [manifest["config"], *manifest["layers"]]:
        client.fetch_blob(repository, descriptor["digest"], size=descriptor["size"],
                          store=BlobStore(layout))


@pytest.fixture(scope="module")
def basic_image(auth_registry: RunningRegistry, small_layout: Path) -> str:
    repository = "auth/small"
    push_layout(auth_registry.host, repository, "latest", small_layout,
                credentials=auth_registry.credentials)
    return repository


@pytest.fixture(scope="module")
def token_image(token_registry: RunningRegistry, small_layout: Path) -> str:
    repository = "token/small"
    push_layout(token_registry.host, repository, "latest", small_layout,
                credentials=token_registry.credentials)
    return repository


def _assert_refused(error: AuthError, host: str) -> None:
    assert error.exit_code == EXIT_FAILURE
    assert error.kind == "auth"
    assert host in error.message and "refused" in error.message
    assert "~/.docker/config.json" in error.hint and "REGISTRY_AUTH_FILE" in error.hint


def test_basic_auth_with_docker_config(auth_registry: RunningRegistry, basic_image: str,
                                       layout: StateLayout) -> None:
    _write_docker_config({f"http://{auth_registry.host}": _auth("user", "pass")})
    credentials = load_credentials(auth_registry.host)
    assert credentials == Credentials("user", "pass")
    with RegistryClient(auth_registry.host, plain_http=True, credentials=credentials) as client:
        _pull_all(client, basic_image, layout)
    assert len(BlobStore(layout).digests()) == 2


def test_registry_auth_file_comes_before_docker_config(
        auth_registry: RunningRegistry, basic_image: str, layout: StateLayout,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_docker_config({auth_registry.host: _auth("user", "wrong")})
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps(
        {"auths": {auth_registry.host: {"username": "user", "password": "pass"}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    credentials = load_credentials(auth_registry.host)
    with RegistryClient(auth_registry.host, plain_http=True, credentials=credentials) as client:
        _pull_all(client, basic_image, layout)
    assert len(BlobStore(layout).digests()) == 2


def test_basic_auth_refuses_wrong_credentials(auth_registry: RunningRegistry,
                                              basic_image: str) -> None:
    client = RegistryClient(auth_registry.host, plain_http=True,
                            credentials=Credentials("user", "wrong"))
    with client, pytest.raises(AuthError) as caught:
        client.get_manifest(basic_image, "latest")
    _assert_refused(caught.value, auth_registry.host)
    assert "'user'" in caught.value.message
    assert "wrong" not in caught.value.message


def test_basic_auth_refuses_anonymous_pulls(auth_registry: RunningRegistry,
                                            basic_image: str) -> None:
    with RegistryClient(auth_registry.host, plain_http=True) as client, \
            pytest.raises(AuthError) as caught:
        client.get_manifest(basic_image, "latest")
    _assert_refused(caught.value, auth_registry.host)
    assert "anonymous" in caught.value.message


def test_bearer_tokens_with_credentials(token_registry: RunningRegistry, token_image: str,
                                        layout: StateLayout) -> None:
    tokens = token_registry.token_server
    assert tokens is not None
    issued = tokens.issued
    credentials = Credentials("user", "pass")
    with RegistryClient(token_registry.host, plain_http=True, credentials=credentials) as client:
        _pull_all(client, token_image, layout)
    assert len(BlobStore(layout).digests()) == 2
    assert tokens.issued == issued + 1  # one token for the scope, reused for every request


def test_bearer_tokens_refused_without_credentials(token_registry: RunningRegistry,
                                                   token_image: str) -> None:
    with RegistryClient(token_registry.host, plain_http=True) as client, \
            pytest.raises(AuthError) as caught:
        client.get_manifest(token_image, "latest")
    _assert_refused(caught.value, token_registry.host)


def test_bearer_tokens_refused_with_wrong_credentials(token_registry: RunningRegistry,
                                                      token_image: str) -> None:
    client = RegistryClient(token_registry.host, plain_http=True,
                            credentials=Credentials("user", "wrong"))
    with client, pytest.raises(AuthError) as caught:
        client.get_manifest(token_image, "latest")
    _assert_refused(caught.value, token_registry.host)
    assert "'user'" in caught.value.message


def test_a_token_for_another_repository_is_not_enough(token_registry: RunningRegistry,
                                                      token_image: str) -> None:
    """The registry itself checks the token's grants: a forged scope gets nowhere."""
    tokens = token_registry.token_server
    assert tokens is not None
    token = tokens.issue("user", ["repository:token/other:pull"])
    response = httpx.get(f"{token_registry.url}/v2/{token_image}/manifests/latest",
                         headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    good = tokens.issue("user", [f"repository:{token_image}:pull"])
    response = httpx.get(f"{token_registry.url}/v2/{token_image}/manifests/latest",
                         headers={"Authorization": f"Bearer {good}",
                                  "Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert response.status_code == 200
