"""Image references, parsed and normalised the way docker does.

``ubuntu`` means ``docker.io/library/ubuntu:latest``; ``user/app`` means
``docker.io/user/app:latest``; a first component with a ``.`` or ``:`` (or ``localhost``)
is a registry host, optionally with a port; ``name@sha256:<hex>`` pins a digest.
Registries on ``localhost`` and 127.0.0.0/8 are spoken to over plain HTTP, like docker.

Two local sources serve air-gapped hosts: ``oci:PATH[:TAG]`` (an OCI image layout
directory) and ``docker-archive:PATH[:REPO:TAG]`` (a ``docker save`` tar).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from microagent.errors import UsageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = re.compile(rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*")
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_MAX_NAME = 255


@dataclass(frozen=True)
class ImageReference:
    """A normalised registry reference: ``domain/path[:tag][@digest]``."""

    domain: str
    path: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        text = f"{self.domain}/{self.path}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def name(self) -> str:
        """``domain/path`` without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def reference(self) -> str:
        """What to ask the manifest endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def api_host(self) -> str:
        """The host[:port] that serves the distribution API for this reference."""
        return DOCKER_HUB_API if self.domain == DOCKER_HUB else self.domain

    @property
    def plain_http(self) -> bool:
        """True for loopback registries, which docker reaches over plain HTTP."""
        return is_loopback_host(self.domain)


@dataclass(frozen=True)
class LocalImageSource:
    """An image on the local file system: an OCI layout or a ``docker save`` archive."""

    kind: str  # "oci" or "docker-archive"
    path: Path
    tag: str | None = None

    def __str__(self) -> str:
        text = f"{self.kind}:{self.path}"
        return f"{text}:{self.tag}" if self.tag else text


ImageSource = ImageReference | LocalImageSource


def is_loopback_host(domain: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ``[::1]``, with or without a port."""
    host = domain
    if host.startswith("["):
        host = host[1 : host.index("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_reference(text: str) -> ImageReference:
    """Parse and normalise a registry reference, or raise UsageError saying why."""
    original = text
    if not text or text != text.strip():
        raise _bad(original, "it is empty or has surrounding spaces")
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise _bad(original, "the digest must be sha256: and 64 lowercase hex digits")
    tag = None
    last = text.rsplit("/", 1)[-1]
    if ":" in last:
        text, tag = text.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise _bad(original, f"{tag!r} is not a valid tag")
    domain, path = _split_domain(text)
    if not _DOMAIN.fullmatch(domain):
        raise _bad(original, f"{domain!r} is not a valid registry host")
    components = path.split("/")
    if not all(_PATH_COMPONENT.fullmatch(c) for c in components):
        raise _bad(original, "repository names are lowercase letters, digits and separators")
    if len(f"{domain}/{path}") > _MAX_NAME:
        raise _bad(original, f"the name is longer than {_MAX_NAME} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageReference(domain=domain, path=path, tag=tag, digest=digest)


def parse_image_source(text: str) -> ImageSource:
    """Parse ``oci:PATH[:TAG]``, ``docker-archive:PATH`` or a registry reference."""
    for kind in ("oci", "docker-archive"):
        prefix = f"{kind}:"
        if text.startswith(prefix):
            # Like skopeo: the path ends at the first colon; what follows names the image
            # inside (a tag, or REPO:TAG in a docker archive).
            rest, sep, tag_text = text[len(prefix) :].partition(":")
            tag = tag_text if sep and tag_text else None
            if not rest:
                raise _bad(text, f"{prefix} needs a path")
            return LocalImageSource(kind=kind, path=Path(rest).expanduser().absolute(), tag=tag)
    return parse_reference(text)


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    is_domain = sep and (
        "." in first or ":" in first or first == "localhost" or first.lower() != first
    )
    if not is_domain:
        domain, path = DOCKER_HUB, name
    else:
        domain, path = first, rest
    if domain == "index.docker.io":
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return domain, path


def _bad(text: str, why: str) -> UsageError:
    return UsageError(
        f"invalid image reference {text!r}: {why}",
        hint="use NAME[:TAG] or NAME@sha256:DIGEST, e.g. docker.io/library/ubuntu:24.04",
    )
