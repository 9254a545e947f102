"""One boot's VMM, prepared and started without asyncio: the supervisor's first half.

``python -m microagent.vm._supervise`` takes the workspace's supervisor lock, holds its
volumes and launches the first boot's QEMU (:func:`first_boot`) before it imports asyncio
and the modules of its event loop (:mod:`microagent.vm.supervisor`): QEMU starts ~40 ms
sooner and those imports overlap the guest's boot. Restarts go through
:func:`launch_vmm` from the event loop.

A workspace with a network gets its passt with each boot (:func:`start_network`): passt's
end of a socketpair, QEMU's end a socket it listens on (``net.sock``), the supervisor's
frame filter between them (:class:`microagent.vm.netfilter.FrameRelay`, two threads of
the supervisor). QEMU outlives a killed supervisor (:mod:`microagent.vm.adopt`); passt
does not.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from microagent.disks.attachments import BootDisks, DiskSpec, prepare_boot_disks
from microagent.disks.ext4 import journal_needs_recovery
from microagent.errors import ConflictError, MicroagentError
from microagent.kernel.kernels import KernelBundle
from microagent.layout import PRIVATE_UMASK, RunFiles, StateLayout
from microagent.state.records import Workspace, get_workspace
from microagent.store import open_private
from microagent.vm.backends.base import (
    AccelChoice,
    LaunchPlan,
    LaunchSpec,
    choose_accel,
    guest_cmdline,
    host_tsc_khz,
)
from microagent.vm.backends.qemu import QemuBackend
from microagent.vm.passt import NetworkHelper

if TYPE_CHECKING:
    from microagent.vm.adopt import Adopted
from microagent.vm.snapshot import ResumeOrder, read_order

PR_SET_PDEATHSIG = 1
LINK_BUFFER = 4 << 20  # each socket of the link to passt (see _buffers)
LINK_WAIT = 60.0  # for QEMU to listen on the link's socket
_SO_SNDBUFFORCE, _SO_RCVBUFFORCE = 32, 33  # Linux; Python 3.11 does not name them


@dataclass
class Launched:
    """A VMM just started for one boot."""

    process: subprocess.Popen[bytes]
    plan: LaunchPlan
    kernel: KernelBundle
    recovery: bool  # the root disk's journal needed replaying (the last VM was killed)
    started: float  # time.monotonic() at the launch
    vmm_log_start: int  # where this boot's lines begin in the VMM's log
    network: NetworkHelper | None = None  # passt and the relay, with a network
    disks: tuple[Path, ...] = ()  # the images, in QEMU's drive order (disk0, disk1...)
    memory_file: Path | None = None  # the guest's RAM file (vm/memory.py), None: anon RAM
    resume: ResumeOrder | None = None  # the memory image QEMU waits for (-incoming defer)
    pending_root: Path | None = None  # a restore's old root disk, until the load works
    memory_fd: int | None = None  # holds the RAM file's lock for the boot (vm/memory.py)


@dataclass
class FirstBoot:
    """What ``_supervise`` did before the event loop, handed to the supervisor."""

    workspace: Workspace
    accel: AccelChoice
    tsc_khz: int | None
    holds: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    held_fds: tuple[int, ...] = ()  # the volumes' locks, which each QEMU inherits
    launched: Launched | None = None
    failure: str | None = None  # why nothing was launched
    volumes_failed: bool = False  # the failure was holding the volumes: no boot at all
    adopted: Adopted | None = None  # a VM whose supervisor was lost, to re-attach to


def take_supervisor_lock(files: RunFiles) -> int | None:
    """The workspace's supervisor lock (held for the process's life), or None when
    another supervisor has it."""
    lock = os.open(files.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return None
    return lock


def unlaunched(layout: StateLayout, name: str) -> FirstBoot:
    """What a first boot needs to know, nothing held or launched yet."""
    workspace = get_workspace(layout, name)
    accel = choose_accel()
    tsc_khz = host_tsc_khz(layout.tsc_record) if accel.accel == "tcg" else None
    return FirstBoot(workspace, accel, tsc_khz)


def first_boot(layout: StateLayout, name: str) -> FirstBoot:
    """Hold the workspace's volumes and launch its first boot (the caller holds the
    supervisor lock and is in the run directory). Failures are recorded, not raised:
    the supervisor reports them as the boot's outcome."""
    from microagent.disks.volumes import hold_volumes

    first = unlaunched(layout, name)
    workspace, accel, tsc_khz = first.workspace, first.accel, first.tsc_khz
    volumes = [d.name for d in workspace.disks if d.kind == "volume"]
    try:  # held for the supervisor's life (see volumes.py)
        first.held_fds = tuple(first.holds.enter_context(hold_volumes(layout, name, volumes)))
    except MicroagentError as e:
        first.failure, first.volumes_failed = e.message, True
        return first
    try:
        resume = read_order(layout.run_files(name).resume_order)
        first.launched = launch_vmm(layout, workspace, accel, tsc_khz, resume=resume,
                                    inherit=first.held_fds)
    except ConflictError as e:
        first.failure = e.message
    except Exception as e:
        first.failure = f"could not boot: {e}"
    return first


