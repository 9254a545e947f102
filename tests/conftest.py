"""Shared fixtures: every test gets its own state directory; no test touches ~/.microagent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.layout import StateLayout

pytest_plugins = [
    "tests.support.registry",
    "tests.support.distro",
    "tests.support.fixtures",
    "tests.support.kernel",
]


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point MICROAGENT_HOME at a fresh temporary directory for each test."""
    home = tmp_path / "state"
    monkeypatch.setenv("MICROAGENT_HOME", str(home))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    yield home


@pytest.fixture
def layout(state_dir: Path) -> StateLayout:
    """The StateLayout of the test's state directory."""
    return StateLayout.resolve(state_dir)
