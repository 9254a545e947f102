"""Files in the guest through its agent: the ``get``, ``put``, ``stat``, ``list``,
``remove`` and ``mkdir`` operations of ``docs/protocol.md``, one stream each over an
:class:`~microagent.vm.agent.AgentClient` (to the agent, or through the supervisor's relay).

File contents stream both ways within the peer's credit, one frame (at most 64 KiB) at a
time, so neither side holds more than a window of a file whatever its size; a listing
comes the same way, as JSON lines. What the guest refuses is an :class:`AgentFileError`
carrying the agent's errno name (``ENOENT``, ``ENOTEMPTY``...); :func:`as_api_error`
turns it into the class of the error tree a caller of the public API expects.
"""

from __future__ import annotations

import io
import json
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from microagent.errors import AgentFileError as AgentFileError
from microagent.errors import (
    ConflictError,
    MicroagentError,
    NotFoundError,
    UnresponsiveError,
    UsageError,
)
from microagent.vm.protocol import (
    FLAG_END,
    Frame,
    FrameType,
    ProtocolError,
    decode_credit,
    encode,
    encode_credit,
    encode_json,
)

IDLE_LIMIT = 60.0  # no frame of the stream for this long: the guest is unresponsive
KINDS = frozenset({"file", "dir", "symlink", "other"})
Sink = Callable[[bytes], object]


class Channel(Protocol):
    """What the file operations need of a connection to the agent: the
    :class:`~microagent.vm.agent.AgentClient` after its HELLO."""

    peer: dict[str, Any]
    peer_window: int
    max_payload: int
    next_stream: int
    pending: list[Frame]

    def send(self, data: bytes) -> None: ...

    def read_frame(self, deadline: float | None) -> Frame: ...


# The error tree's class for an errno name; the others stay AgentFileError.
_API_ERRORS: dict[str, type[MicroagentError]] = {
    "ENOENT": NotFoundError,
    "EEXIST": ConflictError,
    "ENOTEMPTY": ConflictError,
    "ENOTDIR": ConflictError,
    "EISDIR": ConflictError,
    "EBUSY": ConflictError,
    "EINVAL": UsageError,
    "ENAMETOOLONG": UsageError,
}


def as_api_error(error: AgentFileError) -> MicroagentError:
    """The public API's error for what the guest refused: ``NotFoundError`` for a missing
    path, ``ConflictError`` for one that exists, is (not) a directory or is not empty,
    ``UsageError`` for a malformed path; anything else (``EACCES``, ``ENOSPC``...) is
    ``error`` itself. Meant for ``raise as_api_error(e) from e``."""
    cls = _API_ERRORS.get(error.code)
    return error if cls is None else cls(error.message, error.hint)


@dataclass(frozen=True)
class GuestEntry:
    """One entry of the guest's file system as ``stat`` and ``list`` describe it, with
    lstat semantics: a symlink is the link itself, ``target`` its text.

    Names and targets that are not UTF-8 hold lone surrogates (``surrogateescape``);
    passed back to the agent in a path they stand for the same bytes.
    """

    name: str
    path: str
    kind: str  # "file", "dir", "symlink" or "other"
    size: int
    mode: int  # the permission bits (0o7777)
    uid: int
    gid: int
    mtime_ns: int
    target: str | None = None  # a symlink's target

    @property
    def mtime(self) -> float:
        """The modification time in seconds since the epoch."""
        return self.mtime_ns / 1e9

    @classmethod
    def from_json(cls, doc: Any, directory: str) -> GuestEntry:
        """The entry the agent's document describes, in ``directory``. ProtocolError
        when the document lacks a field or has one of the wrong type."""
        malformed = ProtocolError(f"the guest agent sent a malformed entry: {doc!r:.200}")
        if not isinstance(doc, dict):
            raise malformed
        name, kind, target = doc.get("name"), doc.get("kind"), doc.get("target")
        numbers = [doc.get(key) for key in ("size", "mode", "uid", "gid", "mtime_ns")]
        ints = [n for n in numbers if isinstance(n, int) and not isinstance(n, bool)]
        if not isinstance(name, str) or not isinstance(kind, str) or kind not in KINDS or \
                len(ints) != len(numbers) or not (target is None or isinstance(target, str)):
            raise malformed
        size, mode, uid, gid, mtime_ns = ints
        path = directory if name == "/" else posixpath.join(directory, name)
        return cls(name, path, kind, size, mode, uid, gid, mtime_ns, target)


