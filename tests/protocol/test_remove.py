"""remove against the real agent: files, empty directories, trees; symlinks removed and
never followed; a tree deeper than PATH_MAX and than the agent's open levels."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from tests.protocol.driver import AgentProcess, Session, StreamState
from tests.protocol.test_files import error_code


def remove(session: Session, path: str | Path, **options: Any) -> StreamState:
    return session.wait(session.open({"op": "remove", "path": str(path), **options}),
                        timeout=120)


def removed(session: Session, path: str | Path, **options: Any) -> int:
    state = remove(session, path, **options)
    assert state.exit is not None, state.error
    assert state.exit["exit_code"] == 0
    return int(state.exit["removed"])


def outside_tree(root: Path) -> Path:
    """A directory the removals must not touch, with a file in it."""
    outside = root / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    return outside


def open_fds(agent: AgentProcess) -> int:
    return len(os.listdir(f"/proc/{agent.pid}/fd"))


def test_a_file_a_symlink_and_an_empty_directory(session: Session, tmp_path: Path) -> None:
    outside = outside_tree(tmp_path)
    (tmp_path / "f").write_text("x")
    (tmp_path / "dirlink").symlink_to(outside)
    (tmp_path / "filelink").symlink_to(outside / "keep")
    (tmp_path / "dangling").symlink_to("nowhere")
    (tmp_path / "empty").mkdir()
    for name in ("f", "dirlink", "filelink", "dangling", "empty"):
        assert removed(session, tmp_path / name) == 1, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside"]
    assert (outside / "keep").read_text() == "keep"


def test_a_symlink_with_a_trailing_slash_is_still_the_link(session: Session,
                                                            tmp_path: Path) -> None:
    outside = outside_tree(tmp_path)
    (tmp_path / "dirlink").symlink_to(outside)
    assert removed(session, f"{tmp_path}/dirlink/", recursive=True) == 1
    assert not (tmp_path / "dirlink").is_symlink() and (outside / "keep").exists()


def test_a_tree_with_symlinks_out_of_it(agent: AgentProcess, tmp_path: Path) -> None:
    session = Session(agent.sock)
    session.hello()
    outside = outside_tree(tmp_path)
    top = tmp_path / "top"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "file").write_text("f")
    (top / "a" / "b" / "up").symlink_to("../../..")
    (top / "a" / "b" / "out").symlink_to(outside)
    (top / "a" / "b" / "keep").symlink_to(outside / "keep")
    (top / "c").mkdir(mode=0o000)  # unreadable to others; the agent's user owns it
    os.mkfifo(top / "a" / "fifo")
    entries = sum(1 for _ in top.rglob("*")) + 1
    fds = open_fds(agent)
    state = remove(session, top)
    assert error_code(state) == "ENOTEMPTY" and top.exists()  # not without recursive
    assert removed(session, top, recursive=True) == entries
    assert not top.exists()
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside"]
    assert open_fds(agent) == fds


def test_a_deep_tree_beyond_path_max_and_the_open_levels(agent: AgentProcess,
                                                         tmp_path: Path) -> None:
    """3000 levels (paths of 9000 bytes), each with a file and a symlink beside the next
    level: the agent climbs back through levels whose directories it had closed."""
    session = Session(agent.sock)
    session.hello()
    outside = outside_tree(tmp_path)
    depth = 3000
    try:
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(depth):
                os.mkdir("dd", dir_fd=fd)
                os.close(os.open("file", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
                os.symlink(str(outside), "link", dir_fd=fd)
                next_fd = os.open("dd", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = next_fd
        finally:
            os.close(fd)
        os.remove(tmp_path / "file")
        os.remove(tmp_path / "link")
        fds = open_fds(agent)
        # per level: the directory, its file and its symlink; the deepest has neither
        assert removed(session, tmp_path / "dd", recursive=True) == 3 * depth - 2
        assert sorted(p.name for p in tmp_path.iterdir()) == ["outside"]
        assert (outside / "keep").read_text() == "keep"
        assert open_fds(agent) == fds

    finally:  # not left to pytest: its clean-up recurses once per level
        subprocess.run(["rm", "-rf", "--", str(tmp_path / "dd")], check=False)

def test_a_tree_wide_at_every_level(session: Session, tmp_path: Path) -> None:
    """Directories with many subdirectories, some deeper than the open levels."""
    top = tmp_path / "top"
    top.mkdir()
    count = 1
    for i in range(40):
        branch = top / f"b{i}"
        branch.mkdir()
        count += 1
        for j in range(20):
            (branch / f"f{j}").write_text("x")
            count += 1
        if i % 10 == 0:
            deep = branch / "/".join(f"l{k}" for k in range(30))
            deep.mkdir(parents=True)
            (deep / "leaf").write_text("x")
            count += 31
    assert removed(session, top, recursive=True) == count
    assert not top.exists()


def test_remove_errors(session: Session, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    cases = [
        ({"path": str(tmp_path / "missing")}, "ENOENT"),
        ({"path": str(tmp_path / "missing"), "recursive": True}, "ENOENT"),
        ({"path": str(tmp_path / "f" / "below")}, "ENOTDIR"),
        ({"path": "/", "recursive": True}, "EBUSY"),
        ({"path": "/"}, "EBUSY"),
        ({"path": f"{tmp_path}/d/.."}, "EINVAL"),
        ({"path": f"{tmp_path}/d/.", "recursive": True}, "EINVAL"),
        ({"path": "relative"}, "EINVAL"),
        ({"path": str(tmp_path / "d"), "recursive": 1}, "EINVAL"),
        ({}, "EINVAL"),
    ]
    for request, code in cases:
        state = session.wait(session.open({"op": "remove", **request}))
        assert error_code(state) == code, request
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]


def test_a_large_tree_reports_progress_and_other_streams_go_on(session: Session,
                                                               tmp_path: Path) -> None:
    top = tmp_path / "top"
    top.mkdir()
    for i in range(3000):
        os.close(os.open(top / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o600))
    state = session.open({"op": "remove", "path": str(top), "recursive": True})
    echo = session.run(["echo", "meanwhile"])
    assert bytes(echo.stdout) == b"meanwhile\n"
    session.wait(state)
    assert state.exit is not None and state.exit["removed"] == 3001
    assert state.started is not None and state.started["removed"] >= 0  # the first one
