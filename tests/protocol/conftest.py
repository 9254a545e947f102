"""Fixtures of the protocol tests: the agent binary (built with make, or
``$MICROAGENT_PROTOCOL_AGENT``, e.g. a sanitizer build) and a connected agent per test."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.vm.agent import AgentClient
from tests.protocol.driver import AgentProcess, Session
from tests.support.agent import build_guest_agent

AGENT_ENV = "MICROAGENT_PROTOCOL_AGENT"

if not sys.platform.startswith("linux"):
    pytest.skip("the agent is Linux-only", allow_module_level=True)


@pytest.fixture(scope="session")
def agent_binary() -> Path:
    """``$MICROAGENT_PROTOCOL_AGENT``, else the agent built from the current sources."""
    override = os.environ.get(AGENT_ENV)
    if override:
        return Path(override)
    return build_guest_agent()


@pytest.fixture
def agent(agent_binary: Path) -> Iterator[AgentProcess]:
    """A fresh agent process on a socketpair; closed (and its exit checked) after."""
    process = AgentProcess(agent_binary)
    yield process
    returncode, stderr = process.close()
    assert "Sanitizer" not in stderr and "runtime error" not in stderr, stderr
    assert returncode == 0, f"the agent exited with {returncode}:\n{stderr}"


@pytest.fixture
def session(agent: AgentProcess) -> Session:
    """A raw session after the HELLO exchange."""
    s = Session(agent.sock)
    s.hello()
    return s


@pytest.fixture
def client(agent: AgentProcess) -> AgentClient:
    """microagent's own host client, after the HELLO exchange."""
    c = AgentClient(agent.sock)
    c.hello()
    return c
