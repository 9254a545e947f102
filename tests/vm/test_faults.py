"""Faults on real microVMs, each followed by the next start: nothing written before the
fault is lost.

- SIGTERM, SIGINT and SIGHUP to the supervisor halt the workspace as ``halt`` does.
- A frozen VM (QEMU stopped with SIGSTOP): exec's ``--timeout`` is a host deadline too,
  exec, cp and connect answer SIGTERM and Ctrl-C at once, ``status --json`` returns in
  bounded time and says the guest is unresponsive.
- The host disk full: QEMU pauses the VM; the workspace is ``paused`` with the reason,
  exec, cp and console input say so, ``resume`` continues once there is room (run as root:
  the workspace lives on a small tmpfs the test mounts).
- A panic under ``--restart on-failure``: ``logs --previous`` still shows it.
- An exec whose VM goes away (a power-off, a halt, a panic) is microagent's failure, 125,
  with the workspace's new state.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.fixtures import MICROAGENT, PushedImage
from tests.vm.cli import events, ma, ok, qemu_pids

pytestmark = pytest.mark.slow


def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def status(home: Path, name: str) -> dict[str, object]:
    return json.loads(ok(ma(home, "--json", "status", name)).stdout)  # type: ignore[no-any-return]


def background(home: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([MICROAGENT, "--state-dir", str(home), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def timed_signal(process: subprocess.Popen[str], signum: int, timeout: float
                 ) -> tuple[int, str, float]:
    """Send ``signum``; the exit code, stderr and how long the process took to end."""
    sent = time.monotonic()
    process.send_signal(signum)
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError(f"{process.args} ignored signal {signum} for {timeout}s") \
            from None
    return process.returncode, err, time.monotonic() - sent


@pytest.fixture
def workspace(home: Path, busybox_image: PushedImage, request: pytest.FixtureRequest
              ) -> Iterator[str]:
    """A created workspace named after the test; killed and deleted afterwards."""
    name = request.node.name.removeprefix("test_").replace("_", "-")[:40]
    ok(ma(home, "create", name, "--image", busybox_image.ref, "--profile", "tiny"))
    yield name
    ma(home, "kill", name)
    ma(home, "delete", name, "--yes")


def test_signals_to_the_supervisor_halt_the_workspace(home: Path, workspace: str) -> None:
    name = workspace
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signame = signal.Signals(signum).name
        ok(ma(home, "start", name))
        ok(ma(home, "exec", name, "--", "sh", "-c", f"echo {signame} > /root/{signame}"))
        supervisor = int(str(status(home, name)["supervisor_pid"]))
        os.kill(supervisor, signum)
        gone = Path(f"/proc/{supervisor}")
        until(lambda: not gone.exists(), 60, "the supervisor to exit")  # noqa: B023
        log = events(home, name)
        assert [e["state"] for e in log][-2:] == ["halting", "halted"], log
        assert f"{signame} to the supervisor" in log[-2]["detail"]
        assert log[-1]["detail"] == f"halted cleanly ({signame} to the supervisor)"
        assert qemu_pids(name) == []
    ok(ma(home, "start", name))
    for signame in ("SIGTERM", "SIGINT", "SIGHUP"):  # written without sync before each
        assert ok(ma(home, "exec", name, "--", "cat", f"/root/{signame}")).stdout == \
            f"{signame}\n"
    ok(ma(home, "halt", name))


def test_a_frozen_vm_bounds_every_wait(home: Path, workspace: str, tmp_path: Path) -> None:
    name = workspace
    ok(ma(home, "start", name))
    ok(ma(home, "exec", name, "--", "sh", "-c", "echo before > /root/before"))
    (vm,) = qemu_pids(name)
    os.kill(vm, signal.SIGSTOP)
    try:
        started = time.monotonic()
        timed = ma(home, "exec", name, "--timeout", "5", "--", "sleep", "100", timeout=120)
        took = time.monotonic() - started
        assert timed.returncode == 125, timed
        assert "unresponsive" in timed.stderr and "--timeout of 5s" in timed.stderr
        assert took < 40, took

        for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
            waiting = background(home, "exec", name, "--", "sleep", "100")
            time.sleep(2)
            returncode, err, took = timed_signal(waiting, signum, 30)
            assert returncode == code, err
            assert took < 10, took
        for args in (("cp", f"{name}:/etc/hostname", str(tmp_path / "hostname")),
                     ("connect", name, "--send", "echo hi")):
            waiting = background(home, *args)
            time.sleep(2)
            returncode, err, took = timed_signal(waiting, signal.SIGTERM, 30)
            assert returncode == 143, (args, err)
            assert took < 5, (args, took)

        started = time.monotonic()
        frozen = status(home, name)
        assert time.monotonic() - started < 30
        assert frozen["state"] == "running"
        ready = frozen["execReady"]
        assert isinstance(ready, dict) and ready["ok"] is False, ready
        assert "did not answer a ping" in ready["detail"]
        assert f"VM process {vm} is stopped" in ready["detail"]
    finally:
        os.kill(vm, signal.SIGCONT)
    assert ok(ma(home, "exec", name, "--", "echo", "thawed")).stdout == "thawed\n"
    until(lambda: status(home, name)["execReady"]["ok"] is True,  # type: ignore[index]
          30, "execReady again")
    ok(ma(home, "halt", name))
    ok(ma(home, "start", name))
    assert ok(ma(home, "exec", name, "--", "cat", "/root/before")).stdout == "before\n"
    ok(ma(home, "halt", name))


@pytest.fixture
def small_disk(home: Path, workspace: str) -> Iterator[Path]:
    """The workspace's directory on a tmpfs of its own (the test grows it with
    ``remount,size=``); needs root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    directory = home / "workspaces" / workspace
    aside = directory.with_name(f".{workspace}.aside")
    directory.rename(aside)
    directory.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0700", "tmpfs",
                              str(directory)], capture_output=True, text=True)
    if mounted.returncode != 0:
        directory.rmdir()
        aside.rename(directory)
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        subprocess.run(["cp", "-a", "--sparse=always", f"{aside}/.", str(directory)],
                       check=True)
        shutil.rmtree(aside)
        yield directory
    finally:
        ma(home, "kill", workspace)
        if subprocess.run(["umount", str(directory)]).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)])


