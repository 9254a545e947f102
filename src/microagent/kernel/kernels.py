"""Kernel bundles: the guest kernel, the modules it needs, and a record of both.

A bundle lives in ``kernels/<version>/``::

    vmlinuz        the compressed bzImage QEMU boots
    vmlinux        the uncompressed ELF extracted from it (for Firecracker)
    modules.cpio   a newc archive: the needed modules, decompressed, under
                   /lib/modules/<version>/, and /etc/microagent/modules, the load order
    kernel.json    schema, version, source, sha256 and size of each file, module lists

``kernels/default.json`` names the default bundle. Bundles are staged in a hidden
directory and renamed into place, under the ``kernel-store`` lock. A workspace's own
kernel (``create --kernel PATH``) is a bundle too, in ``kernels/by-digest/<hex>/``, named
by its content (:mod:`microagent.kernel.ownkernels`); the workspace records the digest.

Sources, in order: an explicit path (a bzImage with its modules directory, an unpacked
kernel package, or a ``.deb``); an installed bundle; the host's ``/boot/vmlinuz-*`` with
its ``/lib/modules``; on Debian and Ubuntu, the distribution package fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x`` (no root needed).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microagent.errors import HostError, MicroagentError, NotFoundError
from microagent.kernel import cpio
from microagent.kernel.modules import (
    ModulePlan,
    bzimage_version,
    extract_vmlinux,
    module_contents,
    resolve_modules,
)
from microagent.staging import stage_dir, sweep_abandoned
from microagent.store import (
    ensure_dir,
    file_lock,
    fsync_dir,
    open_private,
    read_json,
    write_json_atomic,
)

if TYPE_CHECKING:
    from microagent.layout import StateLayout
    from microagent.progress import Progress

# The drivers a guest needs, with the config symbol that builds each one in.
REQUIRED_MODULES = {
    "virtio_mmio": "CONFIG_VIRTIO_MMIO",
    "virtio_blk": "CONFIG_VIRTIO_BLK",
    "virtio_net": "CONFIG_VIRTIO_NET",
    "virtio_console": "CONFIG_VIRTIO_CONSOLE",
    "ext4": "CONFIG_EXT4_FS",
}
# button: the ACPI power button, so QMP system_powerdown (stop's fallback) reaches the agent
OPTIONAL_MODULES = {
    "vmw_vsock_virtio_transport": "CONFIG_VIRTIO_VSOCKETS",
    "button": "CONFIG_ACPI_BUTTON",
}
MODULE_LIST = "etc/microagent/modules"
DEFAULT_RECORD = "default.json"
BUNDLE_RECORD = "kernel.json"
INSTALL_LOCK_TIMEOUT = 900.0
APT_TIMEOUT = 900
HOST_ROOT = Path("/")


@dataclass(frozen=True)
class KernelBundle:
    """An installed kernel bundle (``kernels/<version>/``)."""

    version: str
    path: Path
    vmlinuz: Path
    modules_cpio: Path
    vmlinux: Path | None
    modules: tuple[str, ...]
    builtin: tuple[str, ...]
    source: str
    created: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False)
    default: bool = False

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` shape of one bundle."""
        return {
            "version": self.version,
            "default": self.default,
            "path": str(self.path),
            "source": self.source,
            "created": self.created,
            "modules": list(self.modules),
            "builtin": list(self.builtin),
            "files": self.files,
        }


@dataclass(frozen=True)
class KernelSource:
    """A kernel found somewhere, before it is assembled into a bundle."""

    version: str
    vmlinuz: Path
    modules_dir: Path | None
    config: Path | None
    description: str


# --- public API -------------------------------------------------------------------------


def list_kernels(layout: StateLayout) -> list[KernelBundle]:
    """Every installed bundle, newest version first; broken ones are skipped."""
    default = _default_version(layout)
    bundles = []
    if layout.kernels_dir.is_dir():
        for entry in layout.kernels_dir.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            with contextlib.suppress(MicroagentError, FileNotFoundError, KeyError):
                bundles.append(load_bundle(entry, default=entry.name == default))
    return sorted(bundles, key=lambda b: _version_key(b.version), reverse=True)


def default_kernel(layout: StateLayout, *, install_if_missing: bool = True) -> KernelBundle:
    """The default bundle; else the newest installed one; else install one (see module doc).

    Raises NotFoundError when none is installed and ``install_if_missing`` is false.
    """
    bundles = list_kernels(layout)
    for bundle in bundles:
        if bundle.default:
            return bundle
    if bundles:
        _write_default(layout, bundles[0].version)
        return load_bundle(bundles[0].path, default=True)
    if not install_if_missing:
        raise NotFoundError("no kernel is installed",
                            hint="run `microagent kernel install [--from PATH]`")
    return install_kernel(layout)


