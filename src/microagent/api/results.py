"""What the public API returns: frozen dataclasses, each with ``to_json()`` where the CLI
prints the same thing as ``--json``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from microagent.errors import EXIT_TIMED_OUT, CommandFailedError


@dataclass(frozen=True)
class ExecResult:
    """How one command ended, with its whole output.

    ``exit_code`` is the command's code (127 or 126 when it could not start, as in the
    CLI), None when a signal ended it (``signal``) or its timeout did (``timed_out``).
    """

    exit_code: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    signal: int | None = None
    timed_out: bool = False
    duration_s: float = 0.0
    error: str = ""  # why the command could not start, when it could not
    # the agent's error document (code, errno, message), for to_json
    error_detail: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_agent(cls, raw: Any, stdout: bytes = b"", stderr: bytes = b"") -> ExecResult:
        """From the agent client's result (``vm/agent.ExecResult``) and the output."""
        if raw.error is not None:
            exit_code: int | None = raw.host_exit_code  # 127 or 126
            error = str(raw.error.get("message", raw.error))
        else:
            exit_code = None if (raw.timed_out or raw.signal) else raw.exit_code
            error = ""
        return cls(exit_code=exit_code, stdout=stdout, stderr=stderr, signal=raw.signal,
                   timed_out=raw.timed_out, duration_s=raw.duration_ms / 1000, error=error,
                   error_detail=dict(raw.error or {}))

    @property
    def ok(self) -> bool:
        """The command exited 0."""
        return self.exit_code == 0

    @property
    def stdout_text(self) -> str:
        """stdout as UTF-8 (undecodable bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        """stderr as UTF-8 (undecodable bytes replaced)."""
        return self.stderr.decode("utf-8", "replace")

    @property
    def duration_ms(self) -> int:
        """The duration in whole milliseconds (as ``exec --json`` prints it)."""
        return round(self.duration_s * 1000)

    @property
    def host_exit_code(self) -> int:
        """What ``microagent exec`` exits with: the code, 124 on timeout, 128+N."""
        if self.timed_out:
            return EXIT_TIMED_OUT
        if self.signal:
            return 128 + self.signal
        return self.exit_code if self.exit_code is not None else 125

    def check(self) -> ExecResult:
        """This result if the command exited 0, else CommandFailedError carrying it."""
        if self.ok:
            return self
        if self.timed_out:
            how = f"timed out after {self.duration_s:.1f}s"
        elif self.signal:
            how = f"was killed by signal {self.signal}"
        else:
            how = f"exited {self.exit_code}"
        tail = self.stderr_text.strip().splitlines()[-5:]
        detail = (": " + " | ".join(tail)) if tail else ""
        raise CommandFailedError(f"command {how}{detail}", self, self.host_exit_code)

    def to_json(self) -> dict[str, Any]:
        """The document of ``exec --json``."""
        document: dict[str, Any] = {
            "exit_code": self.host_exit_code, "signal": self.signal,
            "timed_out": self.timed_out, "duration_ms": self.duration_ms}
        document.update(text_field("stdout", self.stdout))
        document.update(text_field("stderr", self.stderr))
        if self.error:
            document["error"] = dict(self.error_detail) or {"message": self.error}
        return document


def text_field(key: str, data: bytes) -> dict[str, Any]:
    """Output as text, or base64 with a flag when it is not valid UTF-8."""
    try:
        return {key: data.decode("utf-8"), f"{key}_encoding": "utf-8"}
    except UnicodeDecodeError:
        import base64

        return {key: base64.b64encode(data).decode(), f"{key}_encoding": "base64"}


@dataclass(frozen=True)
class Readiness:
    """The four readiness signals of a workspace, with why each is or is not there."""

    guest: bool
    exec: bool
    console: bool
    network: bool
    details: Mapping[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def from_status(cls, doc: Mapping[str, Any]) -> Readiness:
        """From ``workspace_status``'s ``guestReady``... signals."""
        keys = {"guest": "guestReady", "exec": "execReady", "console": "consoleReady",
                "network": "networkReady"}
        signals = {short: doc.get(key) or {} for short, key in keys.items()}
        return cls(**{short: bool(s.get("ok")) for short, s in signals.items()},
                   details={short: str(s.get("detail", "")) for short, s in signals.items()})


@dataclass(frozen=True)
class WorkspaceStatus:
    """One workspace in full at one moment (``microagent status``)."""

    name: str
    state: str
    detail: str
    image: str | None
    backend: str | None
    profile: str | None
    memory_mib: int | None
    cpus: int | None
    disk_mib: int | None
    network: str | None
    restart: str | None
    pid: int | None
    uptime_s: float | None
    address: str | None
    ports: tuple[str, ...]
    readiness: Readiness
    error: str = ""  # a broken workspace: why its record cannot be read
    document: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_status(cls, doc: Mapping[str, Any]) -> WorkspaceStatus:
        """From ``workspace_status``'s document (kept whole for :meth:`to_json`)."""
        resources = doc.get("resources") or {}
        ports = tuple(f"{p['host_ip']}:{p['host_port']}:{p['guest_port']}/{p['protocol']}"
                      for p in doc.get("ports") or ())
        return cls(
            name=doc["name"], state=doc["state"], detail=str(doc.get("detail") or ""),
            image=doc.get("image"), backend=doc.get("backend"), profile=doc.get("profile"),
            memory_mib=resources.get("memory_mib"), cpus=resources.get("cpus"),
            disk_mib=resources.get("disk_mib"), network=doc.get("network"),
            restart=doc.get("restart"), pid=doc.get("pid"),
            uptime_s=doc.get("uptime_seconds"), address=doc.get("guest_address"),
            ports=ports, readiness=Readiness.from_status(doc),
            error=str(doc.get("error") or ""), document=doc)

    def to_json(self) -> dict[str, Any]:
        """The document of ``microagent --json status NAME``."""
        return dict(self.document)


@dataclass(frozen=True)
class FileEntry:
    """One entry of a guest directory (``ws.files.list``) or a ``stat``."""

    name: str
    path: str
    kind: str  # file, dir, symlink, other
    size: int
    mode: int  # permission bits
    mtime: float  # seconds since the epoch
    uid: int = 0
    gid: int = 0
    target: str | None = None  # a symlink's target

    @classmethod
    def from_guest(cls, entry: Any) -> FileEntry:
        """From the agent client's ``GuestEntry``."""
        return cls(entry.name, entry.path, entry.kind, entry.size, entry.mode, entry.mtime,
                   entry.uid, entry.gid, entry.target)

    def to_json(self) -> dict[str, Any]:
        """As JSON."""
        return {"name": self.name, "path": self.path, "kind": self.kind, "size": self.size,
                "mode": self.mode, "mtime": self.mtime, "uid": self.uid, "gid": self.gid,
                "target": self.target}
