"""`microagent image` and `create` against the real registry, as a user runs them."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

from tests.e2e.conftest import MICROAGENT, PushedImage, microagent
from tests.support.push import push_layout
from tests.support.registry import RunningRegistry


def test_pull_list_rm(busybox_image: PushedImage, state_dir: Path) -> None:
    result = microagent("image", "pull", busybox_image.ref)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{busybox_image.ref} {busybox_image.digest}"
    # not a TTY: quiet lines, no escape sequences
    assert "\x1b[" not in result.stderr
    assert "layer 1/1" in result.stderr and "pulled" in result.stderr

    listed = microagent("image", "list")
    header, row = listed.stdout.splitlines()
    assert header.split() == ["REF", "DIGEST", "SIZE", "PULLED"]
    assert row.split()[:2] == [busybox_image.ref, busybox_image.digest[:19]]

    doc = json.loads(microagent("--json", "image", "list").stdout)
    (image,) = doc["images"]
    assert image["digest"] == busybox_image.digest
    assert image["config"]["working_dir"] == "/root"
    assert image["config"]["exposed_ports"] == ["8080/tcp"]

    again = microagent("image", "pull", busybox_image.ref)
    assert "already cached" in again.stderr

    by_digest = microagent("image", "pull", f"{busybox_image.ref.rsplit(':', 1)[0]}@"
                           f"{busybox_image.digest}")
    assert by_digest.returncode == 0, by_digest.stderr

    removed = microagent("image", "rm", busybox_image.ref)
    assert removed.returncode == 0 and "Removed" in removed.stdout
    assert busybox_image.ref not in microagent("image", "list").stdout
    gone = microagent("image", "rm", busybox_image.ref)
    assert gone.returncode == 1 and "not found" in gone.stderr


def test_progress_bars_on_a_terminal(busybox_image: PushedImage) -> None:
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen([MICROAGENT, "image", "pull", busybox_image.ref],
                                   stdout=subprocess.PIPE, stderr=follower, env=os.environ)
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert process.wait(60) == 0
    finally:
        os.close(leader)
    screen = b"".join(chunks).decode(errors="replace")
    assert "\x1b[" in screen  # redrawn in place
    assert "layer 1/1" in screen


def test_create_from_registry(busybox_image: PushedImage, state_dir: Path) -> None:
    result = microagent("create", "research", "--image", busybox_image.ref, "--profile", "tiny")
    assert result.returncode == 0, result.stderr
    rootfs = state_dir / "workspaces" / "research" / "rootfs.ext4"
    assert result.stdout.splitlines() == [
        "Workspace: research",
        "State: prepared",
        f"Rootfs: {rootfs}",
        "Profile: tiny",
        "Resources: memory=256MiB cpus=1 disk=512MiB",
    ]
    assert rootfs.stat().st_size == 512 * 1024 * 1024
    assert rootfs.stat().st_blocks * 512 < 100 * 1024 * 1024  # sparse on the host
    fsck = subprocess.run(["e2fsck", "-fn", str(rootfs)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    listing = subprocess.run(["debugfs", "-R", "stat /bin/busybox", str(rootfs)],
                             capture_output=True, text=True, check=True).stdout
    assert "User:     0   Group:     0" in listing

    record = json.loads((state_dir / "workspaces" / "research" / "workspace.json").read_text())
    assert record["image"]["digest"] == busybox_image.digest
    assert record["image"]["config"]["env"] == ["PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                                               "HOME=/root"]

    listed = microagent("list").stdout.splitlines()
    assert listed[0].split() == ["NAME", "STATE", "BACKEND", "PROFILE", "NETWORK", "RESTART"]
    assert listed[1].split() == ["research", "prepared", "qemu", "tiny", "user", "never"]

    again = microagent("create", "research", "--image", busybox_image.ref)
    assert again.returncode == 1 and "already exists" in again.stderr

    # a second workspace of the same image reuses the cached base disk
    second = microagent("create", "--name", "other", "--image", busybox_image.ref,
                        "--profile", "tiny")
    assert second.returncode == 0, second.stderr
    assert "Building root disk" not in second.stderr
    assert len(list((state_dir / "images" / "disks").iterdir())) == 1

    deleted = microagent("delete", "research", "--yes")
    assert deleted.returncode == 0
    assert not (state_dir / "workspaces" / "research").exists()
    assert (state_dir / "workspaces" / "other" / "rootfs.ext4").exists()


def test_unknown_image_is_not_found(registry: RunningRegistry, state_dir: Path) -> None:
    for ref in (f"{registry.host}/no/such:1", f"{registry.host}/test/busybox:nosuchtag"):
        result = microagent("create", "w", "--image", ref)
        assert result.returncode == 1, result.stderr
        assert "not found" in result.stderr and ref in result.stderr
    assert not (state_dir / "workspaces" / "w").exists()
    assert not list((state_dir / "images" / "blobs").rglob("*")) if \
        (state_dir / "images" / "blobs").exists() else True


def test_basic_auth_from_docker_config(auth_registry: RunningRegistry, busybox_layout: Path,
                                       tmp_path: Path) -> None:
    push_layout(auth_registry.host, "team/busybox", "1", busybox_layout,
                credentials=auth_registry.credentials)
    ref = f"{auth_registry.host}/team/busybox:1"
    refused = microagent("image", "pull", ref)
    assert refused.returncode == 1
    assert auth_registry.host in refused.stderr

    config_dir = Path(os.environ["DOCKER_CONFIG"])
    config_dir.mkdir(parents=True, exist_ok=True)
    import base64

    def write_config(user: str, password: str) -> None:
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        (config_dir / "config.json").write_text(
            json.dumps({"auths": {auth_registry.host: {"auth": auth}}}))

    write_config("user", "wrong")
    wrong = microagent("image", "pull", ref)
    assert wrong.returncode == 1 and auth_registry.host in wrong.stderr
    write_config(*auth_registry.credentials)  # type: ignore[misc]
    ok = microagent("image", "pull", ref)
    assert ok.returncode == 0, ok.stderr


def test_bearer_token_flow(token_registry: RunningRegistry, busybox_layout: Path,
                           tmp_path: Path) -> None:
    push_layout(token_registry.host, "team/busybox", "1", busybox_layout,
                credentials=token_registry.credentials)
    ref = f"{token_registry.host}/team/busybox:1"
    refused = microagent("--json", "image", "pull", ref)
    assert refused.returncode == 1
    error = json.loads(refused.stdout)["error"]
    assert error["kind"] == "auth" and token_registry.host in error["message"]

    import base64

    user, password = token_registry.credentials  # type: ignore[misc]
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"auths": {token_registry.host: {
        "auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))
    ok = microagent("image", "pull", ref, env={"REGISTRY_AUTH_FILE": str(auth_file)})
    assert ok.returncode == 0, ok.stderr