def install_kernel(
    layout: StateLayout,
    *,
    from_path: Path | None = None,
    modules_dir: Path | None = None,
    progress: Progress | None = None,
) -> KernelBundle:
    """Assemble a bundle and make it the default.

    ``from_path`` is a bzImage (its modules directory given as ``modules_dir`` or found
    alongside), an unpacked kernel package, or a ``.deb``. Without it: the host's
    ``/boot`` kernel, else the distribution package through apt; a version already
    installed from those is kept as it is.
    """
    if from_path is not None and not from_path.exists():
        raise NotFoundError(f"{from_path} does not exist",
                            hint="pass an unpacked kernel package, a .deb, or a bzImage file")
    ensure_dir(layout.kernels_dir)
    ensure_dir(layout.tmp_dir)
    lock = layout.lock_file("kernel", "store")
    with file_lock(lock, what="the kernel store", timeout=INSTALL_LOCK_TIMEOUT), \
            stage_dir(layout.tmp_dir, "kernel-") as staged:  # swept if killed
        sweep_abandoned(layout)
        work = staged.path
        if from_path is not None:
            source = source_from_path(Path(from_path), modules_dir, work, progress)
        else:
            found = _source_from_host(layout, work, progress)
            if isinstance(found, KernelBundle):
                _write_default(layout, found.version)
                return load_bundle(found.path, default=True)
            source = found
        bundle_dir = _assemble(layout, source, work, progress)
        _write_default(layout, source.version)
        return load_bundle(bundle_dir, default=True)


# --- the bundle on disk -----------------------------------------------------------------


def load_bundle(path: Path, *, default: bool = False) -> KernelBundle:
    """The bundle in ``path``; MicroagentError when a file is missing or truncated."""
    record = read_json(path / BUNDLE_RECORD)
    files = record.get("files", {})
    for name, described in files.items():
        try:
            intact = (path / name).stat().st_size == described["size"]
        except OSError:
            intact = False
        if not intact:
            raise MicroagentError(f"kernel bundle {path}: {name} is missing or truncated",
                                  hint="reinstall it with `microagent kernel install`")
    return KernelBundle(
        version=str(record["version"]),
        path=path,
        vmlinuz=path / "vmlinuz",
        modules_cpio=path / "modules.cpio",
        vmlinux=path / "vmlinux" if "vmlinux" in files else None,
        modules=tuple(record.get("modules", ())),
        builtin=tuple(record.get("builtin", ())),
        source=str(record.get("source", "")),
        created=str(record.get("created", "")),
        files=dict(files),
        default=default,
    )


def _default_version(layout: StateLayout) -> str | None:
    try:
        return str(read_json(layout.kernels_dir / DEFAULT_RECORD)["version"])
    except (FileNotFoundError, KeyError, MicroagentError):
        return None


def _write_default(layout: StateLayout, version: str) -> None:
    write_json_atomic(layout.kernels_dir / DEFAULT_RECORD, {"version": version})


def _assemble(
    layout: StateLayout, source: KernelSource, work: Path, progress: Progress | None
) -> Path:
    """Write the bundle of ``source`` into a staging dir and rename it into place."""
    plan = resolve_modules(source.version, source.modules_dir, source.config,
                           REQUIRED_MODULES, OPTIONAL_MODULES)
    staged = stage_dir(layout.kernels_dir, f".new-{source.version}-")  # swept if killed
    staging = staged.path
    try:
        write_bundle(source, plan, staging, progress)
        final = layout.kernels_dir / source.version
        old = None
        if final.exists():
            old = stage_dir(layout.kernels_dir, f".old-{source.version}-")
            os.replace(final, old.path / "bundle")
        try:
            staged.replace(final)
        except BaseException:
            if old is not None:  # put the previous bundle back
                os.replace(old.path / "bundle", final)
            raise
        finally:
            if old is not None:
                old.close()
        fsync_dir(layout.kernels_dir)
    except OSError as e:
        raise HostError(f"cannot write the kernel bundle: {e}") from e
    finally:
        staged.close()
    return final


