"""The public API refuses bad input with the error tree's types before touching anything:
a program gets a typed exception with kind, message and hint, never a foreign one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from microagent import Microagent
from microagent.errors import MicroagentError, NotFoundError, UsageError


@pytest.fixture
def ma(tmp_path: Path) -> Microagent:
    return Microagent(tmp_path / "state")


CASES: list[tuple[str, Callable[[Microagent], Any], type[MicroagentError], str]] = [
    ("bad name", lambda ma: ma.get("../x"), UsageError, "invalid workspace name '../x'"),
    ("no image", lambda ma: ma.create("a", ""), UsageError, "create needs an image"),
    ("bad reference", lambda ma: ma.create("a", "Bad//Ref"), UsageError,
     "invalid image reference 'Bad//Ref'"),
    ("bad profile", lambda ma: ma.create("a", "oci:/x", profile="huge"), UsageError,
     "unknown profile 'huge'"),
    ("bad env", lambda ma: ma.create("a", "oci:/x", env=["=x"]), UsageError,
     "invalid env item '=x'"),
    ("publish as one str", lambda ma: ma.create("a", "oci:/x", publish="80:80"), UsageError,
     "invalid publish '80:80': a list of str"),
    ("bad volume spec", lambda ma: ma.create("a", "oci:/x", volumes=["data:work"]),
     UsageError, "data:work"),
    ("missing layout", lambda ma: ma.create("a", "oci:/nonexistent"), NotFoundError,
     "image oci:/nonexistent not found"),
    ("unknown workspace", lambda ma: ma.get("zz"), NotFoundError, "no workspace named zz"),
    ("exec on unknown", lambda ma: ma.handle("zz").exec("true"), NotFoundError,
     "no workspace named zz"),
    ("empty command", lambda ma: ma.handle("zz").exec([]), UsageError, "invalid command"),
    ("files on unknown", lambda ma: ma.handle("zz").files.read("/x"), NotFoundError,
     "no workspace named zz"),
    ("relative guest path", lambda ma: ma.handle("zz").files.read("x"), UsageError,
     "invalid guest path 'x'"),
    ("bad state", lambda ma: ma.handle("zz").wait("nap", timeout=1), UsageError,
     "unknown state 'nap'"),
    ("negative start timeout", lambda ma: ma.handle("zz").start(timeout=-1), UsageError,
     "invalid start timeout -1"),
    ("negative tail", lambda ma: ma.handle("zz").logs(tail=-1), UsageError,
     "invalid tail -1"),
    ("bad mode", lambda ma: ma.handle("zz").files.write("/x", b"", mode=0o17777),
     UsageError, "invalid mode"),
    ("volume too small", lambda ma: ma.volumes.create("v", 1), UsageError, "out of range"),
    ("image not cached", lambda ma: ma.images.remove("nope:1"), NotFoundError,
     "image docker.io/library/nope:1 not found"),
    ("unknown volume", lambda ma: ma.volumes.get("nov"), NotFoundError, "nov"),
]


@pytest.mark.parametrize(("what", "call", "error", "message"), CASES,
                         ids=[case[0] for case in CASES])
def test_bad_input_is_a_typed_error(ma: Microagent, what: str,
                                    call: Callable[[Microagent], Any],
                                    error: type[MicroagentError], message: str) -> None:
    with pytest.raises(error) as info:
        call(ma)
    assert type(info.value) is error
    assert info.value.kind == error.kind and message in info.value.message
    assert info.value.exit_code == (2 if error is UsageError else 1)
    if error is UsageError:
        assert isinstance(info.value, ValueError)
    assert not (ma.state_dir / "workspaces").exists() or \
        not list((ma.state_dir / "workspaces").iterdir()), "nothing was created"


def test_a_state_dir_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(UsageError, match="is not a directory"):
        Microagent(path).list()


def test_a_state_dir_others_can_write_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "open"
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    with pytest.raises(MicroagentError) as info:
        Microagent(state).list()
    assert "chmod" in info.value.hint or "chmod" in info.value.message


def test_making_a_client_does_no_io(tmp_path: Path) -> None:
    ma = Microagent(tmp_path / "never")
    assert ma.state_dir == tmp_path / "never"
    assert not (tmp_path / "never").exists()
