"""The agent as PID 1 in a real microVM: the channel over virtio-serial, exec, networking
to the host, the console shell, reconnecting supervisors and the shutdown operation.

One VM is shared by the tests that leave it running; the shutdown tests boot their own.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.errors import NotFoundError, UnresponsiveError
from microagent.kernel.kernels import KernelBundle
from microagent.vm.agent import AgentClient, ExecRequest, ExecResult
from microagent.vm.protocol import Frame, FrameType, encode_json
from tests.vm.qemu import NETWORK_APPEND, RunningVM

pytestmark = pytest.mark.slow

APPEND = f"console=ttyS0 panic=-1 {NETWORK_APPEND} microagent.hostname=ws-agent"
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
READY = "microagent-init: ready"


def boot(kernel: KernelBundle, initramfs: Path, disk: Path, append: str = APPEND) -> RunningVM:
    vm = RunningVM(kernel.vmlinuz, initramfs, disk, append)
    try:
        vm.wait_for_console(READY, 90)
    except BaseException:
        vm.kill()
        raise
    return vm


def connect(vm: RunningVM) -> AgentClient:
    """A client whose HELLO was answered. Like the supervisor (vm/channel.py), it says
    HELLO again while none comes back: a host that connects right after another left can
    reach the guest before the agent has seen the first one go. The console's tail is in
    the error if the agent never answers."""
    client = AgentClient(vm.connect("agent"))
    for attempt in range(6):
        try:
            client.hello(timeout=5)
            return client
        except UnresponsiveError:
            if attempt == 5:
                client.close()
                raise AssertionError(f"the agent never answered HELLO; console:\n"
                                     f"{vm.tail()}") from None
    raise AssertionError("unreachable")


def run(client: AgentClient, *argv: str, vm: RunningVM | None = None,
        **options: object) -> tuple[ExecResult, str]:
    out = bytearray()
    options.setdefault("env", (PATH,))
    result = client.exec(ExecRequest(argv=argv, **options),  # type: ignore[arg-type]
                         stdout=out.extend, stderr=out.extend)
    return result, out.decode(errors="replace")


@pytest.fixture(scope="module")
def vm(guest_kernel: KernelBundle, boot_initramfs: Path, busybox_disk: Path,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningVM]:
    disk = tmp_path_factory.mktemp("agent-vm") / "rootfs.ext4"
    shutil.copyfile(busybox_disk, disk)
    machine = boot(guest_kernel, boot_initramfs, disk)
    yield machine
    machine.kill()


def test_exec_in_the_guest(vm: RunningVM, guest_kernel: KernelBundle) -> None:
    client = connect(vm)
    try:
        result, out = run(client, "uname", "-r")
        assert (result.exit_code, out.strip()) == (0, guest_kernel.version), vm.tail()
        result, out = run(client, "cat", "/proc/1/cmdline")
        assert out == "/init\0"
        assert run(client, "hostname")[1] == "ws-agent\n"
        assert run(client, "id", "-u", user="nobody")[1] == "65534\n"
        assert run(client, "sh", "-c", "exit 7")[0].host_exit_code == 7
        assert run(client, "no-such-command")[0].host_exit_code == 127
        result, out = run(client, "sh", "-c", "tty; stty size", tty=(20, 70))
        assert out.replace("\r\n", "\n").splitlines()[-1] == "20 70", out
        # the info operation: what the host's networkReady comes from
        client.send(encode_json(FrameType.OPEN, 1001, {"op": "info"}))
        frame = client.read_frame(time.monotonic() + 10)
        while frame.stream != 1001:
            frame = client.read_frame(time.monotonic() + 10)
        info = frame.json()["info"]
        assert info["pid1"] is True and info["hostname"] == "ws-agent"
        assert info["network"] == {"configured": True, "address": "10.0.2.15/24",
                                   "gateway": "10.0.2.2", "dns": "10.0.2.3",
                                   "interface": "eth0", "detail": ""}
    finally:
        client.close()
    lines = [line for line in vm.console().splitlines() if line.startswith("microagent-init:")]
    assert "microagent-init: network 10.0.2.15/24 via 10.0.2.2 on eth0" in lines, lines
    assert any(re.fullmatch(r"microagent-init: agent channel on /dev/vport\d+p\d+", line)
               for line in lines), lines
    if "button" not in guest_kernel.modules:
        assert "microagent-init: power button: no ACPI button driver (button.ko) loaded; " \
            "only the shutdown operation powers off" in lines, lines


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello from the host, path {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_guest_reaches_a_server_on_the_host(vm: RunningVM) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = connect(vm)
    try:
        port = server.server_address[1]
        # busybox-static's wget crashes in glibc's static NSS (getservbyname), so the
        # request is sent with nc
        result, out = run(client, "sh", "-c", "printf 'GET /probe HTTP/1.0\\r\\n\\r\\n' | "
                          f"nc -w 20 10.0.2.2 {port}", timeout_ms=60_000)
        assert result.exit_code == 0, (out, vm.tail())
        assert out.startswith("HTTP/1.0 200 OK\r\n"), out
        assert out.endswith("\r\n\r\nhello from the host, path /probe\n"), out
        assert run(client, "cat", "/etc/resolv.conf")[1] == "nameserver 10.0.2.3\n"
        _, routes = run(client, "ip", "route")
        assert "default via 10.0.2.2 dev eth0" in routes, routes
    finally:
        client.close()
        server.shutdown()
        server.server_close()


def test_console_shell_answers(vm: RunningVM) -> None:
    assert "microagent-init: console shell on ttyS0" in vm.console()
    with vm.connect("console") as sock:
        sock.settimeout(1)
        sock.sendall(b"echo hi-$((1+1))\n")
        received = b""
        deadline = time.monotonic() + 20
        while b"hi-2\r\n" not in received:
            assert time.monotonic() < deadline, f"no answer on the console: {received!r}"
            with contextlib.suppress(TimeoutError):
                received += sock.recv(4096)
    # the shell respawns after `exit`
    with vm.connect("console") as sock:
        sock.sendall(b"exit\n")
        deadline = time.monotonic() + 20
        sock.settimeout(1)
        received = b""
        while True:
            sock.sendall(b"echo again-$((2+2))\n")
            with contextlib.suppress(TimeoutError):
                received += sock.recv(4096)
            if b"again-4\r\n" in received:
                break
            assert time.monotonic() < deadline, f"no respawned shell: {received!r}"


def test_a_new_supervisor_takes_over(vm: RunningVM) -> None:
    first = connect(vm)
    first.send(encode_json(FrameType.OPEN, 1, {"op": "exec", "argv": ["sleep", "600"],
                                               "env": [PATH]}))
    started = first.read_frame(time.monotonic() + 20)
    assert started.type == FrameType.STARTED, started
    pid = started.json()["pid"]
    first.close()  # the supervisor dies without a word
    second = connect(vm)
    try:
        deadline = time.monotonic() + 20
        while True:
            _result, out = run(second, "sh", "-c", f"test -d /proc/{pid} && "
                              f"cat /proc/{pid}/stat || echo gone")
            if out.strip() == "gone" or " Z " in out:
                break
            assert time.monotonic() < deadline, f"the first supervisor's exec survived: {out}"
            time.sleep(0.2)
        assert run(second, "echo", "still-serving")[1] == "still-serving\n"
    finally:
        second.close()
    # While no host is connected the port polls POLLHUP: the agent must sleep, not spin.
    before = _pid1_cpu_ticks(vm)
    time.sleep(3)
    third = connect(vm)
    try:
        assert third.ping() < 5
        _, stat = run(third, "cat", "/proc/1/stat")
        ticks = sum(int(v) for v in stat.split(")")[1].split()[11:13])
        assert ticks - before < 30, f"PID 1 used {ticks - before} ticks while disconnected"
    finally:
        third.close()


def _pid1_cpu_ticks(vm: RunningVM) -> int:
    """PID 1's user+system CPU ticks, read over a connection that is closed again."""
    client = connect(vm)
    try:
        _, stat = run(client, "cat", "/proc/1/stat")
    finally:
        client.close()
    return sum(int(v) for v in stat.split(")")[1].split()[11:13])


