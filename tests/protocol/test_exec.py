"""exec: exit codes, errors that map to 126/127, signals, timeouts, env, cwd and users."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from microagent.vm.agent import AgentClient, ExecRequest, ExecResult
from tests.protocol.driver import Session

PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"


def run(client: AgentClient, *argv: str, **options: object) -> tuple[ExecResult, bytes, bytes]:
    out, err = bytearray(), bytearray()
    options.setdefault("env", (PATH,))
    request = ExecRequest(argv=argv, **options)  # type: ignore[arg-type]
    result = client.exec(request, stdout=out.extend, stderr=err.extend)
    return result, bytes(out), bytes(err)


def test_echo_and_exit_codes(client: AgentClient) -> None:
    result, out, err = run(client, "echo", "hello", "world")
    assert (result.exit_code, result.signal, out, err) == (0, None, b"hello world\n", b"")
    assert result.pid is not None and result.pid > 1
    assert run(client, "true")[0].host_exit_code == 0
    assert run(client, "false")[0].host_exit_code == 1
    for code in (2, 42, 255):
        assert run(client, "sh", "-c", f"exit {code}")[0].host_exit_code == code


def test_stdout_and_stderr_are_separate(client: AgentClient) -> None:
    result, out, err = run(client, "sh", "-c", "echo out; echo err >&2; echo out2")
    assert (result.exit_code, out, err) == (0, b"out\nout2\n", b"err\n")


def test_command_not_found_is_127(client: AgentClient) -> None:
    result, _, _ = run(client, "no-such-command-xyz")
    assert result.error is not None and result.error["code"] == "ENOENT"
    assert "no-such-command-xyz" in result.error["message"]
    assert result.host_exit_code == 127
    result, _, _ = run(client, "/no/such/path")
    assert result.error is not None and result.error["code"] == "ENOENT"
    assert result.host_exit_code == 127


def test_not_executable_is_126(client: AgentClient, tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho never\n")
    script.chmod(0o644)
    result, out, _ = run(client, str(script))
    assert out == b""
    assert result.error is not None and result.error["code"] == "EACCES", result.error
    assert str(script) in result.error["message"]
    assert result.host_exit_code == 126
    result, _, _ = run(client, str(tmp_path))  # a directory
    assert result.error is not None and result.host_exit_code == 126
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x7fELF\x00garbage")
    garbage.chmod(0o755)
    result, _, _ = run(client, str(garbage))
    assert result.error is not None and result.error["code"] == "ENOEXEC", result.error
    assert result.host_exit_code == 126


def test_found_in_the_path_of_env(client: AgentClient, tmp_path: Path) -> None:
    tool = tmp_path / "my-tool"
    tool.write_text("#!/bin/sh\necho from-my-tool \"$@\"\n")
    tool.chmod(0o755)
    result, out, _ = run(client, "my-tool", "x", env=(f"PATH=/nonexistent:{tmp_path}:/bin",))
    assert (result.exit_code, out) == (0, b"from-my-tool x\n")
    # not executable in one PATH entry, found in a later one: runs the later one
    (tmp_path / "shadow").mkdir()
    blocked = tmp_path / "shadow" / "echo"
    blocked.write_text("#!/bin/sh\necho wrong\n")
    blocked.chmod(0o644)
    result, out, _ = run(client, "echo", "right", env=(f"PATH={tmp_path}/shadow:/bin",))
    assert (result.exit_code, out) == (0, b"right\n")
    # only a non-executable match: EACCES, 126
    result, _, _ = run(client, "echo", env=(f"PATH={tmp_path}/shadow",))
    assert result.error is not None and result.error["code"] == "EACCES"


def test_killed_by_a_signal_is_128_plus_n(client: AgentClient) -> None:
    result, _, _ = run(client, "sh", "-c", "kill -9 $$")
    assert (result.exit_code, result.signal, result.host_exit_code) == (None, 9, 137)
    result, _, _ = run(client, "sh", "-c", "kill -TERM $$")
    assert result.host_exit_code == 143


def test_timeout_kills_the_process_group(client: AgentClient) -> None:
    result, out, _ = run(client, "sh", "-c", "echo before; sleep 30 & sleep 30; echo never",
                         timeout_ms=500)
    assert result.timed_out and result.host_exit_code == 124
    assert out == b"before\n"
    assert result.duration_ms < 10_000


def test_env_is_exactly_as_given_plus_home(client: AgentClient) -> None:
    result, out, _ = run(client, "/usr/bin/env", env=("A=1", "B=two words", "C="))
    assert result.exit_code == 0
    lines = sorted(out.decode().splitlines())
    assert lines == ["A=1", "B=two words", "C=", "HOME=/root"], lines
    result, out, _ = run(client, "/usr/bin/env", env=("HOME=/custom",))
    assert out == b"HOME=/custom\n"


def test_cwd_default_and_errors(client: AgentClient, tmp_path: Path) -> None:
    assert run(client, "pwd", cwd=str(tmp_path))[1] == f"{tmp_path}\n".encode()
    assert run(client, "pwd")[1] == b"/\n"
    result, _, _ = run(client, "pwd", cwd=str(tmp_path / "missing"))
    assert result.error is not None and result.error["code"] == "ECWD"
    assert str(tmp_path / "missing") in result.error["message"]
    assert result.host_exit_code == 126


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_users_by_name_and_number(client: AgentClient) -> None:
    result, out, _ = run(client, "sh", "-c", "id -u; id -g; echo $HOME", user="nobody")
    assert result.exit_code == 0
    assert out.decode().split() == ["65534", "65534", "/nonexistent"]
    _, out, _ = run(client, "sh", "-c", "id -u; id -g; id -G", user="1234:5678")
    assert out.decode().split() == ["1234", "5678", "5678"]
    _, out, _ = run(client, "sh", "-c", "id -u; id -g", user="nobody:root")
    assert out.decode().split() == ["65534", "0"]
    _, out, _ = run(client, "id", "-u", user="root")
    assert out == b"0\n"
    _, out, _ = run(client, "id", "-u", user="")
    assert out == b"0\n"
    result, _, _ = run(client, "id", user="no-such-user-xyz")
    assert result.error is not None and result.error["code"] == "EUSER"
    assert "no-such-user-xyz" in result.error["message"]
    assert result.host_exit_code == 126
    result, _, _ = run(client, "id", user="nobody:no-such-group-xyz")
    assert result.error is not None and result.error["code"] == "EUSER"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_supplementary_groups_come_from_etc_group(client: AgentClient) -> None:
    members: dict[str, set[int]] = {}
    for line in Path("/etc/group").read_text().splitlines():
        fields = line.split(":")
        if len(fields) == 4 and fields[3]:
            for name in fields[3].split(","):
                members.setdefault(name, set()).add(int(fields[2]))
    passwd = {line.split(":")[0]: line.split(":") for line in
              Path("/etc/passwd").read_text().splitlines() if line.count(":") == 6}
    candidates = [name for name in members if name in passwd]
    if not candidates:
        pytest.skip("no user with supplementary groups in this host's /etc/group")
    name = candidates[0]
    _, out, _ = run(client, "id", "-G", user=name)
    expected = members[name] | {int(passwd[name][3])}
    assert set(map(int, out.split())) == expected


def test_bad_requests_are_einval(session: Session) -> None:
    for doc in ({"op": "exec"}, {"op": "exec", "argv": []}, {"op": "exec", "argv": [1]},
                {"op": "exec", "argv": ["x\u0000y"]}, {"op": "exec", "argv": [""]},
                {"op": "exec", "argv": ["true"], "env": "A=1"},
                {"op": "exec", "argv": ["true"], "tty": {"rows": -1, "cols": 2}},
                {"op": "exec", "argv": ["true"], "timeout_ms": 1.5},
                {"op": "exec", "argv": ["true"], "stdin": "yes"}):
        state = session.wait(session.open(doc))
        assert state.error is not None and state.error["code"] == "EINVAL", (doc, state.error)
    state = session.wait(session.open({"op": "no-such-op"}))
    assert state.error is not None and state.error["code"] == "ENOTSUP"
    assert session.run(["true"]).exit == {"exit_code": 0, "signal": None, "timed_out": False}


def test_argv_bytes_survive_json_escapes(session: Session) -> None:
    # \udcXX is a raw byte (Python's surrogateescape), so argv can carry any bytes.
    odd = "caf\u00e9 \U0001f600 tab\there quote\" back\\slash " + \
        b"\xff\xfe".decode("utf-8", "surrogateescape")
    state = session.run(["printf", "%s", odd])
    assert state.exit is not None and state.exit["exit_code"] == 0
    assert bytes(state.stdout) == odd.encode("utf-8", "surrogateescape")


def test_background_holder_is_waited_for_and_killed_at_the_timeout(session: Session) -> None:
    # The shell exits at once; its background child keeps stdout open: EXIT waits for EOF,
    # which the timeout brings by killing the group, and the shell's own status is kept.
    state = session.run(["sh", "-c", "echo first; (sleep 0.5; echo late; sleep 60) & exit 3"],
                        timeout_ms=1500)
    assert state.exit == {"exit_code": 3, "signal": None, "timed_out": False}
    assert bytes(state.stdout) == b"first\nlate\n"