def launch_vmm(layout: StateLayout, workspace: Workspace, accel: AccelChoice, tsc_khz: int | None,
               cancelled: Callable[[], bool] = lambda: False,
               resume: ResumeOrder | None = None,
               inherit: tuple[int, ...] = ()) -> Launched | None:
    """Prepare one boot (initramfs, attached disks, the guest's RAM file, the VMM's argv)
    and start the VMM and, with a network, its passt. With ``resume``, the disks and
    the RAM are the image's (:func:`place_image`) and QEMU waits for its device state.
    QEMU inherits ``inherit`` (the volumes' locks) and the RAM file's lock.

    None when ``cancelled()`` says a kill came while preparing. Raises ConflictError for
    a published port that is taken."""
    from microagent.guest import agent_binary
    from microagent.kernel.initramfs import build_boot_initramfs
    from microagent.network import check_ports_free
    from microagent.vm.memory import prepare_memory_file

    files = layout.run_files(workspace.name)
    kernel = workspace_kernel(layout, workspace)
    recovery = journal_needs_recovery(workspace.rootfs)
    # at every boot: a restart finds a port taken while the guest was down
    check_ports_free(workspace.ports)
    build_boot_initramfs(kernel, agent_binary(), files.initramfs)
    # a fresh copy of each rw bundle's disk at every boot: its writes do not persist
    attached = prepare_boot_disks(layout, files, workspace.disks,
                                  layout.workspace_bundles_dir(workspace.name))
    held = prepare_memory_file(layout, workspace.name, workspace.resources.memory_mib)
    root = None
    try:
        if resume is not None:
            resume, root = place_image(resume, workspace, files, held)
        else:  # a cold boot (a restart too) spends a memory image left unloaded
            from microagent.state.snapshots import discard_resume

            discard_resume(layout, workspace.name)
            for leftover in (".restoring", ".previous"):  # a killed restore's
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(workspace.rootfs.with_name(f".{workspace.rootfs.name}{leftover}"))
        launched = _launch(layout, workspace, files, kernel, accel, tsc_khz, attached, held,
                           resume, root, recovery, cancelled, inherit)
    except BaseException:
        _forget_memory(held)
        put_back_root(workspace.rootfs, root)
        raise
    if launched is None:  # cancelled: no VM
        _forget_memory(held)
        return None
    launched.memory_fd = held[1] if held is not None else None
    return launched


def _forget_memory(held: tuple[Path, int] | None) -> None:
    if held is not None:
        from microagent.vm.memory import release_memory_file

        release_memory_file(*held)


def _launch(layout: StateLayout, workspace: Workspace, files: RunFiles, kernel: KernelBundle,
            accel: AccelChoice, tsc_khz: int | None, attached: BootDisks,
            memory: tuple[Path, int] | None, resume: ResumeOrder | None, root: Path | None,
            recovery: bool, cancelled: Callable[[], bool],
            inherit: tuple[int, ...]) -> Launched | None:
    from microagent.network import has_network

    spec = launch_spec(workspace, files, kernel, accel, tsc_khz, attached,
                       memory_file=memory[0] if memory is not None else None,
                       incoming=resume is not None)
    plan = QemuBackend().plan(spec)
    if cancelled():
        return None
    for socket_name in (plan.agent_socket, plan.console_socket, plan.monitor_socket,
                        *filter(None, [plan.out_socket, plan.net_socket])):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(files.dir / socket_name)
    # QEMU outlives a supervisor that dies (SIGKILL, the OOM killer): the guest and its
    # background processes run on and the next command re-attaches a supervisor
    # (vm/adopt.py). So it inherits what must stay held while it runs: the RAM file's
    # lock and the volumes' (held for the supervisor's life otherwise)
    keep = (*inherit, *([memory[1]] if memory is not None else []))
    with os.fdopen(open_private(files.vmm_log, os.O_WRONLY | os.O_APPEND), "ab") as vmm_log:
        vmm_log_start = vmm_log.tell()
        process = subprocess.Popen(
            plan.argv, cwd=plan.cwd, stdin=subprocess.DEVNULL, stdout=vmm_log,
            stderr=subprocess.STDOUT, start_new_session=True,
            umask=PRIVATE_UMASK,  # its sockets: owner only
            pass_fds=keep)
    network = None
    if has_network(workspace.network):
        try:
            network = start_network(files, workspace)
        except BaseException:
            process.kill()
            process.wait()
            raise
    return Launched(process, plan, kernel, recovery, time.monotonic(), vmm_log_start, network,
                    tuple(Path(disk.path) for disk in spec.disks),
                    memory[0] if memory is not None else None, resume, root)


