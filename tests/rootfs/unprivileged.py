"""Run build_root_disk as an ordinary user (nobody) from a root test session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import microagent
from microagent.images.layers import LayerFile

NOBODY = 65534
SRC = str(Path(microagent.__file__).resolve().parents[1])
SITE = sysconfig.get_paths()["purelib"]

PROGRAM = """
import json, sys, time
args = json.loads(sys.argv[1])
sys.path[:0] = args["path"]
from pathlib import Path
from microagent.images.layers import LayerFile
from microagent.disks.rootfs import build_root_disk
layers = [LayerFile(Path(p), m, d, i) for p, m, d, i in args["layers"]]
started = time.perf_counter()
build_root_disk(layers, Path(args["dest"]), size_mib=args["size_mib"],
                work_dir=Path(args["work"]))
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def require_setpriv() -> None:
    """Skip unless this session can switch to nobody."""
    if os.geteuid() != 0:
        pytest.skip("switching to the nobody user needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")


@contextmanager
def shared_dir(prefix: str) -> Iterator[Path]:
    """A directory under /tmp that nobody can read, and write in ``work``/``out``."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        base.chmod(0o755)
        for sub in ("work", "out", "layers"):
            (base / sub).mkdir()
        for sub in ("work", "out"):
            os.chown(base / sub, NOBODY, NOBODY)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def share_layer(layer: Path, base: Path) -> Path:
    """Make ``layer`` readable by nobody under ``base/layers`` (a hard link if possible)."""
    shared = base / "layers" / layer.name
    try:
        os.link(layer, shared)
    except OSError:
        shutil.copyfile(layer, shared)
    shared.chmod(0o644)
    return shared


def build_as_nobody(layers: list[LayerFile], dest: Path, work: Path, *, size_mib: int,
                    timeout: float = 600) -> float:
    """Build the disk as nobody:nogroup with no supplementary groups; return seconds."""
    args = {"path": [SRC, SITE], "dest": str(dest), "work": str(work), "size_mib": size_mib,
            "layers": [[str(x.path), x.media_type, x.digest, x.diff_id] for x in layers]}
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "/usr/bin/python3", "-c", PROGRAM, json.dumps(args)],
        capture_output=True, text=True, timeout=timeout, check=False, cwd="/",
        env={"PATH": "/usr/bin:/bin", "HOME": str(work), "LC_ALL": "C.UTF-8"},
    )
    assert result.returncode == 0, f"build as nobody failed:\n{result.stderr[-3000:]}"
    return float(json.loads(result.stdout.strip().splitlines()[-1])["seconds"])
