"""Image references parse and normalise as docker does; bad ones are usage errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from microagent.errors import EXIT_USAGE, UsageError
from microagent.images.references import (
    ImageReference,
    LocalImageSource,
    is_loopback_host,
    parse_image_source,
    parse_reference,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("ubuntu", "docker.io/library/ubuntu:latest"),
        ("ubuntu:24.04", "docker.io/library/ubuntu:24.04"),
        ("library/ubuntu", "docker.io/library/ubuntu:latest"),
        ("docker.io/library/ubuntu:24.04", "docker.io/library/ubuntu:24.04"),
        ("index.docker.io/library/ubuntu", "docker.io/library/ubuntu:latest"),
        ("user/app", "docker.io/user/app:latest"),
        ("ghcr.io/org/team/app:v1.2", "ghcr.io/org/team/app:v1.2"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/app:dev", "localhost:5000/app:dev"),
        ("127.0.0.1:5000/x/y:tag", "127.0.0.1:5000/x/y:tag"),
        ("Registry/app", "Registry/app:latest"),
        (f"ubuntu@{DIGEST}", f"docker.io/library/ubuntu@{DIGEST}"),
        (f"ubuntu:24.04@{DIGEST}", f"docker.io/library/ubuntu:24.04@{DIGEST}"),
        ("a.b-c/d__e_f.g-h", "a.b-c/d__e_f.g-h:latest"),
    ],
)
def test_normalisation(text: str, normalised: str) -> None:
    assert str(parse_reference(text)) == normalised


def test_digest_is_what_the_manifest_endpoint_is_asked_for() -> None:
    ref = parse_reference(f"127.0.0.1:5000/app:1@{DIGEST}")
    assert ref.reference == DIGEST
    assert ref.tag == "1"
    assert parse_reference("app").reference == "latest"


def test_docker_hub_uses_its_api_host_over_https() -> None:
    ref = parse_reference("ubuntu")
    assert ref.api_host == "registry-1.docker.io"
    assert not ref.plain_http


@pytest.mark.parametrize(
    ("domain", "plain"),
    [("localhost", True), ("localhost:5000", True), ("127.0.0.1:5000", True),
     ("127.1.2.3", True), ("[::1]:5000", True), ("ghcr.io", False),
     ("10.0.0.1:5000", False), ("localhost.example.com", False)],
)
def test_plain_http_only_for_loopback(domain: str, plain: bool) -> None:
    assert is_loopback_host(domain) is plain
    assert ImageReference(domain, "x", "latest", None).plain_http is plain


@pytest.mark.parametrize(
    "text",
    ["", " ubuntu", "UPPER", "ubuntu:", "ubuntu:bad tag", "ubuntu@sha256:short",
     "ubuntu@md5:" + "a" * 32, "a//b", "-lead/x", "x/Y", "ubuntu:" + "t" * 129,
     "a/" + "b" * 260, "host:port/x", "ubuntu@", "a_b.c/x"],
)
def test_bad_references_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_reference(text)
    assert info.value.exit_code == EXIT_USAGE
    assert "invalid image reference" in info.value.message


def test_local_sources(tmp_path: Path) -> None:
    oci = parse_image_source(f"oci:{tmp_path}/layout:v1")
    assert oci == LocalImageSource("oci", tmp_path / "layout", "v1")
    assert parse_image_source(f"oci:{tmp_path}/layout") == LocalImageSource(
        "oci", tmp_path / "layout", None)
    archive = parse_image_source(f"docker-archive:{tmp_path}/img.tar")
    assert archive == LocalImageSource("docker-archive", tmp_path / "img.tar", None)
    assert str(oci) == f"oci:{tmp_path}/layout:v1"
    with pytest.raises(UsageError):
        parse_image_source("oci:")