def require_feature(client: Channel, feature: str) -> None:
    """AgentFileError ENOTSUP when the agent's HELLO lists features without ``feature``
    (an agent older than this microagent, in a workspace started before an upgrade)."""
    features = client.peer.get("features")
    if isinstance(features, list) and feature not in features:
        raise AgentFileError("ENOTSUP", f"the guest agent ({client.peer.get('software', '?')})"
                             f" has no {feature} operation",
                             hint="restart the workspace so that it boots the current agent")


def file_error(frame: Frame) -> AgentFileError:
    doc = frame.json()
    return AgentFileError(str(doc.get("code", "EIO")), str(doc.get("message", "failed")))


def open_operation(client: Channel, operation: dict[str, Any]) -> int:
    """Send OPEN for ``operation`` on a new stream; its id."""
    stream_id = client.next_stream
    client.next_stream += 2
    client.send(encode_json(FrameType.OPEN, stream_id, operation))
    return stream_id


def frame_of(client: Channel, stream_id: int) -> Frame:
    """The next frame of ``stream_id``, answering pings and raising on a channel error;
    UnresponsiveError when none comes for IDLE_LIMIT seconds."""
    while True:
        try:
            frame = client.read_frame(time.monotonic() + IDLE_LIMIT)
        except TimeoutError as e:
            raise UnresponsiveError(f"the guest sent nothing for {IDLE_LIMIT:g}s: it is "
                                    "unresponsive (frozen, or paused)") from e
        if frame.stream == 0:
            if frame.type == FrameType.PING:
                client.send(encode(FrameType.PONG, 0, frame.payload))
            elif frame.type == FrameType.ERROR:
                raise ProtocolError(f"guest agent reported: {frame.json().get('message', '')}")
        elif frame.stream == stream_id:
            return frame


def answer_operation(client: Channel, operation: dict[str, Any]) -> dict[str, Any]:
    """Run an operation that answers with EXIT alone (STARTED frames, a long removal's
    progress, only show that the guest works); the EXIT document."""
    stream_id = open_operation(client, operation)
    while True:
        frame = frame_of(client, stream_id)
        if frame.type == FrameType.EXIT:
            return frame.json()
        if frame.type == FrameType.ERROR:
            raise file_error(frame)


def _clean(path: str) -> str:
    """``path`` as the agent takes it: trailing slashes dropped ("/" stays)."""
    return path.rstrip("/") or "/"


# --- contents ----------------------------------------------------------------------


def get_file(client: Channel, path: str, sink: Sink) -> dict[str, Any]:
    """Read the regular file ``path`` of the guest into ``sink``; return its metadata.

    The metadata is the ``STARTED`` document (``size``, ``mode``, ``uid``, ``gid``,
    ``mtime``). Raises AgentFileError with the guest's code (``ENOENT``, ``EISDIR``...).
    Credit for the FILE channel is returned once per batch of frames read, so at most
    the window is in flight: memory stays bounded whatever the file's size.
    """
    stream_id = open_operation(client, {"op": "get", "path": path})
    started: dict[str, Any] = {}
    owed = 0
    while True:
        if not client.pending and owed:
            client.send(encode_credit(stream_id, FrameType.FILE, owed))
            owed = 0
        frame = frame_of(client, stream_id)
        if frame.type == FrameType.STARTED:
            started = frame.json()
        elif frame.type == FrameType.FILE:
            if frame.payload:
                sink(frame.payload)
                owed += len(frame.payload)
        elif frame.type == FrameType.EXIT:
            return started
        elif frame.type == FrameType.ERROR:
            raise file_error(frame)


