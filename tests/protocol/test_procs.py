"""Background processes (spawn, procs, proc_read, proc_write, proc_signal) against the
real agent in the host test mode: output read from offsets with nothing lost or
duplicated, waiting for more, stdin in pieces, signals, the bound on the output files,
a process that outlives the connection that started it, and starts that take long (an
injected delay before the child's chdir) answered while everything else goes on."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent.vm import agentprocs
from microagent.vm.agent import AgentClient
from microagent.vm.protocol import FLAG_END, FrameType, encode
from tests.protocol.driver import AgentProcess, Session

ENV = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
HEAD = TAIL = 1024 * 1024
STEP = 64 * 1024


def call(session: Session, doc: dict[str, Any]) -> dict[str, Any]:
    state = session.wait(session.open(doc))
    assert state.error is None, state.error
    assert state.exit is not None
    return state.exit


def spawn(session: Session, argv: list[str], **extra: Any) -> dict[str, Any]:
    proc = call(session, {"op": "spawn", "argv": argv, "env": ENV, **extra})["proc"]
    assert isinstance(proc, dict)
    return proc


def read(session: Session, pid: int, offset: int = 0, *, stream: str = "stdout",
         max_bytes: int | None = None, wait_ms: int = 0) -> tuple[bytes, dict[str, Any]]:
    doc: dict[str, Any] = {"op": "proc_read", "id": pid, "stream": stream, "offset": offset,
                           "wait_ms": wait_ms}
    if max_bytes is not None:
        doc["max"] = max_bytes
    state = session.wait(session.open(doc), timeout=wait_ms / 1000 + 20)
    assert state.error is None, state.error
    assert state.exit is not None and FrameType.FILE in state.ends
    return bytes(state.file), state.exit


def write(session: Session, pid: int, data: bytes, close: bool = False) -> dict[str, Any]:
    state = session.open({"op": "proc_write", "id": pid, "close": close})
    view = memoryview(data)
    while view:  # within the agent's credit (its window), as FILE frames
        session.pump_until(lambda: state.file_credit > 0 or state.done, what="credit")
        assert not state.done, state.error
        n = min(len(view), state.file_credit, 65536)
        state.file_credit -= n
        session.send(encode(FrameType.FILE, state.id, bytes(view[:n])))
        view = view[n:]
    session.send(encode(FrameType.FILE, state.id, b"", FLAG_END))
    session.wait(state)
    assert state.error is None, state.error
    assert state.exit is not None
    return state.exit


def wait_finished(session: Session, pid: int, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        proc = call(session, {"op": "procs", "id": pid})["proc"]
        if proc["state"] != "running":
            return dict(proc)
        assert time.monotonic() < deadline, f"process {pid} still runs: {proc}"
        time.sleep(0.05)


def read_all(session: Session, pid: int, max_bytes: int = 7000) -> tuple[bytes, int]:
    """Everything kept, read in small pieces; also the bytes reported skipped."""
    out, offset, skipped = bytearray(), 0, 0
    while True:
        data, answer = read(session, pid, offset, max_bytes=max_bytes, wait_ms=5000)
        assert answer["offset"] == offset + answer["skipped"]
        assert answer["next"] == answer["offset"] + len(data)
        skipped += answer["skipped"]
        out += data
        offset = answer["next"]
        if answer["eof"]:
            return bytes(out), skipped


def test_hello_announces_procs(session: Session) -> None:
    assert "procs" in session.peer["features"]


def test_spawn_list_and_exit(session: Session) -> None:
    proc = spawn(session, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert proc["id"] >= 1 and proc["pid"] > 0
    assert proc["argv"] == ["sh", "-c", "echo out; echo err >&2; exit 3"]
    assert Path(proc["dir"]).is_dir()
    done = wait_finished(session, proc["id"])
    assert (done["state"], done["exit_code"], done["signal"]) == ("exited", 3, None)
    assert done["stdout"]["size"] == 4 and done["stderr"]["size"] == 4
    assert done["finished_ms"] >= done["started_ms"] > 0
    listed = call(session, {"op": "procs"})["procs"]
    assert [p["id"] for p in listed] == [proc["id"]]
    assert read(session, proc["id"])[0] == b"out\n"
    assert read(session, proc["id"], stream="stderr")[0] == b"err\n"
    meta = (Path(proc["dir"]) / "meta").read_text()
    assert '"state":"exited"' in meta
    assert (Path(proc["dir"]) / "stdout").read_bytes() == b"out\n"


def test_numbered_lines_from_offsets(session: Session) -> None:
    proc = spawn(session, ["sh", "-c", "i=0; while [ $i -lt 20000 ]; do echo line$i; "
                           "i=$((i+1)); done"])
    data, skipped = read_all(session, proc["id"])
    assert skipped == 0
    assert data.decode().splitlines() == [f"line{i}" for i in range(20000)]


def test_read_waits_for_more_output(session: Session) -> None:
    proc = spawn(session, ["sh", "-c", "echo first; sleep 1; echo second"])
    data, answer = read(session, proc["id"], wait_ms=5000)
    assert data == b"first\n" and not answer["eof"]
    started = time.monotonic()
    data, answer = read(session, proc["id"], answer["next"], wait_ms=10000)
    assert data == b"second\n"
    assert time.monotonic() - started < 8
    data, answer = read(session, proc["id"], answer["next"], wait_ms=10000)
    assert data == b"" and answer["eof"]


def test_read_wait_times_out(session: Session) -> None:
    proc = spawn(session, ["sleep", "30"])
    started = time.monotonic()
    data, answer = read(session, proc["id"], wait_ms=300)
    assert data == b"" and not answer["eof"] and answer["proc"]["state"] == "running"
    assert 0.25 < time.monotonic() - started < 5
    call(session, {"op": "proc_signal", "id": proc["id"], "signal": 9})
    wait_finished(session, proc["id"])


def test_stdin_in_pieces_then_closed(session: Session) -> None:
    proc = spawn(session, ["cat"])
    assert proc["stdin"] is True
    pieces = [b"one ", b"two\n", b"\x00binary\xff", b"x" * 300_000]
    for piece in pieces:
        assert write(session, proc["id"], piece)["written"] == len(piece)
    assert write(session, proc["id"], b"", close=True)["written"] == 0
    done = wait_finished(session, proc["id"])
    assert done["exit_code"] == 0 and done["stdin"] is False
    assert read_all(session, proc["id"], 1 << 20)[0] == b"".join(pieces)
    state = session.wait(session.open({"op": "proc_write", "id": proc["id"]}))
    assert state.error is not None and state.error["code"] == "EPIPE"


def test_the_client_writes_stdin_beyond_the_window(client: AgentClient, tmp_path: Path
                                                    ) -> None:
    """``agentprocs.write_input`` sends several windows' worth within the agent's credit,
    a frame at a time, and closes stdin."""
    data = bytes(range(256)) * (3 * 4096 + 7)  # 3 MiB and a bit, not a frame multiple
    assert len(data) > 2 * client.peer_window
    proc = agentprocs.spawn(client, ("sh", "-c", f"cat > {tmp_path}/stdin"), env=tuple(ENV))
    assert agentprocs.write_input(client, proc.id, data, close=True) == len(data)
    done = agentprocs.wait_process(client, proc.id, 30)
    assert done.exit_code == 0
    assert (tmp_path / "stdin").read_bytes() == data


def test_signal_delivered_and_recorded(session: Session) -> None:
    proc = spawn(session, ["sh", "-c", "trap 'echo got TERM; exit 7' TERM; echo ready; "
                           "while :; do sleep 0.05; done"])
    data, _ = read(session, proc["id"], wait_ms=5000)
    assert data == b"ready\n"
    call(session, {"op": "proc_signal", "id": proc["id"], "signal": int(signal.SIGTERM)})
    done = wait_finished(session, proc["id"])
    assert done["exit_code"] == 7
    assert b"got TERM" in read_all(session, proc["id"])[0]

    proc = spawn(session, ["sleep", "60"])
    call(session, {"op": "proc_signal", "id": proc["id"], "signal": int(signal.SIGKILL)})
    done = wait_finished(session, proc["id"])
    assert (done["state"], done["exit_code"], done["signal"]) == ("signaled", None, 9)
    state = session.wait(session.open({"op": "proc_signal", "id": proc["id"], "signal": 15}))
    assert state.error is not None and state.error["code"] == "ESRCH"


def test_outlives_the_connection(agent: AgentProcess) -> None:
    first = Session(agent.sock)
    first.hello()
    proc = spawn(first, ["sh", "-c", "echo before; read x; echo after $x"])
    assert read(first, proc["id"], wait_ms=5000)[0] == b"before\n"
    # a second HELLO: a new host; the old connection's streams end, the process goes on
    second = Session(agent.sock)
    second.hello()
    listed = call(second, {"op": "procs"})["procs"]
    assert [(p["id"], p["state"]) for p in listed] == [(proc["id"], "running")]
    write(second, proc["id"], b"now\n", close=True)
    done = wait_finished(second, proc["id"])
    assert done["exit_code"] == 0
    assert read_all(second, proc["id"])[0] == b"before\nafter now\n"


def test_output_bounded_head_and_tail(session: Session) -> None:
    # 4 MiB of numbered 16-byte records, more than head and tail together
    records = 4 * 1024 * 1024 // 16
    proc = spawn(session, ["sh", "-c", f"seq -f %015g 0 {records - 1}"])
    done = wait_finished(session, proc["id"], timeout=60)
    size = records * 16
    out = done["stdout"]
    assert out["size"] == size
    tail_start = out["tail_start"]
    assert out["dropped"] == tail_start - HEAD > 0
    assert size - TAIL - STEP < tail_start <= size - TAIL and tail_start % STEP == 0
    data, skipped = read_all(session, proc["id"], max_bytes=1 << 20)
    assert skipped == tail_start - HEAD
    assert len(data) == HEAD + size - tail_start
    expected = b"".join(b"%015d\n" % i for i in range(records))
    assert data[:HEAD] == expected[:HEAD]
    assert data[HEAD:] == expected[tail_start:]
    # a read in the dropped range skips to the tail and says how much it skipped
    got, answer = read(session, proc["id"], HEAD + 100, max_bytes=16)
    assert answer["offset"] == tail_start and answer["skipped"] == tail_start - HEAD - 100
    assert got == expected[tail_start:tail_start + 16]
    # the file keeps the offsets; the dropped range is a hole
    on_disk = Path(proc["dir"]) / "stdout"
    assert on_disk.stat().st_size == size
    assert on_disk.stat().st_blocks * 512 < HEAD + TAIL + 2 * STEP + 65536


def test_errors(session: Session) -> None:
    state = session.wait(session.open({"op": "spawn", "argv": ["no-such-command-x"],
                                       "env": ENV}))
    assert state.error is not None and state.error["code"] == "ENOENT"
    for doc in ({"op": "proc_read", "id": 999}, {"op": "procs", "id": 999},
                {"op": "proc_signal", "id": 999, "signal": 9}):
        state = session.wait(session.open(doc))
        assert state.error is not None and state.error["code"] == "ENOENT", doc
    proc = spawn(session, ["true"])
    wait_finished(session, proc["id"])
    state = session.wait(session.open({"op": "proc_read", "id": proc["id"], "offset": 5}))
    assert state.error is not None and state.error["code"] == "EINVAL"
    state = session.wait(session.open({"op": "spawn", "argv": []}))
    assert state.error is not None and state.error["code"] == "EINVAL"


@pytest.fixture
def slow_agent(agent_binary: Path, tmp_path: Path) -> Iterator[tuple[AgentProcess, Path]]:
    """An agent whose children wait 5 s before their chdir into ``tmp_path/slow`` (the
    host test mode's injected stand-in for a directory on a hung mount) and 15 s into
    ``tmp_path/hung``, beyond the agent's 10 s wait for a start."""
    slow = tmp_path / "slow"
    slow.mkdir()
    process = AgentProcess(agent_binary, env={**os.environ,
                                              "MICROAGENT_TEST_SLOW_CWD": str(slow),
                                              "MICROAGENT_TEST_SLOW_CWD_MS": "5000"})
    yield process, slow
    returncode, stderr = process.close()
    assert "Sanitizer" not in stderr and "runtime error" not in stderr, stderr
    assert returncode == 0, f"the agent exited with {returncode}:\n{stderr}"


def test_a_slow_start_with_an_injected_delay_stalls_nothing_else(
        slow_agent: tuple[AgentProcess, Path]) -> None:
    """While one spawn's child has not exec'd yet, the agent answers everything else:
    the list (without the starting process), another spawn, its output."""
    agent, slow = slow_agent
    session = Session(agent.sock)
    session.hello()
    starting = session.open({"op": "spawn", "argv": ["pwd"], "env": ENV, "cwd": str(slow)})
    assert call(session, {"op": "procs"})["procs"] == []
    quick = spawn(session, ["echo", "quick"])
    assert read(session, quick["id"], wait_ms=5000)[0] == b"quick\n"
    assert not starting.done, "the slow start was answered before the quick one"
    session.wait(starting)
    assert starting.error is None and starting.exit is not None, starting.error
    slow_proc = starting.exit["proc"]
    assert slow_proc["id"] not in (quick["id"], 0)
    wait_finished(session, slow_proc["id"])
    assert read(session, slow_proc["id"])[0] == f"{slow}\n".encode()
    assert sorted(p["id"] for p in call(session, {"op": "procs"})["procs"]) == \
        sorted([quick["id"], slow_proc["id"]])


def test_a_start_whose_requester_left_still_runs(slow_agent: tuple[AgentProcess, Path]
                                                 ) -> None:
    """The connection that asked for a slow start goes (a new HELLO): the process starts
    all the same and the new connection finds it."""
    agent, slow = slow_agent
    first = Session(agent.sock)
    first.hello()
    first.open({"op": "spawn", "argv": ["sh", "-c", "echo started"], "env": ENV,
                "cwd": str(slow)})
    second = Session(agent.sock)
    second.hello()
    deadline = time.monotonic() + 20
    while not (listed := call(second, {"op": "procs"})["procs"]):
        assert time.monotonic() < deadline, "the process never started"
        time.sleep(0.1)
    (proc,) = listed
    wait_finished(second, proc["id"])
    assert read(second, proc["id"])[0] == b"started\n"


def test_a_slow_start_holds_no_other_process_open(slow_agent: tuple[AgentProcess, Path]
                                                  ) -> None:
    """The child of a slow start holds none of the agent's fds while it waits: another
    process's stdin, closed meanwhile, reaches EOF before the slow one has exec'd."""
    agent, slow = slow_agent
    session = Session(agent.sock)
    session.hello()
    cat = spawn(session, ["cat"])
    starting = session.open({"op": "spawn", "argv": ["true"], "env": ENV, "cwd": str(slow)})
    write(session, cat["id"], b"x", close=True)
    assert wait_finished(session, cat["id"])["exit_code"] == 0
    assert not starting.done, "cat saw EOF only once the slow start had exec'd"
    session.wait(starting)
    assert starting.error is None, starting.error


def test_a_cancelled_start_is_killed(slow_agent: tuple[AgentProcess, Path]) -> None:
    """CANCEL while a spawn waits for its child: ECANCELED, and the child never runs."""
    agent, slow = slow_agent
    session = Session(agent.sock)
    session.hello()
    marker = slow / "ran"
    starting = session.open({"op": "spawn", "argv": ["touch", str(marker)], "env": ENV,
                             "cwd": str(slow)})
    session.send_json(FrameType.CANCEL, starting.id, {})
    session.wait(starting)
    assert starting.error is not None and starting.error["code"] == "ECANCELED"
    time.sleep(6)  # past the injected 5 s delay: a child left alive would have run by now
    assert not marker.exists(), "the cancelled start ran"
    assert call(session, {"op": "procs"})["procs"] == []
    assert spawn(session, ["true"])["id"] == 1


def test_a_start_that_never_reports_is_ended(agent_binary: Path, tmp_path: Path) -> None:
    """A child that has not exec'd after 10 s is killed and the spawn refused (ESETUP);
    the id it had is the next process's."""
    hung = tmp_path / "hung"
    hung.mkdir()
    agent = AgentProcess(agent_binary, env={**os.environ,
                                            "MICROAGENT_TEST_SLOW_CWD": str(hung),
                                            "MICROAGENT_TEST_SLOW_CWD_MS": "60000"})
    try:
        session = Session(agent.sock)
        session.hello()
        state = session.wait(session.open({"op": "spawn", "argv": ["true"], "env": ENV,
                                           "cwd": str(hung)}), timeout=30)
        assert state.error is not None and state.error["code"] == "ESETUP", state.error
        assert "start-up report" in state.error["message"]
        assert call(session, {"op": "procs"})["procs"] == []
        assert spawn(session, ["true"])["id"] == 1
    finally:
        returncode, stderr = agent.close()
    assert "Sanitizer" not in stderr and "runtime error" not in stderr, stderr
    assert returncode == 0, stderr
