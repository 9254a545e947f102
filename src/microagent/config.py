"""Specs and validation: profiles, resources, workspace names.

Profiles are the named resource sizes of CLI.md; ``--memory``, ``--cpus`` and
``--size-mib`` override one value and keep the profile's name. ``--env``/``-e`` items
(:func:`parse_env`) are resolved here too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from microagent.errors import UsageError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class Profile:
    """A named resource size."""

    name: str
    memory_mib: int
    cpus: int
    disk_mib: int
    description: str


PROFILES: tuple[Profile, ...] = (
    Profile("tiny", 256, 1, 512, "smoke tests, small shells"),
    Profile("small", 512, 2, 1024, "light work"),
    Profile("medium", 2048, 2, 8192, "package installs, normal agent work"),
    Profile("large", 4096, 4, 16384, "builds"),
)
DEFAULT_PROFILE = "small"
DEFAULT_VOLUME_MIB = 1024  # a named volume created on first use (sparse)


@dataclass(frozen=True)
class Resources:
    """What one workspace gets: the profile's values with any overrides applied."""

    profile: str
    memory_mib: int
    cpus: int
    disk_mib: int

    def describe(self) -> str:
        """The ``memory=2048MiB cpus=2 disk=8192MiB`` form of the seed page."""
        return f"memory={self.memory_mib}MiB cpus={self.cpus} disk={self.disk_mib}MiB"


def get_profile(name: str) -> Profile:
    """Return the profile called ``name`` or raise a usage error listing the choices."""
    for profile in PROFILES:
        if profile.name == name:
            return profile
    choices = ", ".join(p.name for p in PROFILES)
    raise UsageError(f"unknown profile {name!r}", hint=f"choose one of: {choices}")


def resolve_resources(
    profile: str | None = None,
    *,
    memory_mib: int | None = None,
    cpus: int | None = None,
    disk_mib: int | None = None,
) -> Resources:
    """Apply single-value overrides to a profile, validating each."""
    base = get_profile(profile or DEFAULT_PROFILE)
    resources = Resources(
        profile=base.name,
        memory_mib=base.memory_mib if memory_mib is None else memory_mib,
        cpus=base.cpus if cpus is None else cpus,
        disk_mib=base.disk_mib if disk_mib is None else disk_mib,
    )
    if not 64 <= resources.memory_mib <= 1024 * 1024:
        raise UsageError(f"--memory {resources.memory_mib} is out of range (64..1048576 MiB)")
    if not 1 <= resources.cpus <= 256:
        raise UsageError(f"--cpus {resources.cpus} is out of range (1..256)")
    if not 16 <= resources.disk_mib <= 16 * 1024 * 1024:
        raise UsageError(f"--size-mib {resources.disk_mib} is out of range (16..16777216 MiB)")
    return resources


def parse_env(items: Sequence[str], host_env: Mapping[str, str], flag: str) -> tuple[str, ...]:
    """``NAME=VALUE`` items as given, and ``NAME`` alone as the host's value, as docker
    does (dropped when the host has no such variable). ``''`` and ``=VALUE`` are usage
    errors."""
    resolved: list[str] = []
    for item in items:
        name, sep, _ = item.partition("=")
        if not name:
            raise UsageError(f"invalid {flag} {item!r}: no variable name",
                             hint=f"use {flag} NAME=VALUE, or {flag} NAME to pass the "
                             "host's value")
        if "\0" in item:
            raise UsageError(f"invalid {flag} {item!r}: a NUL byte")
        if sep:
            resolved.append(item)
        elif name in host_env:
            resolved.append(f"{name}={host_env[name]}")
    return tuple(resolved)


def host_memory_mib(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The host's total memory in MiB (``MemTotal``), or None when it cannot be read."""
    try:
        for line in meminfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "MemTotal":
                return int(value.split()[0]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits_host(resources: Resources, host_mib: int | None = None) -> None:
    """Refuse more guest memory than the host has: the guest kernel would map it all
    (its page tables alone are ~1.5%), and QEMU would fail or the host swap."""
    host_mib = host_memory_mib() if host_mib is None else host_mib
    if host_mib is not None and resources.memory_mib > host_mib:
        raise UsageError(f"--memory {resources.memory_mib} MiB is more than this host has "
                         f"({host_mib} MiB)", hint="give less memory, or a smaller --profile")


def validate_name(name: str, what: str = "workspace") -> str:
    """Return ``name`` if it is a valid workspace or volume name, else raise UsageError."""
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(
            f"invalid {what} name {name!r}",
            hint="names are 1 to 63 characters of letters, digits, '.', '_' and '-', "
            "starting with a letter or digit",
        )
    return name
