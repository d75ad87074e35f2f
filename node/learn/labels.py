"""Severity labels of archived studies, recorded as an append-only history.

Every change is a new :class:`node.db.LabelEvent` that names the event it
supersedes (the study's latest one); a retraction is an event without a value.
Nothing is updated or deleted, so the label of any study at any earlier moment
can be recomputed (:mod:`node.learn.history`), which keeps frozen datasets
reproducible.  Each change also gets an :class:`node.db.AuditEntry`.

Labels apply to archived (de-identified) studies only: the training data is the
archive, never the original instances.  A study is named by a *key*: its
original Study Instance UID, its de-identified Study UID, its accession number
(read from one of its stored original instances: the database never holds
accession numbers), or, for studies imported from public datasets, their
pseudonymous study UID.  Nothing is guessed: a key that matches nothing, or
more than one study, is a :class:`node.errors.LabelError` that says so.

Repeats add nothing: setting the value a study already has from the same kind of
source (CLI, CSV, DICOM ...) returns ``None``, and so does a carrier seen before
(the same CSV file, the same SR instance), so imports and re-sent SRs can be
repeated safely.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.db import (
    AuditEntry,
    Instance,
    LabelEvent,
    LabelSource,
    LabelValue,
    LearnStudy,
    ResultObject,
    Study,
    UidMapping,
    utcnow,
)
from node.errors import LabelError
from node.learn.history import latest_event
from node.learn.sr_labels import SrLabel
from node.settings import Settings

__all__ = [
    "ImportReport",
    "ImportedRow",
    "LabelRecorder",
    "StudyResolver",
    "UnmatchedRow",
    "history",
    "import_csv",
    "parse_value",
    "record_sr_label",
    "resolve_study",
    "retract_label",
    "set_label",
]

logger = logging.getLogger(__name__)

ALLOWED = ", ".join(v.value for v in LabelValue)


def parse_value(text: str | LabelValue) -> LabelValue:
    """``text`` as a label value (case and surrounding blanks ignored); an error lists the allowed."""
    if isinstance(text, LabelValue):
        return text
    try:
        return LabelValue(text.strip().lower())
    except ValueError:
        raise LabelError(f"unknown severity {text!r}; allowed values: {ALLOWED}") from None


# -- which study ---------------------------------------------------------------------------------

class StudyResolver:
    """Finds the :class:`LearnStudy` a key names, creating its row for an archived node study.

    One resolver per call site: the accession-number index (one header read per study)
    is built the first time a key matches no UID, then reused (a CSV import resolves
    every row with one resolver).

    Parameters
    ----------
    session:
        Where the rows are read and the new :class:`LearnStudy` rows added (not committed).
    storage_root, archive_root:
        ``[storage] root`` (original instances, for accession numbers) and the archive.
    """

    def __init__(self, session: Session, storage_root: Path, archive_root: Path) -> None:
        self.session = session
        self.storage_root = storage_root
        self.archive_root = archive_root
        self._accessions: dict[str, list[int]] | None = None

    @classmethod
    def from_settings(cls, session: Session, settings: Settings) -> StudyResolver:
        return cls(session, settings.storage.root, settings.archive_root)

    def accessions(self) -> dict[str, list[int]]:
        """Accession number -> node study ids, from one stored original instance per study."""
        if self._accessions is not None:
            return self._accessions
        index: dict[str, list[int]] = defaultdict(list)
        first = (select(Instance.study_id, Instance.path).order_by(Instance.study_id, Instance.id))
        seen: set[int] = set()
        for study_id, rel in self.session.execute(first):
            if study_id in seen:
                continue
            path = self.storage_root / rel
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["AccessionNumber"])
            except (OSError, InvalidDicomError) as exc:
                logger.debug("accession number of study %s unreadable from %s: %s", study_id, path, exc)
                continue  # try the study's next instance
            seen.add(study_id)
            accession = str(ds.get("AccessionNumber") or "").strip()
            if accession:
                index[accession].append(study_id)
        self._accessions = dict(index)
        return self._accessions

    def _describe(self, study_id: int) -> str:
        anon = self._anonymized_uid(study_id)
        return f"node study {study_id} ({'de-identified ' + anon if anon else 'not archived'})"

    def _anonymized_uid(self, study_id: int) -> str | None:
        stmt = (select(UidMapping.anonymized_uid)
                .join(Study, Study.id == UidMapping.study_id)
                .where(UidMapping.study_id == study_id,
                       UidMapping.original_uid == Study.study_instance_uid))
        return self.session.scalars(stmt).first()

    def resolve(self, key: str) -> LearnStudy:
        """The study ``key`` names; :class:`LabelError` when none, several, or not archived."""
        key = key.strip()
        if not key:
            raise LabelError("no study given: name it by Study Instance UID, de-identified Study "
                             "UID or accession number")
        study_ids: set[int] = set()
        original = self.session.scalar(select(Study.id).where(Study.study_instance_uid == key))
        if original is not None:
            study_ids.add(original)
        deidentified = (select(UidMapping.study_id)
                        .join(Study, Study.id == UidMapping.study_id)
                        .where(UidMapping.anonymized_uid == key,
                               UidMapping.original_uid == Study.study_instance_uid))
        study_ids.update(self.session.scalars(deidentified))
        learn = self.session.scalars(
            select(LearnStudy).where(LearnStudy.pseudo_study_uid == key)).first()
        if learn is not None and learn.study_id is not None:
            study_ids.add(learn.study_id)
        if not study_ids and learn is None:
            study_ids.update(self.accessions().get(key, []))
        if len(study_ids) > 1:
            listed = "; ".join(self._describe(i) for i in sorted(study_ids))
            raise LabelError(f"{key!r} names {len(study_ids)} studies ({listed}); nothing was "
                             "guessed: label it by its de-identified Study UID instead")
        if not study_ids:
            if learn is not None:
                return learn
            raise LabelError(f"no study matches {key!r} (tried Study Instance UID, de-identified "
                             "Study UID and accession number); check the key, "
                             "'lungnode studies' lists the node's studies")
        return self.learn_study(study_ids.pop(), key)

    def learn_study(self, study_id: int, key: str) -> LearnStudy:
        """The node study's :class:`LearnStudy` row, added from its archive copy when missing."""
        existing = self.session.scalars(
            select(LearnStudy).where(LearnStudy.study_id == study_id)).first()
        if existing is not None:
            return existing
        study = self.session.get_one(Study, study_id)
        anon = self._anonymized_uid(study_id)
        if anon is None:
            raise LabelError(
                f"study {key} is not archived yet (state {study.state.value}): labels apply to "
                "de-identified archived studies only; wait until the node has analysed and "
                "archived it ('lungnode show' tells its state), then label it again")
        folder = self.archive_root / anon
        series = sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("*.dcm"))) \
            if folder.is_dir() else []
        if not series:
            raise LabelError(
                f"study {key} has a de-identified UID ({anon}) but no files under {folder}: "
                "its archive copy is missing; restore the archive or run 'lungnode retry' "
                "so the node archives it again, then label it")
        sample = next(iter(sorted(series[0].glob("*.dcm"))))
        try:
            patient = str(pydicom.dcmread(sample, stop_before_pixels=True,
                                          specific_tags=["PatientID"]).get("PatientID") or "")
        except (OSError, InvalidDicomError) as exc:
            raise LabelError(f"archived file {sample} cannot be read ({exc}); "
                             "check the archive") from exc
        row = LearnStudy(origin="archive", study_id=study_id, pseudo_study_uid=anon,
                         pseudo_patient_id=patient,
                         source_path=series[0].relative_to(self.archive_root).as_posix())
        try:
            with self.session.begin_nested():
                self.session.add(row)
        except IntegrityError:  # another writer added it first
            return self.session.scalars(
                select(LearnStudy).where(LearnStudy.study_id == study_id)).one()
        return row


