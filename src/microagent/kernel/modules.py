"""Kernel modules and kernel images: what goes into a bundle's ``modules.cpio``.

``resolve_modules`` finds the needed modules and their dependencies (from ``modules.dep``
when the tree has one, else from each module's ``.modinfo``), in load order;
``module_contents`` reads them decompressed and without their signatures
(``strip_signature``). ``bzimage_version`` and ``extract_vmlinux``
read a bzImage: its version string, and the uncompressed ELF inside it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from microagent.errors import HostError, MicroagentError, NotFoundError

COMPRESSED_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz")
SIGNATURE_MAGIC = b"~Module signature appended~\n"
SIGNATURE_INFO = struct.Struct(">BBBBB3xI")  # struct module_signature, before the magic


@dataclass(frozen=True)
class KernelModule:
    """One module file: ``rel`` is its path under ``lib/modules/<version>/`` as it will be
    in the initramfs (never compressed); ``source`` the file as shipped."""

    name: str
    rel: str
    source: Path


@dataclass(frozen=True)
class ModulePlan:
    """What goes into ``modules.cpio``: modules in load order (dependencies first)."""

    modules: tuple[KernelModule, ...]
    builtin: tuple[str, ...]
    missing_optional: tuple[str, ...]


def resolve_modules(
    version: str,
    modules_dir: Path | None,
    config: Path | None,
    required: dict[str, str],
    optional: dict[str, str],
) -> ModulePlan:
    """The modules that load ``required`` and ``optional`` (name → config symbol) with
    their dependencies (``modules.dep``, else each module's own ``depends=``) and their
    ``softdep pre:`` modules. A module built into the kernel (``modules.builtin`` or
    ``=y`` in the config) needs nothing. Raises NotFoundError for a missing required one.
    """
    symbols = _read_config(config)
    builtin_names = set()
    index: dict[str, KernelModule] = {}
    deps: dict[str, list[str]] | None = None
    aliases: list[tuple[str, str]] = []
    if modules_dir is not None:
        builtin_names = {_module_name(line) for line in _lines(modules_dir / "modules.builtin")}
        index = _index_modules(modules_dir)
        deps = _read_modules_dep(modules_dir)
        aliases = [(parts[1], _norm(parts[2])) for line in _lines(modules_dir / "modules.alias")
                   if len(parts := line.split()) == 3 and parts[0] == "alias"]
    order: list[KernelModule] = []
    builtin: list[str] = []
    missing: list[str] = []
    seen: set[str] = set()

    def visit(name: str, symbol: str, needed_by: str) -> None:
        name = _norm(name)
        if name in seen:
            return
        seen.add(name)
        if name in builtin_names or symbols.get(symbol) == "y":
            builtin.append(name)
            return
        module = index.get(name)
        if module is None:
            if needed_by:
                where = modules_dir or "(no modules directory)"
                raise NotFoundError(
                    f"kernel {version} has no module {name} (needed by {needed_by}) "
                    f"in {where}",
                    hint="pass the kernel's modules directory, or a kernel package")
            missing.append(name)
            return
        info = _modinfo(module.source)
        hard = deps[name] if deps is not None and name in deps else [
            d for value in info.get("depends", []) for d in value.split(",") if d]
        for dep in hard:
            visit(dep, "", name)
        for value in info.get("softdep", []):
            pre = value.split("post:")[0].removeprefix("pre:").split()
            for alias in pre:
                provider = _resolve_alias(alias, index, aliases)
                if provider is not None:
                    visit(provider, "", "")
        order.append(module)

    for name, symbol in required.items():
        visit(name, symbol, "the guest")
    for name, symbol in optional.items():
        visit(name, symbol, "")
    return ModulePlan(tuple(order), tuple(builtin), tuple(missing))


def module_contents(plan: ModulePlan) -> list[tuple[str, bytes]]:
    """Each module of ``plan`` as (path under lib/modules/<version>/, its bytes
    decompressed, unsigned and with its ftrace call sites made no-ops)."""
    return [(module.rel, nop_ftrace_sites(strip_signature(_read_module(module.source))))
            for module in plan.modules]


def strip_signature(module: bytes) -> bytes:
    """``module`` without the signature its distribution appended, if any.

    The guest kernel checks a signed module's signature at every load (a SHA-256 of the
    module and an RSA verification, under TCG about a tenth of start-up: measured 2.28-2.31
    s to execReady against 2.52-2.80 s signed, ``bench/workspace_lifecycle.py``). Unsigned,
    the kernel loads them (Debian does not enforce signatures without Secure Boot) and
    marks itself tainted ('E'). The bundle's own integrity is its recorded SHA-256s."""
    if not module.endswith(SIGNATURE_MAGIC):
        return module
    end = len(module) - len(SIGNATURE_MAGIC)
    if end < SIGNATURE_INFO.size:
        raise MicroagentError("a kernel module's signature trailer is cut short")
    _, _, _, signer_len, key_id_len, sig_len = SIGNATURE_INFO.unpack_from(
        module, end - SIGNATURE_INFO.size)
    cut = end - SIGNATURE_INFO.size - sig_len - signer_len - key_id_len
    if cut <= 0:
        raise MicroagentError("a kernel module's signature is longer than the module")
    return module[:cut]


ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")
SYMBOL = struct.Struct("<IBBHQQ")
RELA = struct.Struct("<QQq")
SHT_SYMTAB, SHT_RELA = 2, 4
R_X86_64_NONE, R_X86_64_64, R_X86_64_PC32, R_X86_64_PLT32 = 0, 1, 2, 4
CALL_REL32 = b"\xe8\x00\x00\x00\x00"  # call __fentry__, before relocation
NOP5 = b"\x0f\x1f\x44\x00\x00"  # the kernel's 5-byte NOP (BYTES_NOP5)


