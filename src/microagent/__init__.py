"""microagent: persistent AI-agent workspaces in microVMs built from OCI images.

The CLI is a thin layer over this library; a Python program can do what the CLI does.
This module stays light so that ``microagent --help`` starts fast: heavy modules (HTTP,
compression) are imported by the functions that need them.
"""

__version__ = "0.1.0"