def put_file(client: Channel, path: str, read: Callable[[int], bytes], *, mode: int,
             uid: int | None = None, gid: int | None = None, parents: bool = False) -> None:
    """Write the guest file ``path`` (atomically, by the agent) from ``read(n)`` until it
    returns ``b""``; ``mode`` the permission bits, ``uid``/``gid`` None for root's;
    ``parents``: make the missing directories above it first (0755, root's).

    Sends FILE frames within the guest's credit, reading no more than a frame ahead.
    Raises AgentFileError with the guest's code (``ENOENT`` for a missing parent,
    ``EISDIR``...).
    """
    request: dict[str, Any] = {"op": "put", "path": path, "mode": mode}
    if uid is not None:
        request["uid"] = uid
    if gid is not None:
        request["gid"] = gid
    if parents:
        require_feature(client, "put_parents")
        request["parents"] = True
    _, sent_end = send_contents(client, open_operation(client, request), read)
    if not sent_end:
        raise ProtocolError(f"guest agent ended the put of {path} early")


def send_contents(client: Channel, stream_id: int, read: Callable[[int], bytes]
                  ) -> tuple[Frame, bool]:
    """Send what ``read(n)`` returns, until ``b""``, as FILE frames of ``stream_id``
    within the guest's credit (reading no more than a frame ahead), then the END frame;
    the stream's EXIT frame and whether the END frame went before it (the guest may end
    the stream first). AgentFileError for the guest's ERROR frame."""
    credit = client.peer_window
    sent_end = False
    while True:
        while not sent_end and credit > 0 and not client.pending:
            data = read(min(client.max_payload, credit))
            if data:
                credit -= len(data)
                client.send(encode(FrameType.FILE, stream_id, data))
            else:
                client.send(encode(FrameType.FILE, stream_id, b"", FLAG_END))
                sent_end = True
        frame = frame_of(client, stream_id)
        if frame.type == FrameType.CREDIT:
            data_type, increment = decode_credit(frame)
            if data_type == FrameType.FILE:
                credit += increment
        elif frame.type == FrameType.EXIT:
            return frame, sent_end
        elif frame.type == FrameType.ERROR:
            raise file_error(frame)


# --- the tree ----------------------------------------------------------------------


def stat_path(client: Channel, path: str, *, follow: bool = False) -> GuestEntry:
    """What ``path`` is (lstat: a symlink is described, not followed, unless ``follow``).
    AgentFileError ``ENOENT`` when it does not exist, ``ENOTDIR`` when a component above
    is no directory."""
    require_feature(client, "stat")
    path = _clean(path)
    doc = answer_operation(client, {"op": "stat", "path": path, "follow": follow})
    return GuestEntry.from_json(doc.get("entry"), posixpath.dirname(path))


def list_dir(client: Channel, path: str) -> list[GuestEntry]:
    """The entries of the directory ``path`` (a symlink to one is followed; the entries
    are not), sorted by name (their bytes), without ``.`` and ``..``.

    The agent sends them as JSON lines within the credit this client returns as it
    parses them, so a directory of any size comes in bounded pieces. AgentFileError
    ``ENOENT``, ``ENOTDIR`` (a file), ``EOVERFLOW`` (beyond the agent's bound on what
    one listing holds)..."""
    require_feature(client, "list")
    path = _clean(path)
    stream_id = open_operation(client, {"op": "list", "path": path})
    entries: list[GuestEntry] = []
    partial = bytearray()
    owed = 0
    while True:
        if not client.pending and owed:
            client.send(encode_credit(stream_id, FrameType.FILE, owed))
            owed = 0
        frame = frame_of(client, stream_id)
        if frame.type == FrameType.FILE and frame.payload:
            owed += len(frame.payload)
            partial += frame.payload
            cut = partial.rfind(b"\n")
            if cut >= 0:
                for line in bytes(partial[:cut]).split(b"\n"):
                    entries.append(_entry_line(line, path))
                del partial[:cut + 1]
        elif frame.type == FrameType.EXIT:
            count = frame.json().get("count")
            if partial or count != len(entries):
                raise ProtocolError(f"the listing of {path} ended after {len(entries)} of "
                                    f"{count} entries")
            return entries
        elif frame.type == FrameType.ERROR:
            raise file_error(frame)


def _entry_line(line: bytes, directory: str) -> GuestEntry:
    try:
        doc = json.loads(line)
    except ValueError as e:
        raise ProtocolError(f"the guest agent sent a malformed listing line: "
                            f"{line[:200]!r}") from e
    return GuestEntry.from_json(doc, directory)


