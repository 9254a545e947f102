"""Registry fixtures: real registries on loopback, and a fake one that misbehaves.

``registry``, ``auth_registry`` and ``token_registry`` are Debian's ``docker-registry``
(the reference distribution implementation) started once per session on a free port
with storage in a temporary directory: anonymous, htpasswd basic auth, and bearer tokens
from :class:`TokenServer`, a token service in this process whose RS256 JWTs the registry
verifies against the issuer's certificate (the real Docker Hub flow).

``fake_registry`` serves canned answers the real registry cannot be made to give:
content that does not match its digest, truncated or broken-off bodies, 503s, and
redirects, an untrusted TLS certificate. ``unreachable_host`` is a loopback port nobody
listens on.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
    from cryptography.x509 import Certificate

USERNAME = "user"
PASSWORD = "pass"
TOKEN_SERVICE = "microagent-test-registry"
TOKEN_ISSUER = "microagent-test-issuer"
START_TIMEOUT = 20.0


def free_port() -> int:
    """A loopback port that was free a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RunningRegistry:
    """A docker-registry process serving on ``host``; its files are under ``root``."""

    host: str
    root: Path
    username: str | None = None
    password: str | None = None
    token_server: TokenServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def credentials(self) -> tuple[str, str] | None:
        if self.username is None or self.password is None:
            return None
        return self.username, self.password

    @property
    def log(self) -> Path:
        return self.root / "registry.log"


