"""A download inside the guest: passt (what workspaces use) against QEMU's slirp (what they
used before issue 12), in the same run.

- **Server**: Python's HTTP server in a network namespace the bench makes, reached over a
  veth pair on 198.18.N.2 (``tests/support/netns.py``): a non-loopback address, which is
  what a workspace reaches by default. ``GET /bytes/N`` sends N zero bytes.
- **Figure**: busybox ``wget -q -O /dev/null URL`` of ``--mib`` MiB in a busybox workspace
  (profile small, TCG here), timed by the guest (``/proc/uptime``, 10 ms), started with
  ``microagent exec``. The bytes go server -> host socket -> passt -> the supervisor's
  relay -> QEMU -> guest.
- **Slirp**: the same wget in a VM booted from a copy of the same image's disk with the
  backend's argv but ``-netdev user`` (``bench/slirp_vm.py``), both VMs up, measured in
  turns. The ratio is passt / slirp (higher: passt does better).
- **Floor**: the host itself fetching the same URL (``http.client``), the server's pace.

Needs root (the namespace). Run: ``.venv/bin/python bench/guest_download.py [--mib 128]
[--runs 3]``.
"""

from __future__ import annotations

import argparse
import http.client
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "bench")]

from boot_floor import install_cached_kernel  # noqa: E402
from ocilayout import ImageSpec, Layer, build_layout, busybox_tree, tar_directory  # noqa: E402
from slirp_vm import SlirpVM  # noqa: E402
from tests.support.netns import Netns, NetnsHttpServer  # noqa: E402
from workspace_lifecycle import MICROAGENT, ma  # noqa: E402


def timed_wget(run: Callable[[str], str], url: str) -> float:
    """Seconds (guest clock) for one wget of ``url`` to /dev/null."""
    out = run(f"read t0 _ < /proc/uptime; wget -q -O /dev/null {url} || exit 1; "
              "read t1 _ < /proc/uptime; echo $t0 $t1").split()
    return float(out[1]) - float(out[0])


def host_fetch(address: str, port: int, path: str, size: int) -> float:
    start = time.perf_counter()
    conn = http.client.HTTPConnection(address, port, timeout=60)
    conn.request("GET", path)
    response = conn.getresponse()
    received = 0
    while chunk := response.read(1 << 20):
        received += len(chunk)
    conn.close()
    if received != size:
        raise RuntimeError(f"the host got {received} of {size} bytes")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.mib << 20
    seconds: dict[str, list[float]] = {"passt": [], "slirp": [], "host": []}
    with tempfile.TemporaryDirectory(prefix="download-bench-") as tmp:
        work = Path(tmp)
        home = work / "home"
        install_cached_kernel(home)
        build_layout(work / "image", [ImageSpec(layers=[Layer(tar_directory(
            busybox_tree(work / "tree")))])])
        netns = Netns()
        slirp = None
        try:
            server = NetnsHttpServer(netns, work / "requests.log")
            url = f"{server.url}/bytes/{size}"
            for name in ("bench", "slirp"):
                ma(home, "create", name, "--image", f"oci:{work / 'image'}", "--profile",
                   "small")
            slirp = SlirpVM(home, "slirp", work)
            ma(home, "start", "bench")

            def in_workspace(command: str) -> str:
                return ma(home, "exec", "bench", "--", "sh", "-c", command).stdout

            timed_wget(in_workspace, url)  # warm both: first runs pay page-ins
            timed_wget(slirp.run, url)
            for _ in range(args.runs):
                seconds["passt"].append(timed_wget(in_workspace, url))
                seconds["slirp"].append(timed_wget(slirp.run, url))
                seconds["host"].append(host_fetch(server.address, server.port,
                                                  f"/bytes/{size}", size))
            ma(home, "halt", "bench")
        finally:
            subprocess.run([MICROAGENT, "--state-dir", str(home), "kill", "bench"],
                           capture_output=True, check=False)
            if slirp is not None:
                slirp.close()
            netns.close()
    rate = {key: size / min(values) / 1e6 for key, values in seconds.items()}
    print(f"guest wget of {args.mib} MiB from a server on a non-loopback address "
          f"(a test namespace), best of {args.runs}")
    print(f"  figure: passt (workspace, supervisor's frame filter)  {rate['passt']:8.1f} MB/s  "
          f"{min(seconds['passt']):6.2f} s")
    print(f"  slirp:  QEMU's -netdev user, same disk and argv      {rate['slirp']:8.1f} MB/s  "
          f"{min(seconds['slirp']):6.2f} s   passt / slirp {rate['passt'] / rate['slirp']:.2f}")
    print(f"  floor:  the host fetching it (http.client)           {rate['host']:8.1f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
