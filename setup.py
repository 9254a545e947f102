"""The package build's one extra step: compile the guest agent (static C, libc only).

Everything else is declared in pyproject.toml. ``build_agent`` is a ``build`` sub-command
(setuptools' documented way to add a build step, which editable installs also run): it
runs the agent's Makefile, the one place its compiler flags live, and puts the static
binary beside the Python modules as ``microagent/guest/build/microagent-init``, where
``microagent.guest.agent_binary()`` looks. An editable install builds it in place, in
``src/microagent/guest/build/``, as ``make -C src/microagent/guest`` does. The binary
makes the wheel platform-specific (``py3-none-<platform>``): it needs no Python ABI.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from setuptools import Command, Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build import build
from setuptools.errors import CompileError

GUEST = Path("src", "microagent", "guest")
BINARY = Path("microagent", "guest", "build", "microagent-init")  # inside the package
PACKAGES = "gcc libc6-dev make"
INSTALL = f"on Debian or Ubuntu: sudo apt-get install --no-install-recommends {PACKAGES}"
PROBE = "#include <stdio.h>\nint main(void) { return puts(\"\") < 0; }\n"


class build_agent(Command):  # noqa: N801 (setuptools names commands by their verb)
    """Compile the guest agent with its Makefile, static, into the package."""

    description = "compile the guest agent (static C binary, libc only)"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        self.build_lib: str | None = None
        self.build_temp: str | None = None
        self.editable_mode = False

    def finalize_options(self) -> None:
        self.set_undefined_options("build_ext", ("build_lib", "build_lib"),
                                   ("build_temp", "build_temp"))

    def run(self) -> None:
        compiler = _compiler()
        if shutil.which("make") is None:
            raise CompileError(f"building the guest agent needs `make`, which is not "
                               f"installed; {INSTALL}")
        _probe_static_libc(compiler)
        if self.editable_mode:  # in place, where make -C puts it for developers
            _make(compiler, (GUEST / "build").resolve())
            return
        objects = Path(str(self.build_temp)).resolve() / "guest"
        _make(compiler, objects)
        target = Path(str(self.build_lib)) / BINARY
        self.mkpath(str(target.parent))
        self.copy_file(str(objects / "microagent-init"), str(target))  # keeps the mode

    def get_source_files(self) -> list[str]:
        return sorted(str(p) for p in (*GUEST.glob("*.[ch]"), GUEST / "Makefile"))

    def get_outputs(self) -> list[str]:
        return [str(Path(self.build_lib or "") / BINARY)]

    def get_output_mapping(self) -> dict[str, str]:
        if not self.editable_mode:
            return {}
        return {str(Path(self.build_lib or "") / BINARY): str(GUEST / "build" / BINARY.name)}


class NativeDistribution(Distribution):
    """A distribution with a native binary: its wheel is not pure (files go to platlib)."""

    def has_ext_modules(self) -> bool:
        return True


class platform_wheel(bdist_wheel):  # noqa: N801
    """Tagged for this platform (the binary) and any Python 3 (it needs no Python ABI)."""

    def get_tag(self) -> tuple[str, str, str]:
        _python, _abi, platform = super().get_tag()
        return "py3", "none", platform


def _compiler() -> list[str]:
    """``$CC`` (as make would take it), else ``cc``; a clear error when there is none."""
    words = shlex.split(os.environ.get("CC", "")) or ["cc"]
    if shutil.which(words[0]) is None:
        raise CompileError(f"building the guest agent needs a C compiler, and "
                           f"`{words[0]}` was not found; {INSTALL}")
    return words


def _probe_static_libc(compiler: list[str]) -> None:
    """Link a one-line static program first: a missing libc6-dev (headers or libc.a)
    then says so, instead of failing in the middle of the agent's build."""
    with tempfile.TemporaryDirectory(prefix="microagent-probe-") as work:
        source = Path(work, "probe.c")
        source.write_text(PROBE)
        try:
            probe = subprocess.run([*compiler, "-static", "-o", str(Path(work, "probe")),
                                    str(source)], capture_output=True, text=True,
                                   timeout=120, check=False)
        except OSError as e:
            raise CompileError(f"cannot run the C compiler `{compiler[0]}`: {e}; "
                               f"{INSTALL}") from e
    if probe.returncode != 0:
        said = "\n".join((probe.stdout + probe.stderr).strip().splitlines()[-5:])
        raise CompileError(f"the C compiler cannot link a static program (the guest agent "
                           f"is one), so the static C library (libc6-dev) is probably "
                           f"missing; {INSTALL}\n{shlex.join(compiler)} said:\n{said}")


def _make(compiler: list[str], objects: Path) -> None:
    command = ["make", "-C", str(GUEST), f"CC={shlex.join(compiler)}", f"BUILD={objects}"]
    try:
        subprocess.run(command, check=True)
    except subprocess.CalledProcessError as e:
        raise CompileError(f"building the guest agent failed: `{shlex.join(command)}` "
                           f"exited with {e.returncode} (its output is above)") from e


build.sub_commands.insert(0, ("build_agent", None))  # first: a missing compiler fails at once
setup(distclass=NativeDistribution,
      cmdclass={"build_agent": build_agent, "bdist_wheel": platform_wheel})
