"""One file per instance under the storage root, written atomically.

Paths are built from UIDs only after :func:`validate_uid` has accepted them, so
a dataset cannot steer a write outside the storage root.  Files are written to
a temporary name in the destination folder, flushed and renamed: a crash never
leaves a half-written file under a real name.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from node.errors import StorageError

__all__ = ["InstanceStore", "StoredFile", "atomic_write", "validate_uid"]

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
    """

    def __init__(self, root: Path, *, min_free_mb: int = 500, fsync: bool = True) -> None:
        self.root = root
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self.fsync = fsync

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

    def absolute(self, relative_path: str) -> Path:
        path = (self.root / relative_path).resolve()
        if self.root.resolve() not in path.parents:
            raise StorageError(f"path {relative_path!r} is outside the storage root")
        return path
