"""A client for the OCI distribution API: manifests and blobs, with auth and retries.

One :class:`RegistryClient` talks to one registry host. Every request is tried
anonymously first; a 401 names the scheme in ``WWW-Authenticate``: ``Basic`` is answered
with the user's credentials, ``Bearer`` with a token fetched from the challenge's realm
(the Docker Hub flow) and cached per repository scope for the client's life.

Failures become the errors of :mod:`microagent.errors` at this boundary, never an httpx
traceback: refused auth is :class:`AuthError`, an unknown name or tag
:class:`NotFoundError`, a registry that cannot be reached (after retries with
exponential backoff) :class:`UnreachableError`, 429 and 5xx that persist
:class:`RetryableError`, content that does not hash to its digest :class:`IntegrityError`
(never retried, never cached).
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from microagent import __version__
from microagent.errors import (
    AuthError,
    IntegrityError,
    NotFoundError,
    RegistryError,
    RetryableError,
    UnreachableError,
    UsageError,
)
from microagent.images.blobs import BlobStore, check_digest
from microagent.images.credentials import Challenge, Credentials, parse_www_authenticate

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ACCEPT_MANIFESTS: tuple[str, ...] = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST,
                                     DOCKER_MANIFEST_LIST)

CHUNK_SIZE = 1 << 20
MAX_MANIFEST_BYTES = 4 << 20  # containerd's limit: a bigger "manifest" is an attack
MAX_REDIRECTS = 5
MAX_RETRY_AFTER = 10.0  # seconds; a longer Retry-After is not worth waiting for here
MAX_BACKOFF = 8.0
_GENERIC_TYPES = frozenset({"", "application/json", "text/plain", "application/octet-stream",
                            "binary/octet-stream"})
_NOT_FOUND_CODES = frozenset({"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"})
_USER_AGENT = f"microagent/{__version__}"

T = TypeVar("T")


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest or index exactly as served, with its media type and verified digest."""

    data: bytes
    media_type: str
    digest: str


