"""Importers of public chest CT datasets as training material: MosMedData and COV19-CT-DB.

Each scan becomes a :class:`node.db.LearnStudy` (origin ``mosmed`` or
``cov19ctdb``; pseudonymous IDs from the dataset's own file or folder names,
prefixed, e.g. ``mosmed:study_0001``; every scan is its own patient, since
neither layout says which scans share one), a :class:`node.db.LabelEvent`
(source ``import``, actor the dataset and file, ``source_ref`` so a second
import adds nothing) and its cached tensor (:mod:`node.learn.tensors`), computed
here from the dataset's own files since they are not in the node's archive
(a new label event of a scan recomputes it, so a new ``--hu-window`` takes effect).

Entries that cannot be used are skipped with a reason (:class:`ImportReport`);
each imported study is committed on its own, so an interrupted import resumes
where it stopped.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from model.errors import AnalysisError
from model.volume import CTVolume
from node.db import LabelEvent, LabelSource, LabelValue, LearnStudy
from node.errors import DatasetError
from node.learn.tensors import preprocessing_params, write_tensor
from node.settings import Settings

__all__ = ["COV19_SEVERITY", "DEFAULT_HU_WINDOW", "MOSMED_CATEGORIES", "ImportReport",
           "import_cov19ctdb", "import_mosmed"]

logger = logging.getLogger(__name__)

MOSMED_CATEGORIES: dict[str, LabelValue] = {
    "CT-0": LabelValue.NON_COVID, "CT-1": LabelValue.MILD, "CT-2": LabelValue.MODERATE,
    "CT-3": LabelValue.SEVERE, "CT-4": LabelValue.CRITICAL,
}
COV19_SEVERITY: dict[str, LabelValue] = {
    "1": LabelValue.MILD, "2": LabelValue.MODERATE, "3": LabelValue.SEVERE, "4": LabelValue.CRITICAL,
}
DEFAULT_HU_WINDOW = (-1150.0, 350.0)
"""The lung window COV19-CT-DB's 8-bit slices are taken to span (0 -> low, 255 -> high)."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class ImportReport:
    """What an import did: studies added, already present, and entries skipped with reasons."""

    dataset: str
    added: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"dataset": self.dataset, "added": len(self.added), "existing": len(self.existing),
                "skipped": [{"entry": e, "reason": r} for e, r in self.skipped], "notes": self.notes}


def _add(session: Session, settings: Settings, report: ImportReport, *, origin: str, pseudo: str,
         entry: str, source_path: str, value: LabelValue, actor: str, source_ref: str, reason: str,
         volume: Callable[[], CTVolume]) -> None:
    """One scan: study row, label event and tensor, unless the same label was imported before."""
    study = session.scalars(select(LearnStudy).where(LearnStudy.pseudo_study_uid == pseudo)).first()
    if study is not None:
        seen = session.scalars(select(LabelEvent.id).where(LabelEvent.learn_study_id == study.id,
                                                           LabelEvent.source_ref == source_ref)).first()
        if seen is not None:
            report.existing.append(pseudo)
            return
    try:  # always recomputed: a new event may come with a new HU mapping of the same scan
        write_tensor(settings, pseudo, volume(), preprocessing_params())
    except (DatasetError, AnalysisError, OSError, ValueError, RuntimeError) as exc:
        report.skipped.append((entry, str(exc)))
        return
    if study is None:
        study = LearnStudy(origin=origin, pseudo_study_uid=pseudo, pseudo_patient_id=pseudo,
                           source_path=source_path)
        session.add(study)
        session.flush()
    last = session.scalars(select(LabelEvent).where(LabelEvent.learn_study_id == study.id)
                           .order_by(LabelEvent.at.desc(), LabelEvent.id.desc()).limit(1)).first()
    session.add(LabelEvent(learn_study_id=study.id, value=value, source=LabelSource.IMPORT,
                           actor=actor[:128], reason=reason, source_ref=source_ref[:200],
                           supersedes_id=last.id if last is not None else None))
    session.commit()
    report.added.append(pseudo)


# ---------------------------------------------------------------- MosMedData

