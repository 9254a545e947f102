"""The public API against a real VM: the lifecycle, exec and files of one workspace."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import microagent
from microagent import ExecResult, Microagent, Workspace
from microagent.errors import (
    CommandFailedError,
    ConflictError,
    MicroagentError,
    NotFoundError,
    UsageError,
)
from tests.support.fixtures import PushedImage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(home: Path) -> Microagent:
    return Microagent(home)


@pytest.fixture(scope="module")
def running(client: Microagent, busybox_image: PushedImage) -> Iterator[Workspace]:
    """One running busybox workspace for the tests that do not stop it."""
    ws = client.create("api-shared", busybox_image.ref, profile="tiny")
    ws.start()
    yield ws
    ws.kill()
    ws.delete()


def test_exec_results(running: Workspace) -> None:
    r = running.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert isinstance(r, ExecResult)
    assert (r.exit_code, r.stdout, r.stderr, r.ok) == (3, b"out\n", b"err\n", False)
    assert r.stdout_text == "out\n" and r.signal is None and not r.timed_out
    assert r.duration_s > 0
    assert running.exec("echo $((6 * 7))").stdout == b"42\n"  # a str runs through sh -c
    assert running.exec(["no-such-command"]).exit_code == 127
    assert running.exec(["/etc/passwd"]).exit_code == 126
    killed = running.exec(["sh", "-c", "kill -9 $$"])
    assert (killed.exit_code, killed.signal) == (None, 9)
    assert killed.to_json()["exit_code"] == 137


def test_check_raises_command_failed(running: Workspace) -> None:
    with pytest.raises(CommandFailedError) as info:
        running.exec("echo broken >&2; exit 4", check=True)
    error = info.value
    assert error.kind == "command-failed" and error.exit_code == 4
    assert error.result.exit_code == 4 and "exited 4" in error.message
    assert "broken" in error.message
    assert running.exec("true", check=True).ok
    with pytest.raises(CommandFailedError):
        running.exec("exit 1").check()


def test_stdin_env_cwd_user(running: Workspace) -> None:
    assert running.exec(["cat"], stdin=b"fed\n").stdout == b"fed\n"
    big = bytes(range(256)) * 4096  # 1 MiB through the flow control
    assert running.exec(["sh", "-c", "cat | md5sum"], stdin=big).stdout.split()[0] == \
        __import__("hashlib").md5(big).hexdigest().encode()
    assert running.exec(["cat"]).stdout == b""  # no stdin: end of file at once
    assert running.exec("echo $A", env={"A": "b c"}).stdout == b"b c\n"
    assert running.exec("pwd", cwd="/tmp").stdout == b"/tmp\n"
    assert running.exec("id -u", user="65534", cwd="/").stdout == b"65534\n"
    cannot = running.exec("id -u", user="65534")  # the image's WorkingDir is /root
    assert cannot.exit_code == 126 and "/root" in cannot.error
    with pytest.raises(UsageError):
        running.exec("true", env={"": "x"})
    with pytest.raises(ValueError):  # UsageError is a ValueError too
        running.exec([])


def test_timeout(running: Workspace) -> None:
    r = running.exec(["sleep", "30"], timeout=1)
    assert r.timed_out and r.exit_code is None and not r.ok
    assert r.duration_s < 20
    assert r.to_json()["exit_code"] == 124


def test_streaming_callbacks_see_output_as_it_arrives(running: Workspace) -> None:
    seen: list[tuple[float, bytes]] = []
    errors: list[bytes] = []
    begun = time.monotonic()
    r = running.exec("echo first; sleep 2; echo second; echo e >&2",
                     on_stdout=lambda b: seen.append((time.monotonic() - begun, b)),
                     on_stderr=errors.append)
    assert b"".join(b for _, b in seen) == r.stdout == b"first\nsecond\n"
    assert b"".join(errors) == r.stderr == b"e\n"
    first = next(t for t, b in seen if b"first" in b)
    assert first < r.duration_s - 1, "the first line came before the command ended"


def test_exec_from_threads(running: Workspace) -> None:
    results: list[bytes] = []

    def work(i: int) -> None:
        results.append(running.exec(["echo", str(i)]).stdout)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [b"%d\n" % i for i in range(4)]


def test_files_read_write(running: Workspace) -> None:
    running.files.write("/root/api/deep/a.txt", "hello\n")
    assert running.files.read("/root/api/deep/a.txt") == b"hello\n"
    assert running.files.read_text("/root/api/deep/a.txt") == "hello\n"
    big = bytes(range(256)) * (12 << 10)  # 3 MiB
    running.files.write("/root/big.bin", big, mode=0o600)
    assert running.files.read("/root/big.bin") == big
    assert running.exec("stat -c %a /root/big.bin").stdout == b"600\n"
    with pytest.raises(NotFoundError):
        running.files.read("/root/nothing-here")
    with pytest.raises(UsageError):
        running.files.read("relative/path")


def test_files_list_stat_remove_mkdir(running: Workspace) -> None:
    files = running.files
    assert files.mkdir("/root/tree/a/b", mode=0o750) is True
    files.write("/root/tree/one.txt", b"1")
    running.exec("ln -s one.txt /root/tree/link", check=True)
    entries = files.list("/root/tree")
    assert [(e.name, e.kind) for e in entries] == [("a", "dir"), ("link", "symlink"),
                                                   ("one.txt", "file")]
    one = entries[2]
    assert (one.path, one.size, one.mode) == ("/root/tree/one.txt", 1, 0o644)
    assert one.mtime > 1.6e9 and entries[1].target == "one.txt"
    assert files.stat("/root/tree/a/b").mode == 0o750
    assert files.exists("/root/tree/link") and not files.exists("/root/tree/none")
    with pytest.raises(ConflictError):
        files.remove("/root/tree")  # not empty
    assert files.remove("/root/tree", recursive=True) == 5
    assert not files.exists("/root/tree")
    with pytest.raises(NotFoundError):
        files.list("/root/tree")


def test_status_and_listing(client: Microagent, running: Workspace) -> None:
    st = running.status()
    assert st.state == "running" and st.name == running.name
    assert st.readiness.guest and st.readiness.exec
    assert (st.profile, st.memory_mib, st.cpus) == ("tiny", 256, 1)
    assert st.pid is not None and st.uptime_s is not None
    assert st.to_json()["execReady"]["ok"] is True
    assert running in client.list() and running in client.list(running=True)
    assert client.get(running.name) == running
    assert running.state == "running"
    assert any(e.state == "running" for e in running.events())
    assert "microagent" in running.logs() or running.logs(tail=5)


def test_lifecycle_through_the_api(client: Microagent, busybox_image: PushedImage,
                                   tmp_path: Path) -> None:
    ws = client.create("api-life", busybox_image.ref, profile="tiny")
    assert ws.state == "prepared" and ws.attrs["image"] == busybox_image.ref
    with pytest.raises(ConflictError):
        client.create("api-life", busybox_image.ref)
    status = ws.start()
    assert status.state == "running" and status.readiness.exec
    ws.exec("echo persisted > /root/notes.txt", check=True)
    with pytest.raises(ConflictError) as info:
        ws.delete()
    assert "running" in info.value.message
    ws.copy_out("/root/notes.txt", tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "persisted\n"
    assert ws.halt() == "halted"
    assert ws.wait("halted", timeout=5).state == "halted"
    ws.copy_in(str(tmp_path / "notes.txt"), "/root/copied.txt")  # into the halted disk
    ws.start()
    assert ws.files.read("/root/notes.txt") == b"persisted\n"
    assert ws.files.read("/root/copied.txt") == b"persisted\n"
    ws.halt()
    assert ws.delete() is True
    with pytest.raises(NotFoundError):
        client.get("api-life")
    assert ws.delete() is False


def test_errors_carry_kind_message_hint(client: Microagent) -> None:
    with pytest.raises(NotFoundError) as missing:
        client.get("no-such-workspace")
    assert missing.value.kind == "not-found" and "no-such-workspace" in missing.value.message
    assert missing.value.hint and missing.value.exit_code == 1
    with pytest.raises(UsageError) as bad:
        client.get("Bad Name!")
    assert bad.value.kind == "usage" and isinstance(bad.value, ValueError)
    assert bad.value.exit_code == 2
    assert issubclass(CommandFailedError, MicroagentError)


def test_import_is_light() -> None:
    import subprocess
    import sys

    code = ("import sys, microagent; microagent.Microagent(); "
            "print(sorted(m for m in ('httpx', 'zstandard', 'asyncio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    assert microagent.Microagent(state_dir="/nonexistent/x").state_dir == \
        Path("/nonexistent/x")
