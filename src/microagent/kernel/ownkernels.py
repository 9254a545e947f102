"""A workspace's own kernel: ``create --kernel PATH``.

PATH is what a user has at hand: a bzImage (``vmlinuz``) with its modules beside it (or
its drivers built in), a kernel bundle directory as ``kernel install`` makes (or its
``vmlinuz``: the bundle is taken whole), an unpacked kernel package, or a ``.deb``. It is
checked before anything is written (:func:`check_kernel_path`), then stored as a bundle in
``kernels/by-digest/<hex>/`` named by its content (:func:`bundle_digest`), so equal
kernels are stored once. The workspace records the digest and boots that bundle at every
start (:func:`own_kernel`); the default kernel is neither used nor changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from microagent.errors import HostError, MicroagentError, NotFoundError, UsageError
from microagent.kernel.kernels import (
    BUNDLE_RECORD,
    INSTALL_LOCK_TIMEOUT,
    OPTIONAL_MODULES,
    REQUIRED_MODULES,
    KernelBundle,
    describe_file,
    load_bundle,
    source_from_path,
    sources_in_tree,
    write_bundle,
)
from microagent.kernel.modules import bzimage_version, resolve_modules
from microagent.staging import stage_dir, sweep_abandoned
from microagent.store import ensure_dir, file_lock, fsync_dir

if TYPE_CHECKING:
    from microagent.layout import StateLayout
    from microagent.progress import Progress

KERNEL_FORMS = ("pass a bzImage (vmlinuz) with its modules beside it (lib/modules/VERSION/) "
                "or built in, a kernel bundle directory (as `kernel install` makes), a file "
                "of one, an unpacked kernel package, or a .deb")


def check_kernel_path(path: Path) -> Path:
    """``create --kernel PATH`` before anything is written: PATH exists and is a kernel (a
    bzImage, a bundle directory, an unpacked kernel package or a .deb); its absolute form.
    UsageError otherwise."""
    path = path.expanduser().absolute()
    flag = f"--kernel {path}"
    if not path.exists():
        raise UsageError(f"{flag}: no such file or directory", hint=KERNEL_FORMS)
    if path.is_dir():
        if (path / BUNDLE_RECORD).is_file() or sources_in_tree(path, ""):
            return path
        raise UsageError(f"{flag}: the directory holds no kernel bundle (kernel.json) and no "
                         "boot/vmlinuz-*", hint=KERNEL_FORMS)
    try:
        with path.open("rb") as f:
            head = f.read(0x10300)  # the setup header and the version string it points to
    except OSError as e:
        raise UsageError(f"{flag}: cannot read it: {e.strerror}") from e
    if path.suffix == ".deb" and head.startswith(b"!<arch>\n"):
        return path
    if bzimage_version(head) is None:
        raise UsageError(f"{flag}: not a kernel image (no bzImage header)", hint=KERNEL_FORMS)
    return path


def install_own_kernel(layout: StateLayout, path: Path,
                       progress: Progress | None = None) -> KernelBundle:
    """The bundle of ``create --kernel PATH``, stored once per content under
    ``kernels/by-digest/`` (see :func:`bundle_digest`); never the default.

    A bundle directory, or a file that is the ``vmlinuz`` of one, is taken whole;
    anything else is assembled as ``kernel install --from`` does. A kernel whose
    required modules cannot be found is a UsageError; nothing is left behind.
    """
    path = check_kernel_path(path)
    store = ensure_dir(layout.own_kernels_dir)
    ensure_dir(layout.tmp_dir)
    with file_lock(layout.lock_file("kernel", "store"), what="the kernel store",
                   timeout=INSTALL_LOCK_TIMEOUT), \
            stage_dir(layout.tmp_dir, "kernel-") as tmp, \
            stage_dir(store, ".new-") as staged:  # both swept if killed (staging.py)
        sweep_abandoned(layout)
        staging = staged.path
        try:
            whole = _bundle_of(path)
            if whole is not None:
                for name in (*whole.files, BUNDLE_RECORD):
                    shutil.copyfile(whole.path / name, staging / name)
                    os.chmod(staging / name, 0o600)
            else:
                try:
                    source = source_from_path(path, None, tmp.path, progress)
                    plan = resolve_modules(source.version, source.modules_dir, source.config,
                                           REQUIRED_MODULES, OPTIONAL_MODULES)
                except NotFoundError as e:
                    raise UsageError(f"--kernel {path}: {e.message}",
                                     hint=KERNEL_FORMS) from None
                write_bundle(source, plan, staging, progress)
            final = store / bundle_digest(load_bundle(staging)).split(":", 1)[1]
            if not _intact(final):
                shutil.rmtree(final, ignore_errors=True)
                staged.replace(final)
                fsync_dir(store)
        except OSError as e:
            raise HostError(f"cannot store the kernel of {path}: {e}") from e
    return load_bundle(final)


def own_kernel(layout: StateLayout, digest: str) -> KernelBundle:
    """The stored bundle ``digest`` of a workspace's own kernel; NotFoundError when it is
    missing or damaged."""
    path = layout.own_kernels_dir / digest.split(":", 1)[-1]
    try:
        return load_bundle(path)
    except (OSError, KeyError, MicroagentError) as e:
        raise NotFoundError(f"the workspace's own kernel {path} is missing or damaged: "
                            f"{getattr(e, 'message', e)}",
                            hint="create the workspace again with --kernel PATH") from None


def bundle_digest(bundle: KernelBundle) -> str:
    """``sha256:<hex>`` of what a boot takes from a bundle: its vmlinuz and modules.cpio
    (vmlinux is derived from vmlinuz)."""
    lines = "".join(f"{name} {bundle.files[name]['sha256']}\n"
                    for name in ("vmlinuz", "modules.cpio"))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def _bundle_of(path: Path) -> KernelBundle | None:
    """The bundle ``path`` is (a directory with kernel.json) or is the vmlinuz of."""
    directory = path if path.is_dir() else path.parent
    if not (directory / BUNDLE_RECORD).is_file():
        return None
    try:
        bundle = load_bundle(directory)
    except (OSError, KeyError, MicroagentError) as e:
        if path.is_dir():
            raise UsageError(f"--kernel {path}: a damaged kernel bundle: "
                             f"{getattr(e, 'message', e)}") from None
        return None
    if path.is_dir() or describe_file(path)["sha256"] == bundle.files.get("vmlinuz", {}).get(
            "sha256"):
        return bundle
    return None


def _intact(path: Path) -> bool:
    try:
        load_bundle(path)
    except (OSError, KeyError, MicroagentError):
        return False
    return True
