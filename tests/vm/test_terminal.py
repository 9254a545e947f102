"""``exec -it -- bash`` in a real terminal (tmux): typing, output, resize, a sane exit."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.fixtures import MICROAGENT, PushedImage
from tests.vm.cli import ma, ok

pytestmark = pytest.mark.slow


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout


def wait_for(predicate: Callable[[], bool], what: str, screen: Callable[[], str],
             timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; the screen:\n{screen()}")
        time.sleep(0.1)


@pytest.fixture
def debian_ws(home: Path, debian_image: PushedImage) -> Iterator[str]:
    ok(ma(home, "create", "term", "--image", debian_image.ref, "--profile", "small"))
    ok(ma(home, "start", "term"))
    yield "term"
    ma(home, "kill", "term")
    ma(home, "delete", "term", "--yes")


def test_interactive_bash(home: Path, debian_ws: str, tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is needed for the terminal tests (install.sh installs it)")
    session = f"ma-{tmp_path.name[-20:]}"
    tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", "bash", "--norc")
    try:
        def screen() -> str:
            return tmux("capture-pane", "-p", "-t", session)

        tmux("send-keys", "-t", session, f"{MICROAGENT} --state-dir {home} exec -it "
                                         f"{debian_ws} -- bash", "Enter")
        wait_for(lambda: "root@term" in screen(), "the guest's bash prompt", screen)
        tmux("send-keys", "-t", session, "echo $((6*7))-answer", "Enter")
        wait_for(lambda: "42-answer" in screen(), "the command's output", screen)
        tmux("send-keys", "-t", session, "stty size", "Enter")
        wait_for(lambda: "30 100" in screen(), "the terminal size in the guest", screen)
        tmux("resize-window", "-t", session, "-x", "120", "-y", "40")
        tmux("send-keys", "-t", session, "clear; stty size", "Enter")
        wait_for(lambda: "40 120" in screen(), "the new size after a resize", screen)
        tmux("send-keys", "-t", session, "exit 7", "Enter")
        wait_for(lambda: screen().rstrip().splitlines()[-1].startswith("bash-"),
                 "the local shell again", screen)
        tmux("send-keys", "-t", session, "echo rc=$?; stty -a | tr ' ;' '\\n\\n' | "
             "grep -x -e icanon -e -icanon -e echo -e -echo | tr '\\n' , ; echo", "Enter")
        wait_for(lambda: "rc=7" in screen(), "the exit code", screen)
        # the local terminal is back in cooked mode with echo
        wait_for(lambda: "icanon,echo," in screen(), "sane terminal settings", screen)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
