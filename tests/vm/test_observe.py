"""`logs`, `events` and `wait` on real microVMs (QEMU, TCG on this host).

One busybox workspace is booted, watched while running, and halted from another thread
while `logs -f`, `events -f` and `wait` follow it; a second one fails its boot, and its
console is read afterwards.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from pathlib import Path

import pytest

from tests.support.fixtures import MICROAGENT, PushedImage
from tests.vm.cli import ma, ok

pytestmark = pytest.mark.slow

KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d{6}\] ", re.MULTILINE)


def follow(home: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([MICROAGENT, "--state-dir", str(home), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_watch_a_boot_and_a_halt(home: Path, busybox_image: PushedImage) -> None:
    ok(ma(home, "create", "watched", "--image", busybox_image.ref, "--profile", "tiny"))
    ok(ma(home, "start", "watched"))

    log = ok(ma(home, "logs", "watched")).stdout
    assert KERNEL_LINE.search(log), log
    assert "microagent-init: ready" in log and "\r\n" not in log
    doc = json.loads(ok(ma(home, "--json", "logs", "watched")).stdout)
    assert doc["name"] == "watched" and "microagent-init: ready" in doc["log"]
    assert ok(ma(home, "logs", "watched", "--tail", "3")).stdout.count("\n") <= 3

    timed = ma(home, "wait", "watched", "--timeout", "1", "--state", "halted")
    assert timed.returncode == 75, timed
    assert "is running" in timed.stderr and "halted" in timed.stderr
    assert ok(ma(home, "wait", "watched", "--state", "running")).stdout == "running\n"

    logs = follow(home, "logs", "-f", "watched")
    events = follow(home, "events", "-f", "watched")
    waited: list[subprocess.CompletedProcess[str]] = []
    waiter = threading.Thread(target=lambda: waited.append(
        ma(home, "--json", "wait", "watched", "--state", "halted")))
    waiter.start()
    try:
        halter = threading.Thread(target=lambda: ok(ma(home, "halt", "watched")))
        halter.start()
        halter.join(240)
        waiter.join(240)
        assert json.loads(ok(waited[0]).stdout) == {
            "name": "watched", "state": "halted", "detail": json.loads(
                ok(ma(home, "--json", "events", "watched")).stdout)["events"][-1]["detail"]}
        out, err = logs.communicate(timeout=60)  # ends by itself once halted
        assert logs.returncode == 0, err
        assert "microagent-init: ready" in out and out.startswith(log[:200])
        out, err = events.communicate(timeout=60)
        assert events.returncode == 0, err
    finally:
        for process in (logs, events):
            if process.poll() is None:
                process.kill()
                process.wait()
    followed = [line.split()[1] for line in out.splitlines()]
    listed = ok(ma(home, "events", "watched")).stdout
    assert [line.split()[1] for line in listed.splitlines()] == followed
    assert followed[-4:] == ["starting", "running", "halting", "halted"], listed
    doc = json.loads(ok(ma(home, "--json", "events", "watched")).stdout)
    assert [e["state"] for e in doc["events"]] == followed
    # halted: following ends at once, wait returns at once
    assert ok(ma(home, "logs", "-f", "watched", timeout=30)).stdout == \
        ok(ma(home, "logs", "watched")).stdout
    assert ok(ma(home, "wait", "watched", timeout=30)).stdout == "halted\n"
    ok(ma(home, "delete", "watched", "--yes"))


def test_the_log_of_a_failed_boot_is_readable(home: Path, busybox_image: PushedImage) -> None:
    ok(ma(home, "create", "fails", "--image", busybox_image.ref, "--profile", "tiny"))
    result = ma(home, "start", "fails", "--timeout", "1")
    assert result.returncode == 1, result
    assert ok(ma(home, "wait", "fails", timeout=30)).stdout == "failed\n"
    capture = home / "workspaces" / "fails" / "serial.log"
    assert capture.exists()  # maybe empty: under TCG the guest prints little in 1 s
    log = ok(ma(home, "logs", "fails")).stdout
    assert log == capture.read_bytes().decode(errors="replace").replace("\r\n", "\n")
    assert "microagent-init: ready" not in log
    assert ok(ma(home, "logs", "-f", "fails", timeout=30)).stdout == log
    states = [line.split()[1] for line in ok(ma(home, "events", "fails")).stdout.splitlines()]
    assert states[-2:] == ["starting", "failed"]
    ok(ma(home, "delete", "fails", "--yes"))


def test_the_console_of_a_guest_that_cannot_mount_its_root(
        home: Path, busybox_image: PushedImage) -> None:
    ok(ma(home, "create", "broken", "--image", busybox_image.ref, "--profile", "tiny"))
    with (home / "workspaces" / "broken" / "rootfs.ext4").open("r+b") as disk:
        disk.seek(1024)
        disk.write(bytes(1024))  # no ext4 superblock: the agent cannot mount the root
    result = ma(home, "start", "broken", "--timeout", "60")
    assert result.returncode == 1, result
    log = ok(ma(home, "logs", "broken")).stdout
    assert KERNEL_LINE.search(log) and "microagent-init: fatal: mount" in log, log
    for line in log.strip().splitlines()[-3:]:  # start quoted the last lines; logs has all
        assert line.strip() in result.stderr
    assert ok(ma(home, "logs", "broken", "--tail", "1")).stdout == \
        log.rstrip("\n").rsplit("\n", 1)[-1] + "\n"
    ok(ma(home, "delete", "broken", "--yes"))
