"""Start-up time: ``microagent --help``, ``profiles``, ``list``, and the library's
``import microagent`` with ``Microagent()``.

Floor: the same interpreter starting and exiting (``python -c pass``), measured in the
same run. Targets: each command under 150 ms wall; the import and the client under 30 ms
above the floor, with no HTTP client, compression module or asyncio loaded.
Run: ``.venv/bin/python bench/cli_startup.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 15
TARGET_MS = 150.0
IMPORT_TARGET_MS = 30.0  # above the floor
IMPORT = ("import sys, microagent; microagent.Microagent(); "
          "heavy = [m for m in ('httpx', 'zstandard', 'asyncio') if m in sys.modules]; "
          "sys.exit(f'imported {heavy}' if heavy else 0)")


def best_wall_ms(argv: list[str], env: dict[str, str]) -> float:
    best = float("inf")
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        best = min(best, (time.perf_counter() - start) * 1000)
    return best


def main() -> int:
    bindir = Path(sys.executable).parent
    entry = str(bindir / "microagent")
    with tempfile.TemporaryDirectory() as state:
        env = {**os.environ, "MICROAGENT_HOME": state}
        floor = best_wall_ms([sys.executable, "-c", "pass"], env)
        failed = False
        for args in (["--help"], ["profiles"], ["list"]):
            ms = best_wall_ms([entry, *args], env)
            ok = ms < TARGET_MS
            failed |= not ok
            print(f"microagent {' '.join(args):10s} {ms:6.1f} ms   floor (python -c pass) "
                  f"{floor:5.1f} ms   ratio {ms / floor:4.2f}   target < {TARGET_MS:.0f} ms "
                  f"{'ok' if ok else 'MISSED'}")
        ms = best_wall_ms([sys.executable, "-c", IMPORT], env)
        ok = ms - floor < IMPORT_TARGET_MS
        failed |= not ok
        print(f"import microagent + Microagent() {ms:6.1f} ms   floor (python -c pass) "
              f"{floor:5.1f} ms   above floor {ms - floor:5.1f} ms   target < "
              f"{IMPORT_TARGET_MS:.0f} ms above {'ok' if ok else 'MISSED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
