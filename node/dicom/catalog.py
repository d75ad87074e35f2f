"""Study, series and instance rows: what the SCP records and what stages read.

The C-STORE handler calls :meth:`Catalog.record_instance` once per instance:
one short SQLAlchemy Core transaction (the instance row and its study's and
series' counters).  A small cache of study and series ids saves the lookups.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.db import SINGLE_READ, AuditEntry, Instance, Series, Study, utcnow
from node.records import StoredInstance, StoredStudy

__all__ = ["Catalog", "InstanceRecord", "KnownInstance", "stored_study"]

logger = logging.getLogger(__name__)

_INSTANCE_BY_UID = select(Instance.id).where(
    Instance.sop_instance_uid == bindparam("uid")).limit(1)
_INSTANCE_PATH_BY_UID = select(Instance.path).where(
    Instance.sop_instance_uid == bindparam("uid")).limit(1)
_KNOWN_INSTANCE = (
    select(Instance.id, Instance.study_id, Instance.path, Instance.size_bytes,
           Instance.transfer_syntax_uid, Study.study_instance_uid, Series.series_instance_uid)
    .join(Study, Study.id == Instance.study_id).join(Series, Series.id == Instance.series_id)
    .where(Instance.sop_instance_uid == bindparam("uid")).limit(1))
_INSERT_INSTANCE = insert(Instance)
_BUMP_STUDY = update(Study).where(Study.id == bindparam("row_id")).values(
    instance_count=Study.instance_count + 1, last_received_at=bindparam("b_now"),
    updated_at=bindparam("b_now"))
_BUMP_SERIES = update(Series).where(Series.id == bindparam("row_id")).values(
    instance_count=Series.instance_count + 1)


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


@dataclass(frozen=True)
class KnownInstance:
    """The recorded row of a SOP Instance UID (what a resend is compared with)."""

    id: int
    study_id: int
    relative_path: str
    size_bytes: int
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str


class Catalog:
    """Writes ingest rows; safe to share between association threads.

    Parameters
    ----------
    sessions:
        The session factory (its engine is used).
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.engine: Engine = sessions.kw["bind"]
        self.lock = threading.Lock()
        self.study_ids: dict[str, int] = {}
        self.series_ids: dict[str, int] = {}

    def has_instance(self, sop_instance_uid: str) -> bool:
        with self.engine.connect().execution_options(**SINGLE_READ) as conn:
            return conn.execute(_INSTANCE_BY_UID, {"uid": sop_instance_uid}).first() is not None

    def instance_path(self, sop_instance_uid: str) -> str | None:
        with self.engine.connect().execution_options(**SINGLE_READ) as conn:
            return conn.scalar(_INSTANCE_PATH_BY_UID, {"uid": sop_instance_uid})

    def known_instance(self, sop_instance_uid: str) -> KnownInstance | None:
        """The row of an instance already recorded, ``None`` for a new SOP Instance UID."""
        with self.engine.connect().execution_options(**SINGLE_READ) as conn:
            row = conn.execute(_KNOWN_INSTANCE, {"uid": sop_instance_uid}).first()
        if row is None:
            return None
        return KnownInstance(id=int(row[0]), study_id=int(row[1]), relative_path=str(row[2]),
                             size_bytes=int(row[3]), transfer_syntax_uid=str(row[4]),
                             study_instance_uid=str(row[5]), series_instance_uid=str(row[6]))

    def replace_instance(self, known: KnownInstance, rec: InstanceRecord, detail: str,
                         now: datetime | None = None,
                         action: str = "instance-resend-differs") -> None:
        """Point an instance's row at its replaced file (size, transfer syntax, sender, time) and
        audit it (``action``), in one transaction; the study counts it as received."""
        now = now or utcnow()
        with self.engine.begin() as conn:
            conn.execute(update(Instance).where(Instance.id == known.id).values(
                size_bytes=rec.size_bytes, transfer_syntax_uid=rec.transfer_syntax_uid,
                sop_class_uid=rec.sop_class_uid, calling_ae=rec.calling_ae, received_at=now))
            conn.execute(update(Study).where(Study.id == known.study_id).values(
                last_received_at=now, updated_at=now))
            conn.execute(insert(AuditEntry).values(actor="scp", action=action,
                                                   study_id=known.study_id, detail=detail))
        logger.warning("%s: %s", action, detail)

    def record_event(self, study_id: int | None, action: str, detail: str) -> None:
        """An audit row on a known study (by id) that leaves the study's reason as it is."""
        with self.engine.begin() as conn:
            conn.execute(insert(AuditEntry).values(actor="scp", action=action, study_id=study_id,
                                                   detail=detail))
        logger.warning("%s: %s", action, detail)

    def study_id(self, conn: Connection, uid: str) -> int:
        cached = self.study_ids.get(uid)
        if cached is not None:
            return cached
        study_id = conn.scalar(select(Study.id).where(Study.study_instance_uid == uid))
        if study_id is None:
            study_id = conn.scalar(insert(Study).values(study_instance_uid=uid).returning(Study.id))
            conn.execute(insert(AuditEntry).values(actor="scp", action="study-created",
                                                   study_id=study_id))
        assert study_id is not None
        return int(study_id)

    def series_id(self, conn: Connection, study_id: int, uid: str, modality: str | None) -> int:
        cached = self.series_ids.get(uid)
        if cached is not None:
            return cached
        series_id = conn.scalar(select(Series.id).where(Series.series_instance_uid == uid))
        if series_id is None:
            series_id = conn.scalar(insert(Series).values(
                study_id=study_id, series_instance_uid=uid, modality=modality).returning(Series.id))
        assert series_id is not None
        return int(series_id)

    def record_instance(self, rec: InstanceRecord, now: datetime | None = None) -> bool:
        """Insert the instance and bump its study's and series' counters.

        One short transaction (this runs once per received instance); the first
        instance of a study or series creates its row.  Returns ``False`` when
        the SOP Instance UID was already recorded (a repeated C-STORE is
        acknowledged but not counted twice).
        """
        now = now or utcnow()
        for attempt in range(3):
            try:
                with self.engine.begin() as conn:
                    study_id = self.study_id(conn, rec.study_instance_uid)
                    series_id = self.series_id(conn, study_id, rec.series_instance_uid,
                                                rec.modality)
                    conn.execute(_INSERT_INSTANCE, {
                        "series_id": series_id, "study_id": study_id,
                        "sop_instance_uid": rec.sop_instance_uid,
                        "sop_class_uid": rec.sop_class_uid,
                        "transfer_syntax_uid": rec.transfer_syntax_uid,
                        "path": rec.relative_path, "size_bytes": rec.size_bytes,
                        "calling_ae": rec.calling_ae, "received_at": now,
                    })
                    conn.execute(_BUMP_STUDY, {"row_id": study_id, "b_now": now})
                    conn.execute(_BUMP_SERIES, {"row_id": series_id})
            except IntegrityError:
                if self.has_instance(rec.sop_instance_uid):
                    return False
                # a concurrent association created the study or series first
                with self.lock:
                    self.study_ids.pop(rec.study_instance_uid, None)
                    self.series_ids.pop(rec.series_instance_uid, None)
                if attempt == 2:
                    raise
                continue
            with self.lock:
                self.study_ids[rec.study_instance_uid] = study_id
                self.series_ids[rec.series_instance_uid] = series_id
            return True
        return False  # pragma: no cover - the loop returns or raises

    def close(self) -> None:
        """Forget the cached ids (the engine's connections belong to its pool)."""
        self.forget()

    def record_refusal(self, study_uid: str | None, action: str, detail: str) -> None:
        """Record a refused instance or association on its study (when known)."""
        with self.engine.begin() as conn:
            study_id = self.study_id(conn, study_uid) if study_uid else None
            conn.execute(insert(AuditEntry).values(actor="scp", action=action, study_id=study_id,
                                                   detail=detail))
            if study_id is not None:
                conn.execute(update(Study).where(Study.id == study_id).values(
                    reason=f"refused: {detail}"[:2000], updated_at=utcnow()))
        logger.warning("%s: %s", action, detail)

    def forget(self) -> None:
        """Drop cached ids (after studies were deleted)."""
        with self.lock:
            self.study_ids.clear()
            self.series_ids.clear()


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
