"""Run the CLI as ``python -m microagent``."""

from microagent.cli import main

raise SystemExit(main())
