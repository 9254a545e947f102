"""VMM backends: a small interface (``base``) and its implementations (``qemu``)."""
