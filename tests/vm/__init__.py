"""Tests that boot real microVMs: the real kernel, the real agent, QEMU (TCG here)."""
