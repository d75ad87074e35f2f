"""Frozen dataclasses passed between the pipeline's stages.

Stages (:mod:`node.stages.selection`, :mod:`node.stages.anonymize`, :mod:`node.stages.reports`, ...)
take and return these; none of them touches the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ArchivedSeries", "SelectedSeries", "SeriesCandidate", "StoredInstance", "StoredStudy"]


@dataclass(frozen=True)
class StoredInstance:
    """One instance as the node stored it (file under the storage root)."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class StoredStudy:
    """Every stored instance of one study, as the database lists them."""

    study_instance_uid: str
    instances: tuple[StoredInstance, ...]


@dataclass(frozen=True)
class SeriesCandidate:
    """How series selection judged one series of the study."""

    series_instance_uid: str
    series_number: int | None
    description: str
    slices: int
    slice_thickness_mm: float | None
    kernel: str | None
    kernel_class: str
    """``smooth``, ``sharp`` or ``unknown`` (from the kernel table or measured noise)."""
    noise_hu: float | None
    eligible: bool
    reason: str
    """Why the series is (not) eligible, in words."""


@dataclass(frozen=True)
class SelectedSeries:
    """The series chosen for analysis and the reason, for the study's record."""

    study_instance_uid: str
    series_instance_uid: str
    paths: tuple[Path, ...]
    reason: str
    candidates: tuple[SeriesCandidate, ...] = field(default=())


@dataclass(frozen=True)
class ArchivedSeries:
    """The de-identified copy of a selected series in the archive."""

    directory: Path
    paths: tuple[Path, ...]
    uid_map: dict[str, str]
    """Original UID to de-identified UID, for every UID replaced (study, series,
    instances, frame of reference, ...)."""
    profile: str
    """Name of the confidentiality profile and options applied."""
