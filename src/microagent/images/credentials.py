"""Registry credentials: the files docker and podman write, and registry challenges.

A registry asks for credentials with ``WWW-Authenticate`` challenges, parsed here by
:func:`parse_www_authenticate`; :func:`load_credentials` finds what to answer with.

Sources, in order; the first file with an entry for the host wins:

1. the file named by ``REGISTRY_AUTH_FILE`` (podman, skopeo, buildah);
2. ``$DOCKER_CONFIG/config.json`` (``DOCKER_CONFIG`` defaults to ``~/.docker``).

Both use ``{"auths": {KEY: {"auth": base64("user:pass")}}}``; ``"username"`` and
``"password"`` keys are accepted too. A KEY may be ``host``, ``https://host``,
``http://host`` or ``https://host/v1/``; Docker Hub's is ``https://index.docker.io/v1/``
and serves ``docker.io``, ``index.docker.io`` and ``registry-1.docker.io``.

Not supported yet: ``identitytoken`` entries and credential helpers (``credsStore``,
``credHelpers``). A file that names a helper for the host, or whose entry for the host
has no inline secret (which is what ``docker login`` writes when a ``credsStore`` holds
the secret), ends the search with no credentials: the pull is tried anonymously.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microagent.errors import HostError, UsageError

AUTH_FILE_ENV = "REGISTRY_AUTH_FILE"
DOCKER_CONFIG_ENV = "DOCKER_CONFIG"
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


@dataclass(frozen=True)
class Credentials:
    """A user name and password (or token) for one registry."""

    username: str
    password: str = field(repr=False)


def credential_files() -> list[Path]:
    """The files searched for credentials, in order of precedence."""
    files = []
    auth_file = os.environ.get(AUTH_FILE_ENV)
    if auth_file:
        files.append(Path(auth_file).expanduser())
    docker_config = os.environ.get(DOCKER_CONFIG_ENV)
    base = Path(docker_config).expanduser() if docker_config else Path.home() / ".docker"
    files.append(base / "config.json")
    return files


def load_credentials(host: str) -> Credentials | None:
    """The credentials for registry ``host`` (``host[:port]``), or None for anonymous."""
    for path in credential_files():
        document = _read_config(path)
        if document is None:
            continue
        found, credentials = credentials_from_config(document, host, source=path)
        if found:
            return credentials
    return None


def credentials_from_config(
    document: dict[str, Any], host: str, *, source: Path
) -> tuple[bool, Credentials | None]:
    """Look ``host`` up in one parsed config file.

    Returns ``(found, credentials)``: ``found`` is True when the file has an entry (or a
    credential helper) for the host, which ends the search even if ``credentials`` is
    None because the secret lives where we cannot read it yet.
    """
    auths = document.get("auths", {})
    helpers = document.get("credHelpers", {})
    if not isinstance(auths, dict) or not isinstance(helpers, dict):
        raise _malformed(source, '"auths" and "credHelpers" must be JSON objects')
    key = find_auth_key(auths, host)
    if key is not None:
        entry = auths[key]
        if not isinstance(entry, dict):
            raise _malformed(source, f"the entry for {host} is not a JSON object")
        return True, _inline_credentials(entry, host, source)
    return find_auth_key(helpers, host) is not None, None


def find_auth_key(entries: dict[str, Any], host: str) -> str | None:
    """The key of ``entries`` that names ``host``; an exact key beats a URL form."""
    if host in entries:
        return host
    wanted = normalize_registry_host(host)
    for key in entries:
        if normalize_registry_host(key) == wanted:
            return key
    return None


def normalize_registry_host(key: str) -> str:
    """``https://Host:5000/v1/`` -> ``host:5000``; every Docker Hub alias -> ``docker.io``."""
    text = key.strip()
    for scheme in ("https://", "http://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme) :]
            break
    text = text.split("/", 1)[0].lower()
    return "docker.io" if text in _DOCKER_HUB_HOSTS else text


@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header; scheme and names in lower case."""

    scheme: str
    params: Mapping[str, str]


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_SCHEME = re.compile(rf"[\s,]*({_TOKEN})(?=[\s,]|$)")
_PARAM = re.compile(rf'[\s,]*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*(?:,|$)')
_TOKEN68 = re.compile(r"\s+[A-Za-z0-9._~+/-]+=*\s*(?:,|$)")


def parse_www_authenticate(headers: str | Iterable[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` values (RFC 7235) into challenges, in order.

    Quoted values may hold commas and backslash escapes
    (``scope="repository:a/b:pull,push"``); one header may carry several challenges.
    A token68 (``Negotiate abc==``) and parts that cannot be parsed are skipped.
    """
    found: list[tuple[str, dict[str, str]]] = []
    for header in [headers] if isinstance(headers, str) else headers:
        pos, open_challenge = 0, False
        while pos < len(header):
            if open_challenge:
                param = _PARAM.match(header, pos)
                if param:
                    name, quoted, bare = param.groups()
                    value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
                    found[-1][1][name.lower()] = value
                    pos = param.end()
                    continue
            scheme = _SCHEME.match(header, pos)
            if scheme:
                found.append((scheme.group(1).lower(), {}))
                open_challenge = True
                token68 = _TOKEN68.match(header, scheme.end())
                pos = token68.end() if token68 else scheme.end()
                continue
            comma = header.find(",", pos)
            if comma < 0:
                break
            pos = comma + 1
    return [Challenge(scheme, params) for scheme, params in found]


def _inline_credentials(entry: dict[str, Any], host: str, source: Path) -> Credentials | None:
    encoded = entry.get("auth")
    if encoded:
        why = f'the "auth" of {host} is not base64 of "user:password"'
        if not isinstance(encoded, str):
            raise _malformed(source, why)
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as e:
            raise _malformed(source, why) from e
        username, sep, password = decoded.partition(":")
        if not sep or not username:
            raise _malformed(source, why)
        return Credentials(username, password)
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(secret, str) and name:
        return Credentials(name, secret)
    return None


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise _malformed(path, "it is not UTF-8 text") from e
    except OSError as e:
        raise HostError(f"cannot read registry credentials file {path}: {e.strerror}") from e
    try:
        document = json.loads(text)
    except ValueError as e:
        raise _malformed(path, f"it is not valid JSON ({e})") from e
    if not isinstance(document, dict):
        raise _malformed(path, "it is not a JSON object")
    return document


def _malformed(path: Path, why: str) -> UsageError:
    return UsageError(
        f"registry credentials file {path} is malformed: {why}",
        hint='expected {"auths": {"HOST": {"auth": "<base64 of user:password>"}}}',
    )