def place_image(order: ResumeOrder, workspace: Workspace, files: RunFiles,
                held: tuple[Path, int] | None) -> tuple[ResumeOrder, Path | None]:
    """Make a memory image this boot's, before QEMU starts: links to its device state
    and RAM in the run directory (a snapshot deleted meanwhile stays whole for this
    boot); its root disk copied beside the workspace's, which it replaces only once the
    load has worked (returned: vm/imaging.load_image renames it); its rw bundle disks
    over this boot's copies; and the RAM file (``held``: its path and locked descriptor)
    of the image's size, empty: the supervisor fills it while QEMU starts
    (vm/imaging.fill_memory). Raises HostError when the RAM file has no room."""
    import dataclasses
    import shutil

    from microagent.disks.rootfs import clone_file
    from microagent.errors import HostError
    from microagent.state.snapshots import MEMORY, VMSTATE, read_manifest
    from microagent.vm.memory import shm_dir

    if held is None:
        raise HostError(f"no room in {shm_dir().parent} for the memory of {workspace.name} "
                        f"({workspace.resources.memory_mib} MiB)",
                        hint="free some there, or start it cold: microagent start --cold "
                             f"{workspace.name}")
    links = files.dir / "image"
    shutil.rmtree(links, ignore_errors=True)
    os.mkdir(links, 0o700)
    for name in (VMSTATE, MEMORY):
        os.link(order.source / name, links / name)
    order = dataclasses.replace(order, held=links)
    manifest = read_manifest(order.source)
    previous = None
    for disk in manifest.get("disks", []):
        source = order.source / str(disk["file"])
        if disk["role"] == "root":
            # QEMU must open it by its own name (it reopens images by name), so the old
            # disk is kept under another name until the load has worked
            partial = workspace.rootfs.with_name(f".{workspace.rootfs.name}.restoring")
            previous = keep_previous_root(workspace.rootfs)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            clone_file(source, partial)
            os.replace(partial, workspace.rootfs)
            continue
        if disk["role"] != "bundle":
            continue
        target = files.bundle_disk(str(disk["name"]))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        clone_file(source, target)
    os.ftruncate(held[1], os.stat(order.memory).st_size)  # the image's RAM's size
    return order, previous


def keep_previous_root(rootfs: Path) -> Path:
    """A second name for the workspace's root disk (``.rootfs.ext4.previous``), so that
    a restore whose load fails can put it back (:func:`put_back_root`)."""
    previous = rootfs.with_name(f".{rootfs.name}.previous")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(previous)
    os.link(rootfs, previous)
    return previous


def put_back_root(rootfs: Path, previous: Path | None) -> None:
    """The old root disk back in place after a restore that did not load (nothing when
    the load worked: the second name is gone then)."""
    if previous is not None and previous.exists():
        os.replace(previous, rootfs)
        from microagent.store import fsync_dir

        fsync_dir(rootfs.parent)


