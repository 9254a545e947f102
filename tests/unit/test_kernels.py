"""Kernel bundles from synthetic kernel packages: module resolution, sources, the store.

The packages are built here: ELF modules with a real ``.modinfo`` section, a bzImage with
a real setup header and an xz payload, and a .deb made with ``dpkg-deb --build``. apt is
replaced by small scripts on PATH, so nothing here needs the network.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest
import zstandard

from microagent.errors import MicroagentError, NotFoundError
from microagent.kernel import kernels
from microagent.kernel.kernels import default_kernel, install_kernel, list_kernels
from microagent.kernel.modules import (
    bzimage_version,
    extract_vmlinux,
    nop_ftrace_sites,
    strip_signature,
)
from microagent.layout import StateLayout
from tests.unit.test_initramfs import parse_newc

VERSION = "6.1.0-99-test"


def elf(sections: dict[str, bytes]) -> bytes:
    """A relocatable ELF64 file holding ``sections`` (and its section name table)."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [*sections, ".shstrtab"])
    body = bytearray(64)
    offsets = {}
    for name, data in sections.items():
        offsets[name] = len(body)
        body += data
    names_at = len(body)
    body += names + bytes(-(len(body) + len(names)) % 8)
    shoff = len(body)
    headers = [struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    name_pos = 1
    for name, data in sections.items():
        headers.append(struct.pack("<IIQQQQIIQQ", name_pos, 1, 0, 0, offsets[name],
                                   len(data), 0, 0, 1, 0))
        name_pos += len(name) + 1
    headers.append(struct.pack("<IIQQQQIIQQ", name_pos, 3, 0, 0, names_at, len(names),
                               0, 0, 1, 0))
    body += b"".join(headers)
    body[:64] = (b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(headers),
        len(headers) - 1))
    return bytes(body)


def module(name: str, depends: str = "", *extra: str) -> bytes:
    info = [f"name={name}", f"depends={depends}", *extra]
    return elf({".text": b"\x90" * 16, ".modinfo": b"\0".join(s.encode() for s in info)})


VMLINUX = elf({".text": b"\xcc" * 64, ".data": b"kernel data"})


def bzimage(version: str, payload: bytes) -> bytes:
    """A bzImage setup header (protocol 2.15) pointing at ``payload``."""
    image = bytearray(0x410)
    image[0x1F1] = 1  # one setup sector: the protected-mode code starts at 0x400
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x020F)
    struct.pack_into("<H", image, 0x20E, 0x300 - 0x200)
    text = f"{version} (test@example.org) #1 SMP".encode() + b"\0"
    image[0x300:0x300 + len(text)] = text
    struct.pack_into("<II", image, 0x248, 0x10, len(payload))
    return bytes(image) + payload + bytes(16)


def signed(data: bytes, sig_len: int = 512) -> bytes:
    """``data`` with a signature trailer as the kernel's sign-file appends it (PKCS#7)."""
    return (data + b"\x30" * sig_len + struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, sig_len)
            + b"~Module signature appended~\n")


UNSIGNED = {
    "kernel/drivers/virtio/virtio_ring.ko": module("virtio_ring"),
    "kernel/drivers/virtio/virtio.ko": module("virtio", "virtio_ring"),
    "kernel/drivers/virtio/virtio_mmio.ko": module("virtio_mmio", "virtio,virtio_ring"),
    "kernel/drivers/block/virtio_blk.ko": module("virtio_blk", "virtio,virtio_ring"),
    "kernel/fs/ext4/ext4.ko": module("ext4", "jbd2,crc16", "softdep=pre: crypto-crc32c"),
    "kernel/fs/jbd2/jbd2.ko": module("jbd2"),
    "kernel/lib/crc16.ko": module("crc16"),
    "kernel/arch/x86/crypto/crc32c-intel.ko": module(
        "crc32c_intel", "", "alias=crypto-crc32c", "alias=crc32c"),
    "kernel/crypto/crc32c_generic.ko": module(
        "crc32c_generic", "", "alias=crypto-crc32c", "alias=crc32c"),
    "kernel/drivers/gpu/unrelated.ko": module("unrelated"),
}
# as Debian ships them: signed (ext4 also compressed, so it is stripped after decompression)
MODULES = {rel: signed(data) if rel.endswith(("ext4.ko", "jbd2.ko", "virtio.ko")) else data
           for rel, data in UNSIGNED.items()}