def resolve_study(session: Session, settings: Settings, key: str) -> LearnStudy:
    """The archived (or imported) study ``key`` names, its :class:`LearnStudy` row created if
    missing; see :class:`StudyResolver`."""
    return StudyResolver.from_settings(session, settings).resolve(key)


# -- events --------------------------------------------------------------------------------------

def _append(session: Session, study: LearnStudy, value: LabelValue | None, *, source: LabelSource,
            actor: str, reason: str | None, source_ref: str | None) -> LabelEvent | None:
    """Add one event after the study's latest, and its audit entry; ``None`` when it would repeat."""
    latest = latest_event(session, study.id)
    if latest is not None and latest.value == value and latest.source == source:
        return None  # the current label already is this, from the same kind of source
    if value is None and (latest is None or latest.value is None):
        return None  # nothing to retract
    if source_ref is not None:
        seen = session.scalars(select(LabelEvent.id).where(
            LabelEvent.learn_study_id == study.id, LabelEvent.source_ref == source_ref,
            LabelEvent.value == value if value is not None else LabelEvent.value.is_(None),
        ).limit(1)).first()
        if seen is not None:
            return None  # the same carrier (file, SR) was recorded before
    event = LabelEvent(learn_study_id=study.id, value=value, source=source, actor=actor[:128],
                       at=utcnow(), reason=reason, source_ref=source_ref,
                       supersedes_id=latest.id if latest is not None else None)
    session.add(event)
    before = latest.value.value if latest is not None and latest.value is not None else "none"
    after = value.value if value is not None else "none"
    detail = f"{study.pseudo_study_uid}: {before} -> {after}"
    if source_ref:
        detail += f" ({source_ref})"
    if reason:
        detail += f"; reason: {reason}"
    session.add(AuditEntry(actor=f"{source.value}:{actor}"[:64],
                           action="label-set" if value is not None else "label-retracted",
                           study_id=study.study_id, detail=detail))
    session.flush()
    return event