def remove_path(client: Channel, path: str, *, recursive: bool = False) -> int:
    """Remove ``path``: a file, a symlink (never what it points to), an empty directory,
    or with ``recursive`` a whole tree (symlinks in it removed, not followed; a mount
    point in it not entered). Returns how many entries went. AgentFileError
    ``ENOENT``, ``ENOTEMPTY`` (a directory, without ``recursive``), ``EBUSY`` (``/``, a
    mount point), ``EINVAL`` (a path ending in ``.`` or ``..``)..."""
    require_feature(client, "remove")
    doc = answer_operation(client, {"op": "remove", "path": _clean(path), "recursive": recursive})
    return int(doc.get("removed", 0))


def make_dir(client: Channel, path: str, *, mode: int = 0o755,
             parents: bool = False) -> bool:
    """Make the directory ``path`` with exactly ``mode``; with ``parents`` the missing
    ones above it too (0755) and an existing directory is fine, as ``mkdir -p``. Returns
    whether ``path`` was made. AgentFileError ``EEXIST`` (it exists; with ``parents``:
    as something else than a directory), ``ENOENT`` (no parent, without ``parents``),
    ``ENOTDIR``..."""
    require_feature(client, "mkdir")
    doc = answer_operation(client, {"op": "mkdir", "path": _clean(path), "mode": mode,
                           "parents": parents})
    return bool(doc.get("created", False))


# --- the client's methods ----------------------------------------------------------


class GuestFiles:
    """The file operations as methods of :class:`~microagent.vm.agent.AgentClient` (a
    mixin), with the error tree's classes: what the guest refuses is raised as
    :func:`as_api_error` says (``NotFoundError`` for a missing path, ``ConflictError``,
    ``UsageError``, else :class:`AgentFileError` with the guest's errno text), chained to
    the :class:`AgentFileError` that carries the errno name. A guest that stops
    answering is ``UnresponsiveError``, a broken channel ``ProtocolError``."""

    def stat(self: Channel, path: str, *, follow: bool = False) -> GuestEntry:
        """What ``path`` is; a symlink is described, not followed, unless ``follow``."""
        try:
            return stat_path(self, path, follow=follow)
        except AgentFileError as e:
            raise as_api_error(e) from e

    def list_dir(self: Channel, path: str) -> list[GuestEntry]:
        """The entries of the directory ``path``, sorted by name, without ``.`` and
        ``..``; ``ConflictError`` when it is not a directory."""
        try:
            return list_dir(self, path)
        except AgentFileError as e:
            raise as_api_error(e) from e

    def remove(self: Channel, path: str, *, recursive: bool = False) -> int:
        """Remove the file, symlink or empty directory ``path`` (with ``recursive``: a
        tree); symlinks are never followed. How many entries went."""
        try:
            return remove_path(self, path, recursive=recursive)
        except AgentFileError as e:
            raise as_api_error(e) from e

    def mkdir(self: Channel, path: str, *, parents: bool = True, mode: int = 0o755) -> bool:
        """Make the directory ``path`` with exactly ``mode``; with ``parents`` (the
        default) as ``mkdir -p``. Whether ``path`` was made."""
        try:
            return make_dir(self, path, mode=mode, parents=parents)
        except AgentFileError as e:
            raise as_api_error(e) from e

    def read_file(self: Channel, path: str, sink: Sink) -> None:
        """Stream the regular file ``path`` into ``sink``, a frame at a time."""
        try:
            get_file(self, path, sink)
        except AgentFileError as e:
            raise as_api_error(e) from e

    def write_file(self: Channel, path: str, data: bytes | Callable[[int], bytes], *,
                   mode: int = 0o644, parents: bool = True) -> None:
        """Write the file ``path`` (atomically: it appears whole or not at all; root's,
        with exactly ``mode``) from ``data``, or from ``read(n)`` until it returns
        ``b""``; with ``parents`` the missing directories above it are made (0755)."""
        read = io.BytesIO(data).read if isinstance(data, bytes) else data
        try:
            put_file(self, path, read, mode=mode, parents=parents)
        except AgentFileError as e:
            raise as_api_error(e) from e