def _nifti_volume(path: Path, pseudo: str) -> CTVolume:
    """A NIfTI CT in HU as a :class:`CTVolume` (SimpleITK gives z, y, x arrays in LPS geometry)."""
    import SimpleITK as sitk  # type: ignore[import-untyped]

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DatasetError(f"{path.name} cannot be read as NIfTI: {str(exc).strip().splitlines()[-1]}") \
            from exc
    if image.GetDimension() != 3:
        raise DatasetError(f"{path.name} is {image.GetDimension()}D, not a 3D CT volume")
    array = sitk.GetArrayFromImage(image)  # (z, y, x): NumPy reverses ITK's (x, y, z) index order
    hu = array.astype(np.int16) if np.issubdtype(array.dtype, np.integer) else array.astype(np.float32)
    sx, sy, sz = (float(v) for v in image.GetSpacing())
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    ox, oy, oz = (float(v) for v in image.GetOrigin())
    return CTVolume(hu=hu, spacing=(sz, sy, sx), origin=(ox, oy, oz), direction=direction,
                    series_instance_uid=pseudo,
                    sop_instance_uids=tuple(f"{pseudo}#{i}" for i in range(hu.shape[0])),
                    slice_thickness=sz)


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _registry(directory: Path, report: ImportReport) -> dict[str, str] | None:
    """``dataset_registry.csv``'s category per study file stem, when the dataset ships one."""
    path = next((p for p in (directory / "dataset_registry.csv", directory / "studies" /
                             "dataset_registry.csv") if p.is_file()), None)
    if path is None:
        return None
    out: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "study_file" not in reader.fieldnames \
                or "category" not in reader.fieldnames:
            report.notes.append(f"{path.name} has no study_file and category columns; not cross-checked")
            return None
        for row in reader:
            stem = _nifti_stem(Path((row.get("study_file") or "").strip()))
            if stem:
                out[stem] = (row.get("category") or "").strip()
    return out


def import_mosmed(session: Session, settings: Settings, directory: Path) -> ImportReport:
    """Import MosMedData: ``studies/CT-0..CT-4/study_NNNN.nii.gz``, optional lesion ``masks/``.

    CT-0 is non-covid, CT-1..CT-4 mild..critical.  A ``dataset_registry.csv``
    (columns ``study_file``, ``category``) is cross-checked: a study whose folder
    and registry category disagree is skipped.  Lesion masks
    (``masks/study_NNNN_mask.nii.gz``) are recorded in the label event's reason;
    they are not lung masks and are not used for the input.

    Raises
    ------
    DatasetError
        ``directory`` has no ``studies/CT-*`` folders.
    """
    directory = Path(directory)
    studies = directory / "studies"
    folders = sorted(p for p in studies.glob("CT-*") if p.is_dir()) if studies.is_dir() else []
    if not folders:
        raise DatasetError(f"{directory} is not a MosMedData folder: expected studies/CT-0 ... "
                           "studies/CT-4 with .nii.gz files")
    report = ImportReport("MosMedData")
    registry = _registry(directory, report)
    masks = directory / "masks"
    for folder in folders:
        value = MOSMED_CATEGORIES.get(folder.name)
        files = sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii")))
        if value is None:
            report.skipped.extend((f"studies/{folder.name}/{p.name}",
                                   f"unknown category folder {folder.name} (CT-0..CT-4)") for p in files)
            continue
        for path in files:
            rel = path.relative_to(directory).as_posix()
            stem = _nifti_stem(path)
            if registry is not None:
                listed = registry.get(stem)
                if listed is None:
                    report.notes.append(f"{rel} is not in dataset_registry.csv")
                elif listed != folder.name:
                    report.skipped.append((rel, f"dataset_registry.csv says {listed} but the file is "
                                                f"in {folder.name}; fix the copy of the dataset"))
                    continue
            mask = next((m for m in (masks / f"{stem}_mask.nii.gz", masks / f"{stem}_mask.nii")
                         if m.is_file()), None)
            reason = f"MosMedData category {folder.name}" + (
                f"; lesion mask {mask.relative_to(directory).as_posix()}" if mask else "; no lesion mask")
            pseudo = f"mosmed:{stem}"
            _add(session, settings, report, origin="mosmed", pseudo=pseudo, entry=rel, source_path=str(path),
                 value=value, actor=f"MosMedData:{rel}", source_ref=f"mosmed:{rel}", reason=reason,
                 volume=lambda p=path, s=pseudo: _nifti_volume(p, s))  # type: ignore[misc]
    return report


# ---------------------------------------------------------------- COV19-CT-DB

def _class_of(parts: tuple[str, ...]) -> LabelValue | None:
    """covid / non-covid from a path's folder names (``non-covid``, ``non_covid``, ``noncovid``)."""
    for part in reversed(parts):
        key = re.sub(r"[^a-z]", "", part.lower())
        if key == "noncovid":
            return LabelValue.NON_COVID
        if key == "covid":
            return LabelValue.COVID_UNKNOWN
    return None


def _severity_tables(directory: Path, report: ImportReport) -> list[tuple[str | None, dict[str, str]]]:
    """Severity CSVs (columns ``Name``, ``Category`` 1-4) with the split they apply to.

    A CSV whose name mentions ``val`` applies to scans under a ``val*`` folder,
    one that mentions ``train`` to scans under ``train*``; otherwise to all.
    """
    tables: list[tuple[str | None, dict[str, str]]] = []
    for path in sorted(directory.rglob("*.csv")):
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = {f.strip().lower(): f for f in reader.fieldnames or []}
            if "name" not in fields or "category" not in fields:
                report.notes.append(f"{path.relative_to(directory)} has no Name and Category "
                                    "columns; ignored")
                continue
            rows = {(r.get(fields["name"]) or "").strip(): (r.get(fields["category"]) or "").strip()
                    for r in reader}
        stem = path.stem.lower()
        scope = "val" if "val" in stem else "train" if "train" in stem else None
        tables.append((scope, {k: v for k, v in rows.items() if k}))
    return tables


