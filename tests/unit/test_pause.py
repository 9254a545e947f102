"""vmm.PauseWatch: QMP's events as QEMU 7.2 sends them, to the paused state and its reason."""

from __future__ import annotations

from pathlib import Path

from microagent.vm.vmm import USER_PAUSE, PauseWatch, process_stopped


def io_error(device: str, nospace: bool = True) -> dict[str, object]:
    return {"event": "BLOCK_IO_ERROR", "data": {
        "device": device, "node-name": "#block153", "operation": "write", "action": "stop",
        "nospace": nospace, "reason": "No space left on device" if nospace else "I/O error"}}


STOP = {"event": "STOP"}
RESUME = {"event": "RESUME"}


def test_a_full_host_disk_pauses_with_the_directory(tmp_path: Path) -> None:
    root, volume = tmp_path / "ws" / "rootfs.ext4", tmp_path / "volumes" / "data.ext4"
    watch = PauseWatch((root, volume))
    assert watch.event(io_error("disk1")) is None  # the STOP follows
    assert not watch.paused
    assert watch.event(STOP) == "paused"
    assert watch.reason == f"host disk full in {tmp_path / 'volumes'} (writing data.ext4)"
    assert watch.event(RESUME) == "resumed" and not watch.paused
    # cont retries the write; still no room: paused again, counted
    watch.event(io_error("disk0"))
    assert watch.event(STOP) == "paused" and watch.pauses == 2
    assert watch.reason == f"host disk full in {tmp_path / 'ws'} (writing rootfs.ext4)"


def test_other_pauses_and_errors_say_what_they_are(tmp_path: Path) -> None:
    watch = PauseWatch((tmp_path / "rootfs.ext4",))
    assert watch.event(STOP) == "paused"
    assert watch.reason == "the VM was paused (a QMP stop)"  # no I/O error before it
    watch.event(RESUME)
    watch.event(io_error("disk0", nospace=False))
    watch.event(STOP)
    assert watch.reason == f"host I/O error on rootfs.ext4 in {tmp_path}: I/O error"
    assert watch.event(RESUME) == "resumed"
    assert watch.event(RESUME) is None  # not paused: nothing changes
    report = {"event": "BLOCK_IO_ERROR", "data": {"device": "disk0", "action": "report"}}
    assert watch.event(report) is None and watch.event(STOP) == "paused"
    assert watch.reason == "the VM was paused (a QMP stop)"  # the guest saw that error


def test_the_users_pause_is_told_from_the_hosts(tmp_path: Path) -> None:
    watch = PauseWatch((tmp_path / "rootfs.ext4",))
    watch.ask()
    assert watch.event(STOP) == "paused"
    assert watch.asked and watch.reason == USER_PAUSE
    assert watch.event(RESUME) == "resumed" and not watch.asked
    # an I/O error before the asked STOP makes it the host's: resume must wait and see
    watch.ask()
    watch.event(io_error("disk0"))
    watch.event(STOP)
    assert not watch.asked and watch.reason.startswith("host disk full")
    watch.event(RESUME)
    watch.event(STOP)  # not asked again: someone else's
    assert not watch.asked and watch.reason == "the VM was paused (a QMP stop)"


def test_a_disk_the_watch_does_not_know() -> None:
    watch = PauseWatch(())
    watch.event(io_error("disk3"))
    watch.event(STOP)
    assert watch.reason == "host disk full in an unknown directory (writing disk3)"


def test_process_stopped() -> None:
    """A stopped process (SIGSTOP) is told from a running one, by /proc's state."""
    import os
    import signal
    import subprocess
    import time

    assert process_stopped(os.getpid()) is False
    assert process_stopped(2 ** 22 + 7) is False  # no such process
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        os.kill(sleeper.pid, signal.SIGSTOP)
        for _ in range(500):  # the kernel stops it asynchronously: look until it has
            if process_stopped(sleeper.pid):
                break
            time.sleep(0.01)
        assert process_stopped(sleeper.pid) is True
    finally:
        sleeper.kill()
        sleeper.wait()
