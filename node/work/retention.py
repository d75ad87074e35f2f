"""Retention: when the node deletes patient data, and the purge that does it.

Three rules, applied in this order by :func:`plan_purge` (``[retention]``):

1. **Horizon.**  A study's originals (the received instances, which carry the
   patient's data) and the node's result files (SR, SEG, summary under
   ``results/``) are deleted ``originals_days`` after the study was *done*:
   every result object of its latest analysis was delivered to every
   destination (the latest ``sent_at``); with no delivery rows (no
   destinations configured when it was analysed) when the results were made;
   for a rejected study (nothing to analyse, nothing to deliver) when its last
   job ended.
2. **Archive quota.**  The de-identified archive (training material) is only
   cut when ``archive_quota_mb`` is set and exceeded: the oldest archived
   studies go first, unlabelled ones before labelled ones, and a study that
   any frozen or locked dataset manifest lists (or whose pseudonymous patient
   is in a locked evaluation set) is never deleted.
3. **Emergency.**  When free space on the storage file system is under
   ``emergency_free_percent``, the originals of done studies go before their
   day count, oldest done first, until the space freed brings it back above.

Never purged: studies still receiving, queued or analysing, with new instances
not yet analysed, with a queued or running job, with a pending or sending
delivery, whose latest results are not all delivered (a dead delivery
included), failed studies (an administrator looks at them first), and studies
whose de-identified copy is still to be written (:func:`node.pipeline.archive_pending`
writes it at the next start).

What a purge leaves: the study, series, result-object and delivery rows stay
(the record of what was received and sent), with ``Study.purged_at`` set; the
instance rows are deleted with their files (nothing points at a missing file,
and the same instance can be received again); every purged study gets an
audit entry (``purge-originals``, ``purge-archive``) with counts and bytes.
The database change is committed before the files are unlinked, so a crash
between the two leaves unreferenced files, never rows pointing at nothing.
"""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, delete, exists, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from model.errors import ModelError
from model.manifest import read_manifest
from node.db import (
    AuditEntry,
    DatasetManifest,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    LearnStudy,
    ResultObject,
    Study,
    StudyState,
    UidMapping,
    utcnow,
)
from node.dicom.storage import validate_uid
from node.errors import StorageError
from node.settings import Settings
from node.work.claim import for_update
from node.work.outbox import delivered_at

__all__ = ["DiskUsage", "PurgeItem", "PurgePlan", "PurgeReport", "delivered_at", "disk_usage",
           "execute_plan", "plan_purge", "purge"]

logger = logging.getLogger(__name__)

ORIGINALS = "originals"
ARCHIVE = "archive"
PURGEABLE_STATES = (StudyState.COMPLETE, StudyState.DELIVERING, StudyState.DELIVERED,
                    StudyState.REJECTED)
"""States whose originals may go; the others are in progress or need an administrator."""
_CHUNK = 500
_MB = 1024 * 1024


@dataclass(frozen=True)
class DiskUsage:
    """Size and free space of the storage file system, in bytes."""

    total: int
    free: int

    @property
    def free_percent(self) -> float:
        return 100.0 * self.free / self.total if self.total else 100.0


def disk_usage(root: Path) -> DiskUsage:
    """:class:`DiskUsage` of the file system holding ``root`` (its nearest existing parent)."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return DiskUsage(total=usage.total, free=usage.free)


@dataclass(frozen=True)
class PurgeItem:
    """One study's data that a purge deletes, and why."""

    kind: str
    """``originals`` (instances and result files) or ``archive`` (the de-identified copy)."""
    study_id: int | None
    """The node's study (``None``: an archive folder no study row maps to)."""
    uid: str
    """Study Instance UID (originals) or de-identified Study Instance UID (archive)."""
    rule: str
    """``horizon``, ``emergency`` or ``quota``."""
    reason: str
    """In words, for the dry run and the audit entry."""
    bytes: int
    files: int
    since: datetime
    """When the study was done (originals) or archived (archive): the age the rules order by."""