def set_label(session: Session, settings: Settings, key: str, value: str | LabelValue, *,
              source: LabelSource, actor: str, reason: str | None = None,
              source_ref: str | None = None) -> LabelEvent | None:
    """Label the study ``key`` names; ``None`` when that adds nothing (see the module's notes).

    The caller commits.  :class:`LabelError` for an unknown value, an unknown, ambiguous or
    unarchived study.
    """
    label = parse_value(value)
    study = resolve_study(session, settings, key)
    return _append(session, study, label, source=source, actor=actor, reason=reason,
                   source_ref=source_ref)


def retract_label(session: Session, settings: Settings, key: str, *, source: LabelSource,
                  actor: str, reason: str | None = None,
                  source_ref: str | None = None) -> LabelEvent | None:
    """Withdraw the study's current label (an event without value); ``None`` when it has none."""
    study = resolve_study(session, settings, key)
    return _append(session, study, None, source=source, actor=actor, reason=reason,
                   source_ref=source_ref)


def history(session: Session, settings: Settings, key: str) -> list[LabelEvent]:
    """Every label event of the study ``key`` names, oldest first."""
    study = resolve_study(session, settings, key)
    return list(session.scalars(select(LabelEvent).where(LabelEvent.learn_study_id == study.id)
                                .order_by(LabelEvent.at, LabelEvent.id)))


# -- CSV import -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImportedRow:
    """A matched CSV row: ``added`` (a new event) or ``unchanged`` (the study already has it)."""

    row: int
    key: str
    pseudo_study_uid: str
    value: str
    outcome: str


@dataclass(frozen=True)
class UnmatchedRow:
    """A CSV row that was not applied, and why."""

    row: int
    key: str
    reason: str


@dataclass
class ImportReport:
    """What :func:`import_csv` did (or, dry run, would do)."""

    path: Path
    source_ref: str
    dry_run: bool
    strict: bool
    added: list[ImportedRow] = field(default_factory=list)
    unchanged: list[ImportedRow] = field(default_factory=list)
    unmatched: list[UnmatchedRow] = field(default_factory=list)
    applied: bool = False
    """Whether the matched rows were committed (not on a dry run, nor strict with unmatched rows)."""


