"""A workspace's ``create --setup`` record, ``workspaces/NAME/setup.json``: its commands,
whether they are still pending, and the last failure (the verbs: workspace/provision.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from microagent.layout import StateLayout
from microagent.store import read_json, write_json_atomic


@dataclass(frozen=True)
class SetupState:
    """The recorded setup of one workspace."""

    commands: tuple[str, ...]
    pending: bool
    failure: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"commands": list(self.commands), "pending": self.pending,
                "failure": self.failure}


def read_setup(layout: StateLayout, name: str) -> SetupState | None:
    """The setup of ``name``, or None when it was created without ``--setup``."""
    try:
        raw = read_json(layout.workspace_setup(name))
    except FileNotFoundError:
        return None
    return SetupState(tuple(raw.get("commands", ())), bool(raw.get("pending")),
                      raw.get("failure"))


def write_setup(path: Any, state: SetupState) -> None:
    """Record ``state`` (atomically)."""
    write_json_atomic(path, state.to_json())


def setup_pending(layout: StateLayout, name: str) -> bool:
    state = read_setup(layout, name)
    return state is not None and state.pending
