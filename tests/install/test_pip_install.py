"""``pip install`` gives a working install: the package build compiles the guest agent.

Each test starts from a copy of the source tree without any build output, so the agent
can only come from the package build (no install.sh, no make by hand). pip and build
fetch the build backend and the dependencies from the package index.

``fresh_install`` (one per module) is the venv that later tests of a user's first steps
reuse: it has only what ``pip install`` put there.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sysconfig
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.kernel.kernels import KernelBundle
from tests.support.install import (
    Venv,
    build_dists,
    copy_sources,
    elf_machine_and_interpreter,
    install_sources,
    make_venv,
    pip,
)
from tests.support.kernel import give_default_kernel

pytestmark = pytest.mark.slow

AGENT_IN_PACKAGE = "microagent/guest/build/microagent-init"
PACKAGES = "gcc libc6-dev make"


def check_static_agent_inside(venv: Venv) -> Path:
    """agent_binary() names an executable static ELF of this machine in the venv."""
    binary = venv.agent_binary()
    assert binary.resolve().is_relative_to(venv.site_packages()), binary
    assert binary.is_file() and binary.stat().st_mode & 0o111, oct(binary.stat().st_mode)
    machine, interpreter = elf_machine_and_interpreter(binary)
    assert machine == platform.machine()
    assert not interpreter, f"{binary} is dynamically linked"
    return binary


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh venv where ``pip install SOURCES`` installed the package, as a user does."""
    return install_sources(tmp_path_factory.mktemp("fresh-install"))


@pytest.fixture(scope="module")
def fresh_home(fresh_install: Venv, guest_kernel: KernelBundle,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A state directory for the fresh install, with the tests' cached kernel as its
    default (what `microagent kernel install` would have put there)."""
    home = tmp_path_factory.mktemp("fresh-home")
    give_default_kernel(home, guest_kernel)
    yield home
    for ws in (home / "workspaces").glob("*"):  # never leave a VM behind
        fresh_install.run("microagent", "--state-dir", home, "kill", ws.name)


def test_pip_install_of_the_sources_builds_the_agent_into_the_venv(fresh_install: Venv
                                                                  ) -> None:
    binary = check_static_agent_inside(fresh_install)
    doctor = fresh_install.run("microagent", "--json", "doctor")
    agent = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}["agent"]
    assert agent["status"] == "ok" and str(binary) in agent["detail"], agent


def test_a_fresh_install_boots_a_workspace_through_its_cli(
        fresh_install: Venv, fresh_home: Path, busybox_layout: Path) -> None:
    """The venv's own microagent, its own agent in the boot initramfs: create, start, exec,
    halt, delete."""

    def ma(*args: str) -> subprocess.CompletedProcess[str]:
        done = fresh_install.run("microagent", "--state-dir", fresh_home, *args, timeout=600)
        assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
        return done

    ma("create", "fresh", "--image", f"oci:{busybox_layout}:latest", "--profile", "tiny")
    ma("start", "fresh")
    assert ma("exec", "fresh", "--", "echo", "booted by pip's install").stdout == \
        "booted by pip's install\n"
    ma("halt", "fresh")
    assert json.loads(ma("--json", "status", "fresh").stdout)["state"] == "halted"
    ma("delete", "fresh", "--yes")
    assert not (fresh_home / "workspaces" / "fresh").exists()


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build``'s output directory: the sdist and the wheel built from it."""
    base = tmp_path_factory.mktemp("dists")
    built = build_dists(copy_sources(base / "src"), base / "dist")
    assert built.returncode == 0, f"python -m build failed:\n{built.stdout}\n{built.stderr}"
    return base / "dist"


@pytest.fixture(scope="module")
def wheel(dists: Path) -> Path:
    (found,) = dists.glob("*.whl")
    return found


def test_the_sdist_has_the_agent_sources_and_no_binary(dists: Path) -> None:
    (sdist,) = dists.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.partition("/")[2] for name in archive.getnames()}
    assert {"setup.py", "src/microagent/guest/Makefile", "src/microagent/guest/main.c"} <= names
    assert not [n for n in names if n.endswith(("microagent-init", ".o"))], names


def test_the_wheel_holds_the_agent_and_a_platform_tag(wheel: Path) -> None:
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    assert wheel.name.endswith(f"-py3-none-{plat}.whl"), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        agent = archive.getinfo(AGENT_IN_PACKAGE)
        assert (agent.external_attr >> 16) & 0o111, "the agent is not executable in the wheel"
        names = archive.namelist()
        (wheel_file,) = [n for n in names if n.endswith(".dist-info/WHEEL")]
        assert "Root-Is-Purelib: false" in archive.read(wheel_file).decode()
    assert not [n for n in names if n.endswith(".o")], "object files in the wheel"


