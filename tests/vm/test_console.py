"""``connect``: the serial console's shell, in a real terminal (tmux) and with ``--send``.

Real VMs (TCG here), the real agent and console shell: bash on the Debian image, busybox
ash on the busybox one, no shell at all on a one-file image.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fixtures import MICROAGENT, PushedImage, RunningRegistry
from tests.support.images import simple_layout
from tests.support.push import push_layout
from tests.vm.cli import ma, ok
from tests.vm.test_terminal import tmux, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def debian_ws(home: Path, debian_image: PushedImage) -> Iterator[str]:
    ok(ma(home, "create", "cons", "--image", debian_image.ref, "--profile", "small"))
    ok(ma(home, "start", "cons"))
    yield "cons"
    ma(home, "kill", "cons")
    ma(home, "delete", "cons", "--yes")


@pytest.fixture(scope="module")
def busybox_ws(home: Path, busybox_image: PushedImage) -> Iterator[str]:
    ok(ma(home, "create", "ash", "--image", busybox_image.ref, "--profile", "tiny"))
    ok(ma(home, "start", "ash"))
    yield "ash"
    ma(home, "kill", "ash")
    ma(home, "delete", "ash", "--yes")


def send(home: Path, name: str, line: str, *args: str
         ) -> subprocess.CompletedProcess[str]:
    return ma(home, "connect", name, "--send", line, *args)


@pytest.mark.parametrize("shell", ["debian_ws", "busybox_ws"])
def test_send_prints_only_the_output(home: Path, shell: str,
                                     request: pytest.FixtureRequest) -> None:
    name = request.getfixturevalue(shell)
    release = ok(ma(home, "exec", name, "--", "uname", "-r")).stdout
    seed = ok(send(home, name, "uname -r"))
    assert seed.stdout == release and seed.stderr == ""  # the seed page's example
    assert ok(send(home, name, "printf 'a  b'; echo; echo; printf c")).stdout == "a  b\n\nc\n"
    assert ok(send(home, name, "true")).stdout == ""
    # the console shell is one shell: its state carries from line to line
    ok(send(home, name, "cd /tmp && export MA_X=kept"))
    assert ok(send(home, name, "pwd; echo $MA_X")).stdout == "/tmp\nkept\n"
    ok(send(home, name, "cd"))
    document = json.loads(ok(ma(home, "--json", "connect", name, "--send",
                                "echo out; echo err >&2; false")).stdout)
    assert document["output"] == "out\nerr\n" and document["exit_code"] == 1
    # longer than the tty's 4095-byte line buffer: assembled in the shell, still exact
    long_word = "x" * 9000
    assert ok(send(home, name, f"echo {long_word} | wc -c")).stdout.strip() == "9001"
    assert ok(send(home, name, f"echo {long_word}")).stdout == long_word + "\n"
    quoted = "it's \"quoted\" $HOME `tick` \\ done"
    assert ok(send(home, name, "echo '" + quoted.replace("'", "'\\''") + "'")).stdout == \
        quoted + "\n"


def test_send_refuses_what_is_not_one_line(home: Path, debian_ws: str) -> None:
    for line, words in (("", "empty"), ("   ", "empty"), ("echo a\nb", "U+000A"),
                        ("echo \x03", "U+0003"), ("echo \x1b[2J", "U+001B"),
                        ("printf 'a\tb'", "U+0009")):
        result = send(home, debian_ws, line)
        assert result.returncode == 2, (line, result)
        assert words in result.stderr and result.stdout == ""
    # an incomplete line is a syntax error (the line runs through eval), at once
    result = json.loads(ok(ma(home, "--json", "connect", debian_ws, "--send", "if true")).stdout)
    assert result["exit_code"] == 2 and "syntax error" in result["output"]
    assert ok(send(home, debian_ws, "echo still-fine")).stdout == "still-fine\n"


def test_send_timeout_interrupts_and_restores(home: Path,
                                              busybox_ws: str) -> None:
    result = send(home, busybox_ws, "echo started; sleep 60", "--timeout", "2")
    assert result.returncode == 75, result
    assert "within 2s" in result.stderr and "started" in result.stderr
    # the sleep was interrupted, and the shell answers with its own prompt again
    assert "sleep 60" not in ok(ma(home, "exec", busybox_ws, "--", "ps")).stdout
    assert ok(send(home, busybox_ws, "echo after")).stdout == "after\n"
    log = home / "workspaces" / busybox_ws / "serial.log"
    wait_for(lambda: b"~ # " in log.read_bytes().rsplit(b"MA-e-", 1)[1], "the restored prompt",
             lambda: log.read_bytes()[-300:].decode(errors="replace"))


def test_interactive_session(home: Path, debian_ws: str, tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is needed for the terminal tests (install.sh installs it)")
    session = f"mc-{tmp_path.name[-20:]}"
    tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", "bash", "--norc")
    try:
        def screen() -> str:
            return tmux("capture-pane", "-p", "-t", session)

        tmux("send-keys", "-t", session, f"{MICROAGENT} --state-dir {home} connect "
                                         f"{debian_ws}", "Enter")
        wait_for(lambda: "Detach with Ctrl-]" in screen(), "the banner", screen)
        tmux("send-keys", "-t", session, "Enter")
        wait_for(lambda: "root@cons" in screen(), "the console shell's prompt", screen)
        tmux("send-keys", "-t", session, "echo $((6*7))-answer; tty", "Enter")
        wait_for(lambda: "42-answer" in screen() and "/dev/ttyS0" in screen(),
                 "the command's output", screen)
        tmux("send-keys", "-t", session, "stty size", "Enter")
        wait_for(lambda: "30 100" in screen(), "the terminal size in the guest", screen)

        # while attached, the console is taken: a second session and --send are refused
        second = ma(home, "connect", debian_ws)
        assert second.returncode == 2 and "terminal" in second.stderr  # no tty here
        refused = send(home, debian_ws, "true")
        assert refused.returncode == 75, refused
        assert "held by an interactive connect (pid" in refused.stderr
        status = json.loads(ok(ma(home, "--json", "status", debian_ws)).stdout)
        assert status["consoleReady"]["ok"] is True

        tmux("resize-window", "-t", session, "-x", "120", "-y", "40")
        tmux("send-keys", "-t", session, "clear; stty size", "Enter")
        wait_for(lambda: "40 120" in screen(), "the new size after a resize", screen)
        tmux("send-keys", "-t", session, "C-]")
        wait_for(lambda: "Detached from cons; it keeps running." in screen(),
                 "the detach message", screen)
        tmux("send-keys", "-t", session, "echo rc=$?; stty -a | tr ' ;' '\\n\\n' | "
             "grep -x -e icanon -e -icanon -e echo -e -echo | tr '\\n' , ; echo", "Enter")
        wait_for(lambda: "rc=0" in screen(), "the exit code", screen)
        wait_for(lambda: "icanon,echo," in screen(), "sane terminal settings", screen)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    # the workspace kept running, and the console is free again
    assert ok(send(home, debian_ws, "echo free")).stdout == "free\n"


def test_second_interactive_session_names_the_first(home: Path,
                                                    busybox_ws: str, tmp_path: Path) -> None:
    """Two real terminals: the second connect is refused, naming the first's pid."""
    session = f"m2-{tmp_path.name[-20:]}"
    tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "24", "bash", "--norc")
    try:
        def screen() -> str:
            return tmux("capture-pane", "-p", "-t", f"{session}.0")

        tmux("send-keys", "-t", session, f"{MICROAGENT} --state-dir {home} connect "
                                         f"{busybox_ws}", "Enter")
        wait_for(lambda: "Detach with Ctrl-]" in screen(), "the banner", screen)
        tmux("split-window", "-t", session, "bash --norc")
        second = f"{session}.1"
        tmux("send-keys", "-t", second, f"{MICROAGENT} --state-dir {home} connect "
                                        f"{busybox_ws}; echo rc=$?", "Enter")
        wait_for(lambda: "rc=75" in tmux("capture-pane", "-p", "-t", second),
                 "the refusal", lambda: tmux("capture-pane", "-p", "-t", second))
        refusal = tmux("capture-pane", "-p", "-J", "-t", second)
        assert "held by an interactive connect (pid" in refusal, refusal
        tmux("send-keys", "-t", f"{session}.0", "C-]")
        wait_for(lambda: "Detached" in screen(), "the first session's detach", screen)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_sends_from_two_processes_take_turns(home: Path, busybox_ws: str) -> None:
    results: dict[int, subprocess.CompletedProcess[str]] = {}

    def one(i: int) -> None:
        results[i] = send(home, busybox_ws, f"sleep 1; echo turn-{i}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, result in results.items():
        assert ok(result).stdout == f"turn-{i}\n"


def test_connect_refusals(home: Path, registry: RunningRegistry,
                          busybox_image: PushedImage, tmp_path: Path) -> None:
    missing = send(home, "nosuch", "true")
    assert missing.returncode == 1 and "nosuch" in missing.stderr
    assert send(home, "../x", "true").returncode == 2
    ok(ma(home, "create", "idle", "--image", busybox_image.ref, "--profile", "tiny"))
    halted = send(home, "idle", "true")
    assert halted.returncode == 1 and "not running" in halted.stderr
    assert ma(home, "connect", "idle").returncode == 1
    ok(ma(home, "delete", "idle", "--yes"))

    # an image with no shell at all: the agent runs, the console has nothing to offer
    layout = simple_layout(tmp_path / "noshell", files={"etc/hello": b"hi\n"})
    push_layout(registry.host, "test/noshell", "1", layout)
    ok(ma(home, "create", "bare", "--image", f"{registry.host}/test/noshell:1",
          "--profile", "tiny"))
    ok(ma(home, "start", "bare"))
    try:
        for args in (("--send", "true"), ()):
            result = ma(home, "connect", "bare", *args)
            assert result.returncode == 1, result
            assert "has no shell" in result.stderr
        status = json.loads(ok(ma(home, "--json", "status", "bare")).stdout)
        assert status["consoleReady"]["ok"] is False
        assert "no shell" in status["consoleReady"]["detail"]
    finally:
        ok(ma(home, "halt", "bare"))
        ok(ma(home, "delete", "bare", "--yes"))
