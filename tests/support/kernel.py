"""The guest kernel of the tests that boot VMs, and how a state directory gets it.

Loaded as a pytest plugin by tests/conftest.py. The kernel bundle is installed once into a
state directory under ``${XDG_CACHE_HOME:-~/.cache}/microagent-tests/`` (the .deb is
downloaded on the first session only).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from microagent.kernel.kernels import KernelBundle
from microagent.store import write_json_atomic
from tests.support.distro import cache_dir

KERNEL_STATE = "kernel-state-v4"


@pytest.fixture(scope="session")
def guest_kernel() -> KernelBundle:
    """The default kernel bundle, installed into the test cache on first use."""
    from microagent.errors import NotFoundError
    from microagent.kernel.kernels import default_kernel
    from microagent.layout import StateLayout

    layout = StateLayout(cache_dir() / KERNEL_STATE)
    try:
        return default_kernel(layout)
    except NotFoundError as e:
        pytest.skip(f"no guest kernel can be had here: {e.message}")


def give_default_kernel(home: Path, bundle: KernelBundle) -> None:
    """Copy ``bundle`` into the state directory ``home`` as its default kernel."""
    shutil.copytree(bundle.path, home / "kernels" / bundle.version)
    write_json_atomic(home / "kernels" / "default.json", {"version": bundle.version})
