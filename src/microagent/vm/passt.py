"""passt, the user-mode network of a workspace: its command line (pure) and its process.

QEMU 7.2's own user network (slirp) connects whatever the guest sends to 10.0.2.2 to the
host's loopback, and has no switch to stop it. A workspace's network is passt instead (the
Debian package ``passt``; podman's rootless network): one process per boot, started by the
supervisor, speaking QEMU's ``-netdev stream`` framing over a socketpair handed to it
with ``--fd``. Between the two sits the supervisor's frame filter
(:mod:`microagent.vm.netfilter`), because this passt connects a hand-made frame addressed to
127.0.0.1 to the host's loopback.

The guest keeps the addressing it had under slirp (10.0.2.15/24, gateway 10.0.2.2, DNS
10.0.2.3, set by the agent from the kernel command line): ``--address``, ``--gateway`` and
``--dns-forward`` give passt the same plan. DNS to 10.0.2.3 goes to the first resolver of
the host's ``/etc/resolv.conf``, as slirp's did, a loopback one (systemd-resolved's stub)
included; over UDP only (this passt does not forward TCP there; slirp did).
``--no-map-gw`` unless the workspace opted in to the host's loopback (``--network
user:host-loopback``): then 10.0.2.2 is the host's 127.0.0.1, as it was.
Published ports are ``--tcp-ports HOST_IP/HOST_PORT:GUEST_PORT`` (passt binds them when
it starts and exits if one is taken); ``--udp-ports none`` keeps passt from forwarding the
same numbers over UDP, which it does by default.

Started as root, passt changes to the user ``nobody`` after binding its ports (the
socketpair needs no path it could not reach). ``--fd`` implies ``--one-off``: it exits
when QEMU's end of the link closes; the supervisor also ends it by pid at the end of
each boot and at quarantine, and it dies with the supervisor (``PR_SET_PDEATHSIG``; one
that re-attaches to the VM starts its own: vm/adopt.py).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

from microagent.vm.backends.base import PortSpec

if TYPE_CHECKING:
    from microagent.vm.netfilter import FrameRelay

PASST_BINARY = "passt"
PASST_PACKAGE = "passt"
GUEST_ADDRESS = "10.0.2.15"  # backends.base.USER_NET_IP without the prefix length
PREFIX_LENGTH = 24
GATEWAY = "10.0.2.2"
DNS_ADDRESS = "10.0.2.3"
STOP_WAIT = 5.0


@dataclass(frozen=True)
class PasstSpec:
    """One boot's passt: the descriptor of its end of the link, the host-loopback opt-in
    and the published ports."""

    fd: int
    host_loopback: bool = False
    ports: tuple[PortSpec, ...] = ()


def passt_argv(spec: PasstSpec) -> list[str]:
    """passt's command line for ``spec``. Pure; golden-tested."""
    argv = [
        PASST_BINARY, "--foreground", "--quiet", "--fd", str(spec.fd),
        "--address", GUEST_ADDRESS, "--netmask", str(PREFIX_LENGTH), "--gateway", GATEWAY,
        "--dns-forward", DNS_ADDRESS,
    ]
    if not spec.host_loopback:
        argv.append("--no-map-gw")
    for port in spec.ports:
        argv += ["--tcp-ports", f"{port.host_ip}/{port.host_port}:{port.guest_port}"]
    argv += ["--udp-ports", "none"]
    return argv


def passt_problems() -> list[str]:
    """What stops a workspace with a network from starting here (empty when fine)."""
    if shutil.which(PASST_BINARY) is None:
        return [f"{PASST_BINARY} not found: a workspace's network needs it; install the "
                f"{PASST_PACKAGE} package (apt-get install {PASST_PACKAGE}), or create the "
                "workspace with --network none"]
    return []


@dataclass
class NetworkHelper:
    """One boot's network outside QEMU: passt's process and the relay to it."""

    process: subprocess.Popen[bytes]
    relay: FrameRelay
    log_start: int = 0  # where this boot's lines begin in passt's log

    @property
    def pid(self) -> int:
        """passt's process id."""
        return self.process.pid

    def stop(self) -> None:
        """Stop relaying and end passt by its pid (SIGTERM, SIGKILL after a while); its
        published ports are closed when this returns. Idempotent."""
        self.relay.close()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                self.process.wait()