def resize(directory: Path, free_kib: int) -> None:
    """The tmpfs at ``directory``: what it holds now, plus ``free_kib``."""
    used = int(subprocess.run(["df", "-k", "--output=used", str(directory)], check=True,
                              capture_output=True, text=True).stdout.split()[-1])
    subprocess.run(["mount", "-o", f"remount,size={used + free_kib}k", str(directory)],
                   check=True)


def test_host_disk_full_pauses_until_resumed(home: Path, workspace: str,
                                            small_disk: Path, tmp_path: Path) -> None:
    name = workspace
    ok(ma(home, "start", name))
    ok(ma(home, "exec", name, "--", "sh", "-c", "echo before > /root/before"))
    resize(small_disk, 12 * 1024)
    fill = background(home, "exec", name, "--", "dd", "if=/dev/zero", "of=/root/fill",
                      "bs=1M", "count=40", "conv=fsync")
    try:
        until(lambda: status(home, name)["state"] == "paused", 120, "the workspace to pause")
        paused = status(home, name)
        reason = f"host disk full in {small_disk}"
        assert reason in str(paused["detail"]), paused
        assert fill.poll() is None, "the command waits while the VM is paused"

        refused = ma(home, "exec", name, "--", "true")
        assert refused.returncode == 1, refused
        assert f"{name} is paused: {reason}" in refused.stderr
        assert "resume it first" in refused.stderr
        as_json = ma(home, "--json", "exec", name, "--", "true")
        assert as_json.returncode == 1
        assert json.loads(as_json.stdout)["error"]["kind"] == "conflict"
        for args in (("cp", f"{name}:/etc/hostname", str(tmp_path / "x")),
                     ("connect", name, "--send", "echo hi")):
            refused = ma(home, *args)
            assert (refused.returncode, "is paused" in refused.stderr) == (1, True), refused
        refused = ma(home, "start", name)
        assert refused.returncode == 1 and f"microagent resume {name}" in refused.stderr
        still = ma(home, "resume", name)  # no room yet: it pauses again at once
        assert still.returncode == 1 and "paused again" in still.stderr, still
        assert status(home, name)["state"] == "paused"

        resize(small_disk, 256 * 1024)  # room on the host
        ok(ma(home, "resume", name))
        _, err = fill.communicate(timeout=120)
        assert fill.returncode == 0, err
        assert status(home, name)["state"] == "running"
        states = [e["state"] for e in events(home, name)]
        assert "paused" in states and states[-1] == "running", states
    finally:
        if fill.poll() is None:
            fill.kill()
            fill.communicate()
    ok(ma(home, "halt", name))
    ok(ma(home, "start", name))
    assert ok(ma(home, "exec", name, "--", "cat", "/root/before")).stdout == "before\n"
    ok(ma(home, "halt", name))


