"""The guest agent (``microagent-init``): C sources and their build.

The package build compiles the agent (``setup.py``'s ``build_agent`` runs this directory's
Makefile) into ``build/microagent-init`` beside this module: in the installed package for
``pip install``, in the source tree for an editable install, where ``make -C
src/microagent/guest`` rebuilds it after an edit. It is a static binary the host puts into
every boot initramfs as ``/init``. ``MICROAGENT_AGENT`` names another binary (a
development build).
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
            hint=f"reinstall the package (`pip install` builds it; it needs gcc, libc6-dev "
                 f"and make), or `make -C {SOURCE_DIR}`",
        )
    return path
