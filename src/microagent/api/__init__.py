"""The public Python API (``docs/python.md``): re-exported by ``microagent`` itself."""