def write_bundle(source: KernelSource, plan: ModulePlan, staging: Path,
                  progress: Progress | None) -> None:
    """The files of the bundle of ``source`` (its modules as ``plan`` says) in ``staging``."""
    _step(progress, f"assembling kernel {source.version} from {source.description}")
    shutil.copyfile(source.vmlinuz, staging / "vmlinuz")
    os.chmod(staging / "vmlinuz", 0o600)  # copyfile's mode is 0666 less the umask
    prefix = f"lib/modules/{source.version}"
    entries = [
        cpio.regular_file(f"{prefix}/{rel}", data)
        for rel, data in module_contents(plan)
    ]
    order = "".join(f"/{prefix}/{module.rel}\n" for module in plan.modules)
    entries.append(cpio.regular_file(MODULE_LIST, order.encode()))
    with os.fdopen(open_private(staging / "modules.cpio", os.O_WRONLY), "wb") as f:
        cpio.write_cpio(entries, f)
    vmlinux = extract_vmlinux((staging / "vmlinuz").read_bytes())
    if vmlinux is not None:
        with os.fdopen(open_private(staging / "vmlinux", os.O_WRONLY), "wb") as f:
            f.write(vmlinux)
    names = ["vmlinuz", "modules.cpio"] + (["vmlinux"] if vmlinux is not None else [])
    write_json_atomic(staging / BUNDLE_RECORD, {
        "version": source.version,
        "source": source.description,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "files": {name: describe_file(staging / name) for name in names},
        "modules": [module.name for module in plan.modules],
        "builtin": list(plan.builtin),
        "missing_optional": list(plan.missing_optional),
    })


def describe_file(path: Path) -> dict[str, Any]:
    """``{"sha256", "size"}`` of a bundle's file, as ``kernel.json`` records them."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "size": path.stat().st_size}


# --- sources ----------------------------------------------------------------------------


def source_from_path(
    path: Path, modules_dir: Path | None, work: Path, progress: Progress | None
) -> KernelSource:
    """An explicit ``--from``: a .deb, an unpacked package tree, or a kernel image file."""
    path = path.expanduser().absolute()
    if not path.exists():
        raise NotFoundError(f"kernel source {path} does not exist")
    if path.is_dir():
        found = sources_in_tree(path, f"path:{path}")
        if not found:
            raise NotFoundError(
                f"no boot/vmlinuz-* with lib/modules/<version> under {path}",
                hint="pass an unpacked kernel package, a .deb, or a bzImage file")
        return found[0]
    if path.suffix == ".deb":
        _unpack_deb(path, work / "deb", progress)
        found = sources_in_tree(work / "deb", f"deb:{path.name}")
        if not found:
            raise NotFoundError(f"{path.name} holds no boot/vmlinuz-* kernel")
        return found[0]
    try:
        version = bzimage_version(path.read_bytes())
    except OSError as e:
        raise HostError(f"cannot read {path}: {e.strerror}") from e
    if version is None:
        raise MicroagentError(f"{path} is not a bzImage kernel (no HdrS header)")
    candidates = [modules_dir] if modules_dir is not None else [
        path.parent / "lib" / "modules" / version,
        path.parent.parent / "lib" / "modules" / version,
        path.parent / "modules" / version,
        path.parent / "modules",
        HOST_ROOT / "lib" / "modules" / version,
    ]
    found_dir = next((c for c in candidates if c.is_dir()), None)
    config = path.parent / f"config-{version}"
    return KernelSource(version, path, found_dir, config if config.is_file() else None,
                        f"path:{path}")


def sources_in_tree(root: Path, description: str) -> list[KernelSource]:
    """Kernels of an unpacked package tree (or of ``/``), newest first."""
    found = []
    for image in (root / "boot").glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        modules = next((d for d in (root / "lib" / "modules" / version,
                                    root / "usr" / "lib" / "modules" / version)
                        if d.is_dir()), None)
        config = root / "boot" / f"config-{version}"
        found.append(KernelSource(version, image, modules,
                                  config if config.is_file() else None, description))
    return sorted(found, key=lambda s: _version_key(s.version), reverse=True)


def _source_from_host(
    layout: StateLayout, work: Path, progress: Progress | None
) -> KernelSource | KernelBundle:
    """The host's /boot kernel if usable, else the distribution package via apt."""
    reasons: list[str] = []
    usable = _usable_host_source(reasons)
    if usable is not None:
        return usable
    package = _apt_kernel_package(reasons)
    if package is None:
        raise NotFoundError(
            "no kernel found: " + ("; ".join(reasons) or "no /boot/vmlinuz-*, no apt"),
            hint="pass one with `microagent kernel install --from PATH` (a bzImage and its "
                 "modules directory, an unpacked kernel package or a .deb), or on "
                 "Debian/Ubuntu configure apt so `apt-get download linux-image-amd64` works")
    version = package.removeprefix("linux-image-")
    installed = layout.kernels_dir / version
    with contextlib.suppress(MicroagentError, FileNotFoundError):
        return load_bundle(installed)
    _step(progress, f"downloading {package}")
    debs = [_apt_download(package, work)]
    root = work / "deb"
    _unpack_deb(debs[0], root, progress)
    if not (root / "lib" / "modules" / version / "kernel").is_dir() and \
            _apt_has(f"linux-modules-{version}"):
        # Ubuntu ships the modules in a package of their own.
        _step(progress, f"downloading linux-modules-{version}")
        _unpack_deb(_apt_download(f"linux-modules-{version}", work), root, progress)
    found = [s for s in sources_in_tree(root, "") if s.version == version]
    if not found:
        raise HostError(f"{debs[0].name} holds no boot/vmlinuz-{version}")
    return KernelSource(version, found[0].vmlinuz, found[0].modules_dir, found[0].config,
                        f"apt:{debs[0].name}")


