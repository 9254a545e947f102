"""Records on disk: atomic JSON with a schema version, and file locks.

Every record is written to a temporary file in the same directory, fsynced and renamed
over the old one, so a reader sees the old record or the new one, never half of one.
Locks are ``flock`` locks on files under ``locks/``: the kernel drops them when the
holder dies, so a killed command never leaves a workspace locked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from microagent.errors import BusyError, HostError, MicroagentError

SCHEMA_VERSION = 1


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 if missing; return it."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise HostError(f"cannot create directory {path}: {e.strerror}") from e
    return path


def write_json_atomic(path: Path, document: dict[str, Any], *, durable: bool = True) -> None:
    """Write ``document`` (plus ``schema``) to ``path`` atomically, mode 0600; fsynced
    unless not ``durable`` (state that means nothing after a host crash, e.g. a running
    supervisor's status, rewritten several times per boot). A full file system is a
    HostError that says so (the old record stays)."""
    ensure_dir(path.parent)
    payload = json.dumps({"schema": SCHEMA_VERSION, **document}, indent=2, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(payload + "\n")
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = (write_error(e, f"cannot write {path}", path.parent)
                if isinstance(e, OSError) and is_no_space(e) else None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full is not None:
            raise full from e
        raise
    if durable:
        fsync_dir(path.parent)


def read_json(path: Path) -> dict[str, Any]:
    """Read a record written by :func:`write_json_atomic`, checking its schema."""
    try:
        with path.open(encoding="utf-8") as f:
            document = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise MicroagentError(f"cannot read record {path}: {e}") from e
    if not isinstance(document, dict):
        raise MicroagentError(f"record {path} is not a JSON object")
    schema = document.get("schema")
    if schema != SCHEMA_VERSION:
        raise MicroagentError(
            f"record {path} has schema {schema!r}, this microagent reads {SCHEMA_VERSION}",
            hint="upgrade microagent, or remove the record",
        )
    return document


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path, *, what: str, timeout: float = 0.0) -> Iterator[None]:
    """Hold an exclusive flock on ``path``; raise BusyError after ``timeout`` seconds.

    ``what`` names the locked object in the error ("workspace research").
    """
    ensure_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BusyError(
                        f"{what} is busy: another microagent command holds its lock",
                        hint="wait for the other command to finish, then retry",
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(e: OSError) -> bool:
    """Whether ``e`` says the file system is full or the disk quota is used up."""
    return e.errno in NO_SPACE


def write_error(e: OSError, doing: str, directory: Path) -> HostError:
    """The HostError for ``doing`` (e.g. "cannot store blob X") failing with ``e`` while
    writing in ``directory``: :func:`no_space_error` when it ran out of space."""
    if is_no_space(e):
        return no_space_error(doing, directory, quota=e.errno == errno.EDQUOT)
    return HostError(f"{doing}: {e.strerror or e}")


def no_space_error(doing: str, directory: Path, *, quota: bool = False,
                   needed: int | None = None) -> HostError:
    """A HostError that says the host file system of ``directory`` is full, with its free
    space (and ``needed`` bytes, when known), not what the write was for."""
    free = _mib(_free_bytes(directory))
    if quota:
        what = f"the disk quota is used up in {directory} ({free} free on its file system)"
    elif needed is not None:
        what = (f"the host file system has too little room in {directory} ({free} free, "
                f"about {_mib(needed)} needed)")
    else:
        what = f"the host file system is full in {directory} ({free} free)"
    return HostError(f"{doing}: {what}",
                     hint="free some space there (microagent image rm, delete unused "
                     "workspaces) or use a --state-dir on a bigger file system, then retry")


def _free_bytes(directory: Path) -> int:
    for path in (directory, *directory.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(path).free
    return 0


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"
