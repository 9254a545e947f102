"""The ```python blocks of docs/python.md, for the tests that keep the page true.

A block whose first line is ``# not run`` is compiled but not executed (it would
download a kernel, say). Each block is compiled with its line numbers in the page, so a
failing example's traceback names the line of docs/python.md.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from types import CodeType

PYTHON_DOC = Path(__file__).resolve().parents[2] / "docs" / "python.md"
NOT_RUN = "# not run"


@dataclass(frozen=True)
class Block:
    """One fenced block: its language, first line's number in the page, and text."""

    language: str
    line: int
    source: str

    @property
    def runs(self) -> bool:
        """False for a Python block marked ``# not run``."""
        return not self.source.lstrip().startswith(NOT_RUN)

    def compiled(self, filename: str = str(PYTHON_DOC), *,
                 tries_must_raise: bool = False) -> CodeType:
        """The block as code whose line numbers are the page's. With
        ``tries_must_raise``, a ``try`` without ``else`` whose body raises nothing
        raises AssertionError: on the page, a ``try`` shows an error being raised."""
        tree = ast.parse("\n" * (self.line - 1) + self.source, filename)
        if tries_must_raise:
            for node in ast.walk(tree):
                if isinstance(node, ast.Try) and not node.orelse:
                    message = f"{filename}:{node.lineno}: the try's body raised nothing"
                    node.orelse = [ast.Raise(ast.Call(
                        ast.Name("AssertionError", ast.Load()), [ast.Constant(message)], []))]
            ast.fix_missing_locations(tree)
        return compile(tree, filename, "exec")


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown ``text``, in order."""
    blocks: list[Block] = []
    language: str | None = None
    start = 0
    lines: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if language is None:
            if line.startswith("```"):
                language, start, lines = line[3:].strip(), number + 1, []
        elif line.startswith("```"):
            blocks.append(Block(language, start, "\n".join(lines) + "\n"))
            language = None
        else:
            lines.append(line)
    if language is not None:
        raise ValueError(f"a fenced block opened at line {start - 1} is never closed")
    return blocks


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of ``text``."""
    return [b for b in fenced_blocks(text) if b.language == "python"]
