"""The supervisor process: ``python -m microagent._supervise --state-dir DIR NAME``.

``microagent start`` spawns it detached. It does not go through the CLI: it needs none of
the argument tree, and ``start`` waits for it to boot the VM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from microagent.errors import MicroagentError


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m microagent._supervise")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("name")
    args = parser.parse_args()
    from microagent.layout import StateLayout
    from microagent.supervisor import run_supervisor

    try:
        return run_supervisor(StateLayout.resolve(args.state_dir), args.name, args.timeout)
    except MicroagentError as e:
        print(f"microagent supervisor: {e.message}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
