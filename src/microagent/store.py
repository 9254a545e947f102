"""Records on disk: atomic JSON with a schema version, file locks, private modes.

Every record is written to a temporary file in the same directory, fsynced and renamed
over the old one, so a reader sees the old record or the new one, never half of one.
Locks are ``flock`` locks on files under ``locks/``: the kernel drops them when the
holder dies, so a killed command never leaves a workspace locked.

The state directory is private: every directory microagent makes is 0700 and every file
0600, whatever the umask (:func:`ensure_dir`, :func:`open_private`), and
:func:`check_state_dir` refuses a state directory that another user could write in
(another user's base disk would boot as root's next workspace).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from shlex import quote
from typing import Any

from microagent.errors import BusyError, HostError, MicroagentError, UsageError

SCHEMA_VERSION = 1
# the state directory's own levels that check_state_dir looks at (relative to its root)
_CHECKED = ("", "images", "images/blobs", "images/blobs/sha256", "images/disks", "kernels",
            "volumes", "workspaces", "locks", "tmp")


def ensure_dir(path: Path) -> Path:
    """Create ``path`` and any missing parents, each mode 0700 whatever the umask; return it.

    (``Path.mkdir(parents=True)`` gives the parents 0777 less the umask: 0777 under
    ``umask 000``.) Directories that exist are left as they are.
    """
    missing: list[Path] = []
    probe = path
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)  # masked by the umask: never wider than 0700
        except FileExistsError:
            if not directory.is_dir():
                raise HostError(f"cannot create directory {directory}: a file is "
                                "in the way") from None
            continue
        except OSError as e:
            raise HostError(f"cannot create directory {directory}: {e.strerror}") from e
        os.chmod(directory, 0o700)
    return path


def open_private(path: Path, flags: int) -> int:
    """``os.open`` of ``path`` with ``O_CREAT``, mode 0600 whatever the umask; an fd."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o7777 != 0o600:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_state_dir(root: Path) -> None:
    """Refuse a state directory that another user can write in, or that is not ours.

    Looks at the root and its fixed top levels (``images``, ``images/blobs``, ...,
    ``workspaces``, ``locks``, ``tmp``): about ten ``stat`` calls, run once per command.
    Deeper directories are made 0700 by microagent itself, inside these.
    Raises UsageError when the root is not a directory, HostError otherwise.
    """
    me = os.geteuid()
    writable: list[str] = []
    foreign: list[tuple[str, int]] = []
    for relative in _CHECKED:
        path = root / relative if relative else root
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue  # made 0700 when first needed (or refused then, if it cannot be)
        except OSError as e:
            raise HostError(f"cannot inspect the state directory {path}: {e.strerror}") from e
        if not stat.S_ISDIR(st.st_mode):
            if not relative:
                raise UsageError(f"the state directory {root} is not a directory",
                                 hint="pass a directory with --state-dir or MICROAGENT_HOME")
            raise HostError(f"{path} in the state directory is not a directory",
                            hint="move it away: microagent keeps a directory there")
        if st.st_uid != me:
            foreign.append((str(path), st.st_uid))
        elif st.st_mode & 0o022:
            writable.append(str(path))
    if foreign:
        owned, uid = foreign[0]
        raise HostError(
            f"the state directory {owned} belongs to uid {uid}, not to you (uid {me}): "
            "its owner could replace the images and disks your workspaces boot",
            hint="use a state directory of your own (--state-dir or MICROAGENT_HOME), or "
                 f"take it over: chown -R {me} {quote(str(root))} && "
                 f"chmod -R go-w {quote(str(root))}")
    if writable:
        raise HostError(
            f"the state directory is writable by other users: {', '.join(writable)} "
            "(they could replace the images and disks your workspaces boot)",
            hint=f"make it private: chmod go-rwx {' '.join(map(quote, writable))}")


def write_json_atomic(path: Path, document: dict[str, Any], *, durable: bool = True) -> None:
    """Write ``document`` (plus ``schema``) to ``path`` atomically, mode 0600; fsynced
    unless not ``durable`` (state that means nothing after a host crash, e.g. a running
    supervisor's status, rewritten several times per boot). A full file system is a
    HostError that says so (the old record stays)."""
    ensure_dir(path.parent)
    payload = json.dumps({"schema": SCHEMA_VERSION, **document}, indent=2, sort_keys=True)
    import tempfile  # lazily: it imports random, which costs every command ~5 ms

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(fd, 0o600)  # mkstemp's 0600 is masked by the umask too
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
    fd = open_private(path, os.O_RDWR)
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


def check_state_dir_usable(root: Path) -> None:
    """Refuse a state directory that is not a directory or cannot be created, before a
    command reads it (a file there used to read as an empty state: "No workspaces.").

    UsageError (exit 2) when ``root`` or one of its parents is not a directory: the path
    given is wrong and nothing was done. HostError (exit 1) when ``root`` is missing and
    its nearest existing parent does not let this user create it: the path is fine, the
    host's permissions are not. A missing ``root`` is created by the first command that
    writes.
    """
    probe = root
    while True:
        try:
            st = os.stat(probe)
            break
        except (FileNotFoundError, NotADirectoryError):
            if probe.parent == probe:
                return
            probe = probe.parent
        except OSError as e:
            raise HostError(f"cannot use the state directory {root}: {e.strerror}") from e
    hint = "pass a directory with --state-dir or MICROAGENT_HOME (one that does not exist " \
           "yet is created)"
    if probe == root:
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"the state directory {root} is not a directory", hint=hint)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"the state directory {root} cannot be created: {probe} is not a "
                         "directory", hint=hint)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise HostError(f"the state directory {root} cannot be created: {probe} is not "
                        "writable", hint="pick a state directory you can write, or fix the "
                        f"permissions of {probe}")


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
            import shutil

            return shutil.disk_usage(path).free
    return 0


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"