def test_a_paused_workspace_halts_once_there_is_room(home: Path, workspace: str,
                                                     small_disk: Path) -> None:
    """halt from paused: refused while the disk is still full (the VM stays paused, its
    writes kept), done once there is room; kill works at any time."""
    name = workspace
    ok(ma(home, "start", name))
    ok(ma(home, "exec", name, "--", "sh", "-c", "echo before > /root/before"))
    resize(small_disk, 12 * 1024)
    fill = background(home, "exec", name, "--", "dd", "if=/dev/zero", "of=/root/fill",
                      "bs=1M", "count=40", "conv=fsync")
    try:
        until(lambda: status(home, name)["state"] == "paused", 120, "the workspace to pause")
        refused = ma(home, "halt", name)
        assert refused.returncode == 1 and "cannot halt cleanly" in refused.stderr, refused
        assert status(home, name)["state"] == "paused"
        resize(small_disk, 256 * 1024)
        ok(ma(home, "halt", name))
        assert events(home, name)[-1]["state"] == "halted"
        fill.communicate(timeout=60)
    finally:
        if fill.poll() is None:
            fill.kill()
            fill.communicate()
    ok(ma(home, "start", name))
    assert ok(ma(home, "exec", name, "--", "cat", "/root/before")).stdout == "before\n"
    ok(ma(home, "kill", name))


def test_a_panic_restarted_by_policy_keeps_its_console(home: Path,
                                                       busybox_image: PushedImage) -> None:
    """The kernel's own crash (sysrq c): the exec that caused it is 125 with the new state,
    the restart's console is ``logs``, the panic is ``logs --previous``."""
    name = "panicky"
    ok(ma(home, "create", name, "--image", busybox_image.ref, "--profile", "tiny",
          "--restart", "on-failure"))
    try:
        ok(ma(home, "start", name))
        # a panic loses what the guest had not written out: this file is synced
        ok(ma(home, "exec", name, "--", "sh", "-c", "echo before > /root/before; sync"))
        crashed = ma(home, "exec", name, "--", "sh", "-c", "echo c > /proc/sysrq-trigger")
        until(lambda: [e["state"] for e in events(home, name)][-1] == "running", 120,
              "the restart")
        previous = ok(ma(home, "logs", name, "--previous")).stdout
        assert "sysrq: Trigger a crash" in previous, previous[-2000:]
        current = ok(ma(home, "logs", name)).stdout
        assert "Trigger a crash" not in current and "microagent-init" in current
        assert crashed.returncode == 125, crashed
        assert f"workspace {name} stopped while the command ran: failed" in crashed.stderr
        assert ok(ma(home, "exec", name, "--", "cat", "/root/before")).stdout == "before\n"
        ok(ma(home, "halt", name))
        ok(ma(home, "start", name))  # a start is a boot too: the restart is previous now
        assert "Trigger a crash" not in ok(ma(home, "logs", name, "--previous")).stdout
        ok(ma(home, "halt", name))
    finally:
        ma(home, "kill", name)
        ma(home, "delete", name, "--yes")


def test_an_exec_whose_vm_goes_away_is_microagents_failure(home: Path, workspace: str) -> None:
    name = workspace
    ok(ma(home, "start", name))
    ok(ma(home, "exec", name, "--", "sh", "-c", "echo before > /root/before"))
    gone = ma(home, "exec", name, "--", "sh", "-c", "sleep 1; poweroff -f")
    assert gone.returncode == 125, gone
    assert f"workspace {name} stopped while the command ran: stopped (the guest powered " \
           "off)" in gone.stderr
    ok(ma(home, "start", name))
    waiting = background(home, "exec", name, "--", "sleep", "60")
    time.sleep(2)
    ok(ma(home, "halt", name))
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 125, err
    assert f"workspace {name} stopped while the command ran: halted" in err
    ok(ma(home, "start", name))
    assert ok(ma(home, "exec", name, "--", "cat", "/root/before")).stdout == "before\n"
    ok(ma(home, "halt", name))


def test_a_run_whose_vm_goes_away_is_microagents_failure(home: Path,
                                                         busybox_image: PushedImage) -> None:
    gone = ma(home, "run", "--profile", "tiny", busybox_image.ref, "sh", "-c",
              "sleep 1; poweroff -f")
    assert gone.returncode == 125, gone
    assert "stopped while the command ran: stopped (the guest powered off)" in gone.stderr