class _PortTaken(Exception):
    pass


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = _log_tail(log)
            if "address already in use" in tail:
                raise _PortTaken
            raise RuntimeError(f"docker-registry exited with {process.returncode}:\n{tail}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/v2/", timeout=1.0).status_code in (200, 401):
                return
        time.sleep(0.05)
    raise RuntimeError(f"docker-registry did not answer on {url} within {START_TIMEOUT}s:\n"
                       f"{_log_tail(log)}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextlib.contextmanager
def run_registry(root: Path, auth: dict[str, Any] | None = None) -> Iterator[str]:
    """Run docker-registry with storage under ``root`` until the block ends; yield host."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.skip("docker-registry is not installed (apt install docker-registry)")
    root.mkdir(parents=True, exist_ok=True)
    log = root / "registry.log"
    for _ in range(3):
        host = f"127.0.0.1:{free_port()}"
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text"},
            "storage": {"filesystem": {"rootdirectory": str(root / "storage")},
                        "delete": {"enabled": True}},
            # no http.debug section, so no debug server on another port
            "http": {"addr": host, "secret": secrets.token_hex(16)},
        }
        if auth:
            config["auth"] = auth
        config_path = root / "config.yml"
        config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        with log.open("ab") as log_file:
            process = subprocess.Popen(
                [binary, "serve", str(config_path)], stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            )
        try:
            _wait_ready(process, f"http://{host}", log)
        except _PortTaken:
            _stop(process)
            continue
        except BaseException:
            _stop(process)
            raise
        try:
            yield host
        finally:
            _stop(process)
        return
    raise RuntimeError(f"docker-registry could not bind a free port:\n{_log_tail(log)}")


def self_signed_certificate(common_name: str) -> tuple[RSAPrivateKey, Certificate]:
    """An RSA key and a self-signed CA certificate for it, valid for 127.0.0.1 too."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


class TokenServer:
    """A token service: basic credentials in, RS256 JWTs the registry verifies out.

    It refuses requests without the right credentials with 401, and counts the tokens it
    issued (``issued``) so that tests can see the client's token cache at work.
    """

    def __init__(self, directory: Path, username: str, password: str) -> None:
        from cryptography.hazmat.primitives import serialization

        self.username, self.password = username, password
        self.issued = 0
        self._key, cert = self_signed_certificate(TOKEN_ISSUER)
        self.cert_path = directory / "token-issuer.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def issue(self, subject: str, scopes: list[str]) -> str:
        """A JWT granting ``subject`` the actions asked for in ``scopes``."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {"iss": TOKEN_ISSUER, "sub": subject, "aud": TOKEN_SERVICE, "exp": now + 300,
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}." \
                        f"{_b64url(json.dumps(claims).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        self.issued += 1
        return f"{signing_input}.{_b64url(signature)}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self
        expected = "Basic " + base64.b64encode(
            f"{self.username}:{self.password}".encode()).decode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                if self.headers.get("Authorization") != expected:
                    _send_json(self, 401, {"errors": [{"code": "UNAUTHORIZED",
                                                       "message": "bad credentials"}]})
                    return
                token = server.issue(server.username, query.get("scope", []))
                _send_json(self, 200, {"token": token, "access_token": token,
                                       "expires_in": 300})

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _send_json(handler: BaseHTTPRequestHandler, status: int, document: Any,
               headers: dict[str, str] | None = None) -> None:
    body = json.dumps(document).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """An anonymous plain-HTTP registry for the session."""
    root = tmp_path_factory.mktemp("registry")
    with run_registry(root) as host:
        yield RunningRegistry(host=host, root=root)


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """A registry with htpasswd (bcrypt) basic auth for ``user``/``pass``."""
    root = tmp_path_factory.mktemp("auth-registry")
    htpasswd = root / "htpasswd"
    line = subprocess.run(["htpasswd", "-Bbn", USERNAME, PASSWORD], check=True,
                          capture_output=True, text=True).stdout.strip()
    htpasswd.write_text(line + "\n")
    auth = {"htpasswd": {"realm": "microagent-test", "path": str(htpasswd)}}
    with run_registry(root, auth) as host:
        yield RunningRegistry(host=host, root=root, username=USERNAME, password=PASSWORD)


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """A registry with bearer-token auth; the token service wants ``user``/``pass``."""
    root = tmp_path_factory.mktemp("token-registry")
    tokens = TokenServer(root, USERNAME, PASSWORD)
    try:
        auth = {"token": {"realm": tokens.url, "service": TOKEN_SERVICE,
                          "issuer": TOKEN_ISSUER, "rootcertbundle": str(tokens.cert_path)}}
        with run_registry(root, auth) as host:
            yield RunningRegistry(host=host, root=root, username=USERNAME, password=PASSWORD,
                                  token_server=tokens)
    finally:
        tokens.close()


@pytest.fixture
def unreachable_host() -> str:
    """``127.0.0.1:PORT`` where nothing listens."""
    return f"127.0.0.1:{free_port()}"


@dataclass
class FakeRoute:
    """A canned answer of :class:`FakeRegistry` to GETs of one path."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    fail_first: int = 0  # answer 503 (Retry-After: 0) this many times first
    drop_first: int = 0  # send half the body and hang up this many times first


class FakeRegistry:
    """An in-process stand-in for a misbehaving registry, plain HTTP on loopback.

    Answers ``/v2/`` and the routes added with :meth:`route`; 404 otherwise. With
    ``basic_auth`` every request needs those credentials; with ``tls_dir`` it speaks
    HTTPS with a self-signed certificate written there (``cert_path``). Records every
    request's path and headers in ``requests``.
    """

    def __init__(self, basic_auth: tuple[str, str] | None = None,
                 tls_dir: Path | None = None) -> None:
        self.routes: dict[str, FakeRoute] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._expected = None if basic_auth is None else \
            "Basic " + base64.b64encode(":".join(basic_auth).encode()).decode()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self.url = f"http://{self.host}"
        self.cert_path: Path | None = None
        if tls_dir is not None:
            self._serve_tls(tls_dir)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    def _serve_tls(self, directory: Path) -> None:
        import ssl

        from cryptography.hazmat.primitives import serialization

        key, cert = self_signed_certificate("microagent fake registry")
        self.cert_path = directory / "fake-registry.pem"
        key_path = directory / "fake-registry.key"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, key_path)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://{self.host}"

    def route(self, path: str, body: bytes = b"", **options: Any) -> FakeRoute:
        """Answer GET ``path`` with ``body`` (and the :class:`FakeRoute` options)."""
        self.routes[path] = FakeRoute(body=body, **options)
        return self.routes[path]

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                fake.requests.append((path, dict(self.headers.items())))
                if fake._expected and self.headers.get("Authorization") != fake._expected:
                    _send_json(self, 401, {"errors": [{"code": "UNAUTHORIZED"}]},
                               {"WWW-Authenticate": 'Basic realm="fake"'})
                    return
                route = fake.routes.get(path)
                if route is None:
                    status, body = (200, {}) if path == "/v2/" else (404, {"errors": [
                        {"code": "NAME_UNKNOWN", "message": "repository name not known"}]})
                    _send_json(self, status, body)
                elif route.fail_first > 0:
                    route.fail_first -= 1
                    _send_json(self, 503, {"errors": [{"code": "UNAVAILABLE",
                                                       "message": "try again"}]},
                               {"Retry-After": "0"})
                else:
                    self._send_route(route)

            def _send_route(self, route: FakeRoute) -> None:
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                if route.drop_first > 0:
                    route.drop_first -= 1
                    self.wfile.write(route.body[: len(route.body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(route.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def fake_registry() -> Iterator[FakeRegistry]:
    """A fresh :class:`FakeRegistry` for one test."""
    fake = FakeRegistry()
    try:
        yield fake
    finally:
        fake.close()
