"""``create`` and ``image pull`` really killed mid-way (SIGKILL, SIGTERM): SIGTERM cleans
up as Ctrl-C does and exits 143; what a SIGKILL leaves is swept by the next command.
The pull is slowed by a proxy in front of the session's real registry, so that "mid-way"
is certain. No VM boots here; the module sits with the VM tests for their kernel."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fixtures import MICROAGENT
from tests.support.images import layer_of
from tests.support.push import push_layout
from tests.support.registry import RunningRegistry
from tests.support.slowproxy import SlowProxy
from tests.vm.cli import ma, ok

pytestmark = pytest.mark.slow

STAGING = ("images/blobs/sha256/.incoming-*", "images/disks/.*.tmp", "tmp/*",
           "workspaces/.new-*", "workspaces/.deleting-*", "kernels/.new-*", "kernels/.old-*")
SLOW = 1 << 20  # bytes per second: the 24 MiB layer would take 24 s


@pytest.fixture(scope="module")
def big_ref(registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``test/big:1``: one uncompressed layer of 24 MiB of random data and 2,000 small
    files (a build of a second or so)."""
    from ocilayout import ImageSpec, Layer, build_layout

    files = {f"big/part{i}": os.urandom(8 << 20) for i in range(3)}
    files.update({f"small/{i // 100}/f{i}": b"%d\n" % i for i in range(2000)})
    layout = tmp_path_factory.mktemp("big-image") / "layout"
    build_layout(layout, [ImageSpec(layers=[Layer(layer_of(files), "none")])])
    push_layout(registry.host, "test/big", "1", layout)
    return "test/big:1"


@pytest.fixture
def proxy(registry: RunningRegistry) -> Iterator[SlowProxy]:
    slow = SlowProxy(registry.host, SLOW)
    try:
        yield slow
    finally:
        slow.close()


@pytest.fixture
def state(own_home: Path) -> Path:
    return own_home


def leftovers(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for pattern in STAGING for p in home.glob(pattern))


def start(home: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([MICROAGENT, "--state-dir", str(home), *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def interrupt_at(process: subprocess.Popen[str], home: Path, pattern: str, signum: int,
                 *, timeout: float = 120) -> None:
    """Send ``signum`` once ``home/pattern`` exists (a file: once it holds more than a
    manifest or a config would)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(_under_way(p) for p in home.glob(pattern)):
            process.send_signal(signum)
            return
        if process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(f"the command ended before {pattern} appeared (exit "
                        f"{process.returncode}): {err[-2000:]}")
        time.sleep(0.002)
    process.kill()
    pytest.fail(f"{pattern} did not appear within {timeout} s")


def _under_way(path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) or st.st_size > 64 << 10


def test_sigkill_mid_pull_then_the_next_pull_leaves_nothing(
        state: Path, proxy: SlowProxy, big_ref: str) -> None:
    ref = f"{proxy.host}/{big_ref}"
    pull = start(state, "image", "pull", ref)
    interrupt_at(pull, state, "images/blobs/sha256/.incoming-*", signal.SIGKILL)
    assert pull.wait(30) == -signal.SIGKILL
    assert leftovers(state)  # killed mid-way: its staging is there
    proxy.rate = None
    ok(ma(state, "image", "pull", ref))
    assert leftovers(state) == []


def test_sigterm_mid_pull_cleans_up_and_exits_143(state: Path, proxy: SlowProxy,
                                                  big_ref: str) -> None:
    pull = start(state, "image", "pull", f"{proxy.host}/{big_ref}")
    interrupt_at(pull, state, "images/blobs/sha256/.incoming-*", signal.SIGTERM)
    _, err = pull.communicate(timeout=30)
    assert pull.returncode == 143, err
    assert "terminated" in err
    assert leftovers(state) == []


@pytest.mark.parametrize("phase", ["tmp/rootfs-*", "images/disks/.*.tmp",
                                   "workspaces/.new-*"])
def test_sigkill_mid_create_then_the_next_create_leaves_nothing(
        state: Path, registry: RunningRegistry, big_ref: str, phase: str) -> None:
    ref = f"{registry.host}/{big_ref}"
    create = start(state, "create", "w", "--image", ref, "--profile", "tiny")
    interrupt_at(create, state, phase, signal.SIGKILL)
    assert create.wait(30) == -signal.SIGKILL
    assert leftovers(state)  # killed mid-way: its staging is there
    ok(ma(state, "create", "w", "--image", ref, "--profile", "tiny"))
    assert leftovers(state) == []
    assert (state / "workspaces" / "w" / "rootfs.ext4").is_file()


@pytest.mark.parametrize("phase", ["tmp/rootfs-*", "workspaces/.new-*"])
def test_sigterm_mid_create_cleans_up_and_exits_143(
        state: Path, registry: RunningRegistry, big_ref: str, phase: str) -> None:
    create = start(state, "create", "w", "--image", f"{registry.host}/{big_ref}",
                   "--profile", "tiny")
    interrupt_at(create, state, phase, signal.SIGTERM)
    _, err = create.communicate(timeout=60)
    assert create.returncode == 143, err
    assert leftovers(state) == []
    assert not (state / "workspaces" / "w").exists()
