"""stat, list, mkdir and put's "parents" against the real agent, frame by frame."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from microagent.vm.protocol import MAX_PAYLOAD, FrameType, encode
from tests.protocol.driver import AgentProcess, Session, StreamState
from tests.protocol.test_ops import put

FILE_FEATURES = ("stat", "list", "remove", "mkdir", "put_parents")


def stat_of(session: Session, path: str | Path, **options: Any) -> StreamState:
    return session.wait(session.open({"op": "stat", "path": str(path), **options}))


def entry(session: Session, path: str | Path, **options: Any) -> dict[str, Any]:
    state = stat_of(session, path, **options)
    assert state.exit is not None, state.error
    assert state.exit["exit_code"] == 0
    doc = state.exit["entry"]
    assert isinstance(doc, dict)
    return doc


def listing(session: Session, path: str | Path) -> list[dict[str, Any]]:
    state = session.wait(session.open({"op": "list", "path": str(path)}), timeout=120)
    assert state.exit is not None, state.error
    assert FrameType.FILE in state.ends
    lines = bytes(state.file).split(b"\n")
    assert lines[-1] == b""  # every line ends with a newline
    entries = [json.loads(line) for line in lines[:-1]]
    assert state.exit["count"] == len(entries)
    return entries


def error_code(state: StreamState) -> str:
    assert state.error is not None, state.exit
    return str(state.error["code"])


def shape(path: Path) -> dict[str, Any]:
    """What the agent should say about ``path`` (lstat)."""
    st = path.lstat()
    kind = "file" if stat.S_ISREG(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else \
        "symlink" if stat.S_ISLNK(st.st_mode) else "other"
    doc = {"name": path.name, "kind": kind, "size": st.st_size,
           "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
           "mtime_ns": st.st_mtime_ns}
    if kind == "symlink":
        doc["target"] = os.readlink(path)
    return doc


def test_hello_lists_the_file_operations(session: Session) -> None:
    assert set(FILE_FEATURES) <= set(session.peer["features"])


# --- stat ----------------------------------------------------------------------------


def test_stat_describes_files_dirs_and_symlinks_without_following(session: Session,
                                                                  tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 1234)
    (tmp_path / "f").chmod(0o4751)
    (tmp_path / "d").mkdir(mode=0o710)
    (tmp_path / "link").symlink_to("d")
    (tmp_path / "dangling").symlink_to("/no/such/target")
    os.mkfifo(tmp_path / "fifo")
    for name in ("f", "d", "link", "dangling", "fifo"):
        assert entry(session, tmp_path / name) == shape(tmp_path / name), name
    assert entry(session, tmp_path / "link")["target"] == "d"
    followed = entry(session, tmp_path / "link", follow=True)
    assert followed["kind"] == "dir" and "target" not in followed
    assert followed["name"] == "link"  # the name asked for, the target's attributes
    assert error_code(stat_of(session, tmp_path / "dangling", follow=True)) == "ENOENT"
    assert entry(session, f"{tmp_path}/f//")["name"] == "f"  # trailing slashes ignored
    root = entry(session, "/")
    assert root["name"] == "/" and root["kind"] == "dir"


def test_stat_errors(session: Session, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert error_code(stat_of(session, tmp_path / "missing")) == "ENOENT"
    assert error_code(stat_of(session, tmp_path / "f" / "below")) == "ENOTDIR"
    for bad in ({"path": "relative"}, {"path": ""}, {"path": 7}, {},
                {"path": "/" + "a" * 5000}, {"path": "/", "follow": "yes"}):
        state = session.wait(session.open({"op": "stat", **bad}))
        assert error_code(state) == "EINVAL", bad


def test_names_that_are_not_utf8_round_trip(session: Session, tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/caf\xe9\n\x01"
    with open(raw, "wb") as f:
        f.write(b"abc")
    [only] = listing(session, tmp_path)
    assert only["name"] == "caf\udce9\n\x01"
    path = f"{tmp_path}/{only['name']}"  # json.dumps escapes the surrogate: the same byte
    assert entry(session, path)["size"] == 3


# --- list ----------------------------------------------------------------------------


def test_list_sorted_by_name_with_symlinks_not_followed(session: Session,
                                                        tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    top = tmp_path / "top"
    top.mkdir()
    for name in ("b", "a", "B", "_", "é", "z z"):
        (top / name).write_text(name)
    (top / "sub").mkdir()
    (top / "sub" / "inner").write_text("i")
    (top / "to-outside").symlink_to(outside)
    (top / "dangling").symlink_to("nowhere")
    entries = listing(session, top)
    names = [e["name"] for e in entries]
    assert names == sorted(names, key=os.fsencode) and "." not in names and ".." not in names
    assert entries == [shape(top / name) for name in names]
    assert "secret" not in names and "inner" not in names
    (tmp_path / "empty").mkdir()
    assert listing(session, tmp_path / "empty") == []
    (tmp_path / "dirlink").symlink_to(top)  # the path itself is followed, as opendir
    assert [e["name"] for e in listing(session, tmp_path / "dirlink")] == names


def test_list_errors(session: Session, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    for path, code in ((tmp_path / "missing", "ENOENT"), (tmp_path / "f", "ENOTDIR"),
                       ("relative", "EINVAL")):
        state = session.wait(session.open({"op": "list", "path": str(path)}))
        assert error_code(state) == code, path
    state = session.wait(session.open({"op": "list"}))
    assert error_code(state) == "EINVAL"


def test_a_directory_of_many_entries_comes_in_many_frames(session: Session,
                                                          tmp_path: Path) -> None:
    count = 30_000
    names = [f"entry-{i:05d}-" + "x" * (i % 60) for i in range(count)]
    for name in names:
        os.close(os.open(tmp_path / name, os.O_CREAT | os.O_WRONLY, 0o600))
    state = session.wait(session.open({"op": "list", "path": str(tmp_path)}), timeout=120)
    assert state.exit is not None and state.exit["count"] == count
    frames = [f for f in state.frames if f.type == FrameType.FILE and f.payload]
    assert len(frames) > 10 and all(len(f.payload) <= MAX_PAYLOAD for f in frames)
    entries = [json.loads(line) for line in bytes(state.file).splitlines()]
    assert [e["name"] for e in entries] == sorted(names)


def test_list_keeps_to_a_small_window_splitting_lines(agent: AgentProcess,
                                                      tmp_path: Path) -> None:
    """The host's window is smaller than one line: lines span frames, none exceeds it."""
    session = Session(agent.sock, window=100)
    session.hello()
    for i in range(50):
        (tmp_path / f"{i:02d}").write_text("x" * i)
    entries = listing(session, tmp_path)
    assert [e["size"] for e in entries] == list(range(50))
    state = session.streams[max(session.streams)]
    assert max(len(f.payload) for f in state.frames if f.type == FrameType.FILE) <= 100


