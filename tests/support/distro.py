"""Distribution-tree fixtures (owned by the rootfs work)."""
