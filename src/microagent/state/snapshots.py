"""Snapshots on disk: ``workspaces/<name>/snapshots/<tag>/`` and the resume slot.

A snapshot is one directory, published by one rename from a locked staging entry
(``snapshots/.new-*``, swept when its owner is gone: staging.py)::

    manifest.json   what the image must match to be loaded (vm/snapshot.py), its disks,
                    parent, generation, sizes
    vmstate         QEMU's device state (the RAM is not in it: x-ignore-shared)
    memory          the guest's RAM file, sparse (its touched pages)
    disks/          every writable disk at the same instant: root.ext4, bundle-<B>.ext4

Files in a published snapshot never change, so a fork links them instead of copying.
``resume/`` has the same shape: what the next ``start`` resumes from, written by
``suspend`` (no root disk in it: the workspace's own disk is the one paired with the
memory) or by a fork's ``create`` (its root disk already copied to the fork's).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microagent.errors import ConflictError, MicroagentError, NotFoundError, UsageError
from microagent.layout import StateLayout
from microagent.staging import Staged, stage_dir, sweep
from microagent.store import ensure_dir, read_json

MANIFEST = "manifest.json"
VMSTATE = "vmstate"
MEMORY = "memory"
DISKS = "disks"
STAGING_PREFIX = ".new-"
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Snapshot:
    """One published snapshot of a workspace."""

    workspace: str
    tag: str
    created: str
    size_bytes: int  # what its files occupy on the host
    parent: str | None  # NAME:TAG the workspace was restored or forked from, if any
    path: Path
    manifest: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """``snapshot list --json``'s shape of one snapshot."""
        return {"workspace": self.workspace, "tag": self.tag, "created": self.created,
                "size_bytes": self.size_bytes, "parent": self.parent,
                "memory_mib": self.manifest.get("memory_mib"),
                "paused_ms": self.manifest.get("paused_ms")}


def validate_tag(tag: str) -> str:
    """``tag`` if it can name a snapshot, else UsageError."""
    if not _TAG.fullmatch(tag):
        raise UsageError(f"invalid snapshot tag {tag!r}",
                         hint="tags are 1 to 64 characters of letters, digits, '.', '_' and "
                              "'-', starting with a letter or digit")
    return tag


def parse_source(value: str) -> tuple[str, str]:
    """``NAME:TAG`` (``--from-snapshot`` of ``create``) split, each part checked."""
    from microagent.config import validate_name

    name, sep, tag = value.partition(":")
    if not sep or not name or not tag:
        raise UsageError(f"invalid snapshot {value!r}", hint="use NAME:TAG, e.g. dev:snap-1")
    return validate_name(name), validate_tag(tag)


def default_tag(layout: StateLayout, name: str) -> str:
    """``snap-YYYYMMDD-HHMMSS`` (UTC), with ``-2``, ``-3``... if taken this second."""
    base = "snap-" + dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    tag, n = base, 1
    while (layout.workspace_snapshots_dir(name) / tag).exists():
        n += 1
        tag = f"{base}-{n}"
    return tag


def stage_snapshot(layout: StateLayout, name: str) -> Staged:
    """A locked staging directory for a snapshot (or the resume slot) of ``name``; what
    a killed supervisor left there is swept first."""
    directory = ensure_dir(layout.workspace_snapshots_dir(name))
    sweep(directory, STAGING_PREFIX)
    return stage_dir(directory, STAGING_PREFIX)


def list_snapshots(layout: StateLayout, name: str) -> list[Snapshot]:
    """The published snapshots of ``name``, oldest first."""
    directory = layout.workspace_snapshots_dir(name)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        if entry.name.startswith("."):
            continue
        try:
            found.append(_load(name, entry.name, entry))
        except (MicroagentError, OSError, ValueError, KeyError):
            continue  # not one of ours, or unreadable: not listed
    return sorted(found, key=lambda s: (s.created, s.tag))


def get_snapshot(layout: StateLayout, name: str, tag: str) -> Snapshot:
    """The snapshot ``tag`` of ``name``; NotFoundError naming the ones there are."""
    validate_tag(tag)
    path = layout.workspace_snapshots_dir(name) / tag
    try:
        return _load(name, tag, path)
    except FileNotFoundError:
        pass
    except (MicroagentError, ValueError, KeyError) as e:
        raise MicroagentError(f"snapshot {name}:{tag} cannot be read: {e}",
                              hint=f"microagent snapshot delete {name} {tag}") from e
    tags = [s.tag for s in list_snapshots(layout, name)]
    raise NotFoundError(f"workspace {name} has no snapshot {tag}",
                        hint=("its snapshots: " + ", ".join(tags)) if tags else
                        f"take one: microagent snapshot create {name}")


def delete_snapshot(layout: StateLayout, name: str, tag: str) -> None:
    """Remove the snapshot ``tag`` of ``name`` (forks made from it keep their links)."""
    snapshot = get_snapshot(layout, name, tag)
    doomed = snapshot.path.with_name(f"{STAGING_PREFIX}deleting-{tag}-{os.getpid()}")
    os.replace(snapshot.path, doomed)  # gone from the list at once, then removed
    shutil.rmtree(doomed, ignore_errors=True)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a snapshot directory (or of the resume slot)."""
    return read_json(directory / MANIFEST)


def resume_manifest(layout: StateLayout, name: str) -> dict[str, Any] | None:
    """What the next start of ``name`` resumes from, or None."""
    try:
        return read_manifest(layout.workspace_resume_dir(name))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (MicroagentError, ValueError):
        return {"kind": "unreadable"}


def discard_resume(layout: StateLayout, name: str) -> bool:
    """Remove the resume slot of ``name``; whether there was one."""
    slot = layout.workspace_resume_dir(name)
    if not slot.exists():
        return False
    doomed = layout.workspace_snapshots_dir(name) / f"{STAGING_PREFIX}discarded-{os.getpid()}"
    ensure_dir(doomed.parent)
    os.replace(slot, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def directory_bytes(path: Path) -> int:
    """What the files under ``path`` occupy (allocated blocks; a link counted each time)."""
    total = 0
    for root, _, files in os.walk(path):
        for file in files:
            try:
                total += os.lstat(os.path.join(root, file)).st_blocks * 512
            except OSError:
                continue
    return total


def refuse_unless_snapshottable_source(state: str, name: str) -> None:
    """A workspace whose memory can be saved: running or paused."""
    if state not in ("running", "paused"):
        raise ConflictError(f"workspace {name} is not running (state {state})",
                            hint="a snapshot saves a running workspace's memory: start it "
                                 "first")


def _load(name: str, tag: str, path: Path) -> Snapshot:
    manifest = read_manifest(path)
    return Snapshot(workspace=name, tag=tag, created=str(manifest["created"]),
                    size_bytes=directory_bytes(path), parent=manifest.get("parent"),
                    path=path, manifest=manifest)