def test_a_list_waiting_for_credit_blocks_nothing_else_and_can_be_cancelled(
        agent: AgentProcess, tmp_path: Path) -> None:
    session = Session(agent.sock, auto_credit=False, window=4096)
    session.hello()
    for i in range(200):
        (tmp_path / f"file-{i}").write_text("x")
    stalled = session.open({"op": "list", "path": str(tmp_path)})
    session.pump_until(lambda: len(stalled.file) == 4096, what="the first window")
    assert entry(session, tmp_path / "file-0")["size"] == 1  # another stream is served
    assert len(stalled.file) == 4096 and not stalled.done
    session.send_json(FrameType.CANCEL, stalled.id, {})
    session.wait(stalled)
    assert error_code(stalled) == "ECANCELED"


def test_a_frame_that_is_not_credit_ends_a_list(agent: AgentProcess, tmp_path: Path) -> None:
    session = Session(agent.sock, auto_credit=False, window=1024)
    session.hello()
    for i in range(100):
        (tmp_path / f"file-{i}").write_text("x")
    stalled = session.open({"op": "list", "path": str(tmp_path)})
    session.pump_until(lambda: len(stalled.file) == 1024, what="the first window")
    session.send(encode(FrameType.STDIN, stalled.id, b"junk"))
    session.wait(stalled)
    assert error_code(stalled) == "EPROTO"
    assert entry(session, tmp_path)["kind"] == "dir"  # the connection goes on