COMPRESSORS = {
    "kernel/drivers/virtio/virtio_mmio.ko": (".xz", lzma.compress),
    "kernel/drivers/block/virtio_blk.ko": (".zst",
                                           zstandard.ZstdCompressor().compress),
    "kernel/fs/ext4/ext4.ko": (".gz", gzip.compress),
}
EXPECTED_ORDER = ["virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "jbd2", "crc16",
                  "crc32c_generic", "ext4"]


def package_tree(root: Path, version: str = VERSION) -> Path:
    """An unpacked kernel package: virtio_net built in by modules.builtin,
    virtio_console by the config, three modules shipped compressed, no modules.dep."""
    (root / "boot").mkdir(parents=True)
    payload = lzma.compress(VMLINUX + b"RELOCATIONS", format=lzma.FORMAT_XZ,
                            check=lzma.CHECK_CRC32)
    (root / "boot" / f"vmlinuz-{version}").write_bytes(bzimage(version, payload))
    (root / "boot" / f"config-{version}").write_text(
        "CONFIG_VIRTIO_CONSOLE=y\nCONFIG_EXT4_FS=m\n# CONFIG_FOO is not set\n")
    moddir = root / "lib" / "modules" / version
    for rel, data in MODULES.items():
        suffix, compress = COMPRESSORS.get(rel, ("", lambda d: d))
        path = moddir / (rel + suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(compress(data))
    (moddir / "modules.builtin").write_text("kernel/drivers/net/virtio_net.ko\n")
    return root


def build_deb(tree: Path, dest: Path) -> Path:
    control = tree / "DEBIAN" / "control"
    control.parent.mkdir()
    control.write_text(f"Package: linux-image-{VERSION}\nVersion: 1\nArchitecture: amd64\n"
                       "Maintainer: test <test@example.org>\nDescription: test kernel\n")
    subprocess.run(["dpkg-deb", "-Zgzip", "--root-owner-group", "--build", str(tree),
                    str(dest)], check=True, capture_output=True, timeout=60)
    shutil.rmtree(tree / "DEBIAN")
    return dest


def cpio_members(bundle: kernels.KernelBundle) -> dict[str, bytes]:
    [entries] = parse_newc(bundle.modules_cpio.read_bytes())
    return {e.name: e.data for e in entries if stat.S_ISREG(e.mode)}


def check_bundle(bundle: kernels.KernelBundle, source_prefix: str) -> None:
    assert bundle.version == VERSION
    assert bundle.source.startswith(source_prefix), bundle.source
    assert list(bundle.modules) == EXPECTED_ORDER
    assert list(bundle.builtin) == ["virtio_net", "virtio_console"]
    members = cpio_members(bundle)
    prefix = f"lib/modules/{VERSION}/"
    order = [f"/{prefix}{rel}" for rel in [
        "kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_mmio.ko", "kernel/drivers/block/virtio_blk.ko",
        "kernel/fs/jbd2/jbd2.ko", "kernel/lib/crc16.ko", "kernel/crypto/crc32c_generic.ko",
        "kernel/fs/ext4/ext4.ko"]]
    assert members["etc/microagent/modules"].decode().splitlines() == order
    for path in order:
        rel = path.removeprefix(f"/{prefix}")
        assert members[path.lstrip("/")] == UNSIGNED[rel], f"{rel}: compressed or signed"
    assert len(members) == len(order) + 1
    record = json.loads((bundle.path / "kernel.json").read_text())
    assert record["schema"] == 1
    assert record["missing_optional"] == ["vmw_vsock_virtio_transport", "button"]
    for name in ("vmlinuz", "modules.cpio", "vmlinux"):
        data = (bundle.path / name).read_bytes()
        assert record["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(),
                                         "size": len(data)}
    assert bundle.vmlinux is not None and bundle.vmlinux.read_bytes() == VMLINUX
    assert bundle.to_json()["files"] == record["files"]


def test_install_from_an_unpacked_package(layout: StateLayout, tmp_path: Path) -> None:
    tree = package_tree(tmp_path / "pkg")
    bundle = install_kernel(layout, from_path=tree)
    check_bundle(bundle, f"path:{tree}")
    assert bundle.default
    assert bundle.path == layout.kernels_dir / VERSION
    assert default_kernel(layout, install_if_missing=False) == bundle


def test_install_from_a_deb(layout: StateLayout, tmp_path: Path) -> None:
    deb = build_deb(package_tree(tmp_path / "pkg"), tmp_path / "kernel.deb")
    check_bundle(install_kernel(layout, from_path=deb), "deb:kernel.deb")
    assert not [p for p in layout.tmp_dir.iterdir()], "unpacked package left behind"


def test_install_from_a_bzimage_with_modules_alongside(
    layout: StateLayout, tmp_path: Path
) -> None:
    tree = package_tree(tmp_path / "pkg")
    image = tree / f"vmlinuz-{VERSION}"
    shutil.move(tree / "boot" / f"vmlinuz-{VERSION}", image)
    shutil.move(tree / "boot" / f"config-{VERSION}", tree / f"config-{VERSION}")
    check_bundle(install_kernel(layout, from_path=image), f"path:{image}")
    # An explicit modules directory wins over the one found alongside.
    with pytest.raises(NotFoundError, match="no module virtio_mmio"):
        install_kernel(layout, from_path=image, modules_dir=tmp_path / "empty")


def test_a_missing_required_module_is_named(layout: StateLayout, tmp_path: Path) -> None:
    tree = package_tree(tmp_path / "pkg")
    (tree / "lib/modules" / VERSION / "kernel/lib/crc16.ko").unlink()
    with pytest.raises(NotFoundError, match=r"no module crc16 \(needed by ext4\)"):
        install_kernel(layout, from_path=tree)
    assert list_kernels(layout) == []
    assert [p.name for p in layout.kernels_dir.iterdir()] == []


def test_modules_dep_is_used_when_present(layout: StateLayout, tmp_path: Path) -> None:
    tree = package_tree(tmp_path / "pkg")
    moddir = tree / "lib/modules" / VERSION
    (moddir / "modules.dep").write_text(
        "kernel/fs/ext4/ext4.ko.gz: kernel/lib/crc16.ko\n"
        "kernel/drivers/virtio/virtio_mmio.ko.xz: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/block/virtio_blk.ko.zst: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/lib/crc16.ko:\nkernel/drivers/virtio/virtio_ring.ko:\n")
    (moddir / "modules.alias").write_text("alias crypto-crc32c crc32c_intel\n")
    bundle = install_kernel(layout, from_path=tree)
    # modules.dep says ext4 needs only crc16 here; the softdep goes to the alias's module.
    assert list(bundle.modules) == ["virtio_ring", "virtio_mmio", "virtio_blk", "crc16",
                                    "crc32c_intel", "ext4"]


def test_reinstall_replaces_the_bundle_whole(layout: StateLayout, tmp_path: Path) -> None:
    tree = package_tree(tmp_path / "pkg")
    first = install_kernel(layout, from_path=tree)
    (tree / "boot" / f"config-{VERSION}").write_text("CONFIG_EXT4_FS=m\n")
    (tree / "lib/modules" / VERSION / "kernel/drivers/char").mkdir()
    (tree / "lib/modules" / VERSION / "kernel/drivers/char/virtio_console.ko").write_bytes(
        module("virtio_console", "virtio,virtio_ring"))
    second = install_kernel(layout, from_path=tree)
    assert "virtio_console" not in second.builtin
    assert "virtio_console" in second.modules
    assert second.files["modules.cpio"] != first.files["modules.cpio"]
    assert sorted(p.name for p in layout.kernels_dir.iterdir()) == [VERSION, "default.json"]
    assert [b.version for b in list_kernels(layout)] == [VERSION]


def test_default_is_the_last_installed(layout: StateLayout, tmp_path: Path) -> None:
    install_kernel(layout, from_path=package_tree(tmp_path / "a", "6.1.0-10-test"))
    install_kernel(layout, from_path=package_tree(tmp_path / "b", "6.1.0-9-test"))
    listed = list_kernels(layout)
    assert [(b.version, b.default) for b in listed] == [("6.1.0-10-test", False),
                                                        ("6.1.0-9-test", True)]
    assert default_kernel(layout).version == "6.1.0-9-test"
    (layout.kernels_dir / "default.json").unlink()
    assert default_kernel(layout).version == "6.1.0-10-test"  # the newest then


def test_no_kernel_installed_is_not_found(layout: StateLayout) -> None:
    with pytest.raises(NotFoundError, match="no kernel is installed") as info:
        default_kernel(layout, install_if_missing=False)
    assert "kernel install" in info.value.hint


def test_the_host_boot_kernel_is_used(
    layout: StateLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "HOST_ROOT", package_tree(tmp_path / "host"))
    bundle = default_kernel(layout)
    assert bundle.source == f"host:{tmp_path}/host/boot/vmlinuz-{VERSION}"
    assert list(bundle.modules) == EXPECTED_ORDER


def fake_apt(bindir: Path, deb: Path, calls: Path) -> None:
    """apt-cache and apt-get scripts serving ``deb`` as the distribution's kernel."""
    bindir.mkdir()
    scripts = {
        "apt-cache": f"""#!/bin/sh
echo "$@" >> {calls}
case "$1" in
  depends) printf '%s\\n  Depends: linux-image-{VERSION}\\n' "$3" ;;
  show) exit 100 ;;
esac
""",
        "apt-get": f"""#!/bin/sh
echo "$@" >> {calls}
cp {deb} ./linux-image-{VERSION}_1_amd64.deb
""",
    }
    for name, text in scripts.items():
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)


