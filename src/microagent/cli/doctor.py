"""``doctor``: check the host, one line per check, and say what to fix."""

from __future__ import annotations

import argparse

from microagent.cli.output import Output, Verbs, add_verb, layout_of
from microagent.errors import EXIT_FAILURE, EXIT_OK


def cmd_doctor(args: argparse.Namespace, out: Output) -> int:
    from microagent.api.client import Microagent
    from microagent.workspace.doctor import healthy

    # the state directory is reported as one of the checks, not refused
    checks = Microagent(layout_of(args, check=False).root).doctor()
    ok = healthy(checks)
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        lines.append(f"{check.status:<5} {check.name:<{width}}  {check.detail}")
        if check.fix:
            lines.append(f"{'':<5} {'':<{width}}  fix: {check.fix}")
    warnings = sum(c.status == "warn" for c in checks)
    lines.append("microagent can run workspaces here" +
                 (f" ({warnings} warning{'s' if warnings != 1 else ''})" if warnings else "")
                 if ok else "microagent cannot run workspaces here until the failures are "
                            "fixed")
    out.emit({"ok": ok, "checks": [c.to_json() for c in checks]}, "\n".join(lines))
    return EXIT_OK if ok else EXIT_FAILURE


def register(verbs: Verbs) -> None:
    add_verb(verbs, "doctor", cmd_doctor, "check the host and say what to fix")
