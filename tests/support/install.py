"""The package as a user gets it: a copy of the source tree, ``pip install``ed into a fresh
venv (no install.sh, no make), or built into a wheel with ``python -m build``.

pip fetches the build backend and the dependencies from the configured package index, as
it does for a user.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# what a checkout has beside its sources: environments, caches and build outputs
NOT_SOURCES = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                     "__pycache__", ".pytest_cache", ".mypy_cache",
                                     ".ruff_cache")
PIP_TIMEOUT = 900.0
PT_INTERP = 3
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}


@dataclass(frozen=True)
class Venv:
    """A virtual environment with the package installed in it."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def microagent(self) -> Path:
        return self.root / "bin" / "microagent"

    def run(self, *argv: str | Path, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A command of this venv (``argv[0]`` relative to its ``bin/``), run away from
        the source tree, with the environment of a user who has only this install."""
        command = [str(self.root / "bin" / argv[0]), *map(str, argv[1:])]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              cwd=self.root, env={**user_env(), **(env or {})}, check=False)

    def site_packages(self) -> Path:
        """Where pip installed the package (the platform library directory)."""
        found = self.run("python", "-c", "import sysconfig; print(sysconfig.get_paths()"
                                         "['platlib'])")
        assert found.returncode == 0, found.stderr
        return Path(found.stdout.strip()).resolve()

    def agent_binary(self) -> Path:
        """``microagent.guest.agent_binary()`` as this venv's package answers it."""
        found = self.run("python", "-c", "from microagent.guest import agent_binary; "
                                         "print(agent_binary())")
        assert found.returncode == 0, f"agent_binary() failed:\n{found.stderr}"
        return Path(found.stdout.strip())


def user_env() -> dict[str, str]:
    """The test's environment without what would point the venv at this checkout."""
    drop = {"MICROAGENT_AGENT", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def copy_sources(destination: Path) -> Path:
    """The repository's sources, without a built agent or any other build output."""
    shutil.copytree(REPO, destination, ignore=NOT_SOURCES, symlinks=True)
    return destination


def make_venv(root: Path) -> Venv:
    """A fresh venv of the interpreter running the tests (with pip, no packages)."""
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300,
                   env=user_env())
    return Venv(root)


def pip(venv: Venv, *args: str | Path, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """``pip`` of ``venv`` (quiet, no version check)."""
    return venv.run("python", "-m", "pip", "--disable-pip-version-check", "-q", *args,
                    env=env, timeout=PIP_TIMEOUT)


def install_sources(base: Path) -> Venv:
    """A fresh venv under ``base`` where ``pip install SOURCES`` installed a copy of this
    repository's sources, as a user installs a checkout."""
    sources = copy_sources(base / "src")
    venv = make_venv(base / "venv")
    installed = pip(venv, "install", sources)
    if installed.returncode != 0:
        raise AssertionError(f"pip install failed:\n{installed.stdout}\n{installed.stderr}")
    return venv


def build_dists(sources: Path, outdir: Path, *options: str,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m build`` of ``sources`` (the test venv's ``build``): by default an sdist,
    then the wheel built from that sdist, as a release is made."""
    return subprocess.run([sys.executable, "-m", "build", *options, "--outdir", str(outdir),
                           str(sources)], capture_output=True, text=True,
                          timeout=PIP_TIMEOUT, env={**user_env(), **(env or {})},
                          check=False)


def elf_machine_and_interpreter(path: Path) -> tuple[str, bool]:
    """The ELF file's machine and whether it asks for a program interpreter (a dynamic
    loader): a static binary has none."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    (machine,) = struct.unpack_from("<H", data, 18)
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    return ELF_MACHINES.get(machine, str(machine)), PT_INTERP in types