def test_the_wheel_installs_a_working_agent_into_a_fresh_venv(wheel: Path, tmp_path: Path
                                                              ) -> None:
    venv = make_venv(tmp_path / "venv")
    installed = pip(venv, "install", wheel)
    assert installed.returncode == 0, installed.stderr
    check_static_agent_inside(venv)
    completion = venv.run("microagent", "completion", "bash")  # shtab came as a dependency
    assert completion.returncode == 0 and "_shtab_microagent" in completion.stdout


def failed_build(tmp_path: Path, env: dict[str, str]) -> str:
    """Build a wheel of fresh sources under ``env``; the build must fail. Its output."""
    built = build_dists(copy_sources(tmp_path / "src"), tmp_path / "dist", "--wheel", env=env)
    output = built.stdout + built.stderr
    assert built.returncode != 0, f"the build did not fail:\n{output}"
    assert not list((tmp_path / "dist").glob("*.whl"))
    return output


def test_no_c_compiler_fails_the_build_naming_the_packages(tmp_path: Path) -> None:
    output = failed_build(tmp_path, {"CC": "no-such-cc"})
    assert "needs a C compiler, and `no-such-cc` was not found" in output
    assert f"sudo apt-get install --no-install-recommends {PACKAGES}" in output


def test_no_make_fails_the_build_naming_the_packages(tmp_path: Path) -> None:
    tools = tmp_path / "bin"  # a PATH with the compiler and none of make
    tools.mkdir()
    output = failed_build(tmp_path, {"CC": "/usr/bin/gcc", "PATH": str(tools)})
    assert "needs `make`, which is not installed" in output
    assert f"sudo apt-get install --no-install-recommends {PACKAGES}" in output


def test_no_static_libc_fails_the_build_naming_libc6_dev_simulated(tmp_path: Path) -> None:
    """Simulated: a compiler wrapper that links without the C library stands for a host
    without libc6-dev (this host has it, and the test cannot remove it)."""
    wrapper = tmp_path / "cc-without-libc"
    wrapper.write_text('#!/bin/sh\nexec gcc -nostdlib "$@"\n')
    wrapper.chmod(0o755)
    output = failed_build(tmp_path, {"CC": str(wrapper)})
    assert "cannot link a static program" in output and "(libc6-dev)" in output
    assert f"sudo apt-get install --no-install-recommends {PACKAGES}" in output
    assert "undefined reference" in output  # what the compiler said


API_SESSION = '''
import sys, tempfile, pathlib
from microagent import Microagent
from microagent.errors import CommandFailedError, ConflictError

ma = Microagent(sys.argv[1])
ws = ma.create("api", sys.argv[2], profile="tiny")
ws.start()
r = ws.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\\n", b"err\\n"), r
try:
    ws.exec("exit 4", check=True)
    raise SystemExit("check=True did not raise")
except CommandFailedError as e:
    assert e.result.exit_code == 4 and e.kind == "command-failed"
assert ws.exec(["cat"], stdin=b"fed").stdout == b"fed"
timed = ws.exec(["sleep", "30"], timeout=1)
assert timed.timed_out and timed.exit_code is None, timed
ws.files.write("/root/dir/notes.txt", "kept\\n")
assert ws.files.read("/root/dir/notes.txt") == b"kept\\n"
assert [e.name for e in ws.files.list("/root/dir")] == ["notes.txt"]
out = pathlib.Path(tempfile.mkdtemp()) / "notes.txt"
ws.copy_out("/root/dir/notes.txt", out)
assert out.read_text() == "kept\\n"
try:
    ws.delete()
    raise SystemExit("delete of a running workspace did not raise")
except ConflictError as e:
    assert "running" in e.message
ws.halt()
ws.start()
assert ws.files.read_text("/root/dir/notes.txt") == "kept\\n"
ws.halt()
assert ws.delete() is True
print("api session ok")
'''


def test_a_fresh_install_runs_a_workspace_through_the_python_api(
        fresh_install: Venv, fresh_home: Path, busybox_layout: Path) -> None:
    """The acceptance path of the public API, in the venv pip made: create, start, exec
    (exit code, stdout and stderr apart, check=True, stdin, a timeout), files, copy_out,
    delete refused while running, halt, start, the file still there, delete."""
    done = fresh_install.run("python", "-c", API_SESSION, fresh_home,
                             f"oci:{busybox_layout}:latest", timeout=900)
    assert done.returncode == 0 and "api session ok" in done.stdout, \
        f"{done.stdout}\n{done.stderr}"
    assert not (fresh_home / "workspaces" / "api").exists()
