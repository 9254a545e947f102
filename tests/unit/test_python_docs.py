"""docs/python.md against the code, without a VM: every example compiles (also those
marked ``# not run``), every public call and result field is on the page, and the
page's error tree is errors.py's. tests/vm/test_python_docs.py runs the examples."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

import microagent
from microagent import errors
from tests.support.pydocs import PYTHON_DOC, fenced_blocks, python_blocks

PAGE = PYTHON_DOC.read_text()

# Public on the classes, but not for users: each exposes an internal type.
NOT_ON_THE_PAGE = {
    "Microagent.layout",  # the StateLayout the calls use
    "Microagent.spec",  # the WorkspaceSpec create would record
    "WorkspaceStatus.document",  # to_json()'s source
}


def test_every_example_compiles() -> None:
    blocks = python_blocks(PAGE)
    assert blocks and any(not b.runs for b in blocks)
    for block in blocks:
        block.compiled()  # a SyntaxError names the page's line


def test_fences_are_balanced() -> None:
    assert len(fenced_blocks(PAGE)) > len(python_blocks(PAGE))


def _public(cls: type) -> list[str]:
    names = []
    for name, value in vars(cls).items():
        if name.startswith("_") or isinstance(value, classmethod | staticmethod):
            continue
        names.append(name)
    if dataclasses.is_dataclass(cls):
        names += [f.name for f in dataclasses.fields(cls)]
    return names


@pytest.mark.parametrize("name", ["Microagent", "Workspace", "Files", "Images", "Volumes",
                                  "Kernels", "ExecResult", "WorkspaceStatus", "Readiness",
                                  "FileEntry", "Event", "Check"])
def test_every_public_name_is_on_the_page(name: str) -> None:
    cls = getattr(microagent, name)
    instance_attributes = {"Workspace": ["name", "attrs", "files"],
                           "Microagent": ["images", "volumes", "kernels"]}
    missing = []
    for attribute in sorted({*_public(cls), *instance_attributes.get(name, [])}):
        if f"{name}.{attribute}" in NOT_ON_THE_PAGE:
            continue
        # shown as a call or an attribute access (ws.exec(, r.stdout), or named in prose
        if not re.search(rf"\.{attribute}\b|`{attribute}\b", PAGE):
            missing.append(attribute)
    assert not missing, f"{name}: not on docs/python.md: {missing}"


def test_every_export_is_on_the_page() -> None:
    missing = [n for n in microagent.__all__
               if not n.startswith("_") and not re.search(rf"\b{n}\b", PAGE)]
    # Files, Images, Volumes, Kernels: their methods are there as ws.files., ma.images...
    assert set(missing) <= {"Files", "Images", "Volumes", "Kernels", "Image", "Volume",
                            "Kernel"}, missing


def _page_tree() -> list[tuple[int, str, str, str]]:
    """(depth, class, exit code, kind) of each line of the page's error tree."""
    (tree,) = [b.source for b in fenced_blocks(PAGE)
               if b.language == "text" and "MicroagentError" in b.source]
    rows = []
    for line in tree.splitlines():
        match = re.match(r"^([│├└─ ]*)(\w+)\s+exit (\d+|N)\s+\"([\w-]+)\"", line)
        assert match, f"unreadable line of the error tree: {line!r}"
        rows.append((len(match[1]) // 4, match[2], match[3], match[4]))
    return rows


def test_the_error_tree_is_errors_py() -> None:
    rows = _page_tree()
    parents: list[str] = []
    for depth, name, exit_code, kind in rows:
        cls = getattr(errors, name)
        del parents[depth:]
        if parents:
            assert cls.__bases__[0] is getattr(errors, parents[-1]), f"{name}'s parent"
        assert cls.kind == kind, name
        if exit_code != "N":
            assert cls.exit_code == int(exit_code), name
        parents.append(name)
    on_the_page = {name for _, name, _, _ in rows}
    in_the_module = {name for name, value in vars(errors).items()
                     if inspect.isclass(value) and issubclass(value, errors.MicroagentError)}
    assert on_the_page == in_the_module
    assert issubclass(errors.UsageError, ValueError)
