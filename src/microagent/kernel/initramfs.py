"""The guest's boot initramfs, built at every start.

The kernel unpacks concatenated cpio archives one after the other, so the boot initramfs
is the kernel bundle's ``modules.cpio`` followed by a small archive holding the agent as
``/init`` (kernel/cpio.py writes it). An upgraded agent therefore takes effect at the
next start without rebuilding anything else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from microagent.kernel.cpio import (
    CpioEntry,
    append_cpio,
    char_device,
    directory,
    regular_file,
    write_cpio,
)

if TYPE_CHECKING:
    from microagent.kernel.kernels import KernelBundle

AGENT_PATH = "init"


def agent_archive_entries(agent: Path) -> list[CpioEntry]:
    """The small archive that goes after the modules: ``/init`` and its mount points."""
    try:
        data = agent.read_bytes()
    except OSError as e:
        from microagent.errors import HostError

        raise HostError(f"cannot read the guest agent {agent}: {e.strerror}") from e
    return [
        directory("dev"),
        # The kernel opens /dev/console for init's stdio before /init runs.
        char_device("dev/console", 5, 1),
        directory("proc"),
        directory("sys"),
        directory("newroot"),
        regular_file(AGENT_PATH, data, 0o755),
    ]


def build_boot_initramfs(bundle: KernelBundle, agent: Path, out: Path) -> Path:
    """Write ``out``: the bundle's ``modules.cpio`` then an archive with ``agent`` as /init.

    Written to a temporary file next to ``out`` and renamed, so a concurrent reader never
    sees half an initramfs. Returns ``out``.
    """
    from microagent.errors import HostError

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                               0o600), "wb") as f:
            append_cpio([bundle.modules_cpio], f)
            write_cpio(agent_archive_entries(agent), f)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise HostError(f"cannot write the initramfs {out}: {e.strerror or e}") from e
    return out
