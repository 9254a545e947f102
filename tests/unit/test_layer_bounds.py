"""What applying layers will not do: trust a layer its config does not describe, write
more than the target disk holds, nest deeper than MAX_DEPTH, read without end."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from microagent.disks.rootfs import build_root_disk
from microagent.errors import DiskTooSmallError, IntegrityError, UnsafeImageError
from microagent.images.layers import (
    MAX_DEPTH,
    READ_FACTOR,
    ExtractLimitError,
    LayerFile,
    apply_layers,
)
from microagent.images.tarstream import MAX_META_BYTES, MAX_TRAILER_BYTES
from tests.unit.test_layers import GZIP, PLAIN, ZSTD, E, compress, d, sym, tar_of

MIB = 1 << 20


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_file(path: Path, tar: bytes, how: str = "gzip", *, diff_id: str | None = None
               ) -> LayerFile:
    blob = compress(tar, how)
    path.write_bytes(blob)
    media_type = {"gzip": GZIP, "zstd": ZSTD, "none": PLAIN}[how]
    return LayerFile(path, media_type, sha256(blob), sha256(tar) if diff_id is None else diff_id)


def zeros_layer(path: Path, sizes: dict[str, int] | list[tuple[str, int]], *,
                diff_id: bool = False) -> LayerFile:
    """A gzip layer of files full of zeros, streamed (a 'zip bomb': tiny, huge unpacked).

    Each MiB of zeros is deflated once: with a full flush after it, every later MiB
    deflates to the same bytes (the window holds only zeros), so a GiB costs little.
    With ``diff_id``, the uncompressed stream is hashed too (that costs a pass)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(MIB)
    packer.compress(zeros)
    packer.flush(zlib.Z_FULL_FLUSH)
    same = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    crc, length = 0, 0
    tar = hashlib.sha256() if diff_id else None
    with path.open("wb") as out:
        out.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")

        def put(data: bytes) -> None:
            nonlocal crc, length
            crc, length = zlib.crc32(data, crc), length + len(data)
            if tar is not None:
                tar.update(data)
            out.write(packer.compress(data) + packer.flush(zlib.Z_FULL_FLUSH))

        for name, size in sizes.items() if isinstance(sizes, dict) else sizes:
            info = tarfile.TarInfo(name)
            info.size = size
            put(info.tobuf(tarfile.PAX_FORMAT))
            if size >= MIB:
                put(zeros)  # now the window holds zeros only
            for _ in range(size // MIB - 1):
                crc, length = zlib.crc32(zeros, crc), length + MIB
                if tar is not None:
                    tar.update(zeros)
                out.write(same)
            put(bytes(size % MIB + (-size % 512)))
        put(bytes(1024))
        out.write(packer.flush() + struct.pack("<II", crc, length & 0xFFFFFFFF))
    return LayerFile(path, GZIP, sha256(path.read_bytes()),
                     "sha256:" + tar.hexdigest() if tar is not None else "")


def staged_bytes(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


# --- diff_ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["gzip", "zstd", "none"])
def test_a_layer_must_match_its_diff_id(tmp_path: Path, how: str) -> None:
    genuine = tar_of([E("etc/os-release", data=b"genuine\n")])
    evil = tar_of([E("etc/os-release", data=b"evil\n")])
    (tmp_path / "ok").mkdir()
    tree = apply_layers([layer_file(tmp_path / "good", genuine, how)], tmp_path / "ok")
    assert tree.get("etc/os-release") is not None
    first = layer_file(tmp_path / "first", genuine, how)
    bad = layer_file(tmp_path / "bad", evil, how, diff_id=sha256(genuine))
    root = tmp_path / "staging"
    root.mkdir()
    with pytest.raises(IntegrityError) as info:
        apply_layers([first, bad], root)
    message = info.value.message
    assert f"layer 2/2 {bad.digest} does not match the image config" in message
    assert sha256(evil) in message and sha256(genuine) in message
    assert "nothing from it was cached" in info.value.hint


def test_a_mismatch_after_the_end_marker_is_caught(tmp_path: Path) -> None:
    """The digest covers the whole stream, also what follows the archive's end."""
    tar = tar_of([E("f", data=b"x")]) + b"\0" * 4096
    layer = layer_file(tmp_path / "l", tar, diff_id=sha256(tar[:-512]))
    (tmp_path / "s").mkdir()
    with pytest.raises(IntegrityError, match="does not match the image config"):
        apply_layers([layer], tmp_path / "s")


# --- depth ------------------------------------------------------------------------------


def test_nesting_deeper_than_max_depth_is_refused(tmp_path: Path) -> None:
    deep = "/".join(["d"] * (MAX_DEPTH + 1))
    layer = layer_file(tmp_path / "deep", tar_of([E(deep + "/f", data=b"x")]))
    root = tmp_path / "staging"
    root.mkdir()
    with pytest.raises(UnsafeImageError) as info:
        apply_layers([layer], root)
    assert f"is nested deeper than {MAX_DEPTH} directories" in info.value.message
    assert "layer 1/1" in info.value.message and "bytes)" in info.value.message  # shortened
    assert max(len(p.relative_to(root).parts) for p in root.rglob("*")) <= MAX_DEPTH


def test_depth_counts_the_real_path_through_symlinks(tmp_path: Path) -> None:
    half = "/".join(["d"] * (MAX_DEPTH // 2 + 1))
    entries = [d(half), sym("jump", half), E("jump/" + half.replace("d", "e") + "/f")]
    layer = layer_file(tmp_path / "l", tar_of(entries))
    (tmp_path / "s").mkdir()
    with pytest.raises(UnsafeImageError, match="nested deeper than"):
        apply_layers([layer], tmp_path / "s")


def test_max_depth_itself_is_fine(tmp_path: Path) -> None:
    path = "/".join(["d"] * (MAX_DEPTH - 1)) + "/f"
    layer = layer_file(tmp_path / "l", tar_of([E(path, data=b"x")]))
    (tmp_path / "s").mkdir()
    tree = apply_layers([layer], tmp_path / "s")
    assert tree.get(path) is not None


# --- size ------------------------------------------------------------------------------


def test_content_past_the_limit_is_measured_not_written(tmp_path: Path) -> None:
    layer = zeros_layer(tmp_path / "l", {"small": 2 * MIB, "zeros": 40 * MIB, "after": 1})
    root = tmp_path / "staging"
    root.mkdir()
    with pytest.raises(ExtractLimitError) as info:
        apply_layers([layer], root, max_bytes=16 * MIB)
    assert info.value.where == f"layer 1/1 {layer.digest} at entry 'zeros'"
    assert info.value.tree is not None  # read to the end: the caller can say how much
    assert info.value.tree.get("zeros").size == 40 * MIB  # type: ignore[union-attr]
    assert info.value.tree.get("after") is not None
    assert staged_bytes(root) <= 16 * MIB


def test_a_zip_bomb_stops_reading_too(tmp_path: Path) -> None:
    bomb = zeros_layer(tmp_path / "bomb", {"small": 2 * MIB, "zeros": 256 * MIB, "after": 1})
    assert bomb.path.stat().st_size < 2 * MIB
    root = tmp_path / "staging"
    root.mkdir()
    with pytest.raises(ExtractLimitError, match=f"more than {READ_FACTOR} times") as info:
        apply_layers([bomb], root, max_bytes=16 * MIB)
    assert info.value.where == f"layer 1/1 {bomb.digest} at entry 'zeros'"
    assert info.value.tree is None
    assert staged_bytes(root) <= 16 * MIB


def test_without_measuring_extraction_stops_at_the_entry(tmp_path: Path) -> None:
    bomb = zeros_layer(tmp_path / "bomb", {"zeros": 64 * MIB, "after": 1})
    (tmp_path / "s").mkdir()
    with pytest.raises(ExtractLimitError, match="at entry 'zeros' goes past the limit of "
                       "16 MiB; extraction stopped") as info:
        apply_layers([bomb], tmp_path / "s", max_bytes=16 * MIB, measure=False)
    assert info.value.tree is None
    assert not (tmp_path / "s" / "after").exists()


def test_rewriting_the_same_file_is_bounded_by_what_is_read(tmp_path: Path) -> None:
    """Live content stays small, but the work does not: READ_FACTOR times the limit."""
    bomb = zeros_layer(tmp_path / "bomb", [(f"again{i % 2}", 6 * MIB) for i in range(20)])
    (tmp_path / "s").mkdir()
    with pytest.raises(ExtractLimitError, match=f"more than {READ_FACTOR} times") as info:
        apply_layers([bomb], tmp_path / "s", max_bytes=16 * MIB)
    assert info.value.tree is None


def test_later_layers_that_delete_free_their_room(tmp_path: Path) -> None:
    lower = zeros_layer(tmp_path / "lower", {"big/a": 10 * MIB})
    upper = layer_file(tmp_path / "upper", tar_of([E("big/.wh.a"), E("small", data=b"1")]))
    again = zeros_layer(tmp_path / "again", {"big/b": 10 * MIB})
    (tmp_path / "s").mkdir()
    tree = apply_layers([lower, upper, again], tmp_path / "s", max_bytes=16 * MIB)
    assert tree.get("big/a") is None and tree.get("big/b") is not None


def test_hard_links_count_once(tmp_path: Path) -> None:
    entries = [E("a", data=bytes(6 * MIB)), *(E(f"l{i}", tarfile.LNKTYPE, link="a")
                                               for i in range(5))]
    layer = layer_file(tmp_path / "l", tar_of(entries))
    (tmp_path / "s").mkdir()
    apply_layers([layer], tmp_path / "s", max_bytes=8 * MIB)


# --- what the reader will not read ------------------------------------------------------------


def test_a_huge_pax_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    header = bytearray(tarfile.TarInfo("x").tobuf(tarfile.USTAR_FORMAT))
    header[156] = ord("x")
    header[124:136] = b"%011o\0" % (MAX_META_BYTES + 1)
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    tar = bytes(header) + bytes(2048)
    layer = layer_file(tmp_path / "l", tar)
    (tmp_path / "s").mkdir()
    with pytest.raises(IntegrityError, match="PAX or long-name header of"):
        apply_layers([layer], tmp_path / "s")


def test_data_after_the_end_marker_is_bounded(tmp_path: Path) -> None:
    tar = tar_of([E("f", data=b"x")]) + bytes(MAX_TRAILER_BYTES + MIB)
    blob = gzip.compress(tar, mtime=0)
    (tmp_path / "l").write_bytes(blob)
    layer = LayerFile(tmp_path / "l", GZIP, sha256(blob))
    (tmp_path / "s").mkdir()
    with pytest.raises(IntegrityError, match="follow the end of the archive"):
        apply_layers([layer], tmp_path / "s")


def test_no_limit_no_diff_id_is_as_before(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    buf = io.BytesIO(gzip.compress(tar_of([E("f", data=data)]), mtime=0))
    (tmp_path / "l").write_bytes(buf.getvalue())
    (tmp_path / "s").mkdir()
    apply_layers([LayerFile(tmp_path / "l", GZIP, "sha256:x")], tmp_path / "s")
    assert (tmp_path / "s" / "f").read_bytes() == data


# --- through build_root_disk: clear refusals, nothing left behind ------------------------------


def nested_tar(depth: int) -> bytes:
    """``depth`` nested directories with a file at the bottom, as a tar (streamed names)."""
    entries = [d("/".join(["n"] * level)) for level in range(1, depth + 1)]
    return tar_of([*entries, E("/".join(["n"] * depth) + "/f", data=b"x")])


def test_a_deeply_nested_layer_is_refused_and_leaves_no_staging(tmp_path: Path) -> None:
    """6,000 levels made mkfs.ext4 corrupt its heap and shutil.rmtree recurse too deep."""
    layer = layer_file(tmp_path / "deep", nested_tar(6000))
    dest, work = tmp_path / "out" / "root.ext4", tmp_path / "work"
    with pytest.raises(UnsafeImageError) as info:
        build_root_disk([layer], dest, size_mib=64, work_dir=work)
    assert f"nested deeper than {MAX_DEPTH} directories" in info.value.message
    assert f"layer 1/1 {layer.digest}" in info.value.message
    assert os.listdir(work) == [] and os.listdir(dest.parent) == []


def test_a_zip_bomb_image_stops_at_the_disk_size(tmp_path: Path) -> None:
    bomb = zeros_layer(tmp_path / "bomb", {"etc/x": 1, "zeros": 256 * MIB})
    dest, work = tmp_path / "out" / "root.ext4", tmp_path / "work"
    with pytest.raises(DiskTooSmallError) as info:
        build_root_disk([bomb], dest, size_mib=32, work_dir=work)
    message = info.value.message
    assert message.startswith("the image needs more than the disk's 32 MiB: ")
    assert f"layer 1/1 {bomb.digest} at entry 'zeros'" in message
    assert "--size-mib" in info.value.hint
    assert os.listdir(work) == [] and os.listdir(dest.parent) == []


def test_too_big_for_the_disk_still_says_how_much_is_needed(tmp_path: Path) -> None:
    layer = zeros_layer(tmp_path / "l", {"zeros": 40 * MIB, "etc/x": 1})
    dest, work = tmp_path / "out" / "root.ext4", tmp_path / "work"
    with pytest.raises(DiskTooSmallError, match=r"needs at least (\d+) MiB") as info:
        build_root_disk([layer], dest, size_mib=16, work_dir=work)
    needed = int(info.value.message.split("at least ")[1].split()[0])
    build_root_disk([layer], dest, size_mib=needed, work_dir=work)  # and that is enough