@dataclass
class _Section:
    index: int
    header_at: int
    name: str
    type: int
    offset: int
    size: int
    link: int
    info: int


def nop_ftrace_sites(module: bytes) -> bytes:
    """``module`` (x86-64) with its ``call __fentry__`` sites made 5-byte NOPs and its
    ``__mcount_loc`` list emptied, as the kernel's ftrace would make them at load.

    The kernel loads a module in about as much time per ftrace site as it does with the
    rest of it under TCG (ext4's 854 sites: 33 ms of its 114 ms, ``bench/`` notes): it
    rewrites each site with a serialised text poke. Done here once, at bundle assembly,
    the guest finds no sites. What is lost is ftrace function tracing of module code in
    the guest (kprobes still work). Each site is checked (the call's bytes and its
    relocation against ``__fentry__``); a module that does not look exactly like that is
    returned unchanged."""
    try:
        return _nop_ftrace_sites(module) or module
    except (struct.error, IndexError, UnicodeDecodeError):
        return module


def _nop_ftrace_sites(module: bytes) -> bytes | None:
    if module[:4] != b"\x7fELF" or module[4] != 2 or module[5] != 1:
        return None  # not ELF64 little-endian
    header = ELF_HEADER.unpack_from(module)
    machine, shoff, shentsize, shnum, shstrndx = header[2], header[6], header[11], \
        header[12], header[13]
    if machine != 62 or shentsize != SECTION_HEADER.size:  # EM_X86_64
        return None
    raw = [SECTION_HEADER.unpack_from(module, shoff + i * shentsize) for i in range(shnum)]
    names = raw[shstrndx]

    def name_at(table_offset: int, at: int) -> str:
        end = module.index(b"\0", table_offset + at)
        return module[table_offset + at:end].decode()

    sections = [_Section(i, shoff + i * shentsize, name_at(names[4], h[0]), h[1], h[4],
                         h[5], h[6], h[7]) for i, h in enumerate(raw)]
    by_name = {s.name: s for s in sections}
    mcount, mcount_rela = by_name.get("__mcount_loc"), by_name.get(".rela__mcount_loc")
    symtab = next((s for s in sections if s.type == SHT_SYMTAB), None)
    if mcount is None or mcount_rela is None or symtab is None or mcount.size == 0:
        return None
    strtab = sections[symtab.link]
    symbols = [SYMBOL.unpack_from(module, symtab.offset + i * SYMBOL.size)
               for i in range(symtab.size // SYMBOL.size)]
    fentry = {i for i, sym in enumerate(symbols)
              if sym[0] and name_at(strtab.offset, sym[0]) == "__fentry__"}
    rela_for = {s.info: s for s in sections if s.type == SHT_RELA}
    # the relocations of every text section, by the offset they patch
    patches: dict[int, dict[int, int]] = {}
    out = bytearray(module)
    sites = 0
    for at in range(mcount_rela.offset, mcount_rela.offset + mcount_rela.size, RELA.size):
        _, info, addend = RELA.unpack_from(module, at)
        if info & 0xFFFFFFFF != R_X86_64_64:
            return None
        text = sections[symbols[info >> 32][3]]  # the site's section, via its symbol
        rela = rela_for.get(text.index)
        if rela is None or not 0 <= addend <= text.size - len(CALL_REL32):
            return None
        if rela.index not in patches:
            patches[rela.index] = {
                RELA.unpack_from(module, r)[0]: r
                for r in range(rela.offset, rela.offset + rela.size, RELA.size)}
        entry = patches[rela.index].get(addend + 1)
        if entry is None or module[text.offset + addend:][:5] != CALL_REL32:
            return None
        _, call_info, _ = RELA.unpack_from(module, entry)
        if call_info >> 32 not in fentry or \
                call_info & 0xFFFFFFFF not in (R_X86_64_PC32, R_X86_64_PLT32):
            return None
        out[text.offset + addend:text.offset + addend + 5] = NOP5
        RELA.pack_into(out, entry, addend + 1, R_X86_64_NONE, 0)
        sites += 1
    for section in (mcount, mcount_rela):  # an empty __mcount_loc: no sites to process
        SECTION_HEADER.pack_into(out, section.header_at,
                                 *raw[section.index][:5], 0, *raw[section.index][6:])
    return bytes(out) if sites else None


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (*COMPRESSED_SUFFIXES, ".ko"):
        base = base.removesuffix(suffix)
    return _norm(base)


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _read_config(config: Path | None) -> dict[str, str]:
    if config is None:
        return {}
    return dict(line.split("=", 1) for line in _lines(config)
                if line.startswith("CONFIG_") and "=" in line)


def _index_modules(modules_dir: Path) -> dict[str, KernelModule]:
    index: dict[str, KernelModule] = {}
    for dirpath, _dirs, files in os.walk(modules_dir):
        for file in files:
            if file.endswith((".ko", *COMPRESSED_SUFFIXES)):
                source = Path(dirpath) / file
                rel = str(source.relative_to(modules_dir))
                for suffix in COMPRESSED_SUFFIXES:
                    rel = rel.removesuffix(suffix[3:])
                index.setdefault(_module_name(file), KernelModule(_module_name(file), rel,
                                                                  source))
    return index


def _read_modules_dep(modules_dir: Path) -> dict[str, list[str]] | None:
    """``modules.dep`` as name → dependency names; None when absent (a package tree:
    depmod writes it at installation, the package does not ship it)."""
    path = modules_dir / "modules.dep"
    if not path.is_file():
        return None
    deps = {}
    for line in _lines(path):
        module, _, rest = line.partition(":")
        deps[_module_name(module)] = [_module_name(d) for d in rest.split()]
    return deps


def _resolve_alias(alias: str, index: dict[str, KernelModule],
                   aliases: list[tuple[str, str]]) -> str | None:
    """The module providing ``alias``, preferring the architecture-independent one
    (crc32c_generic over crc32c_intel, which refuses CPUs without SSE4.2)."""
    import fnmatch

    if _norm(alias) in index:
        return _norm(alias)
    providers = [name for pattern, name in aliases if fnmatch.fnmatchcase(alias, pattern)]
    if not providers and alias.startswith("crypto-"):
        # No modules.alias in a package tree; crypto providers live in */crypto/.
        providers = [name for name, module in index.items() if "/crypto/" in module.rel
                     and alias in _modinfo(module.source).get("alias", [])]
    providers = [p for p in providers if p in index]
    providers.sort(key=lambda p: (not index[p].rel.startswith("kernel/crypto/"), p))
    return providers[0] if providers else None


def _read_module(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        if path.name.endswith(".ko.xz"):
            import lzma

            return lzma.decompress(data)
        if path.name.endswith(".ko.gz"):
            import gzip

            return gzip.decompress(data)
        if path.name.endswith(".ko.zst"):
            import zstandard

            return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))
    except OSError as e:
        raise HostError(f"cannot read module {path}: {e.strerror}") from e
    except Exception as e:
        raise MicroagentError(f"cannot decompress module {path}: {e}") from e
    return data


def _modinfo(path: Path) -> dict[str, list[str]]:
    """The ``.modinfo`` section of a module: key → values (``depends``, ``softdep``...)."""
    import struct

    data = _read_module(path)
    info: dict[str, list[str]] = {}
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise MicroagentError(f"module {path} is not a 64-bit ELF file")
    end = "<" if data[5] == 1 else ">"
    shoff, = struct.unpack_from(end + "Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x3A)
    sections = [struct.unpack_from(end + "IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    names_at = sections[shstrndx][4]
    for name_off, _type, _flags, _addr, offset, size, *_rest in sections:
        start = names_at + name_off
        if data[start:data.index(b"\0", start)] == b".modinfo":
            for item in data[offset:offset + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
    return info


# --- kernel images ---------------------------------------------------------------------


def bzimage_version(image: bytes) -> str | None:
    """The version string of an x86 bzImage ("6.1.0-56-amd64"), None if not a bzImage."""
    import struct

    if len(image) < 0x300 or image[0x202:0x206] != b"HdrS":
        return None
    offset = struct.unpack_from("<H", image, 0x20E)[0] + 0x200
    text = image[offset:offset + 256].split(b"\0")[0].decode(errors="replace")
    return text.split()[0] if text.split() else None


_PAYLOAD_MAGICS = {b"\xfd7zXZ\x00": "xz", b"\x1f\x8b\x08": "gzip", b"(\xb5/\xfd": "zstd",
                   b"BZh": "bzip2", b"\x5d\x00\x00": "lzma"}


def extract_vmlinux(image: bytes) -> bytes | None:
    """The uncompressed ELF inside a bzImage, as the kernel's ``extract-vmlinux`` finds it:
    the payload named by the setup header, else each compression magic in turn. None
    when the payload uses a compression Python lacks (lz4, lzo)."""
    import struct

    candidates = []
    if image[0x202:0x206] == b"HdrS" and struct.unpack_from("<H", image, 0x206)[0] >= 0x208:
        setup_sects = image[0x1F1] or 4
        payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
        start = (setup_sects + 1) * 512 + payload_offset
        candidates.append(image[start:start + payload_length])
    for magic in _PAYLOAD_MAGICS:
        at = image.find(magic)
        if at >= 0:
            candidates.append(image[at:])
    for payload in candidates:
        elf = _decompress_payload(payload)
        if elf is not None and elf[:4] == b"\x7fELF":
            return _trim_elf(elf)
    return None


def _decompress_payload(payload: bytes) -> bytes | None:
    import bz2
    import lzma
    import zlib

    kind = next((k for magic, k in _PAYLOAD_MAGICS.items() if payload.startswith(magic)), None)
    try:
        if kind == "xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        if kind == "lzma":
            return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
        if kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(payload)
        if kind == "zstd":
            import zstandard

            return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(payload))
    except (lzma.LZMAError, zlib.error, OSError, ValueError, EOFError):
        return None
    except Exception:  # zstandard.ZstdError has no common base with the others
        return None
    return None


def _trim_elf(elf: bytes) -> bytes:
    """Drop what follows the ELF file (the relocation table x86 appends to the payload)."""
    import struct

    if elf[4] != 2:
        return elf
    phoff, shoff = struct.unpack_from("<QQ", elf, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", elf, 0x36)
    end = shoff + shnum * shentsize
    for i in range(phnum):
        offset, _vaddr, _paddr, filesz = struct.unpack_from("<QQQQ", elf, phoff + i * phentsize + 8)
        end = max(end, offset + filesz)
    return elf[:end] if 0 < end <= len(elf) else elf
