"""Archived studies for the retraining tests, without a running node.

:func:`archive_study` writes a small synthetic chest CT study into the storage
root, records it as a complete study (the rows the SCP and the worker would
have written) and archives it through :func:`node.pipeline.archive_series`, the
worker's own public step; what comes out is what the node's archive holds.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.db import Instance, Series, Study, StudyState, UidMapping
from node.pipeline import NodeContext, archive_series
from node.records import SelectedSeries
from node.settings import Settings
from training.synth import SynthSpec, write_study


@dataclass(frozen=True)
class ArchivedStudy:
    study_id: int
    study_uid: str
    """Original Study Instance UID."""
    accession_number: str
    anon_study_uid: str
    """The de-identified Study Instance UID (the archive's folder name)."""
    anon_patient_id: str
    """The de-identified Patient ID in the archived files."""
    involvement: float


def archive_study(settings: Settings, sessions: sessionmaker[Session], *, seed: int,
                  patient_id: str, involvement: float = 0.1, accession: str | None = None,
                  rows: int = 64, slices: int = 40) -> ArchivedStudy:
    """Write, record and archive one synthetic study of patient ``patient_id``."""
    accession = accession or f"ACC{seed:06d}"
    spec = SynthSpec(seed=seed, involvement=involvement, rows=rows, slices=slices,
                     slice_thickness_mm=5.0, patient_id=patient_id, accession_number=accession)
    work = settings.storage.root.parent / "synth" / f"s{seed}"
    synth = write_study(work, spec)
    rel_dir = Path("instances") / synth.study_instance_uid / synth.series_instance_uid
    dest = settings.storage.root / rel_dir
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    with sessions() as session:
        study = Study(study_instance_uid=synth.study_instance_uid, state=StudyState.COMPLETE,
                      instance_count=len(synth.paths), analysed_instance_count=len(synth.paths),
                      selected_series_uid=synth.series_instance_uid)
        session.add(study)
        session.flush()
        series = Series(study_id=study.id, series_instance_uid=synth.series_instance_uid,
                        modality="CT", instance_count=len(synth.paths))
        session.add(series)
        session.flush()
        for src in synth.paths:
            ds = pydicom.dcmread(src, stop_before_pixels=True)
            target = dest / f"{ds.SOPInstanceUID}.dcm"
            shutil.copyfile(src, target)
            paths.append(target)
            session.add(Instance(series_id=series.id, study_id=study.id,
                                 sop_instance_uid=str(ds.SOPInstanceUID),
                                 sop_class_uid=str(ds.SOPClassUID),
                                 transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                                 path=(rel_dir / target.name).as_posix(),
                                 size_bytes=target.stat().st_size, calling_ae="TEST"))
        session.commit()
        study_id = study.id
    ctx = NodeContext(settings=settings, sessions=sessions, owner="test")
    selected = SelectedSeries(synth.study_instance_uid, synth.series_instance_uid, tuple(paths), "test")
    if not archive_series(ctx, study_id, f"study {study_id}", selected, {}):
        raise AssertionError(f"study {study_id} was not archived")
    with sessions() as session:
        anon = session.scalars(select(UidMapping.anonymized_uid).where(
            UidMapping.study_id == study_id,
            UidMapping.original_uid == synth.study_instance_uid)).one()
    archived = next((settings.archive_root / anon).rglob("*.dcm"))
    anon_patient = str(pydicom.dcmread(archived, stop_before_pixels=True).PatientID)
    return ArchivedStudy(study_id=study_id, study_uid=synth.study_instance_uid,
                         accession_number=accession, anon_study_uid=anon,
                         anon_patient_id=anon_patient, involvement=involvement)
