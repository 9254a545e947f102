"""docs/python.md runs: its examples, in order, in one namespace, against real VMs.

The page is written for a reader: it names a public image and a fixed host port. This
test swaps those for the session registry's busybox image and a free port, points
``Microagent()`` at the module's state directory (MICROAGENT_HOME) and runs in a fresh
current directory, where the examples make their host files. Blocks marked ``# not run``
are left to tests/unit/test_python_docs.py (compiled there). A ``try`` on the page shows
an error: one whose body raises nothing fails the test.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.fixtures import PushedImage
from tests.support.pydocs import PYTHON_DOC, python_blocks

pytestmark = pytest.mark.slow

DOC_IMAGE = "docker.io/library/debian:bookworm"
DOC_PUBLISH = '"8080:80"'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_python_page_runs(home: Path, busybox_image: PushedImage, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    text = PYTHON_DOC.read_text()
    for placeholder in (DOC_IMAGE, DOC_PUBLISH):
        assert placeholder in text, f"the page no longer uses {placeholder}: update the test"
    # replacements on one line each: the line numbers stay the page's
    text = text.replace(DOC_IMAGE, busybox_image.ref)
    text = text.replace(DOC_PUBLISH, f'"{free_port()}:80"')
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MICROAGENT_HOME", str(home))

    namespace: dict[str, object] = {"__name__": "python_docs"}
    blocks = [b for b in python_blocks(text) if b.runs]
    assert len(blocks) > 20
    for block in blocks:
        exec(block.compiled(tries_must_raise=True), namespace)  # the page's own examples

    from microagent import Microagent

    assert Microagent(home).list() == [], "the page leaves no workspace behind"
