"""The guest agent (``microagent-init``): C sources and their build.

The agent is built by ``make -C src/microagent/guest`` (``./install.sh`` runs it) into
``build/microagent-init``, a static binary the host puts into every boot initramfs as
``/init``. ``MICROAGENT_AGENT`` names another binary (a development build).
"""

from __future__ import annotations

import os
from pathlib import Path

AGENT_ENV = "MICROAGENT_AGENT"
SOURCE_DIR = Path(__file__).resolve().parent
DEFAULT_BINARY = SOURCE_DIR / "build" / "microagent-init"


def agent_binary() -> Path:
    """The agent binary to boot: ``$MICROAGENT_AGENT``, else the built one.

    Raises HostError when it does not exist.
    """
    from microagent.errors import HostError

    override = os.environ.get(AGENT_ENV)
    path = Path(override).expanduser() if override else DEFAULT_BINARY
    if not path.is_file():
        where = f"{AGENT_ENV}={override}" if override else str(path)
        raise HostError(
            f"the guest agent is not built ({where} does not exist)",
            hint=f"run ./install.sh (needs gcc), or `make -C {SOURCE_DIR}`",
        )
    return path
