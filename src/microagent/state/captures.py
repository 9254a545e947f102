"""The files a serial console is captured into: ``serial.log`` and its older half
``serial.log.1`` (the capture is bounded, vm/console.py), and the previous boot's
capture beside them (``logs --previous``). Read by workspace/logs.py."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def rotated(path: Path) -> Path:
    """The older half of a capture."""
    return path.with_name(path.name + ".1")


def previous_capture(path: Path) -> Path:
    """Where the capture of the boot before the last one is kept (``logs --previous``)."""
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def keep_previous(path: Path) -> None:
    """At the start of a boot: the last boot's capture (both halves) becomes the previous
    one, replacing the one before. Nothing moves when the last boot left no capture."""
    previous = previous_capture(path)
    if not path.exists():
        with contextlib.suppress(FileNotFoundError):
            rotated(path).unlink()  # a half without its current file: not a capture
        return
    os.replace(path, previous)
    try:
        os.replace(rotated(path), rotated(previous))
    except FileNotFoundError:
        with contextlib.suppress(FileNotFoundError):
            rotated(previous).unlink()