@dataclass(frozen=True)
class PurgePlan:
    """What a purge deletes now; :func:`execute_plan` does it, ``--dry-run`` only shows it."""

    now: datetime
    items: tuple[PurgeItem, ...]
    usage: DiskUsage
    archive_bytes: int | None
    """Size of the de-identified archive (``None``: not measured, no quota set)."""
    notes: tuple[str, ...] = ()
    """Why a rule could not do all it wanted (protected archive, undelivered studies ...)."""

    @property
    def bytes(self) -> int:
        return sum(i.bytes for i in self.items)


@dataclass
class PurgeReport:
    """What :func:`execute_plan` deleted and what it left, with the reason."""

    plan: PurgePlan
    done: list[PurgeItem] = field(default_factory=list)
    skipped: list[tuple[PurgeItem, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Done:
    study_id: int
    uid: str
    since: datetime
    basis: str
    instance_bytes: int
    instances: int
    result_paths: tuple[str, ...]
    result_bytes: int


def _chunks(values: Sequence[int]) -> Iterable[Sequence[int]]:
    for i in range(0, len(values), _CHUNK):
        yield values[i:i + _CHUNK]


def _blocked(settings: Settings) -> ColumnElement[bool]:
    """SQL conditions under which a study's originals must stay, whatever its age."""
    busy_job = exists().where(Job.study_id == Study.id,
                              Job.state.in_((JobState.QUEUED, JobState.RUNNING)))
    busy_delivery = exists().where(
        ResultObject.study_id == Study.id, Delivery.result_object_id == ResultObject.id,
        Delivery.state.in_((DeliveryState.PENDING, DeliveryState.SENDING)))
    conds = [Study.state.not_in(PURGEABLE_STATES),
             Study.instance_count > Study.analysed_instance_count, busy_job, busy_delivery]
    if settings.analysis.anonymize:  # what node.pipeline.archive_pending would still archive
        archived = exists().where(UidMapping.study_id == Study.id)
        failed = exists().where(AuditEntry.study_id == Study.id,
                                AuditEntry.action == "archive-failed")
        conds.append(Study.state.in_(PURGEABLE_STATES) & (Study.state != StudyState.REJECTED)
                     & Study.selected_series_uid.is_not(None)
                     & ~archived & ~failed & Study.archive_note.is_(None))
    return or_(*conds)


def _done_studies(session: Session, settings: Settings,
                  only: int | None = None) -> tuple[list[_Done], int]:
    """Studies whose originals or result files may go, with when they were done; and how many
    studies with data on disk are held back (in progress, undelivered)."""
    has_instances = exists().where(Instance.study_id == Study.id)
    stmt = select(Study).where(or_(Study.purged_at.is_(None), has_instances))
    if only is not None:
        stmt = stmt.where(Study.id == only)
    held = 0 if only is not None else session.scalar(
        select(func.count()).select_from(Study).where(has_instances, _blocked(settings))) or 0
    studies = list(session.scalars(stmt.where(~_blocked(settings))))
    ids = [s.id for s in studies]
    delivered = delivered_at(session, ids)
    made: dict[int, datetime] = {}
    paths: dict[int, list[str]] = defaultdict(list)
    sizes: dict[int, tuple[int, int]] = {}
    finished: dict[int, datetime] = {}
    for chunk in _chunks(ids):
        for sid, version_made in session.execute(
                select(ResultObject.study_id, func.max(ResultObject.created_at))
                .where(ResultObject.study_id.in_(chunk)).group_by(ResultObject.study_id)):
            made[sid] = version_made
        for sid, rel in session.execute(select(ResultObject.study_id, ResultObject.path)
                                        .where(ResultObject.study_id.in_(chunk))):
            paths[sid].append(rel)
        for sid, n, total in session.execute(
                select(Instance.study_id, func.count(), func.coalesce(func.sum(Instance.size_bytes), 0))
                .where(Instance.study_id.in_(chunk)).group_by(Instance.study_id)):
            sizes[sid] = (int(n), int(total))
        for sid, ended in session.execute(
                select(Job.study_id, func.max(Job.finished_at))
                .where(Job.study_id.in_(chunk)).group_by(Job.study_id)):
            if ended is not None:
                finished[sid] = ended
    out = []
    for st in studies:
        if st.id in delivered:
            since = delivered[st.id]
            if since is None:
                held += 1
                continue
            basis = "results delivered"
        elif st.id in made:
            since, basis = made[st.id], "results made (no destinations)"
        elif st.state == StudyState.REJECTED:
            since, basis = finished.get(st.id, st.last_received_at), "rejected"
        else:
            since, basis = finished.get(st.id, st.last_received_at), "analysed, no results"
        existing = [p for p in paths[st.id] if (settings.storage.root / p).is_file()]
        n, total = sizes.get(st.id, (0, 0))
        if n == 0 and not existing:
            continue
        result_bytes = sum((settings.storage.root / p).stat().st_size for p in existing)
        out.append(_Done(st.id, st.study_instance_uid, since, basis, total, n, tuple(existing),
                         result_bytes))
    return out, held


def _originals_item(d: _Done, rule: str, why: str) -> PurgeItem:
    return PurgeItem(kind=ORIGINALS, study_id=d.study_id, uid=d.uid, rule=rule,
                     reason=f"{why}; {d.basis} {d.since:%Y-%m-%d %H:%M} UTC",
                     bytes=d.instance_bytes + d.result_bytes,
                     files=d.instances + len(d.result_paths), since=d.since)


# -- the de-identified archive -----------------------------------------------------------------

@dataclass(frozen=True)
class _Archived:
    uid: str
    study_id: int | None
    labelled: bool
    bytes: int
    files: int
    since: datetime


def _protected(session: Session, settings: Settings) -> frozenset[str] | None:
    """De-identified study UIDs that a frozen or locked manifest references (``None``: a manifest
    cannot be read, so nothing can be called unreferenced)."""
    studies: set[str] = set()
    patients: set[str] = set()
    for row in session.scalars(select(DatasetManifest)):
        try:
            manifest = read_manifest(settings.learn_root / row.path)
        except ModelError as exc:
            logger.warning("dataset %d (%s version %d) cannot be read: %s", row.id, row.kind,
                           row.version, exc)
            return None
        studies.update(i.study for i in manifest.items)
        if row.kind == "locked-eval":
            patients.update(manifest.patients)
            patients.update(i.patient for i in manifest.items)
    if patients:
        studies.update(session.scalars(select(LearnStudy.pseudo_study_uid).where(
            LearnStudy.pseudo_patient_id.in_(sorted(patients)))))
    return frozenset(studies)


def _archived(session: Session, settings: Settings) -> list[_Archived]:
    """Every study folder of the archive with its size and age (newest file's time)."""
    root = settings.archive_root
    if not root.is_dir():
        return []
    owners = dict(session.execute(
        select(UidMapping.anonymized_uid, UidMapping.study_id)
        .join(Study, Study.id == UidMapping.study_id)
        .where(UidMapping.original_uid == Study.study_instance_uid)).all())
    labelled = set(session.scalars(select(LearnStudy.pseudo_study_uid)
                                   .where(LearnStudy.origin == "archive")))
    out = []
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        stats = [p.stat() for p in folder.rglob("*") if p.is_file()]
        newest = max((s.st_mtime for s in stats), default=folder.stat().st_mtime)
        out.append(_Archived(folder.name, owners.get(folder.name), folder.name in labelled,
                             sum(s.st_size for s in stats), len(stats),
                             datetime.fromtimestamp(newest, tz=UTC)))
    return out


def _quota_items(session: Session, settings: Settings) -> tuple[list[PurgeItem], int | None, list[str]]:
    quota_mb = settings.retention.archive_quota_mb
    if quota_mb is None:
        return [], None, []
    archived = _archived(session, settings)
    total = sum(a.bytes for a in archived)
    excess = total - quota_mb * _MB
    if excess <= 0:
        return [], total, []
    protected = _protected(session, settings)
    if protected is None:
        return [], total, [f"archive {total / _MB:.1f} MB is over its quota of {quota_mb:g} MB, but a "
                           "dataset manifest cannot be read (see the log), so no archived study is "
                           "known to be unreferenced; nothing was taken from the archive"]
    items = []
    for a in sorted((a for a in archived if a.uid not in protected),
                    key=lambda a: (a.labelled, a.since, a.uid)):
        if excess <= 0:
            break
        items.append(PurgeItem(kind=ARCHIVE, study_id=a.study_id, uid=a.uid, rule="quota",
                               reason=f"archive {total / _MB:.1f} MB over its quota of {quota_mb:g} MB; "
                                      f"{'labelled' if a.labelled else 'unlabelled'}, archived "
                                      f"{a.since:%Y-%m-%d %H:%M} UTC, in no dataset manifest",
                               bytes=a.bytes, files=a.files, since=a.since))
        excess -= a.bytes
    notes = []
    if excess > 0:
        notes.append(f"the archive stays {excess / _MB:.1f} MB over its quota of {quota_mb:g} MB: the "
                     f"rest is referenced by frozen or locked dataset manifests")
    return items, total, notes


# -- the plan ----------------------------------------------------------------------------------

def plan_purge(session: Session, settings: Settings, *, now: datetime | None = None,
               usage: DiskUsage | None = None) -> PurgePlan:
    """What the three retention rules delete at ``now``; deletes nothing.

    Parameters
    ----------
    session
        Read only.
    settings
        ``[retention]``, the storage root and the archive.
    now
        The clock (default: the current time); tests pass their own.
    usage
        The storage file system's size and free space (default: measured now).
    """
    now = now or utcnow()
    usage = usage or disk_usage(settings.storage.root)
    r = settings.retention
    done, held = _done_studies(session, settings)
    horizon = now - timedelta(days=r.originals_days)
    due = sorted((d for d in done if d.since <= horizon), key=lambda d: d.since)
    items = [_originals_item(d, "horizon", f"kept {r.originals_days:g} days") for d in due]
    quota, archive_bytes, notes = _quota_items(session, settings)
    items.extend(quota)
    need = int(usage.total * r.emergency_free_percent / 100) - usage.free - sum(i.bytes for i in items)
    if usage.free_percent < r.emergency_free_percent and need > 0:
        why = (f"emergency: {usage.free_percent:.1f} % free, under {r.emergency_free_percent:g} %")
        for d in sorted((d for d in done if d.since > horizon), key=lambda d: (d.since, d.study_id)):
            if need <= 0:
                break
            item = _originals_item(d, "emergency", why)
            items.append(item)
            need -= item.bytes
        if need > 0:
            notes.append(f"free space stays under {r.emergency_free_percent:g} % ({need / _MB:.1f} MB "
                         f"short): {held} studies with data are in progress or not yet delivered, "
                         "and are never purged")
    return PurgePlan(now=now, items=tuple(items), usage=usage, archive_bytes=archive_bytes,
                     notes=tuple(notes))


# -- doing it ----------------------------------------------------------------------------------

def _inside(root: Path, rel: str) -> Path:
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        raise StorageError(f"path {rel!r} is outside the storage root")
    return path


def _unlink(root: Path, rels: Iterable[str], stop: Path, errors: list[str]) -> None:
    """Delete files (relative to ``root``) and then their folders that became empty, up to ``stop``."""
    folders: set[Path] = set()
    for rel in rels:
        try:
            path = _inside(root, rel)
            path.unlink(missing_ok=True)
        except (OSError, StorageError) as exc:
            errors.append(f"{rel}: {exc}")
            continue
        folders.add(path.parent)
    stop = stop.resolve()
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        while folder != stop and stop in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (a new instance, another version) or gone
            folder = folder.parent


def _purge_originals(sessions: sessionmaker[Session], settings: Settings, item: PurgeItem,
                     actor: str, now: datetime, report: PurgeReport) -> None:
    assert item.study_id is not None
    with sessions() as session:
        study = session.scalars(for_update(session, select(Study).where(Study.id == item.study_id))
                                ).first()
        current = _done_studies(session, settings, only=item.study_id)[0] if study else []
        if study is None or not current:
            session.rollback()
            report.skipped.append((item, "busy (locked, in progress or changed since the plan)"))
            return
        d = current[0]
        instances = list(session.execute(select(Instance.id, Instance.path)
                                         .where(Instance.study_id == study.id)).all())
        for chunk in _chunks([i for i, _p in instances]):
            session.execute(delete(Instance).where(Instance.id.in_(chunk)))
        study.purged_at = now
        session.add(AuditEntry(
            actor=actor, action="purge-originals", study_id=study.id,
            detail=f"{item.rule}: {d.instances} instances ({d.instance_bytes} bytes) and "
                   f"{len(d.result_paths)} result files ({d.result_bytes} bytes) deleted; "
                   f"{item.reason}"))
        session.commit()
    root = settings.storage.root
    resends = [str(f.relative_to(root)) for _i, rel in instances
               for f in (root / rel).parent.glob(Path(rel).name + ".resend-*")]  # keep-first copies
    _unlink(root, [p for _i, p in instances] + resends, settings.incoming_root, report.errors)
    _unlink(root, d.result_paths, settings.results_root, report.errors)
    report.done.append(item)
    logger.info("study %s (id %d): originals and results purged (%s, %d bytes)", item.uid,
                item.study_id, item.rule, item.bytes)


def _purge_archive(sessions: sessionmaker[Session], settings: Settings, item: PurgeItem,
                   actor: str, now: datetime, report: PurgeReport) -> None:
    folder = settings.archive_root / validate_uid(item.uid, "de-identified Study Instance UID")
    with sessions() as session:
        protected = _protected(session, settings)
        if protected is None or item.uid in protected:
            report.skipped.append((item, "a dataset manifest references it now"))
            return
        if item.study_id is not None:
            study = session.get(Study, item.study_id)
            if study is not None:
                study.archive_note = (f"de-identified copy deleted by retention {now:%Y-%m-%d %H:%M} "
                                      "UTC (archive quota)")
        session.add(AuditEntry(actor=actor, action="purge-archive", study_id=item.study_id,
                               detail=f"{item.rule}: de-identified study {item.uid}, {item.files} "
                                      f"files ({item.bytes} bytes) deleted; {item.reason}"))
        session.commit()
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass
    except OSError as exc:
        report.errors.append(f"{folder}: {exc}")
    report.done.append(item)
    logger.info("de-identified study %s purged from the archive (%d bytes)", item.uid, item.bytes)


def execute_plan(sessions: sessionmaker[Session], settings: Settings, plan: PurgePlan, *,
                 actor: str = "retention") -> PurgeReport:
    """Delete what ``plan`` lists; each originals item is checked again under its row's lock.

    Each study is one transaction (rows and audit entry), then its files; a study that became
    busy since the plan (new instances, a retry) is skipped and listed in the report.
    """
    report = PurgeReport(plan=plan)
    for item in plan.items:
        if item.kind == ORIGINALS:
            _purge_originals(sessions, settings, item, actor, plan.now, report)
        else:
            _purge_archive(sessions, settings, item, actor, plan.now, report)
    for message in report.errors:
        logger.error("retention: a file could not be deleted: %s", message)
    return report


def purge(sessions: sessionmaker[Session], settings: Settings, *, actor: str = "retention",
          now: datetime | None = None, usage: DiskUsage | None = None,
          dry_run: bool = False) -> PurgeReport:
    """Plan and (unless ``dry_run``) carry out the retention rules; the service's periodic job.

    Returns
    -------
    PurgeReport
        The plan, and what was deleted (nothing on a dry run) or skipped.
    """
    with sessions() as session:
        plan = plan_purge(session, settings, now=now, usage=usage)
    for note in plan.notes:
        logger.warning("retention: %s", note)
    if dry_run:
        return PurgeReport(plan=plan)
    return execute_plan(sessions, settings, plan, actor=actor)