def _slices(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    bad = [p.name for p in files if not p.stem.isdigit()]
    if bad:
        raise DatasetError(f"slice files must be named by number (0.jpg, 1.jpg ...); found {bad[0]}")
    return sorted(files, key=lambda p: int(p.stem))


def _jpeg_volume(folder: Path, pseudo: str, window: tuple[float, float], slice_mm: float,
                 fov_mm: float) -> CTVolume:
    """8-bit slices mapped linearly to HU over ``window``; geometry assumed (JPEGs carry none)."""
    from PIL import Image

    files = _slices(folder)
    planes = []
    for path in files:
        with Image.open(path) as im:
            planes.append(np.asarray(im.convert("L"), dtype=np.float32))
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        raise DatasetError(f"slices of different sizes {sorted(shapes)}")
    low, high = window
    hu = (np.stack(planes) * ((high - low) / 255.0) + low).astype(np.float32)
    pixel = fov_mm / planes[0].shape[1]
    return CTVolume(hu=hu, spacing=(slice_mm, pixel, pixel), origin=(0.0, 0.0, 0.0),
                    direction=np.eye(3), series_instance_uid=pseudo,
                    sop_instance_uids=tuple(f"{pseudo}#{p.stem}" for p in files),
                    slice_thickness=slice_mm)


def import_cov19ctdb(session: Session, settings: Settings, directory: Path, *,
                     hu_window: tuple[float, float] = DEFAULT_HU_WINDOW, slice_mm: float = 2.5,
                     fov_mm: float = 350.0) -> ImportReport:
    """Import COV19-CT-DB: one folder of numbered slice images per scan, covid/non-covid folders.

    Layout: ``<split>/covid/<scan>/0.jpg ...`` and ``<split>/non-covid/<scan>/...``
    (any depth; the nearest ``covid`` / ``non-covid`` folder name decides).  Severity
    CSVs (columns ``Name`` = scan folder name, ``Category`` 1-4 = mild..critical)
    label covid scans; covid scans without one are ``covid-unknown``.  Slices are
    8-bit images, not HU: 0..255 is mapped linearly to ``hu_window`` (default the
    lung window -1150..350 HU), slices ordered by their numeric file name; JPEGs
    carry no geometry, so ``slice_mm`` and a field of view of ``fov_mm`` are
    assumed.  The mapping is written into each label event's reason.

    Raises
    ------
    DatasetError
        No scan folders found, or a window whose low end is not below the high end.
    """
    directory = Path(directory)
    low, high = (float(v) for v in hu_window)
    if not low < high:
        raise DatasetError(f"HU window {low:g}..{high:g}: the low end must be below the high end")
    if not directory.is_dir():
        raise DatasetError(f"{directory} is not a folder")
    report = ImportReport("COV19-CT-DB")
    scans = sorted({p.parent for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                    and p.is_file()})
    if not scans:
        raise DatasetError(f"{directory} holds no slice images; expected COV19-CT-DB's "
                           "<split>/covid/<scan>/0.jpg ... and <split>/non-covid/<scan>/...")
    tables = _severity_tables(directory, report)
    mapping = (f"8-bit slices mapped to HU {low:g}..{high:g}; assumed {slice_mm:g} mm slices, "
               f"{fov_mm:g} mm field of view")
    for folder in scans:
        rel = folder.relative_to(directory)
        rel_text = rel.as_posix()
        cls = _class_of(rel.parts[:-1])
        if cls is None:
            report.skipped.append((rel_text, "not under a covid or non-covid folder"))
            continue
        top = rel.parts[0].lower() if len(rel.parts) > 1 else ""
        categories = {t[folder.name] for scope, t in tables if folder.name in t
                      and (scope is None or top.startswith(scope))}
        value, note = cls, "covid, severity not given" if cls is LabelValue.COVID_UNKNOWN else "non-covid"
        if categories:
            if len(categories) > 1:
                report.skipped.append((rel_text, f"severity CSVs disagree: categories {sorted(categories)}"))
                continue
            category = categories.pop()
            if category not in COV19_SEVERITY:
                report.skipped.append((rel_text, f"severity category {category!r} is not 1-4"))
                continue
            if cls is LabelValue.NON_COVID:
                report.skipped.append((rel_text, f"a non-covid scan with severity {category}; "
                                                 "the dataset contradicts itself"))
                continue
            value, note = COV19_SEVERITY[category], f"severity category {category}"
        pseudo = f"cov19ctdb:{rel_text}"
        _add(session, settings, report, origin="cov19ctdb", pseudo=pseudo, entry=rel_text,
             source_path=str(folder), value=value, actor=f"COV19-CT-DB:{rel_text}",
             source_ref=f"cov19ctdb:{rel_text}:{value}:{low:g}..{high:g}",
             reason=f"COV19-CT-DB {note}; {mapping}",
             volume=lambda f=folder, s=pseudo: _jpeg_volume(  # type: ignore[misc]
                 f, s, (low, high), slice_mm, fov_mm))
    return report