def _read_csv(path: Path) -> tuple[bytes, list[tuple[int, dict[str, str]]]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LabelError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    names = [h.strip().lower() for h in header or []]
    missing = [c for c in ("study", "severity") if c not in names]
    if missing:
        found = ", ".join(repr(n) for n in names) or "nothing"
        raise LabelError(f"{path}: the first line must be a header with the columns 'study' and "
                         f"'severity' (an optional 'reason'); missing {', '.join(missing)}, "
                         f"found {found}")
    rows: list[tuple[int, dict[str, str]]] = []
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue
        row = {n: (cells[i].strip() if i < len(cells) else "") for i, n in enumerate(names)}
        rows.append((reader.line_num, row))
    return data, rows


def import_csv(session: Session, settings: Settings, path: Path, *, actor: str, dry_run: bool,
               strict: bool = False) -> ImportReport:
    """Apply a CSV of labels (columns ``study``, ``severity``, optional ``reason``).

    Rows that cannot be matched (unknown, unarchived or ambiguous study, unknown value, one
    study given different values in the same file) are listed in the report with their line
    number and nothing is guessed for them.  The matched rows are applied and committed,
    unless ``strict`` and some row is unmatched, or ``dry_run``: then the session is rolled
    back and the report tells what would have happened.  Importing the same file again adds
    nothing (the events carry ``csv:<sha256 of the file>``).
    """
    data, rows = _read_csv(path)
    report = ImportReport(path=path, source_ref=f"csv:{hashlib.sha256(data).hexdigest()}",
                          dry_run=dry_run, strict=strict)
    resolver = StudyResolver.from_settings(session, settings)
    matched: list[tuple[int, str, LearnStudy, LabelValue, str | None]] = []
    for line, row in rows:
        key = row.get("study", "")
        try:
            value = parse_value(row.get("severity", ""))
            study = resolver.resolve(key)
        except LabelError as exc:
            report.unmatched.append(UnmatchedRow(line, key, str(exc)))
            continue
        matched.append((line, key, study, value, row.get("reason") or None))
    by_study: dict[int, list[int]] = defaultdict(list)
    values: dict[int, set[LabelValue]] = defaultdict(set)
    for line, _key, study, value, _reason in matched:
        by_study[study.id].append(line)
        values[study.id].add(value)
    for line, key, study, value, reason in matched:
        if len(values[study.id]) > 1:
            lines = ", ".join(str(n) for n in by_study[study.id])
            report.unmatched.append(UnmatchedRow(
                line, key, f"rows {lines} give this study different severities; "
                "keep one row per study"))
            continue
        event = _append(session, study, value, source=LabelSource.CSV, actor=actor, reason=reason,
                        source_ref=report.source_ref)
        entry = ImportedRow(line, key, study.pseudo_study_uid, value.value,
                            "added" if event is not None else "unchanged")
        (report.added if event is not None else report.unchanged).append(entry)
    report.unmatched.sort(key=lambda u: u.row)
    if dry_run or (strict and report.unmatched):
        session.rollback()
    else:
        session.commit()
        report.applied = True
    return report


# -- labels over DICOM ----------------------------------------------------------------------------

def record_sr_label(session: Session, resolver: StudyResolver, sr: SrLabel,
                    calling_ae: str) -> LabelEvent | None:
    """Record a radiologist's labelling SR; ``None`` when this SR (or the same label) is known.

    The study is the one an SOP instance the SR references belongs to (one of the node's
    own results, or an instance it received), else the SR's own Study Instance UID (an
    original or de-identified one).  References to two different studies, or a reference
    that disagrees with the SR's study, are an error: nothing is guessed.
    """
    via_refs: set[int] = set()
    if sr.referenced_sop_uids:
        refs = list(sr.referenced_sop_uids)
        via_refs.update(session.scalars(select(ResultObject.study_id)
                                        .where(ResultObject.sop_instance_uid.in_(refs))))
        via_refs.update(session.scalars(select(Instance.study_id)
                                        .where(Instance.sop_instance_uid.in_(refs))))
    if len(via_refs) > 1:
        raise LabelError(f"SR {sr.sop_instance_uid} references instances of {len(via_refs)} "
                         "different studies; label one study per SR")
    if via_refs:
        study_id = via_refs.pop()
        own = session.scalar(select(Study.id).where(
            Study.study_instance_uid == sr.study_instance_uid))
        if own is not None and own != study_id:
            raise LabelError(f"SR {sr.sop_instance_uid} is in one study but references "
                             "another; label one study per SR")
        study = resolver.learn_study(study_id, sr.study_instance_uid)
    else:
        study = resolver.resolve(sr.study_instance_uid)
    actor = f"{calling_ae}/{sr.observer or 'unknown observer'}"
    return _append(session, study, sr.value, source=LabelSource.DICOM, actor=actor, reason=None,
                   source_ref=f"sr:{sr.sop_instance_uid}")


class LabelRecorder:
    """Records labelling SRs for the DICOM listener, one short transaction each.

    Parameters
    ----------
    sessions:
        The node's session factory.
    storage_root, archive_root:
        As in :class:`StudyResolver`.
    """

    def __init__(self, sessions: sessionmaker[Session], storage_root: Path,
                 archive_root: Path) -> None:
        self.sessions = sessions
        self.storage_root = storage_root
        self.archive_root = archive_root

    @classmethod
    def from_settings(cls, sessions: sessionmaker[Session], settings: Settings) -> LabelRecorder:
        return cls(sessions, settings.storage.root, settings.archive_root)

    def record(self, sr: SrLabel, calling_ae: str) -> bool:
        """Record ``sr`` from ``calling_ae``; ``True`` when it added an event.

        :class:`LabelError` when the study is unknown, ambiguous or not archived.
        """
        with self.sessions() as session:
            resolver = StudyResolver(session, self.storage_root, self.archive_root)
            event = record_sr_label(session, resolver, sr, calling_ae)
            session.commit()
            return event is not None
