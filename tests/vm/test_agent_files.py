"""The agent's file operations on a running workspace, through its supervisor's relay as
the public API's ``ws.files`` goes: mkdir, write and read of several MiB, stat, list,
remove of a deep tree, and what the guest refuses as the error tree's classes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.errors import ConflictError, NotFoundError
from microagent.layout import StateLayout
from microagent.vm.agent import AgentClient
from microagent.vm.agentfiles import AgentFileError
from microagent.vm.control import SupervisorClient
from tests.support.fixtures import PushedImage
from tests.vm.cli import ma, ok

pytestmark = pytest.mark.slow

NAME = "filesws"
DEPTH = 1500  # "/d" per level: 3000 bytes, within PATH_MAX for mkdir's single path


@pytest.fixture(scope="module")
def running(home: Path, busybox_image: PushedImage) -> Iterator[str]:
    ok(ma(home, "create", NAME, "--image", busybox_image.ref, "--profile", "tiny"))
    ok(ma(home, "start", NAME))
    yield NAME
    ma(home, "kill", NAME)


@pytest.fixture
def client(home: Path, running: str) -> Iterator[AgentClient]:
    """A relayed channel to the workspace's agent, as the API's files use."""
    sock = SupervisorClient(StateLayout(home).run_files(running), running).open_channel()
    c = AgentClient(sock)
    c.hello()
    yield c
    c.close()


def test_files_through_a_running_workspace(home: Path, running: str,
                                           client: AgentClient) -> None:
    content = os.urandom(6 * 1024 * 1024 + 4321)
    client.write_file("/srv/data/blob.bin", content, mode=0o600)  # /srv/data made
    pieces: list[bytes] = []
    client.read_file("/srv/data/blob.bin", pieces.append)
    assert b"".join(pieces) == content
    assert max(len(p) for p in pieces) <= client.max_payload
    digest = ok(ma(home, "exec", running, "--", "sha256sum", "/srv/data/blob.bin")).stdout
    assert digest.split()[0] == hashlib.sha256(content).hexdigest()

    blob = client.stat("/srv/data/blob.bin")
    assert (blob.kind, blob.size, blob.mode, blob.uid) == ("file", len(content), 0o600, 0)
    assert client.mkdir("/srv/data/sub", mode=0o750) is True
    ok(ma(home, "exec", running, "--", "ln", "-s", "/etc", "/srv/data/etc-link"))
    assert [(e.name, e.kind) for e in client.list_dir("/srv/data")] == [
        ("blob.bin", "file"), ("etc-link", "symlink"), ("sub", "dir")]
    assert client.stat("/srv/data/etc-link").target == "/etc"

    deep = "/srv/deep" + "/d" * DEPTH
    assert client.mkdir(deep) is True
    client.write_file(f"{deep}/leaf", b"leaf")
    with pytest.raises(ConflictError, match="not empty"):
        client.remove("/srv/deep")
    # /srv, data, its three entries, deep, its levels and the leaf
    assert client.remove("/srv", recursive=True) == 1 + 1 + 3 + 1 + DEPTH + 1
    with pytest.raises(NotFoundError):
        client.stat("/srv")
    assert client.stat("/etc/passwd").kind == "file"  # the symlink was not followed

    # a mount point is refused before anything in it is removed
    client.write_file("/run/keep", b"keep")
    with pytest.raises(ConflictError, match="mount point"):
        client.remove("/run", recursive=True)
    assert client.stat("/run/keep").size == 4
    with pytest.raises(AgentFileError, match="Operation not permitted") as refused:
        client.remove("/proc/version")
    assert refused.value.code == "EPERM"