def _usable_host_source(reasons: list[str]) -> KernelSource | None:
    """The newest /boot kernel whose modules have what a bundle needs; why not in reasons."""
    for source in sources_in_tree(HOST_ROOT, ""):
        source = KernelSource(source.version, source.vmlinuz,
                              HOST_ROOT / "lib" / "modules" / source.version, source.config,
                              f"host:{source.vmlinuz}")
        if not os.access(source.vmlinuz, os.R_OK):
            reasons.append(f"{source.vmlinuz} is not readable")
            continue
        try:
            resolve_modules(source.version, source.modules_dir, source.config,
                            REQUIRED_MODULES, {})
        except MicroagentError as e:
            reasons.append(e.message)
            continue
        return source
    return None


def kernel_availability(layout: StateLayout) -> tuple[str, str]:
    """Whether a default kernel is ``installed``, ``obtainable`` or ``missing``, and a
    detail; nothing is downloaded or installed (for ``doctor``)."""
    with contextlib.suppress(MicroagentError, FileNotFoundError):
        bundle = default_kernel(layout, install_if_missing=False)
        return "installed", f"{bundle.version} ({bundle.source})"
    reasons: list[str] = []
    source = _usable_host_source(reasons)
    if source is not None:
        return "obtainable", f"{source.version} from the host's {source.vmlinuz}"
    package = _apt_kernel_package(reasons)
    if package is not None:
        return "obtainable", f"{package} through apt-get download"
    return "missing", "; ".join(reasons) or "no /boot kernel and no apt"


def _apt_kernel_package(reasons: list[str]) -> str | None:
    """The versioned linux-image package the distribution's meta package depends on."""
    if shutil.which("apt-cache") is None or shutil.which("apt-get") is None \
            or shutil.which("dpkg-deb") is None:
        reasons.append("apt-get and dpkg-deb are not available")
        return None
    meta = _meta_package()
    try:
        run = subprocess.run(["apt-cache", "depends", "--important", meta],
                             capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        reasons.append(f"apt-cache failed: {e}")
        return None
    found = re.findall(r"Depends:\s*(linux-image-\d\S*)", run.stdout)
    if run.returncode != 0 or not found:
        reasons.append(f"apt does not know {meta} (run `apt-get update`?)")
        return None
    return str(sorted(found, key=_version_key)[-1])


def _meta_package() -> str:
    """``linux-image-<arch>`` on Debian, ``linux-image-generic`` on Ubuntu."""
    with contextlib.suppress(OSError):
        text = Path("/etc/os-release").read_text()
        if re.search(r"^ID=\"?ubuntu", text, re.M):
            return "linux-image-generic"
    arch = "amd64"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip() or arch
    return f"linux-image-{arch}"


def _apt_has(package: str) -> bool:
    try:
        return subprocess.run(["apt-cache", "show", package], capture_output=True,
                              timeout=60, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _apt_download(package: str, work: Path) -> Path:
    """``apt-get download`` into ``work`` (no root needed); the .deb's path."""
    before = set(work.glob("*.deb"))
    try:
        run = subprocess.run(["apt-get", "download", "-q", package], cwd=work,
                             capture_output=True, text=True, timeout=APT_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise HostError(f"apt-get download {package} failed: {e}") from e
    new = sorted(set(work.glob("*.deb")) - before)
    if run.returncode != 0 or not new:
        tail = "\n".join(run.stderr.strip().splitlines()[-5:])
        raise HostError(f"apt-get download {package} failed ({run.returncode}): {tail}",
                        hint="check the apt sources and the network, or pass "
                             "`microagent kernel install --from PATH`")
    return new[0]


def _unpack_deb(deb: Path, dest: Path, progress: Progress | None) -> None:
    _step(progress, f"unpacking {deb.name}")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        run = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True,
                             text=True, timeout=APT_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise HostError(f"dpkg-deb -x {deb} failed: {e}",
                        hint="install dpkg (it provides dpkg-deb)") from e
    if run.returncode != 0:
        raise HostError(f"dpkg-deb -x {deb} failed ({run.returncode}): {run.stderr.strip()}")


def _version_key(version: str) -> tuple[tuple[int, str], ...]:
    """Natural sort order: 6.1.0-56 after 6.1.0-9."""
    return tuple((int(part), "") if part.isdigit() else (-1, part)
                 for part in re.split(r"(\d+)", version) if part)


def _step(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress.step(message)
