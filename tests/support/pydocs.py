"""The ```python blocks of docs/python.md, for the tests that keep the page true.

A block whose first line is ``# not run`` is compiled but not executed (it would
download a kernel, say). Each block is compiled with its line numbers in the page, so a
failing example's traceback names the line of docs/python.md.
"""

from __future__ import annotations

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

    def compiled(self, filename: str = str(PYTHON_DOC)) -> CodeType:
        """The block as code whose line numbers are the page's."""
        return compile("\n" * (self.line - 1) + self.source, filename, "exec")


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