def _resumed(client: AgentClient, stream: int, identity: dict[str, object]) -> Frame:
    """The resumed operation as a fork gets it: the answer's frame."""
    client.send(encode_json(FrameType.OPEN, stream, {
        "op": "resumed", "time_ns": time.time_ns(), "entropy": os.urandom(32).hex(),
        "generation": stream, "identity": identity}))
    frame = client.read_frame(time.monotonic() + 20)
    while frame.stream != stream:
        frame = client.read_frame(time.monotonic() + 20)
    return frame


def _read(client: AgentClient, path: str) -> bytes:
    out = bytearray()
    client.read_file(path, out.extend)
    return bytes(out)


def test_resumed_gives_a_fork_its_identity(guest_kernel: KernelBundle, boot_initramfs: Path,
                                           root_disk: Path) -> None:
    """The resumed operation's identity: the kernel's hostname, /etc/hostname, the old
    name in /etc/hosts and a new /etc/machine-id (the host test mode's side is
    tests/protocol/test_ops.py)."""
    vm = boot(guest_kernel, boot_initramfs, root_disk)  # microagent.hostname=ws-agent
    client = connect(vm)
    try:
        old_id = b"0123456789abcdef0123456789abcdef\n"
        client.write_file("/etc/hostname", b"ws-agent\n")
        client.write_file("/etc/hosts", b"127.0.0.1\tlocalhost\n"
                          b"127.0.1.1\tws-agent ws-agent.example\n"
                          b"# ws-agent stays in comments\n"
                          b"10.0.0.9  ws-agent-db\tws-agent # ws-agent\n", mode=0o640)
        client.write_file("/etc/machine-id", old_id, mode=0o444)
        client.write_file("/var/lib/systemd/random-seed", os.urandom(512), mode=0o600)

        frame = _resumed(client, 1001, {"hostname": "ws-fork", "machine_id": True})
        assert frame.type == FrameType.EXIT, (frame.json(), vm.tail())
        assert frame.json()["applied"] is True and frame.json()["hostname"] == "ws-fork"
        assert run(client, "hostname")[1] == "ws-fork\n"
        assert _read(client, "/etc/hostname") == b"ws-fork\n"
        assert _read(client, "/etc/hosts") == (b"127.0.0.1\tlocalhost\n"
                                               b"127.0.1.1\tws-fork ws-agent.example\n"
                                               b"# ws-agent stays in comments\n"
                                               b"10.0.0.9  ws-agent-db\tws-fork # ws-agent\n")
        assert client.stat("/etc/hosts").mode == 0o640
        machine_id = _read(client, "/etc/machine-id")
        assert re.fullmatch(rb"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}\n", machine_id)
        assert machine_id != old_id and client.stat("/etc/machine-id").mode == 0o444
        with pytest.raises(NotFoundError):
            client.stat("/var/lib/systemd/random-seed")
        assert _read(client, "/run/microagent/generation") == b"1001\n"
        assert "microagent-init: identity: hostname ws-fork (was ws-agent)" in vm.console()

        # a hosts file that does not name the old hostname gets a line for the new one;
        # without machine_id the machine ID stays
        client.write_file("/etc/hosts", b"127.0.0.1\tlocalhost")
        frame = _resumed(client, 1002, {"hostname": "ws-third"})
        assert frame.type == FrameType.EXIT and frame.json()["hostname"] == "ws-third"
        assert _read(client, "/etc/hosts") == b"127.0.0.1\tlocalhost\n127.0.1.1\tws-third\n"
        assert _read(client, "/etc/machine-id") == machine_id
        assert run(client, "hostname")[1] == "ws-third\n"
    finally:
        client.close()
        vm.kill()