class RegistryClient:
    """A synchronous client of one registry's distribution API (``/v2/``)."""

    def __init__(self, host: str, *, plain_http: bool, credentials: Credentials | None = None,
                 max_attempts: int = 4, backoff_base: float = 0.5, timeout: float = 30.0) -> None:
        self.host = host
        self.credentials = credentials
        self.max_attempts = max(1, max_attempts)
        self.backoff_base = backoff_base
        try:
            self._base = httpx.URL(f"{'http' if plain_http else 'https'}://{host}")
        except httpx.InvalidURL as e:
            raise UsageError(f"invalid registry host {host!r}: {e}") from e
        self._client = httpx.Client(timeout=timeout, verify=ssl.create_default_context(),
                                    follow_redirects=False, headers={"User-Agent": _USER_AGENT})
        self._tokens: dict[str, str] = {}
        self._basic = False

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._client.close()

    def get_manifest(self, repository: str, reference: str) -> FetchedManifest:
        """Fetch a manifest or index by tag or digest; verify its digest."""
        pinned = ":" in reference
        if pinned:
            check_digest(reference)
        subject = f"manifest {repository}{'@' if pinned else ':'}{reference}"

        def read(response: httpx.Response) -> tuple[bytes, httpx.Headers]:
            return _read_limited(response, MAX_MANIFEST_BYTES, subject), response.headers

        data, headers = self._fetch(
            f"/v2/{repository}/manifests/{reference}", repository, subject, read,
            {"Accept": ", ".join(ACCEPT_MANIFESTS)},
        )
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        # a pinned reference must match; so must the registry's own claim, when it makes one
        claims = [reference if pinned else "", headers.get("Docker-Content-Digest", "")]
        wrong = [claim for claim in claims if claim.startswith("sha256:") and claim != digest]
        if wrong:
            raise IntegrityError(
                f"digest mismatch for {subject} from registry {self.host}: expected "
                f"{wrong[0]}, the content hashes to {digest}",
                hint="the registry served corrupt or tampered content; nothing was used",
            )
        media_type = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if media_type in _GENERIC_TYPES:
            media_type = _document_media_type(data, subject)
        return FetchedManifest(data=data, media_type=media_type, digest=digest)

    def fetch_blob(self, repository: str, digest: str, *, size: int | None, store: BlobStore,
                   on_progress: Callable[[int], None] | None = None, source: str = "") -> Path:
        """Download a blob into ``store`` (verified by digest and size); its cached path.

        A cached blob returns at once. A connection that breaks mid-body is retried
        from the start; progress is reported once per byte even across retries.
        """
        if store.has(digest):
            return store.path(digest)
        subject = f"blob {digest} of {repository}"
        reported = 0

        def ingest(response: httpx.Response) -> Path:
            seen = 0

            def progress(count: int) -> None:
                nonlocal seen, reported
                seen += count
                if on_progress is not None and seen > reported:
                    on_progress(seen - reported)
                    reported = seen

            return store.ingest(digest, response.iter_raw(CHUNK_SIZE), size=size,
                                source=source or f"{self.host}/{repository}",
                                on_progress=progress)

        # identity: the digest covers the stored bytes, not a decoded transfer
        return self._fetch(f"/v2/{repository}/blobs/{digest}", repository, subject, ingest,
                           {"Accept-Encoding": "identity"})

    # plumbing: body retries > status checks > status retries > auth > redirects

    def _fetch(self, path: str, repository: str, subject: str,
               consume: Callable[[httpx.Response], T], headers: dict[str, str]) -> T:
        url = self._base.join(path)
        attempt = 1
        while True:
            response = self._with_retries(
                lambda: self._exchange(url, repository, headers), f"registry {self.host}")
            try:
                self._check(response, repository, subject)
                return consume(response)
            except httpx.TransportError as e:
                if attempt >= self.max_attempts:
                    raise UnreachableError(
                        f"the connection to registry {self.host} broke while downloading "
                        f"{subject} ({attempt} attempts): {_reason(e)}",
                        hint="check the network, then retry",
                    ) from e
            except httpx.HTTPError as e:
                raise RegistryError(
                    f"registry {self.host} sent an unreadable answer for {subject}: "
                    f"{_reason(e)}") from e
            finally:
                response.close()
            time.sleep(self._backoff(attempt))
            attempt += 1

    def _with_retries(self, send: Callable[[], httpx.Response], what: str) -> httpx.Response:
        attempt = 1
        while True:
            try:
                response = send()
            except httpx.TransportError as e:
                _raise_if_tls_failure(e, what)
                if attempt >= self.max_attempts:
                    raise UnreachableError(
                        f"{what} is unreachable ({attempt} attempts): {_reason(e)}",
                        hint="check the host name, the network and that the registry is "
                        "running, then retry",
                    ) from e
                delay = self._backoff(attempt)
            else:
                status = response.status_code
                if status != 429 and status < 500:
                    return response
                if attempt >= self.max_attempts:
                    message = _error_message(response)
                    response.close()
                    raise RetryableError(
                        f"{what} answered {status} {response.reason_phrase} "
                        f"({attempt} attempts): {message}",
                        hint="the registry is overloaded or failing; retry later",
                    )
                delay = _retry_after(response) or self._backoff(attempt)
                response.close()
            time.sleep(delay)
            attempt += 1

    def _exchange(self, url: httpx.URL, repository: str, headers: dict[str, str]) -> httpx.Response:
        response = self._get(url, repository, headers)
        if response.status_code != 401 or not _same_origin(response.url, self._base):
            return response
        challenges = parse_www_authenticate(response.headers.get_list("WWW-Authenticate"))
        message = _error_message(response)
        response.close()
        self._authenticate(challenges, repository, message)
        return self._get(url, repository, headers)  # a second 401 is refused by _check

    def _get(self, url: httpx.URL, repository: str, headers: dict[str, str]) -> httpx.Response:
        authorization = self._authorization(repository)
        for _ in range(MAX_REDIRECTS + 1):
            request_headers = dict(headers)
            # blobs redirect to storage elsewhere: the registry's credentials stay home
            if authorization and _same_origin(url, self._base):
                request_headers["Authorization"] = authorization
            request = self._client.build_request("GET", url, headers=request_headers)
            response = self._client.send(request, stream=True)
            if not response.is_redirect:
                return response
            response.close()
            url = response.url.join(response.headers["Location"])
        raise RegistryError(f"registry {self.host} redirected more than {MAX_REDIRECTS} "
                            f"times, last to {url}")

    def _authorization(self, repository: str) -> str | None:
        token = self._tokens.get(_pull_scope(repository))
        if token:
            return f"Bearer {token}"
        if self._basic and self.credentials is not None:
            return _basic_authorization(self.credentials)
        return None

    def _authenticate(self, challenges: list[Challenge], repository: str, message: str) -> None:
        for challenge in challenges:
            if challenge.scheme == "bearer" and "realm" in challenge.params:
                self._tokens[_pull_scope(repository)] = self._fetch_token(challenge, repository)
                return
        if any(c.scheme == "basic" for c in challenges):
            if self.credentials is None or self._basic:
                raise self._refused(repository, message)
            self._basic = True
            return
        schemes = ", ".join(c.scheme for c in challenges) or "none"
        raise RegistryError(f"registry {self.host} asked for authentication microagent does "
                            f"not support (schemes: {schemes})")

    def _fetch_token(self, challenge: Challenge, repository: str) -> str:
        realm = challenge.params["realm"]
        params = {"scope": challenge.params.get("scope") or _pull_scope(repository)}
        if "service" in challenge.params:
            params["service"] = challenge.params["service"]
        headers = {}
        if self.credentials is not None:
            params["account"] = self.credentials.username
            headers["Authorization"] = _basic_authorization(self.credentials)
        try:
            url = httpx.URL(realm).copy_merge_params(params)
        except httpx.InvalidURL as e:
            raise RegistryError(f"registry {self.host} named an invalid token realm {realm!r}") \
                from e
        if url.scheme not in ("http", "https"):
            raise RegistryError(f"registry {self.host} named an invalid token realm {realm!r}")
        what = f"the token service {realm} of registry {self.host}"
        request = self._client.build_request("GET", url, headers=headers)
        response = self._with_retries(lambda: self._client.send(request, stream=True), what)
        try:
            if response.status_code in (401, 403):
                raise self._refused(repository, _error_message(response))
            if response.status_code != 200:
                raise RegistryError(f"{what} answered {response.status_code} "
                                    f"{response.reason_phrase}: {_error_message(response)}")
            body = _read_limited(response, 1 << 20, f"the answer of {what}")
        except httpx.HTTPError as e:
            raise UnreachableError(f"{what} broke off its answer: {_reason(e)}") from e
        finally:
            response.close()
        try:
            document = json.loads(body)
            token = document.get("token") or document.get("access_token")
        except (ValueError, AttributeError) as e:
            raise RegistryError(f"{what} answered with something that is not a token") from e
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{what} answered without a token")
        return token

    def _check(self, response: httpx.Response, repository: str, subject: str) -> None:
        status = response.status_code
        if status == 200:
            return
        errors = _registry_errors(response)
        message = "; ".join(m for _, m in errors) or response.reason_phrase
        if status == 404 or _NOT_FOUND_CODES & {code for code, _ in errors}:
            raise NotFoundError(f"{subject} not found on registry {self.host}",
                                hint="check the repository name and the tag or digest")
        if status in (401, 403):
            raise self._refused(repository, message)
        raise RegistryError(f"registry {self.host} answered {status} {response.reason_phrase} "
                            f"for {subject}: {message}")

    def _refused(self, repository: str, message: str) -> AuthError:
        said = f" (the registry said: {message})" if message else ""
        files = "~/.docker/config.json ($DOCKER_CONFIG/config.json) or the file named by " \
                "REGISTRY_AUTH_FILE"
        if self.credentials is None:
            return AuthError(
                f"registry {self.host} refused anonymous access to {repository}: the "
                f"repository does not exist or needs credentials{said}",
                hint=f"if it needs credentials, put them for {self.host} in {files}",
            )
        return AuthError(
            f"registry {self.host} refused the credentials of user "
            f"{self.credentials.username!r} for {repository}{said}",
            hint=f"check the user name and password for {self.host} in {files}",
        )

    def _backoff(self, attempt: int) -> float:
        return float(min(self.backoff_base * 2 ** (attempt - 1), MAX_BACKOFF))


