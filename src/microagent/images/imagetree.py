"""The applied image as the tar headers describe it: :class:`Tree` of :class:`Node`.

:mod:`microagent.images.layers` builds it while staging the layers (the staging directory holds
the content; the Tree what an ordinary user cannot stage: owners, real modes, devices,
xattrs); :mod:`microagent.disks.ext4` measures it and makes the disk's inodes match it.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

BLOCK_SIZE = 4096  # the ext4 disks' block and inode sizes (microagent.disks.ext4)
INODE_SIZE = 256


class Kind(enum.Enum):
    """The file types a layer can create."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


@dataclass(eq=False, slots=True)
class Node:
    """One inode of the applied image, as the tar headers describe it.

    Paths that are hard links to each other share one Node (compare with ``is``).
    ``mode`` holds the permission bits including setuid, setgid and sticky.
    """

    kind: Kind
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    target: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    children: dict[str, Node] | None = None
    links: int = 1  # paths of the Tree that are this node (hard links)

    @property
    def st_mode(self) -> int:
        """The full ``st_mode``: type bits and permission bits."""
        return _TYPE_BITS[self.kind] | self.mode


_TYPE_BITS = {
    Kind.FILE: stat.S_IFREG, Kind.DIR: stat.S_IFDIR, Kind.SYMLINK: stat.S_IFLNK,
    Kind.CHAR: stat.S_IFCHR, Kind.BLOCK: stat.S_IFBLK, Kind.FIFO: stat.S_IFIFO,
}


class Tree:
    """Every path of the applied image and its :class:`Node`; the root is ``""``.

    ``pending_xattrs`` holds the xattrs the staging directory could not take (for an
    ordinary user, anything outside ``user.*``): they must be set in the image.
    """

    def __init__(self) -> None:
        self.root = Node(Kind.DIR, 0o755, 0, 0, 0, children={})
        self.pending_xattrs: dict[Node, dict[str, bytes]] = {}

    def get(self, path: str) -> Node | None:
        """The node at ``path`` (relative, ``/``-separated, no symlink followed)."""
        node: Node | None = self.root
        for name in path.split("/"):
            if name:
                if node is None or node.children is None:
                    return None
                node = node.children.get(name)
        return node

    def walk(self) -> Iterator[tuple[str, Node]]:
        """Every ``(path, node)``, directories before their children; hard links repeat."""
        stack: list[tuple[str, Node]] = [("", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children:
                prefix = f"{path}/" if path else ""
                stack.extend((prefix + name, child)
                             for name, child in reversed(node.children.items()))


def node_blocks(node: Node) -> int:
    """The blocks ``node`` takes in ext4 for its own data (as ``ext4.measure_tree``)."""
    if node.kind is Kind.FILE:
        return -(-node.size // BLOCK_SIZE)
    if node.kind is Kind.DIR:
        return 1
    if node.kind is Kind.SYMLINK and len(os.fsencode(node.target)) >= 60:
        return 1
    return 0
