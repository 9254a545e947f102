"""HTTP requests through a published port against the same requests inside the guest
(issue 6), and against QEMU's slirp, the network workspaces had before issue 12.

One running busybox workspace (profile small, TCG here) created with
``--publish PORT:8080``; busybox ``httpd -p 8080 -h /www`` serves a small file in the guest.

- **Figure**: N sequential ``GET /index.html`` from the host to ``127.0.0.1:PORT`` with
  Python's ``http.client``, a new TCP connection each (``Connection: close``): passt
  accepts on the host and opens a connection to the guest through the supervisor's frame
  filter.
- **Slirp**: the same requests to a second VM booted from a copy of the same image's disk
  with the backend's argv but QEMU's ``-netdev user,hostfwd=...`` (``bench/slirp_vm.py``),
  up at the same time, measured in turns.
- **Floor**: the same N requests made inside the guest, against ``127.0.0.1:8080`` on its
  loopback, by a shell loop of busybox ``wget -q -O /dev/null`` run with exec and timed by
  the guest (``/proc/uptime``, 10 ms resolution). Each of these requests also pays a
  process spawn under TCG; the loop of ``/bin/true`` shown beside it is that cost alone
  (plain ``true`` is an ash builtin and spawns nothing).
- Requests per second for both and their ratio (figure / floor), in the same run, best of
  ``--runs``, interleaved.

Run: ``.venv/bin/python bench/publish_rate.py [--requests 200] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "bench")]

from boot_floor import install_cached_kernel  # noqa: E402
from ocilayout import ImageSpec, Layer, build_layout, busybox_tree, tar_directory  # noqa: E402
from slirp_vm import SlirpVM  # noqa: E402
from workspace_lifecycle import MICROAGENT, ma  # noqa: E402

GUEST_PORT = 8080
PAGE = b"x" * 512


def free_port() -> int:
    """A host TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def host_loop(port: int, count: int) -> float:
    """Seconds for ``count`` sequential GETs through the published port, one connection
    each."""
    start = time.perf_counter()
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/index.html", headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read()
        conn.close()
        if response.status != 200 or body != PAGE:
            raise RuntimeError(f"GET through port {port}: {response.status}, {len(body)} bytes")
    return time.perf_counter() - start


def guest_loop(home: Path, name: str, count: int, command: str) -> float:
    """Seconds (guest clock) for ``count`` runs of ``command`` in a guest shell loop."""
    script = ("read t0 _ < /proc/uptime; n=0; "
              f"while [ $n -lt {count} ]; do {command} || exit 1; n=$((n+1)); done; "
              "read t1 _ < /proc/uptime; echo $t0 $t1")
    out = ma(home, "exec", name, "--", "sh", "-c", script).stdout.split()
    return float(out[1]) - float(out[0])


def wait_for_server(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            host_loop(port, 1)
            return
        except (OSError, http.client.HTTPException, RuntimeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"host": [], "slirp": [], "guest": [], "spawn": []}
    with tempfile.TemporaryDirectory(prefix="publish-bench-") as tmp:
        work = Path(tmp)
        home = work / "home"
        install_cached_kernel(home)
        build_layout(work / "image", [ImageSpec(layers=[Layer(tar_directory(
            busybox_tree(work / "tree")))])])
        name, port, slirp_port = "bench", free_port(), free_port()
        ma(home, "create", name, "--image", f"oci:{work / 'image'}", "--profile", "small",
           "--publish", f"{port}:{GUEST_PORT}")
        ma(home, "create", "slirp", "--image", f"oci:{work / 'image'}", "--profile", "small")
        serve = (f"mkdir -p /www && printf '{PAGE.decode()}' > /www/index.html && "
                 f"httpd -p {GUEST_PORT} -h /www")
        slirp = None
        try:
            slirp = SlirpVM(home, "slirp", work, ((slirp_port, GUEST_PORT),))
            slirp.run(serve)
            ma(home, "start", name)
            ma(home, "exec", name, "--", "sh", "-c", serve)
            wait_for_server(port)
            wait_for_server(slirp_port)
            wget = f"wget -q -O /dev/null http://127.0.0.1:{GUEST_PORT}/index.html"
            for _ in range(args.runs):
                results["host"].append(host_loop(port, args.requests))
                results["slirp"].append(host_loop(slirp_port, args.requests))
                results["guest"].append(guest_loop(home, name, args.requests, wget))
            results["spawn"].append(guest_loop(home, name, args.requests, "/bin/true"))
            ma(home, "halt", name)
        finally:
            subprocess.run([MICROAGENT, "--state-dir", str(home), "kill", name],
                           capture_output=True, check=False)
            if slirp is not None:
                slirp.close()
    rate = {key: args.requests / min(values) for key, values in results.items()}
    print(f"HTTP GET of {len(PAGE)} bytes, {args.requests} sequential requests, one connection "
          f"each, best of {args.runs}")
    print(f"  figure: host -> 127.0.0.1:PORT -> guest :{GUEST_PORT} (http.client)  "
          f"{rate['host']:7.1f} req/s  {1000 / rate['host']:6.1f} ms each   (passt)")
    print(f"  slirp:  the same through QEMU's -netdev user hostfwd         "
          f"{rate['slirp']:7.1f} req/s  {1000 / rate['slirp']:6.1f} ms each   "
          f"passt / slirp {rate['host'] / rate['slirp']:.2f}")
    print(f"  floor:  in the guest, wget -> 127.0.0.1:{GUEST_PORT} (shell loop)     "
          f"{rate['guest']:7.1f} req/s  {1000 / rate['guest']:6.1f} ms each")
    print(f"  ratio figure / floor                                      "
          f"{rate['host'] / rate['guest']:7.2f}")
    print(f"  (the same guest loop of /bin/true, its spawn cost alone: "
          f"{rate['spawn']:.1f} /s, {1000 / rate['spawn']:.1f} ms each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
