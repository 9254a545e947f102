"""``mypy --strict`` passes on tests/typed_client/client.py, a program that uses the
public API as a user's would, with the package found as an installed user has it (the
venv's site-packages, its ``py.typed``), not as this repository's source tree.

A second test breaks one annotation in a copy and expects mypy to fail on that line:
the check must see the API's real types, not ``Any``. A third checks docs/python.md's
examples the same way (those marked ``# not run`` too), as one module whose line numbers
are the page's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.pydocs import PYTHON_DOC, python_blocks

CLIENT = Path(__file__).resolve().parents[1] / "typed_client" / "client.py"
MYPY = Path(sys.executable).parent / "mypy"


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mypy-cache")


def strict(program: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    """mypy --strict on ``program`` from a directory outside the repository, with no
    configuration file: what a user's project would run."""
    if not MYPY.exists():
        pytest.skip(f"no mypy beside {sys.executable} (install the dev extra)")
    return subprocess.run(
        [str(MYPY), "--strict", "--config-file", "", "--cache-dir", str(cache),
         "--no-error-summary", "--show-error-codes", str(program)],
        cwd=cache, capture_output=True, text=True, timeout=600, check=False)


def test_the_typed_client_passes_mypy_strict(mypy_cache: Path) -> None:
    run = strict(CLIENT, mypy_cache)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_broken_type_in_it_fails(mypy_cache: Path, tmp_path: Path) -> None:
    text = CLIENT.read_text()
    good = "code: int | None = result.exit_code"
    assert good in text
    broken = tmp_path / "client.py"
    broken.write_text(text.replace(good, "code: int = result.exit_code"))
    line = text[:text.index(good)].count("\n") + 1
    run = strict(broken, mypy_cache)
    assert run.returncode == 1
    assert f"client.py:{line}: error: Incompatible types in assignment" in run.stdout, \
        run.stdout + run.stderr


def test_the_python_page_passes_mypy_strict(mypy_cache: Path, tmp_path: Path) -> None:
    text = PYTHON_DOC.read_text()
    lines = [""] * len(text.splitlines())  # prose as blank lines: the page's numbering
    for block in python_blocks(text):
        for i, line in enumerate(block.source.splitlines()):
            lines[block.line - 1 + i] = line
    module = tmp_path / "python_md.py"
    module.write_text("\n".join(lines) + "\n")
    run = strict(module, mypy_cache)
    assert run.returncode == 0, f"docs/python.md (line numbers are the page's):\n{run.stdout}"