def test_the_distribution_package_is_downloaded_once(
    layout: StateLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deb = build_deb(package_tree(tmp_path / "pkg"), tmp_path / "kernel.deb")
    calls = tmp_path / "calls"
    fake_apt(tmp_path / "bin", deb, calls)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(kernels, "HOST_ROOT", tmp_path / "nothing")
    bundle = install_kernel(layout)
    check_bundle(bundle, f"apt:linux-image-{VERSION}_1_amd64.deb")
    assert any(line.startswith("download") for line in calls.read_text().splitlines())
    calls.write_text("")
    assert install_kernel(layout).version == VERSION
    assert not any(line.startswith("download") for line in calls.read_text().splitlines())


def test_nothing_found_says_what_to_do(
    layout: StateLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "HOST_ROOT", tmp_path / "nothing")
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    with pytest.raises(NotFoundError, match="no kernel found") as info:
        default_kernel(layout)
    assert "--from" in info.value.hint and "apt-get download" in info.value.hint


def test_bzimage_parsing(tmp_path: Path) -> None:
    payload = lzma.compress(VMLINUX + b"RELOCS", format=lzma.FORMAT_XZ)
    image = bzimage("6.1.0-1-amd64", payload)
    assert bzimage_version(image) == "6.1.0-1-amd64"
    assert extract_vmlinux(image) == VMLINUX
    assert bzimage_version(b"MZ" + bytes(4096)) is None
    # No usable header: found by its magic, as extract-vmlinux does.
    headerless = b"junk" * 100 + gzip.compress(VMLINUX)
    assert extract_vmlinux(headerless) == VMLINUX
    assert extract_vmlinux(b"no payload" * 100) is None
    not_a_kernel = tmp_path / "vmlinuz"
    not_a_kernel.write_bytes(b"\0" * 4096)
    with pytest.raises(MicroagentError, match="not a bzImage"):
        install_kernel(StateLayout(tmp_path / "state"), from_path=not_a_kernel)


def test_bundle_json_shape(layout: StateLayout, tmp_path: Path) -> None:
    bundle = install_kernel(layout, from_path=package_tree(tmp_path / "pkg"))
    shape = bundle.to_json()
    assert set(shape) == {"version", "default", "path", "source", "created", "modules",
                          "builtin", "files"}
    json.dumps(shape)
    assert io.BytesIO(bundle.vmlinuz.read_bytes()).read(0x206)[0x202:] == b"HdrS"


def test_install_from_a_path_that_does_not_exist(layout: StateLayout, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"missing does not exist"):
        install_kernel(layout, from_path=tmp_path / "missing")
    assert not layout.kernels_dir.exists() or not list(layout.kernels_dir.iterdir())


def test_strip_signature() -> None:
    plain = module("plain")
    assert strip_signature(signed(plain)) == plain
    assert strip_signature(signed(plain, sig_len=0)) == plain
    assert strip_signature(plain) == plain  # unsigned: as it is
    with pytest.raises(MicroagentError, match="longer than the module"):
        strip_signature(signed(b"", sig_len=16))
    with pytest.raises(MicroagentError, match="cut short"):
        strip_signature(b"~Module signature appended~\n")


FTRACED_C = """
int counter;
int add(int a, int b) { counter++; return a + b; }
int twice(int a) { return add(a, a); }
static int __attribute__((noinline, section(".init.text"))) setup(void) { return twice(3); }
int (*entry)(void) = setup;
"""


def ftraced_object(tmp_path: Path) -> bytes:
    """A relocatable object as the kernel's modules are built for ftrace: every function
    starts with ``call __fentry__``, its sites listed in ``__mcount_loc``."""
    source = tmp_path / "ftraced.c"
    source.write_text(FTRACED_C)
    subprocess.run(["gcc", "-c", "-O2", "-fno-pic", "-pg", "-mfentry", "-mrecord-mcount",
                    "-o", str(tmp_path / "ftraced.o"), str(source)], check=True)
    return (tmp_path / "ftraced.o").read_bytes()


def readelf(tmp_path: Path, data: bytes, *flags: str) -> str:
    path = tmp_path / "inspect.o"
    path.write_bytes(data)
    return subprocess.run(["readelf", "-W", *flags, str(path)], capture_output=True,
                          text=True, check=True).stdout


def test_nop_ftrace_sites(tmp_path: Path) -> None:
    original = ftraced_object(tmp_path)
    assert readelf(tmp_path, original, "-r").count("__fentry__") == 3
    patched = nop_ftrace_sites(original)
    assert len(patched) == len(original) and patched != original
    assert "__fentry__" not in readelf(tmp_path, patched, "-r")
    mcount = [line for line in readelf(tmp_path, patched, "-S").splitlines()
              if "__mcount_loc" in line]
    assert len(mcount) == 2 and all(line.split("]")[1].split()[4] == "000000" for line in mcount)
    path = tmp_path / "inspect.o"
    path.write_bytes(patched)
    disassembly = subprocess.run(["objdump", "-d", str(path)], capture_output=True,
                                 text=True, check=True).stdout
    starts = disassembly.split(">:\n")[1:]  # each function, from its first instruction
    assert len(starts) == 3
    assert all("0f 1f 44 00 00" in body.splitlines()[0] for body in starts)
    # nothing else changed: per site its call and its relocation; the two sizes
    assert sum(a != b for a, b in zip(original, patched, strict=True)) <= 3 * (5 + 24) + 2 * 8


def test_nop_ftrace_sites_leaves_what_it_does_not_recognise(tmp_path: Path) -> None:
    original = ftraced_object(tmp_path)
    site = original.index(b"\xe8\x00\x00\x00\x00")
    changed = original[:site] + b"\x90" + original[site + 1:]  # one site is not a call
    assert nop_ftrace_sites(changed) == changed
    assert nop_ftrace_sites(b"not an ELF file") == b"not an ELF file"
    assert nop_ftrace_sites(original[:200]) == original[:200]  # cut short
    plain = subprocess.run(["gcc", "-c", "-O2", "-x", "c", "-o", str(tmp_path / "p.o"), "-"],
                           input=FTRACED_C.encode(), check=True)
    assert plain.returncode == 0
    no_sites = (tmp_path / "p.o").read_bytes()
    assert nop_ftrace_sites(no_sites) == no_sites
