"""Build a small OCI image layout offline: ``build_oci_image.py busybox DEST``.

The image is a busybox-static tree (Debian's busybox-static package), tagged ``latest``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ocilayout import ImageSpec, Layer, build_layout, busybox_tree, tar_directory


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] != "busybox":
        print("usage: build_oci_image.py busybox DEST", file=sys.stderr)
        return 2
    dest = Path(argv[2])
    with tempfile.TemporaryDirectory() as tmp:
        tree = busybox_tree(Path(tmp) / "rootfs")
        layer = Layer(tar_directory(tree))
    build_layout(dest, [ImageSpec(layers=[layer], cmd=["/bin/sh"])])
    print(f"built {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
