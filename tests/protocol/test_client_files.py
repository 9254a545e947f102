"""The host client's file methods (``AgentClient.stat``, ``list_dir``, ``remove``,
``mkdir``, ``read_file``, ``write_file``) against the real agent: typed results, the
error tree's classes, and contents of several MiB streamed a frame at a time."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from pathlib import Path

import pytest

from microagent.errors import ConflictError, NotFoundError, UsageError
from microagent.vm.agent import AgentClient
from microagent.vm.agentfiles import AgentFileError, GuestEntry


def test_entries_are_typed_and_frozen(client: AgentClient, tmp_path: Path) -> None:
    top = f"{tmp_path}/a/b"
    assert client.mkdir(top) is True  # parents by default
    assert client.mkdir(top) is False  # and an existing directory is fine
    assert client.mkdir(f"{top}/private", parents=False, mode=0o700) is True
    client.write_file(f"{top}/new/deeper/file.txt", b"hello", mode=0o640)  # parents made
    (Path(top) / "link").symlink_to("new")
    entry = client.stat(f"{top}/new/deeper/file.txt")
    st = (Path(top) / "new" / "deeper" / "file.txt").stat()
    assert entry == GuestEntry("file.txt", f"{top}/new/deeper/file.txt", "file", 5, 0o640,
                               st.st_uid, st.st_gid, st.st_mtime_ns)
    assert entry.mtime == st.st_mtime_ns / 1e9
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.size = 0  # type: ignore[misc]
    entries = client.list_dir(top)
    assert [(e.name, e.kind, e.path) for e in entries] == [
        ("link", "symlink", f"{top}/link"), ("new", "dir", f"{top}/new"),
        ("private", "dir", f"{top}/private")]
    assert entries[0].target == "new" and entries[2].mode == 0o700
    assert client.stat(f"{top}/link", follow=True).kind == "dir"
    assert client.stat("/").name == "/" and client.stat("/").path == "/"
    assert client.remove(f"{top}/link") == 1
    assert client.remove(f"{top}/new", recursive=True) == 3
    assert sorted(os.listdir(top)) == ["private"]


def test_what_the_guest_refuses_is_the_error_tree(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    with pytest.raises(NotFoundError, match="No such file or directory") as missing:
        client.stat(f"{tmp_path}/missing")
    cause = missing.value.__cause__
    assert isinstance(cause, AgentFileError) and cause.code == "ENOENT"
    with pytest.raises(NotFoundError):
        client.read_file(f"{tmp_path}/missing", lambda data: None)
    with pytest.raises(NotFoundError):
        client.write_file(f"{tmp_path}/no/parent", b"x", parents=False)
    with pytest.raises(ConflictError, match="Not a directory"):
        client.list_dir(f"{tmp_path}/file")
    with pytest.raises(ConflictError, match="not empty"):
        client.remove(f"{tmp_path}/dir")
    with pytest.raises(ConflictError, match="File exists"):
        client.mkdir(f"{tmp_path}/dir", parents=False)
    with pytest.raises(ConflictError, match="is a directory"):
        client.read_file(f"{tmp_path}/dir", lambda data: None)
    with pytest.raises(UsageError):
        client.stat("relative/path")
    # anything else: AgentFileError, with the errno's name and text
    with pytest.raises(AgentFileError, match="Operation not permitted") as refused:
        client.remove("/proc/version")
    assert refused.value.code == "EPERM" and refused.value.kind == "guest-file"
    assert (tmp_path / "dir" / "sub").is_dir()


def test_several_mib_stream_both_ways_a_frame_at_a_time(client: AgentClient,
                                                        tmp_path: Path) -> None:
    size = 24 * 1024 * 1024 + 12345
    content = os.urandom(size)
    asked: list[int] = []
    offset = 0

    def read(n: int) -> bytes:
        nonlocal offset
        asked.append(n)
        chunk = content[offset:offset + n]
        offset += len(chunk)
        return chunk

    client.write_file(f"{tmp_path}/big", read)
    assert (tmp_path / "big").read_bytes() == content
    assert max(asked) <= client.max_payload and len(asked) > size // client.max_payload
    digest = hashlib.sha256()
    pieces: list[int] = []

    def sink(data: bytes) -> None:
        pieces.append(len(data))
        digest.update(data)

    client.read_file(f"{tmp_path}/big", sink)
    assert digest.digest() == hashlib.sha256(content).digest() and sum(pieces) == size
    assert max(pieces) <= client.max_payload
    assert stat.S_IMODE((tmp_path / "big").stat().st_mode) == 0o644


def test_an_agent_without_the_operations_says_to_restart(client: AgentClient,
                                                         tmp_path: Path) -> None:
    """An agent older than the host (a workspace started before an upgrade) lists no
    such feature: the host asks nothing and says what to do."""
    client.peer["features"] = ["exec", "put", "get"]
    for call in (lambda: client.stat(str(tmp_path)), lambda: client.list_dir(str(tmp_path)),
                 lambda: client.remove(f"{tmp_path}/x"), lambda: client.mkdir(f"{tmp_path}/x"),
                 lambda: client.write_file(f"{tmp_path}/a/b", b"x")):
        with pytest.raises(AgentFileError, match="has no") as old:
            call()
        assert old.value.code == "ENOTSUP" and "restart the workspace" in old.value.hint
    client.write_file(f"{tmp_path}/plain", b"x", parents=False)  # put itself is old
    assert sorted(os.listdir(tmp_path)) == ["plain"]
