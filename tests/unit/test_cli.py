"""The CLI contract: columns, JSON shapes, exit codes, and nothing written on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from microagent.cli import main

MICROAGENT = str(Path(sys.executable).parent / "microagent")


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The installed console script, as a user runs it."""
    return subprocess.run([MICROAGENT, *args], capture_output=True, text=True, timeout=120,
                          input=stdin, env=os.environ.copy())


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def test_version_and_module_entry_point() -> None:
    result = run("version")
    assert result.returncode == 0
    assert result.stdout.startswith("microagent ")
    module = subprocess.run([sys.executable, "-m", "microagent", "--json", "version"],
                            capture_output=True, text=True, check=True)
    assert json.loads(module.stdout)["version"] == result.stdout.split()[1]


def test_profiles_columns(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "MEMORY", "CPUS", "DISK", "DESCRIPTION"]
    assert lines[3].split()[:4] == ["medium", "2048MiB", "2", "8192MiB"]
    assert main(["--json", "profiles"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in doc["profiles"]] == ["tiny", "small", "medium", "large"]


def test_empty_lists(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    assert capsys.readouterr().out == "No workspaces.\n"
    assert main(["--json", "ls"]) == 0
    assert json.loads(capsys.readouterr().out) == {"workspaces": []}
    assert main(["image", "list"]) == 0
    assert capsys.readouterr().out == "No images.\n"


def test_a_table_of_no_rows_is_its_header() -> None:
    from microagent.cli.output import table

    assert table(["ID", "COMMAND"], []) == "ID   COMMAND"


@pytest.mark.parametrize("name", ["../x", "a/b", "x" * 64, "*", ""])
def test_bad_names_exit_2_and_write_nothing(name: str, state_dir: Path) -> None:
    result = run("create", name, "--image", "busybox")
    assert result.returncode == 2, result.stderr
    assert "invalid workspace name" in result.stderr or "name is required" in result.stderr
    assert files_under(state_dir) == []


@pytest.mark.parametrize("ref", ["library/UPPER", "x@sha256:bad", "a:b:c", "ubuntu:bad tag"])
def test_bad_references_exit_2_and_write_nothing(ref: str, state_dir: Path) -> None:
    for args in (["image", "pull", ref], ["create", "w", "--image", ref]):
        result = run(*args)
        assert result.returncode == 2, result.stderr
        assert "invalid image reference" in result.stderr
    assert files_under(state_dir) == []


def test_json_errors_have_the_contract_shape(state_dir: Path) -> None:
    result = run("--json", "create", "bad/name", "--image", "busybox")
    assert result.returncode == 2
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "usage"
    assert "invalid workspace name" in error["message"]
    assert "hint" in error
    result = run("--json", "frobnicate")
    assert result.returncode == 2
    assert json.loads(result.stdout)["error"]["kind"] == "usage"


def test_name_positional_and_flag_is_a_usage_error() -> None:
    result = run("create", "a", "--name", "b", "--image", "busybox")
    assert result.returncode == 2
    assert "positionally or with --name" in result.stderr


def test_delete_unknown_is_ok_and_prompt_needs_yes(state_dir: Path) -> None:
    result = run("delete", "ghost", "--yes")
    assert result.returncode == 0
    assert "No workspace named ghost" in result.stdout
    result = run("delete", "ghost", stdin="")
    assert result.returncode == 2
    assert "--yes" in result.stderr


def test_unknown_profile_and_backend_are_usage_errors(state_dir: Path) -> None:
    result = run("create", "w", "--image", "busybox", "--profile", "huge")
    assert result.returncode == 2 and "unknown profile" in result.stderr
    result = run("create", "w", "--image", "busybox", "--network", "bridge")
    assert result.returncode == 2 and "network" in result.stderr
    assert files_under(state_dir) == []


def test_registry_unreachable_is_retryable(state_dir: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run("image", "pull", f"127.0.0.1:{port}/nobody/here:1")
    assert result.returncode == 75, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    assert [p for p in files_under(state_dir) if "blobs/sha256/" in p] == []


def test_exec_options_before_and_after_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_run_exec(layout: object, name: str, options: object, **_: object) -> object:
        seen["name"], seen["options"] = name, options
        from microagent.vm.agent import ExecResult

        return ExecResult(exit_code=0)

    monkeypatch.setattr("microagent.workspace.execution.run_exec", fake_run_exec)
    assert main(["exec", "ws", "--timeout", "1", "-e", "A=b", "-w", "/tmp", "--", "sleep",
                 "30"]) == 0
    options = seen["options"]
    assert seen["name"] == "ws"
    assert (options.argv, options.timeout, options.env, options.workdir) == (  # type: ignore[attr-defined]
        ("sleep", "30"), 1.0, ("A=b",), "/tmp")
    assert main(["exec", "-i", "ws", "cat", "-n"]) == 0  # docker's form
    assert seen["options"].argv == ("cat", "-n")  # type: ignore[attr-defined]
    assert seen["options"].interactive  # type: ignore[attr-defined]
    assert main(["exec", "ws", "--", "sh", "-c", "--timeout"]) == 0
    assert seen["options"].argv == ("sh", "-c", "--timeout")  # type: ignore[attr-defined]


# --- numeric flags: refused at parse time, exit 2, before anything is looked up ----------

_BAD_SECONDS = ["-1", "nan", "inf", "-inf", "1e400", "1e10", "ten", ""]


def _numeric_cases() -> list[tuple[str, list[str]]]:
    cases: list[tuple[str, list[str]]] = []
    for v in _BAD_SECONDS:
        cases += [("--timeout", ["exec", "--timeout", v, "ws", "--", "true"]),
                  ("--timeout", ["exec", "ws", "--timeout", v, "--", "true"]),
                  ("--timeout", ["wait", "ws", "--timeout", v]),
                  ("--timeout", ["run", "--timeout", v, "oci:/nonexistent", "true"])]
    for v in [*_BAD_SECONDS, "0"]:  # a wait of 0 s for a boot or a console line: no use
        cases += [("--timeout", ["start", "ws", "--timeout", v]),
                  ("--timeout", ["connect", "ws", "--send", "true", "--timeout", v]),
                  ("--start-timeout", ["run", "--start-timeout", v, "oci:/nonexistent", "true"])]
    for flag in ("--memory", "--cpus", "--size-mib"):
        for v in ("-1", "0", "nan", "1.5", "99999999999999999999"):
            cases += [(flag, ["create", "ws", "--image", "oci:/nonexistent", flag, v]),
                      (flag, ["run", flag, v, "oci:/nonexistent", "true"])]
    cases.append(("--cpus", ["create", "ws", "--image", "oci:/nonexistent", "--cpus", "257"]))
    for v in ("-1", "0", "nan", "1" + "0" * 20):
        cases.append(("--size-mib", ["volume", "create", "v", "--size-mib", v]))
    for v in ("-1", "nan", "1.5"):
        cases.append(("--tail", ["logs", "ws", "--tail", v]))
    return cases


@pytest.mark.parametrize(("flag", "argv"), _numeric_cases())
def test_numeric_flags_are_usage_errors(flag: str, argv: list[str], state_dir: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``exec --timeout -1`` used to exit 126 with the agent's protocol text."""
    assert main(["--json", *argv]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["kind"] == "usage", error
    assert flag in error["message"], error
    assert not any(p.suffix in (".ext4", ".json") for p in state_dir.rglob("*"))


def test_more_memory_than_the_host_has_is_refused(state_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from microagent.config import host_memory_mib

    host = host_memory_mib()
    assert host is not None
    assert main(["--json", "create", "ws", "--image", "oci:/nonexistent", "--memory",
                 str(min(host + 1, 1024 * 1024))]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert "more than this host has" in error["message"]
    assert files_under(state_dir) == []


@pytest.mark.parametrize(("value", "expected_ms"), [("0", 0), ("0.0001", 1), ("2.5", 2500)])
def test_exec_timeout_zero_is_no_limit_and_a_tiny_one_is_kept_faked_exec(
        value: str, expected_ms: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from microagent.workspace.execution import ExecOptions, build_request

    seen: dict[str, object] = {}

    def fake_run_exec(layout: object, name: str, options: ExecOptions, **_: object) -> object:
        seen["options"] = options
        from microagent.vm.agent import ExecResult

        return ExecResult(exit_code=0)

    monkeypatch.setattr("microagent.workspace.execution.run_exec", fake_run_exec)
    assert main(["exec", "ws", "--timeout", value, "--", "true"]) == 0
    options = seen["options"]
    assert isinstance(options, ExecOptions)

    class Config:
        env: tuple[str, ...] = ()
        working_dir = user = ""

    class Workspace:
        image_config = Config()
        env: tuple[str, ...] = ()

    assert build_request(Workspace(), options, None).timeout_ms == expected_ms  # type: ignore[arg-type]


# --- -e/--env NAME passes the host's value, as docker does -------------------------------


def _capture(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Fakes of the three library calls behind exec, create and run, keeping what they
    were asked (no VM here: what is checked is the CLI's resolution of the items)."""
    seen: dict[str, object] = {}

    def fake_run_exec(layout: object, name: str, options: object, **_: object) -> object:
        from microagent.vm.agent import ExecResult

        seen["exec"] = options.env  # type: ignore[attr-defined]
        return ExecResult(exit_code=0)

    def fake_create(layout: object, spec: object, **_: object) -> object:
        seen["create"] = spec.env  # type: ignore[attr-defined]
        raise SystemExit(0)

    def fake_run_once(layout: object, spec: object, *_: object, **__: object) -> object:
        seen["run"] = spec.env  # type: ignore[attr-defined]
        raise SystemExit(0)

    monkeypatch.setattr("microagent.workspace.execution.run_exec", fake_run_exec)
    monkeypatch.setattr("microagent.state.records.create_workspace", fake_create)
    monkeypatch.setattr("microagent.workspace.oneshot.run_once", fake_run_once)
    return seen


def test_env_name_alone_passes_the_hosts_value_to_faked_verbs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``exec -e NAME`` used to set NAME to an empty value."""
    monkeypatch.setenv("MA_FROM_HOST", "host value=with equals")
    monkeypatch.setenv("MA_EMPTY_ON_HOST", "")
    monkeypatch.delenv("MA_NOT_ON_HOST", raising=False)
    seen = _capture(monkeypatch)
    items = ["A=1", "MA_FROM_HOST", "MA_EMPTY_ON_HOST", "MA_NOT_ON_HOST", "B="]
    expected = ("A=1", "MA_FROM_HOST=host value=with equals", "MA_EMPTY_ON_HOST=", "B=")
    assert main(["exec", *(f"-e{i}" for i in items), "ws", "--", "env"]) == 0
    assert seen["exec"] == expected
    with pytest.raises(SystemExit):
        main(["create", "ws", "--image", "oci:/x", *(f"--env={i}" for i in items)])
    assert seen["create"] == expected
    with pytest.raises(SystemExit):
        main(["run", *(f"--env={i}" for i in items), "oci:/x", "env"])
    assert seen["run"] == expected


@pytest.mark.parametrize("item", ["", "=v", "=", "A\0B=1"])
@pytest.mark.parametrize("verb", ["exec", "create", "run"])
def test_env_without_a_name_is_a_usage_error_before_faked_verbs(
        item: str, verb: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    seen = _capture(monkeypatch)
    argv = {"exec": ["exec", "-e", item, "ws", "--", "env"],
            "create": ["create", "ws", "--image", "oci:/x", "--env", item],
            "run": ["run", "--env", item, "oci:/x", "env"]}[verb]
    assert main(["--json", *argv]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["kind"] == "usage" and "invalid" in error["message"], error
    assert seen == {}
    assert files_under(state_dir) == []


# --- a state directory that is not one ------------------------------------------------------

_STATE_VERBS = [["list"], ["ps"], ["status", "ws"], ["delete", "ws", "--yes"], ["start", "ws"],
                ["halt", "ws"], ["logs", "ws"], ["events", "ws"], ["wait", "ws"],
                ["exec", "ws", "--", "true"], ["cp", "ws:/a", "b"], ["connect", "ws"],
                ["create", "ws", "--image", "oci:/nonexistent"],
                ["run", "oci:/nonexistent", "true"], ["image", "list"], ["kernel", "list"],
                ["volume", "list"], ["volume", "create", "v"]]


@pytest.mark.parametrize("argv", _STATE_VERBS, ids=lambda a: " ".join(a[:2]))
@pytest.mark.parametrize("relative", ["file", "file/sub"])
def test_a_state_dir_that_is_not_a_directory_is_a_usage_error(
        argv: list[str], relative: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``--state-dir /etc/passwd list`` used to say "No workspaces."."""
    (tmp_path / "file").write_text("not a directory\n")
    state = tmp_path / relative
    assert main(["--json", "--state-dir", str(state), *argv]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["kind"] == "usage", error
    assert f"the state directory {state} " in error["message"]
    assert "not a directory" in error["message"]
    assert (tmp_path / "file").read_text() == "not a directory\n"


def test_a_state_dir_from_the_environment_is_checked_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "file"))
    result = run("list")
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"the state directory {tmp_path / 'file'} is not a directory" in result.stderr
    assert run("version").returncode == 0  # verbs that never read it still work


def test_a_state_dir_that_cannot_be_created_is_a_host_error() -> None:
    """As the nobody user, in a directory only root can write: exit 1, nothing made."""
    import shutil
    import tempfile

    from tests.rootfs.unprivileged import NOBODY, SRC, require_setpriv

    require_setpriv()
    parent = Path(tempfile.mkdtemp(prefix="root-only-", dir="/tmp"))  # /tmp: nobody can see it
    parent.chmod(0o755)
    try:
        _run_as_nobody_in(parent, NOBODY, SRC)
    finally:
        shutil.rmtree(parent)


def _run_as_nobody_in(parent: Path, nobody: int, src: str) -> None:
    state = parent / "state"
    result = subprocess.run(
        ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups",
         sys.executable, "-m", "microagent", "--json", "--state-dir", str(state), "list"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": src, "HOME": "/nonexistent"})
    assert result.returncode == 1, result
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "host"
    assert error["message"] == (f"the state directory {state} cannot be created: {parent} "
                                "is not writable")
    assert not state.exists()
