"""End-to-end tests run the installed CLI against the session's registries.

The images and the CLI runner live in ``tests/support/fixtures.py`` (a plugin).
"""

from tests.support.fixtures import MICROAGENT, PushedImage, microagent

__all__ = ["MICROAGENT", "PushedImage", "microagent"]
