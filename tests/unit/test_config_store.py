"""Profiles, name validation, atomic records and locks."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from microagent.config import PROFILES, resolve_resources, validate_name
from microagent.errors import EXIT_RETRYABLE, BusyError, MicroagentError, UsageError
from microagent.store import SCHEMA_VERSION, file_lock, read_json, write_json_atomic


def test_profiles_match_the_contract() -> None:
    table = {p.name: (p.memory_mib, p.cpus, p.disk_mib) for p in PROFILES}
    assert table == {"tiny": (256, 1, 512), "small": (512, 2, 1024),
                     "medium": (2048, 2, 8192), "large": (4096, 4, 16384)}


def test_overrides_keep_the_profile_name() -> None:
    r = resolve_resources("medium", cpus=4)
    assert (r.profile, r.memory_mib, r.cpus, r.disk_mib) == ("medium", 2048, 4, 8192)
    assert resolve_resources().profile == "small"
    assert r.describe() == "memory=2048MiB cpus=4 disk=8192MiB"


@pytest.mark.parametrize("kwargs", [{"memory_mib": 1}, {"cpus": 0}, {"disk_mib": 1}])
def test_out_of_range_overrides_are_usage_errors(kwargs: dict[str, int]) -> None:
    with pytest.raises(UsageError):
        resolve_resources("small", **kwargs)


def test_unknown_profile_lists_choices() -> None:
    with pytest.raises(UsageError, match="unknown profile 'huge'") as info:
        resolve_resources("huge")
    assert "tiny" in info.value.hint


@pytest.mark.parametrize("name", ["research", "a", "A.b_c-9", "x" * 63])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "a/b", "x" * 64, "*", "a b", "-x", ".x", "é"])
def test_bad_names(name: str) -> None:
    with pytest.raises(UsageError, match="invalid workspace name"):
        validate_name(name)


def test_atomic_record_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "d" / "rec.json"
    write_json_atomic(path, {"a": 1})
    assert read_json(path) == {"schema": SCHEMA_VERSION, "a": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_json_atomic(path, {"a": 2})
    assert read_json(path)["a"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["rec.json"]


def test_record_with_other_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rec.json"
    path.write_text(json.dumps({"schema": 99}))
    with pytest.raises(MicroagentError, match="schema 99"):
        read_json(path)


def _hold(path: str, ready: multiprocessing.synchronize.Event,
          done: multiprocessing.synchronize.Event) -> None:
    with file_lock(Path(path), what="thing"):
        ready.set()
        done.wait(10)


def test_lock_held_by_another_process_is_busy(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "x.lock"
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(lock), ready, done))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(BusyError) as info, file_lock(lock, what="workspace w", timeout=0.2):
            pass
        assert info.value.exit_code == EXIT_RETRYABLE
        assert "workspace w is busy" in info.value.message
    finally:
        done.set()
        holder.join(10)
    with file_lock(lock, what="thing"):
        pass  # free again once the holder is gone
    assert os.path.exists(lock)