def _buffers(sock: socket.socket) -> None:
    """4 MiB each way on a socket of the link to passt.

    passt drops the frames it cannot write at once and lets TCP retransmit them: with a
    socketpair's default 208 KiB, a download into a TCG guest ran at 2.3 MB/s against
    33 MB/s with 8 MiB (and 16-17 MB/s with 1 MiB or 4 MiB under other load). passt sets
    the same on the sockets it accepts; as root the size does not depend on
    ``net.core.wmem_max``."""
    for forced, plain in ((_SO_SNDBUFFORCE, socket.SO_SNDBUF),
                          (_SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, LINK_BUFFER)
        except PermissionError:  # not root: up to net.core.[rw]mem_max
            sock.setsockopt(socket.SOL_SOCKET, plain, LINK_BUFFER)


def link_connector(files: RunFiles, timeout: float = LINK_WAIT
                   ) -> Callable[[threading.Event], socket.socket | None]:
    """How the frame relay reaches QEMU's end of the link: QEMU listens on
    ``net.sock`` (from a moment after it starts, and again after a connection ends);
    connected with a retry until it is there, None once ``closing`` is set. Raises
    OSError when QEMU never listens within ``timeout``."""
    from microagent.vm.backends.qemu import NET_SOCKET
    from microagent.vm.control import connect_unix

    def connect(closing: threading.Event) -> socket.socket | None:
        deadline = time.monotonic() + timeout
        while not closing.is_set():
            try:
                sock = connect_unix(files.dir, NET_SOCKET, timeout=None)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                closing.wait(0.01)
                continue
            _buffers(sock)
            return sock
        return None

    return connect


def start_network(files: RunFiles, workspace: Workspace) -> NetworkHelper:
    """Start passt on one end of a socketpair and the frame filter between its other end
    and QEMU's link (``net.sock``; a supervisor that re-attaches starts a new pair).
    Raises HostError when passt cannot be run."""
    from microagent.errors import HostError
    from microagent.network import reaches_host_loopback
    from microagent.vm.backends.base import PortSpec
    from microagent.vm.backends.qemu import GUEST_MAC
    from microagent.vm.netfilter import FramePolicy, FrameRelay, guest_announcement
    from microagent.vm.passt import (
        DNS_ADDRESS,
        GATEWAY,
        GUEST_ADDRESS,
        PasstSpec,
        passt_argv,
        passt_problems,
    )

    relay_helper, helper = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (relay_helper, helper):
        _buffers(sock)
    host_loopback = reaches_host_loopback(workspace.network)
    spec = PasstSpec(helper.fileno(), host_loopback,
                     tuple(PortSpec(p.host_ip, p.host_port, p.guest_port)
                           for p in workspace.ports))
    parent = os.getpid()
    try:
        with os.fdopen(open_private(files.network_log, os.O_WRONLY | os.O_APPEND),
                       "ab") as log:
            log_start = log.tell()
            process = subprocess.Popen(
                passt_argv(spec), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=lambda: _die_with_parent(parent),
                start_new_session=True, umask=PRIVATE_UMASK, pass_fds=(helper.fileno(),))
    except OSError as e:
        relay_helper.close()
        problems = passt_problems()
        raise HostError(problems[0] if problems else f"cannot start passt: {e}") from e
    finally:
        helper.close()  # passt's now
    policy = FramePolicy(gateway=None if host_loopback else socket.inet_aton(GATEWAY),
                         dns=socket.inet_aton(DNS_ADDRESS))
    relay = FrameRelay(None, relay_helper, policy, link=link_connector(files),
                       announce=guest_announcement(GUEST_MAC, GUEST_ADDRESS))
    relay.start()
    return NetworkHelper(process, relay, log_start)


def workspace_kernel(layout: StateLayout, workspace: Workspace, *,
                     install_if_missing: bool = False) -> KernelBundle:
    """The bundle ``workspace`` boots: its own (``create --kernel``), else the default."""
    if workspace.own_kernel is not None:
        from microagent.kernel.ownkernels import own_kernel

        return own_kernel(layout, workspace.own_kernel.digest)
    from microagent.kernel.kernels import default_kernel

    return default_kernel(layout, install_if_missing=install_if_missing)


def vmm_said(vmm_log: Path, offset: int) -> str:
    """The VMM's own last words of one boot, from ``offset`` in its log (e.g. QEMU
    refusing a locked image); "" when it said nothing."""
    try:
        with open(vmm_log, "rb") as f:
            f.seek(offset)
            lines = f.read(65536).decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return (": " + " ".join(line.strip() for line in lines[-2:])) if lines else ""


def launch_spec(workspace: Workspace, files: RunFiles, kernel: KernelBundle, accel: AccelChoice,
                tsc_khz: int | None, attached: BootDisks, *, memory_file: Path | None = None,
                incoming: bool = False) -> LaunchSpec:
    """What the backend is asked to boot for ``workspace``."""
    from microagent.network import has_network

    image = kernel.vmlinux if kernel.vmlinux is not None else kernel.vmlinuz
    network = "user" if has_network(workspace.network) else "none"
    return LaunchSpec(
        name=workspace.name, memory_mib=workspace.resources.memory_mib,
        cpus=workspace.resources.cpus, kernel=image, initramfs=files.initramfs,
        cmdline=guest_cmdline(hostname=workspace.hostname, network=network,
                              accel=accel.accel, tsc_khz=tsc_khz, disks=attached.params),
        disks=(DiskSpec(workspace.rootfs), *attached.disks), run_dir=files.dir,
        network=network, accel=accel.accel, memory_file=memory_file,
        incoming=incoming,
    )


def _die_with_parent(parent: int) -> None:
    """In passt's child before exec: die with the supervisor (SIGKILL on its death; one
    that re-attaches starts its own)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)