def _pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def _basic_authorization(credentials: Credentials) -> str:
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    defaults = {"http": 80, "https": 443}
    return (a.scheme, a.host, a.port or defaults.get(a.scheme)) == \
        (b.scheme, b.host, b.port or defaults.get(b.scheme))


def _retry_after(response: httpx.Response) -> float | None:
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return seconds if 0 <= seconds <= MAX_RETRY_AFTER else None


def _read_limited(response: httpx.Response, limit: int, subject: str) -> bytes:
    data = bytearray()
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) > limit:
            raise RegistryError(f"{subject} is larger than {limit} bytes; refusing it")
    return bytes(data)


def _registry_errors(response: httpx.Response) -> list[tuple[str, str]]:
    """The ``(code, message)`` pairs of a distribution API error body, if any."""
    try:
        document: Any = json.loads(_read_limited(response, 1 << 16, "error"))
        return [(str(e.get("code", "")), str(e.get("message", "")))
                for e in document["errors"] if isinstance(e, dict)]
    except (httpx.HTTPError, RegistryError, ValueError, KeyError, TypeError):
        return []


def _error_message(response: httpx.Response) -> str:
    errors = _registry_errors(response)
    return "; ".join(m for _, m in errors if m) or response.reason_phrase


def _document_media_type(data: bytes, subject: str) -> str:
    try:
        document = json.loads(data)
    except ValueError as e:
        raise RegistryError(f"{subject} is not valid JSON") from e
    if not isinstance(document, dict):
        raise RegistryError(f"{subject} is not a JSON object")
    media_type = document.get("mediaType")
    if isinstance(media_type, str) and media_type:
        return media_type
    return OCI_INDEX if "manifests" in document else OCI_MANIFEST


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _raise_if_tls_failure(error: httpx.TransportError, what: str) -> None:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise RegistryError(
                f"the TLS certificate of {what} could not be verified: {cause.verify_message}",
                hint="add the registry's CA certificate to the system trust store "
                "(or point SSL_CERT_FILE at it)",
            ) from error
        cause = cause.__cause__ or cause.__context__
