"""Protocol tests: the real agent binary in its host test mode (``--serve-fd``), no VM."""
