"""How the benches print a series of timings: best and median, and the ratio to a floor."""

from __future__ import annotations

import statistics


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
