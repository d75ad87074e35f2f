"""Study, series and instance rows: what the SCP records and what stages read.

The C-STORE handler calls :meth:`Catalog.record_instance` once per instance;
it keeps a small cache of study and series ids so an instance costs one insert
and one update.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.db import AuditEntry, Instance, Series, Study, utcnow
from node.records import StoredInstance, StoredStudy

__all__ = ["Catalog", "InstanceRecord", "stored_study"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceRecord:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    relative_path: str
    size_bytes: int
    calling_ae: str | None


class Catalog:
    """Writes ingest rows; safe to share between association threads."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._lock = threading.Lock()
        self._study_ids: dict[str, int] = {}
        self._series_ids: dict[str, int] = {}

    def has_instance(self, sop_instance_uid: str) -> bool:
        with self._sessions() as session:
            return session.scalar(
                select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
            ) is not None

    def _study_id(self, session: Session, uid: str) -> int:
        cached = self._study_ids.get(uid)
        if cached is not None:
            return cached
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == uid))
        if study_id is None:
            study = Study(study_instance_uid=uid)
            session.add(study)
            session.flush()
            study_id = study.id
            session.add(AuditEntry(actor="scp", action="study-created", study_id=study_id))
        return study_id

    def _series_id(self, session: Session, study_id: int, uid: str, modality: str | None) -> int:
        cached = self._series_ids.get(uid)
        if cached is not None:
            return cached
        series_id = session.scalar(select(Series.id).where(Series.series_instance_uid == uid))
        if series_id is None:
            series = Series(study_id=study_id, series_instance_uid=uid, modality=modality)
            session.add(series)
            session.flush()
            series_id = series.id
        return series_id

    def record_instance(self, rec: InstanceRecord, now: datetime | None = None) -> bool:
        """Insert the instance and bump its study's counters.

        Returns ``False`` when the SOP Instance UID was already recorded (a
        repeated C-STORE is acknowledged but not counted twice).
        """
        now = now or utcnow()
        for attempt in range(3):
            with self._sessions() as session:
                try:
                    study_id = self._study_id(session, rec.study_instance_uid)
                    series_id = self._series_id(session, study_id, rec.series_instance_uid,
                                                rec.modality)
                    session.add(Instance(
                        series_id=series_id, study_id=study_id,
                        sop_instance_uid=rec.sop_instance_uid, sop_class_uid=rec.sop_class_uid,
                        transfer_syntax_uid=rec.transfer_syntax_uid, path=rec.relative_path,
                        size_bytes=rec.size_bytes, calling_ae=rec.calling_ae, received_at=now,
                    ))
                    session.flush()
                    session.execute(update(Study).where(Study.id == study_id).values(
                        instance_count=Study.instance_count + 1, last_received_at=now,
                        updated_at=now))
                    session.execute(update(Series).where(Series.id == series_id).values(
                        instance_count=Series.instance_count + 1))
                    session.commit()
                except IntegrityError:
                    session.rollback()
                    if self.has_instance(rec.sop_instance_uid):
                        return False
                    # a concurrent association created the study or series first
                    with self._lock:
                        self._study_ids.pop(rec.study_instance_uid, None)
                        self._series_ids.pop(rec.series_instance_uid, None)
                    if attempt == 2:
                        raise
                    continue
            with self._lock:
                self._study_ids[rec.study_instance_uid] = study_id
                self._series_ids[rec.series_instance_uid] = series_id
            return True
        return False  # pragma: no cover - loop always returns or raises

    def record_refusal(self, study_uid: str | None, action: str, detail: str) -> None:
        """Record a refused instance or association on its study (when known)."""
        with self._sessions() as session:
            study_id = None
            if study_uid:
                study_id = self._study_id(session, study_uid)
            session.add(AuditEntry(actor="scp", action=action, study_id=study_id, detail=detail))
            if study_id is not None:
                session.execute(update(Study).where(Study.id == study_id).values(
                    reason=f"refused: {detail}"[:2000], updated_at=utcnow()))
            session.commit()
        logger.warning("%s: %s", action, detail)

    def forget(self) -> None:
        """Drop cached ids (after studies were deleted)."""
        with self._lock:
            self._study_ids.clear()
            self._series_ids.clear()


def stored_study(session: Session, study_id: int, storage_root: Path) -> StoredStudy:
    """The stage input for one study: every recorded instance with its file."""
    study = session.get_one(Study, study_id)
    rows = session.execute(
        select(Instance, Series.series_instance_uid)
        .join(Series, Series.id == Instance.series_id)
        .where(Instance.study_id == study_id)
        .order_by(Instance.id)
    ).all()
    return StoredStudy(
        study_instance_uid=study.study_instance_uid,
        instances=tuple(
            StoredInstance(path=storage_root / inst.path, sop_instance_uid=inst.sop_instance_uid,
                           sop_class_uid=inst.sop_class_uid, series_instance_uid=series_uid)
            for inst, series_uid in rows
        ),
    )
