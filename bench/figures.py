"""What the benches share: how a series of timings is printed (best and median, the ratio
to a floor), and a running busybox workspace to time ``ws.exec(["true"])`` on.

The workspace's imports are made inside :func:`busybox_workspace` (they need the repo's
``tools`` on ``sys.path``, as each bench sets it), so the printing costs nothing more."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microagent import Workspace


def summary(label: str, seconds: list[float], *, width: int = 44) -> str:
    """``label`` then the best and the median of ``seconds``, in milliseconds."""
    return (f"{label:<{width}} best {min(seconds) * 1000:8.1f} ms   "
            f"median {statistics.median(seconds) * 1000:8.1f} ms")


def ratios(figure: list[float], floor: list[float]) -> tuple[float, float]:
    """``figure`` / ``floor``: best over best, median over median."""
    return min(figure) / min(floor), statistics.median(figure) / statistics.median(floor)


def verdict(met: bool) -> str:
    """How a target line ends: ``ok``, or ``MISSED`` in capitals to be seen."""
    return "ok" if met else "MISSED"


@contextlib.contextmanager
def busybox_workspace(prefix: str, name: str = "bench") -> Iterator[tuple[Path, Workspace]]:
    """A running busybox workspace ``name`` (profile tiny, the VM tests' kernel bundle)
    in a temporary state directory: that directory and the handle. Killed and deleted,
    with the directory, when the block ends."""
    from boot_floor import install_cached_kernel
    from ocilayout import ImageSpec, Layer, build_layout, busybox_tree, tar_directory

    from microagent import Microagent

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        home = work / "home"
        install_cached_kernel(home)
        build_layout(work / "image", [ImageSpec(
            layers=[Layer(tar_directory(busybox_tree(work / "tree")))])])
        ws = Microagent(home).create(name, f"oci:{work / 'image'}", profile="tiny")
        try:
            ws.start()
            yield home, ws
        finally:
            ws.kill()
            ws.delete()


def api_exec(ws: Workspace) -> float:
    """Seconds of one ``ws.exec(["true"])`` (RuntimeError unless it exits 0)."""
    start = time.perf_counter()
    result = ws.exec(["true"])
    elapsed = time.perf_counter() - start
    if result.exit_code != 0:
        raise RuntimeError(f"ws.exec(['true']): {result}")
    return elapsed
