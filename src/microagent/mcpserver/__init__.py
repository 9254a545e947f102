"""The MCP server (``microagent serve mcp``): the public API as tools for a model.

Imports the official ``mcp`` SDK (the optional extra ``microagent[mcp]``); only
``cli/serve.py`` imports this package, inside its command.
"""
