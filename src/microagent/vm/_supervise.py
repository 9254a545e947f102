"""The supervisor process: ``python -m microagent.vm._supervise --state-dir DIR NAME``.

With ``--adopt`` it boots nothing: it takes over the VM a lost supervisor left running
(:mod:`microagent.vm.adopt`).

``microagent start`` spawns it detached. It does not go through the CLI: it needs none of
the argument tree, and ``start`` waits for it to boot the VM. It launches the first boot's
VMM before it imports the event loop's modules (:mod:`microagent.vm.launch`). SIGTERM,
SIGINT and SIGHUP that come before the event loop are kept for it: they halt the
workspace once it can be halted (:meth:`microagent.vm.supervisor.Supervisor.run`).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from microagent.errors import MicroagentError

USAGE = ("usage: python -m microagent.vm._supervise --state-dir DIR [--timeout S] [--adopt] "
         "NAME")


def parse(argv: list[str]) -> tuple[Path, float, str, bool]:
    """``--state-dir DIR [--timeout S] [--adopt] NAME``; SystemExit(2) otherwise (argparse
    alone costs this process 6 ms before QEMU can start)."""
    state_dir: Path | None = None
    timeout, name, adopt = 120.0, None, False
    rest = list(argv)
    try:
        while rest:
            arg = rest.pop(0)
            if arg == "--state-dir":
                state_dir = Path(rest.pop(0))
            elif arg == "--timeout":
                timeout = float(rest.pop(0))
            elif arg == "--adopt":
                adopt = True
            elif name is None and not arg.startswith("-"):
                name = arg
            else:
                raise ValueError(arg)
    except (IndexError, ValueError):
        state_dir = None
    if state_dir is None or name is None:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    return state_dir, timeout, name, adopt


def main() -> int:
    state_dir, timeout, name, adopt = parse(sys.argv[1:])
    early_signals: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda received, _frame: early_signals.append(received))
    from microagent.layout import PRIVATE_UMASK, StateLayout
    from microagent.store import check_state_dir, ensure_dir
    from microagent.vm.launch import first_boot, take_supervisor_lock, unlaunched

    os.umask(PRIVATE_UMASK)  # its sockets, logs and QEMU's: the owner's only
    try:
        layout = StateLayout.resolve(state_dir)
        check_state_dir(layout.root)
        files = layout.run_files(name)
        ensure_dir(files.dir)
        if take_supervisor_lock(files) is None:
            return 75  # another supervisor runs this workspace
        os.chdir(files.dir)
        if adopt:
            from microagent.vm.adopt import find_adoptable

            first = unlaunched(layout, name)
            first.adopted = find_adoptable(layout, name)
        else:
            first = first_boot(layout, name)
        from microagent.vm.supervisor import run_supervisor

        return run_supervisor(layout, name, timeout, first, early_signals)
    except MicroagentError as e:
        print(f"microagent supervisor: {e.message}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
