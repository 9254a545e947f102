"""What a user sees when a registry is missing, down, failing or serving bad content.

Tests named ``..._fake_registry...`` use an in-process stand-in for a misbehaving
registry, which the real one cannot be made to imitate.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.errors import (
    EXIT_FAILURE,
    EXIT_RETRYABLE,
    IntegrityError,
    NotFoundError,
    RegistryError,
    RetryableError,
    UnreachableError,
)
from microagent.images.blobs import BlobStore
from microagent.images.credentials import Credentials
from microagent.images.registry import OCI_MANIFEST, RegistryClient
from microagent.layout import StateLayout
from tests.support.push import push_layout
from tests.support.registry import FakeRegistry, RunningRegistry

BLOB = b"layer bytes " * 1000
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
MANIFEST = b'{"schemaVersion": 2, "mediaType": "%s"}' % OCI_MANIFEST.encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()


def _client(host: str, credentials: Credentials | None = None) -> RegistryClient:
    return RegistryClient(host, plain_http=True, credentials=credentials, max_attempts=3,
                          backoff_base=0.01)


def _blob_path(repository: str, digest: str = BLOB_DIGEST) -> str:
    return f"/v2/{repository}/blobs/{digest}"


def _requests_for(fake: FakeRegistry, path: str) -> int:
    return sum(1 for p, _ in fake.requests if p == path)


def _assert_nothing_cached(layout: StateLayout) -> None:
    store = BlobStore(layout)
    assert not store.has(BLOB_DIGEST)
    leftovers = list(layout.blobs_dir.iterdir()) if layout.blobs_dir.exists() else []
    assert leftovers == []


@pytest.fixture
def storage() -> Iterator[FakeRegistry]:
    """A second server, standing in for the blob storage a registry redirects to."""
    fake = FakeRegistry()
    try:
        yield fake
    finally:
        fake.close()


def test_unknown_repository_is_not_found(registry: RunningRegistry) -> None:
    with _client(registry.host) as client, pytest.raises(NotFoundError) as caught:
        client.get_manifest("missing/nothing", "latest")
    error = caught.value
    assert error.exit_code == EXIT_FAILURE and error.kind == "not-found"
    assert "not found" in error.message and "missing/nothing:latest" in error.message
    assert registry.host in error.message


def test_unknown_tag_and_blob_are_not_found(registry: RunningRegistry, small_layout: Path,
                                            layout: StateLayout) -> None:
    push_layout(registry.host, "failures/small", "latest", small_layout)
    with _client(registry.host) as client:
        with pytest.raises(NotFoundError, match=r"failures/small:nope not found"):
            client.get_manifest("failures/small", "nope")
        missing = "sha256:" + "0" * 64
        with pytest.raises(NotFoundError, match=rf"failures/small@{missing} not found"):
            client.get_manifest("failures/small", missing)
        with pytest.raises(NotFoundError, match=rf"blob {missing} of failures/small not found"):
            client.fetch_blob("failures/small", missing, size=None, store=BlobStore(layout))
    _assert_nothing_cached(layout)


def test_unreachable_registry(unreachable_host: str) -> None:
    started = time.monotonic()
    client = RegistryClient(unreachable_host, plain_http=True, max_attempts=2,
                            backoff_base=0.01)
    with client, pytest.raises(UnreachableError) as caught:
        client.get_manifest("any/thing", "latest")
    error = caught.value
    assert error.exit_code == EXIT_RETRYABLE == 75 and error.kind == "unreachable"
    assert unreachable_host in error.message and "unreachable" in error.message
    assert "2 attempts" in error.message and "refused" in error.message.lower()
    assert time.monotonic() - started < 5


def test_fake_registry_blob_digest_mismatch_caches_nothing(fake_registry: FakeRegistry,
                                                           layout: StateLayout) -> None:
    path = _blob_path("bad/blob")
    fake_registry.route(path, b"tampered " + BLOB[9:])
    with _client(fake_registry.host) as client, pytest.raises(IntegrityError) as caught:
        client.fetch_blob("bad/blob", BLOB_DIGEST, size=len(BLOB), store=BlobStore(layout))
    error = caught.value
    assert error.exit_code == EXIT_FAILURE and error.kind == "integrity"
    assert "digest mismatch" in error.message and BLOB_DIGEST in error.message
    assert _requests_for(fake_registry, path) == 1  # corrupt content is not retried
    _assert_nothing_cached(layout)


def test_fake_registry_truncated_blob(fake_registry: FakeRegistry, layout: StateLayout) -> None:
    path = _blob_path("bad/blob")
    fake_registry.route(path, BLOB[:-100])
    with _client(fake_registry.host) as client, pytest.raises(IntegrityError) as caught:
        client.fetch_blob("bad/blob", BLOB_DIGEST, size=len(BLOB), store=BlobStore(layout))
    assert "truncated" in caught.value.message
    assert _requests_for(fake_registry, path) == 1
    _assert_nothing_cached(layout)


def test_fake_registry_connection_dropped_mid_blob_is_retried(fake_registry: FakeRegistry,
                                                              layout: StateLayout) -> None:
    big = bytes(range(256)) * (12 << 10)  # 3 MiB: a whole chunk arrives before the drop
    digest = "sha256:" + hashlib.sha256(big).hexdigest()
    path = _blob_path("flaky/blob", digest)
    fake_registry.route(path, big, drop_first=2)
    progress: list[int] = []
    with _client(fake_registry.host) as client:
        cached = client.fetch_blob("flaky/blob", digest, size=len(big),
                                   store=BlobStore(layout), on_progress=progress.append)
    assert cached.read_bytes() == big
    assert _requests_for(fake_registry, path) == 3
    assert sum(progress) == len(big)  # the retried bytes are not counted twice
    assert list(layout.blobs_dir.iterdir()) == [cached]  # no temp files of the broken tries


def test_fake_registry_connection_dropped_every_time(fake_registry: FakeRegistry,
                                                     layout: StateLayout) -> None:
    fake_registry.route(_blob_path("flaky/blob"), BLOB, drop_first=10)
    with _client(fake_registry.host) as client, pytest.raises(UnreachableError) as caught:
        client.fetch_blob("flaky/blob", BLOB_DIGEST, size=len(BLOB), store=BlobStore(layout))
    assert caught.value.exit_code == EXIT_RETRYABLE
    assert "broke" in caught.value.message and fake_registry.host in caught.value.message
    _assert_nothing_cached(layout)


def test_fake_registry_503_twice_then_success(fake_registry: FakeRegistry,
                                              layout: StateLayout) -> None:
    manifest_path = "/v2/busy/image/manifests/latest"
    fake_registry.route(manifest_path, MANIFEST, fail_first=2,
                        headers={"Content-Type": OCI_MANIFEST})
    fake_registry.route(_blob_path("busy/image"), BLOB, fail_first=2)
    with _client(fake_registry.host) as client:
        manifest = client.get_manifest("busy/image", "latest")
        cached = client.fetch_blob("busy/image", BLOB_DIGEST, size=len(BLOB),
                                   store=BlobStore(layout))
    assert (manifest.data, manifest.digest, manifest.media_type) == \
        (MANIFEST, MANIFEST_DIGEST, OCI_MANIFEST)
    assert cached.read_bytes() == BLOB
    assert _requests_for(fake_registry, manifest_path) == 3


def test_fake_registry_503_until_the_attempts_run_out(fake_registry: FakeRegistry) -> None:
    fake_registry.route("/v2/busy/image/manifests/latest", MANIFEST, fail_first=10)
    with _client(fake_registry.host) as client, pytest.raises(RetryableError) as caught:
        client.get_manifest("busy/image", "latest")
    assert caught.value.exit_code == EXIT_RETRYABLE
    assert "503" in caught.value.message and "try again" in caught.value.message
    assert "3 attempts" in caught.value.message


def test_fake_registry_manifest_digest_mismatch(fake_registry: FakeRegistry) -> None:
    fake_registry.route(f"/v2/bad/image/manifests/{MANIFEST_DIGEST}", MANIFEST + b" ",
                        headers={"Content-Type": OCI_MANIFEST})
    fake_registry.route("/v2/bad/image/manifests/latest", MANIFEST,
                        headers={"Content-Type": OCI_MANIFEST,
                                 "Docker-Content-Digest": BLOB_DIGEST})
    with _client(fake_registry.host) as client:
        with pytest.raises(IntegrityError, match=f"mismatch .* expected {MANIFEST_DIGEST}"):
            client.get_manifest("bad/image", MANIFEST_DIGEST)
        with pytest.raises(IntegrityError, match=f"expected {BLOB_DIGEST}"):
            client.get_manifest("bad/image", "latest")


def test_fake_registry_generic_content_type_uses_the_documents_media_type(
        fake_registry: FakeRegistry) -> None:
    fake_registry.route("/v2/plain/image/manifests/latest", MANIFEST,
                        headers={"Content-Type": "application/json; charset=utf-8"})
    with _client(fake_registry.host) as client:
        assert client.get_manifest("plain/image", "latest").media_type == OCI_MANIFEST


def test_fake_registry_unexpected_status_is_a_registry_error(
        fake_registry: FakeRegistry) -> None:
    fake_registry.route("/v2/odd/image/manifests/latest", status=400,
                        body=b'{"errors": [{"code": "DENIED", "message": "odd request"}]}')
    with _client(fake_registry.host) as client, pytest.raises(RegistryError) as caught:
        client.get_manifest("odd/image", "latest")
    assert caught.value.exit_code == EXIT_FAILURE and caught.value.kind == "registry"
    assert "400" in caught.value.message and "odd request" in caught.value.message


def test_fake_registry_redirect_keeps_credentials_home(storage: FakeRegistry,
                                                       layout: StateLayout) -> None:
    registry = FakeRegistry(basic_auth=("user", "pass"))
    try:
        path = _blob_path("redirected/image")
        registry.route(path, status=307, headers={"Location": f"{storage.url}/store/blob"})
        storage.route("/store/blob", BLOB)
        with _client(registry.host, credentials=Credentials("user", "pass")) as client:
            cached = client.fetch_blob("redirected/image", BLOB_DIGEST, size=len(BLOB),
                                       store=BlobStore(layout))
        assert cached.read_bytes() == BLOB
        sent = [headers for p, headers in registry.requests if p == path]
        assert [h.get("Authorization") for h in sent] == [None, "Basic dXNlcjpwYXNz"]
        assert [p for p, _ in storage.requests] == ["/store/blob"]
        assert "Authorization" not in storage.requests[0][1]
    finally:
        registry.close()


def test_fake_registry_untrusted_tls_certificate(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRegistry(tls_dir=tmp_path)
    try:
        fake.route("/v2/tls/image/manifests/latest", MANIFEST,
                   headers={"Content-Type": OCI_MANIFEST})
        client = RegistryClient(fake.host, plain_http=False, max_attempts=3, backoff_base=5)
        started = time.monotonic()
        with client, pytest.raises(RegistryError) as caught:
            client.get_manifest("tls/image", "latest")
        error = caught.value
        assert not isinstance(error, UnreachableError)
        assert "TLS certificate" in error.message and fake.host in error.message
        assert "SSL_CERT_FILE" in error.hint
        assert time.monotonic() - started < 5  # a certificate problem is not retried
        # the system trust store decides: trust the certificate there and it works
        monkeypatch.setenv("SSL_CERT_FILE", str(fake.cert_path))
        with RegistryClient(fake.host, plain_http=False) as client:
            assert client.get_manifest("tls/image", "latest").digest == MANIFEST_DIGEST
    finally:
        fake.close()