def _fsck_clean(disk: Path) -> None:
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert fsck.returncode == 0, f"the root disk is not clean:\n{fsck.stdout}{fsck.stderr}"
    state = subprocess.run(["dumpe2fs", "-h", str(disk)], capture_output=True, text=True,
                           timeout=60, check=False).stdout
    assert re.search(r"Filesystem state:\s+clean\n", state), state


def test_shutdown_operation_powers_off_cleanly(guest_kernel: KernelBundle, boot_initramfs: Path,
                                               root_disk: Path) -> None:
    vm = boot(guest_kernel, boot_initramfs, root_disk)
    try:
        client = connect(vm)
        _, _out = run(client, "sh", "-c", "sleep 600 > /dev/null 2>&1 & echo $!")
        client.send(encode_json(FrameType.OPEN, 99, {"op": "shutdown", "grace_ms": 2000}))
        frame = client.read_frame(time.monotonic() + 20)
        assert (frame.type, frame.stream) == (FrameType.STARTED, 99), frame
        returncode = vm.wait_exit(60)
        assert returncode == 0, f"QEMU: {returncode}; console tail:\n{vm.tail()}"
        console = vm.console()
        assert "microagent-init: powering off (shutdown requested by the host)" in console
        assert "microagent-init: power off\n" in console, vm.tail()
        assert "Kernel panic" not in console
    finally:
        vm.kill()
    _fsck_clean(root_disk)
    # resolv.conf was provided by a bind mount over a placeholder, removed at shutdown:
    # the image's disk has no /etc/resolv.conf, as before the boot
    listing = subprocess.run(["debugfs", "-R", "ls -l /etc", str(root_disk)],
                             capture_output=True, text=True, timeout=60, check=False).stdout
    assert "resolv.conf" not in listing, listing


def test_system_powerdown(guest_kernel: KernelBundle, boot_initramfs: Path,
                          root_disk: Path) -> None:
    """QEMU's system_powerdown (the ACPI power button) reaches the agent through the
    bundle's ACPI button driver (Debian builds it as button.ko, an optional module)."""
    assert "button" in guest_kernel.modules, guest_kernel.modules
    vm = boot(guest_kernel, boot_initramfs, root_disk)
    try:
        assert vm.qmp("system_powerdown") == {"return": {}}
        returncode = vm.wait_exit(30)
        assert returncode == 0, vm.tail()
        assert "microagent-init: powering off (ACPI power button)" in vm.console()
    finally:
        vm.kill()
    _fsck_clean(root_disk)
