"""microagent: persistent AI-agent workspaces in microVMs built from OCI images.

The public API (``docs/python.md``)::

    from microagent import Microagent

    ma = Microagent()
    ws = ma.create("dev", image="docker.io/library/debian:bookworm")
    ws.start()
    print(ws.exec("uname -a").stdout_text)

The CLI is this API's first client. ``import microagent`` stays light: the names below
are loaded on first use (PEP 562), and heavy modules (HTTP, compression, asyncio) only by
the calls that need them.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is not imported: it costs milliseconds
__version__ = "0.1.0"

if TYPE_CHECKING:
    from typing import Any

    from microagent.api.client import Images, Kernels, Microagent, Volumes
    from microagent.api.results import ExecResult, FileEntry, Readiness, WorkspaceStatus
    from microagent.api.workspace import Files, Workspace
    from microagent.disks.volumes import Volume
    from microagent.events import Event
    from microagent.images.catalog import Image
    from microagent.kernel.kernels import KernelBundle as Kernel
    from microagent.state.snapshots import Snapshot
    from microagent.workspace.doctor import Check

_EXPORTS = {
    "Microagent": ("microagent.api.client", "Microagent"),
    "Images": ("microagent.api.client", "Images"),
    "Volumes": ("microagent.api.client", "Volumes"),
    "Kernels": ("microagent.api.client", "Kernels"),
    "Workspace": ("microagent.api.workspace", "Workspace"),
    "Files": ("microagent.api.workspace", "Files"),
    "ExecResult": ("microagent.api.results", "ExecResult"),
    "FileEntry": ("microagent.api.results", "FileEntry"),
    "Readiness": ("microagent.api.results", "Readiness"),
    "WorkspaceStatus": ("microagent.api.results", "WorkspaceStatus"),
    "Event": ("microagent.events", "Event"),
    "Check": ("microagent.workspace.doctor", "Check"),
    "Image": ("microagent.images.catalog", "Image"),
    "Volume": ("microagent.disks.volumes", "Volume"),
    "Kernel": ("microagent.kernel.kernels", "KernelBundle"),
    "Snapshot": ("microagent.state.snapshots", "Snapshot"),
}

__all__ = [
    "Check", "Event", "ExecResult", "FileEntry", "Files", "Image", "Images", "Kernel",
    "Kernels", "Microagent", "Readiness", "Snapshot", "Volume", "Volumes", "Workspace",
    "WorkspaceStatus", "__version__",
]


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'microagent' has no attribute {name!r}") from None
    value = getattr(__import__(module, fromlist=[attribute]), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