# --- mkdir and put's parents ---------------------------------------------------------


def mkdir(session: Session, path: str | Path, **options: Any) -> StreamState:
    return session.wait(session.open({"op": "mkdir", "path": str(path), **options}))


def test_mkdir_with_exact_modes(session: Session, tmp_path: Path) -> None:
    old = os.umask(0o077)  # the agent inherits it: the mode must not be masked
    try:
        state = mkdir(session, tmp_path / "a", mode=0o2775)
    finally:
        os.umask(old)
    assert state.exit is not None and state.exit["created"] is True
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o2775
    state = mkdir(session, tmp_path / "b")
    assert state.exit is not None and stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o755


def test_mkdir_parents_as_mkdir_p(session: Session, tmp_path: Path) -> None:
    deep = tmp_path / "x" / "y" / "z"
    state = mkdir(session, f"{deep}/", mode=0o700, parents=True)
    assert state.exit is not None and state.exit["created"] is True
    assert stat.S_IMODE(deep.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "x" / "y").stat().st_mode) == 0o755
    again = mkdir(session, deep, parents=True)
    assert again.exit is not None and again.exit["created"] is False
    (tmp_path / "dirlink").symlink_to(deep)  # an existing symlink to a directory is fine
    via_link = mkdir(session, tmp_path / "dirlink", parents=True)
    assert via_link.exit is not None and via_link.exit["created"] is False
    assert mkdir(session, "/", parents=True).exit is not None


def test_mkdir_errors(session: Session, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    cases = [
        ({"path": str(tmp_path / "d")}, "EEXIST"),
        ({"path": str(tmp_path / "f")}, "EEXIST"),
        ({"path": str(tmp_path / "f"), "parents": True}, "EEXIST"),
        ({"path": str(tmp_path / "f" / "below"), "parents": True}, "ENOTDIR"),
        ({"path": str(tmp_path / "missing" / "below")}, "ENOENT"),
        ({"path": "/"}, "EEXIST"),
        ({"path": str(tmp_path / "m"), "mode": 0o10000}, "EINVAL"),
        ({"path": str(tmp_path / "m"), "mode": -1}, "EINVAL"),
        ({"path": str(tmp_path / "m"), "parents": "true"}, "EINVAL"),
        ({"path": "relative"}, "EINVAL"),
    ]
    for request, code in cases:
        state = session.wait(session.open({"op": "mkdir", **request}))
        assert error_code(state) == code, request
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]


def test_put_makes_parents_when_asked(session: Session, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file"
    assert "error" in put(session, target, b"data")  # without parents: ENOENT, as before
    assert put(session, target, b"data", parents=True)["exit_code"] == 0
    assert target.read_bytes() == b"data"
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o755
    (tmp_path / "f").write_text("x")
    result = put(session, tmp_path / "f" / "g" / "file", b"data", parents=True)
    assert result["error"]["code"] == "ENOTDIR"  # type: ignore[index]
    result = put(session, target, b"data", parents="yes")
    assert result["error"]["code"] == "EINVAL"  # type: ignore[index]


@pytest.mark.parametrize("op", ["stat", "list", "remove", "mkdir"])
def test_path_beyond_path_max_is_refused(session: Session, op: str) -> None:
    state = session.wait(session.open({"op": op, "path": "/" + "a/" * 2100}))
    assert error_code(state) == "EINVAL"
