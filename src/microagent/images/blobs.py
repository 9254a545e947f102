"""The content-addressed blob cache shared by all workspaces.

A blob enters ``images/blobs/sha256/<hex>`` only after its bytes were hashed and matched
the digest (and size) it was asked for. Each writer streams into its own temporary file
in the same directory and renames it into place, so two processes pulling the same image
at once both succeed, and nobody ever sees a partial or unverified blob under a digest.
The temporary files (``.incoming-*``) are :mod:`microagent.staging` entries: a killed
pull's are swept by the next command.
A host file system that fills up meanwhile is a HostError naming it and its free space;
the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from microagent.errors import IntegrityError, NotFoundError
from microagent.layout import StateLayout
from microagent.staging import Staged, stage_file
from microagent.store import ensure_dir, is_no_space, write_error

DIGEST_PATTERN = re.compile(r"sha256:[a-f0-9]{64}")
INCOMING_PREFIX = ".incoming-"

ProgressCallback = Callable[[int], None]


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a sha256 digest we can address, else raise."""
    if not DIGEST_PATTERN.fullmatch(digest):
        raise IntegrityError(f"unsupported or malformed digest {digest!r}")
    return digest


class BlobStore:
    """Verified blobs by digest, under one state directory."""

    def __init__(self, layout: StateLayout) -> None:
        self.layout = layout

    def path(self, digest: str) -> Path:
        """Where ``digest`` lives (whether or not it is there)."""
        return self.layout.blob_path(check_digest(digest))

    def has(self, digest: str) -> bool:
        """True when the verified blob is in the cache."""
        return self.path(digest).is_file()

    def read_bytes(self, digest: str) -> bytes:
        """A cached blob's content (for manifests and configs, which are small)."""
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in the image cache") from None

    def ingest(
        self,
        digest: str,
        chunks: Iterable[bytes],
        *,
        size: int | None = None,
        source: str = "",
        on_progress: ProgressCallback | None = None,
    ) -> Path:
        """Stream ``chunks`` into the cache as ``digest``; verify before it becomes visible.

        ``size`` (when known) is checked too; ``source`` names where the bytes came from
        for error messages. On any mismatch nothing is left behind.
        """
        target = self.path(digest)
        directory = ensure_dir(target.parent)
        with _incoming(directory, f"cannot store blob {digest}{_from(source)}") as incoming:
            hasher = hashlib.sha256()
            received = 0
            with os.fdopen(incoming.fd, "wb", closefd=False) as f:
                for chunk in chunks:
                    hasher.update(chunk)
                    f.write(chunk)
                    received += len(chunk)
                    if size is not None and received > size:
                        raise IntegrityError(
                            f"blob {digest}{_from(source)} is larger than its declared "
                            f"size of {size} bytes"
                        )
                    if on_progress is not None:
                        on_progress(len(chunk))
                f.flush()
                os.fsync(f.fileno())
            if size is not None and received != size:
                raise IntegrityError(
                    f"blob {digest}{_from(source)} is truncated: got {received} of {size} bytes"
                )
            actual = "sha256:" + hasher.hexdigest()
            if actual != digest:
                raise IntegrityError(
                    f"digest mismatch for blob {digest}{_from(source)}: content hashes to "
                    f"{actual}",
                    hint="the registry or archive served corrupt or tampered content; "
                    "nothing was cached",
                )
            incoming.replace(target)
        return target

    def ingest_computed(self, chunks: Iterable[bytes], *, source: str = "") -> str:
        """Stream ``chunks`` into the cache under the digest they hash to; return it.

        For content whose digest is not known in advance (legacy ``docker save`` layers);
        the caller checks the result against what it expects (the config's diff_ids).
        """
        directory = ensure_dir(self.layout.blobs_dir)
        with _incoming(directory, f"cannot store a layer{_from(source)}") as incoming:
            hasher = hashlib.sha256()
            with os.fdopen(incoming.fd, "wb", closefd=False) as f:
                for chunk in chunks:
                    hasher.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            digest = "sha256:" + hasher.hexdigest()
            incoming.replace(self.path(digest))
        return digest

    def ingest_file(self, digest: str, path: Path, *, size: int | None = None) -> Path:
        """Copy a local file into the cache as ``digest``, verifying it."""
        if self.has(digest):
            return self.path(digest)
        with path.open("rb") as f:
            return self.ingest(digest, iter(lambda: f.read(1 << 20), b""), size=size,
                               source=str(path))

    def remove(self, digest: str) -> None:
        """Remove a blob if present."""
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()

    def digests(self) -> list[str]:
        """Every digest in the cache."""
        directory = self.layout.blobs_dir
        if not directory.is_dir():
            return []
        return sorted(
            f"sha256:{p.name}" for p in directory.iterdir() if not p.name.startswith(".")
        )


@contextlib.contextmanager
def _incoming(directory: Path, doing: str) -> Iterator[Staged]:
    """A staging file for a blob (swept if the pull is killed); a host file system that
    fills up meanwhile is reported as such, its free space measured before the cleanup."""
    with stage_file(directory, INCOMING_PREFIX) as incoming:
        try:
            yield incoming
        except OSError as e:
            if is_no_space(e):
                raise write_error(e, doing, directory) from e
            raise


def _from(source: str) -> str:
    return f" from {source}" if source else ""
