"""One file per instance under the storage root, written atomically.

Paths are built from UIDs only after :func:`validate_uid` has accepted them, so
a dataset cannot steer a write outside the storage root.  Files are written to
a temporary name in the destination folder, flushed and renamed: a crash never
leaves a half-written file under a real name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from node.errors import StorageError

__all__ = ["InflateLimitError", "InstanceStore", "OverwritePolicy", "StoredFile", "atomic_write",
           "inflate_bounded", "validate_uid"]

OverwritePolicy = Literal["keep-first", "replace"]

_LOCK_STRIPES = 64
_COMPARE_CHUNK = 1 << 20
_INFLATE_CHUNK = 1 << 20

logger = logging.getLogger(__name__)

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_UID_RE_LENIENT = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def validate_uid(value: object, what: str) -> str:
    """Return ``value`` as a UID string or raise :class:`StorageError`.

    A UID is digits and dots, at most 64 characters.  Leading zeros in a
    component (not allowed by PS3.5 but common in the wild) are accepted;
    anything else (slashes, letters, ``..``) is refused.
    """
    text = str(value).strip().rstrip("\x00") if value is not None else ""
    if not text:
        raise StorageError(f"{what} is missing")
    if len(text) > 64 or not _UID_RE_LENIENT.match(text):
        shown = text[:80].encode("unicode_escape").decode("ascii")
        raise StorageError(f"{what} {shown!r} is not a valid UID (digits and dots, at most 64)")
    if not _UID_RE.match(text):
        logger.debug("%s %s has leading zeros in a component", what, text)
    return text


def atomic_write(path: Path, data: bytes | Sequence[bytes | memoryview], *,
                 fsync: bool = True) -> int:
    """Write ``data`` (bytes, or buffers written in order) to ``path`` through a
    temporary file in the same folder and a rename; returns the size.

    ``fsync``: the data is flushed before the rename, and the folder after it,
    so both the contents and the name survive a power loss once this returns
    (the folder's flush costs about 0.1 ms on the development VM's ext4).
    """
    parts = [data] if isinstance(data, bytes) else list(data)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        size = 0
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    n = os.write(fd, view)
                    size += n
                    view = view[n:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if fsync:
            _fsync_folder(path.parent)
        return size
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class InflateLimitError(ValueError):
    """A deflated data set inflates to more than the configured bound."""


def inflate_bounded(data: bytes | memoryview, limit: int) -> bytes:
    """Inflate a raw deflate stream (Deflated Explicit VR Little Endian) of at most ``limit`` bytes.

    zlib's ``decompressobj().decompress(data, max_length)`` hands the output over in 1 MiB pieces,
    so a "bomb" (1 MB that inflates to 1 GiB) is refused once ``limit`` is passed, having held
    no more than ``limit`` bytes.

    Raises
    ------
    InflateLimitError
        The stream inflates to more than ``limit`` bytes.
    zlib.error
        The stream is not valid deflate data.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pending: bytes | memoryview = data
    while True:
        piece = inflater.decompress(pending, _INFLATE_CHUNK)
        out += piece
        if len(out) > limit:
            raise InflateLimitError(f"inflates to more than {limit // (1024 * 1024)} MB")
        pending = inflater.unconsumed_tail
        if inflater.eof or (not pending and not piece):
            break
    out += inflater.flush()
    if len(out) > limit:
        raise InflateLimitError(f"inflates to more than {limit // (1024 * 1024)} MB")
    return bytes(out)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StoredFile:
    relative_path: str
    size_bytes: int


class InstanceStore:
    """Instances under ``root/instances/<study>/<series>/<sop>.dcm``.

    Parameters
    ----------
    root:
        The storage root (instances, results and archive live under it).
    min_free_mb:
        :meth:`has_space` is false when less than this is free on the file system.
    fsync:
        Flush each file to the device before acknowledging it (survives power
        loss, not only a process crash).
    overwrite:
        What a differing resend of a stored SOP Instance UID does: ``keep-first``
        keeps the stored file, ``replace`` replaces it (``[storage] overwrite``).
    max_inflated_mb:
        Largest deflated data set, once inflated, that is accepted.
    """

    def __init__(self, root: Path, *, min_free_mb: int = 500, fsync: bool = True,
                 overwrite: OverwritePolicy = "keep-first", max_inflated_mb: int = 256) -> None:
        if overwrite not in ("keep-first", "replace"):
            raise ValueError(f"overwrite must be keep-first or replace, not {overwrite!r}")
        self.root = root
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self.fsync = fsync
        self.overwrite: OverwritePolicy = overwrite
        self.max_inflated_bytes = max_inflated_mb * 1024 * 1024
        self._locks = tuple(threading.Lock() for _ in range(_LOCK_STRIPES))

    def lock_for(self, sop_uid: str) -> threading.Lock:
        """The lock that serialises the receipt of one SOP Instance UID (one of 64 stripes):
        two associations storing the same instance at once neither both write nor both record it."""
        return self._locks[hash(sop_uid) % _LOCK_STRIPES]

    def same_content(self, relative_path: str, data: Sequence[bytes | memoryview]) -> bool:
        """Whether the stored file holds exactly the bytes of ``data`` (its parts in order);
        compared in 1 MiB pieces, after the sizes."""
        path = self.absolute(relative_path)
        parts = [memoryview(p) for p in data]
        try:
            if path.stat().st_size != sum(p.nbytes for p in parts):
                return False
            with path.open("rb") as f:
                for part in parts:
                    for start in range(0, part.nbytes, _COMPARE_CHUNK):
                        piece = part[start:start + _COMPARE_CHUNK]
                        if f.read(piece.nbytes) != piece:
                            return False
        except FileNotFoundError:
            return False
        return True

    def free_bytes(self) -> int:
        probe = self.root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return shutil.disk_usage(probe).free

    def has_space(self) -> bool:
        return self.free_bytes() >= self.min_free_bytes

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        study = validate_uid(study_uid, "Study Instance UID")
        series = validate_uid(series_uid, "Series Instance UID")
        sop = validate_uid(sop_uid, "SOP Instance UID")
        return f"instances/{study}/{series}/{sop}.dcm"

    def write(self, study_uid: str, series_uid: str, sop_uid: str,
              data: bytes | Sequence[bytes | memoryview]) -> StoredFile:
        """Store one encoded instance (part-10 bytes, or its parts) atomically."""
        rel = self.relative_path(study_uid, series_uid, sop_uid)
        size = atomic_write(self.root / rel, data, fsync=self.fsync)
        return StoredFile(relative_path=rel, size_bytes=size)

    def keep_resend(self, relative_path: str, data: Sequence[bytes | memoryview]) -> str:
        """Keep a differing resend of a stored instance beside it, without replacing it.

        ``keep-first`` acknowledges such a resend (as Orthanc does), so its bytes must not be
        lost: they go to ``<stored name>.resend-<sha256 prefix>`` in the same folder (never
        read as an instance; purged with the study's originals).  Returns its relative path.
        """
        digest = hashlib.sha256()
        for part in data:
            digest.update(part)
        rel = f"{relative_path}.resend-{digest.hexdigest()[:16]}"
        atomic_write(self.absolute(rel), data, fsync=self.fsync)
        return rel

    def absolute(self, relative_path: str) -> Path:
        path = (self.root / relative_path).resolve()
        if self.root.resolve() not in path.parents:
            raise StorageError(f"path {relative_path!r} is outside the storage root")
        return path
