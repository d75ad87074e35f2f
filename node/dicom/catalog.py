"""Study, series and instance rows: what the SCP records and what stages read.

The C-STORE handler calls :meth:`Catalog.record_instance` once per instance;
it keeps a small cache of study and series ids so an instance costs one insert
and one update.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.db import AuditEntry, Instance, Series, Study, utcnow
from node.records import StoredInstance, StoredStudy

__all__ = ["Catalog", "InstanceRecord", "stored_study"]

logger = logging.getLogger(__name__)

_INSTANCE_BY_UID = select(Instance.id).where(
    Instance.sop_instance_uid == bindparam("uid")).limit(1)
_INSTANCE_PATH_BY_UID = select(Instance.path).where(
    Instance.sop_instance_uid == bindparam("uid")).limit(1)
_INSERT_INSTANCE = insert(Instance)
_BUMP_STUDY = update(Study).where(Study.id == bindparam("row_id")).values(
    instance_count=Study.instance_count + 1, last_received_at=bindparam("b_now"),
    updated_at=bindparam("b_now"))
_INSTANCE_COLUMNS = ("series_id, study_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, "
                     "path, size_bytes, calling_ae, received_at")
_SQLITE_INSERT = f"INSERT INTO instances ({_INSTANCE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_SQLITE_BUMP_STUDY = ("UPDATE studies SET instance_count = instance_count + 1, "
                      "last_received_at = ?, updated_at = ? WHERE id = ?")
_SQLITE_BUMP_SERIES = "UPDATE series SET instance_count = instance_count + 1 WHERE id = ?"
_PG_RECORD = (
    # one statement; the series row is updated only after the study row (its FROM
    # needs the study update's row), the order the Core path uses too, so that
    # concurrent writers cannot deadlock
    f"WITH i AS (INSERT INTO instances ({_INSTANCE_COLUMNS}) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING study_id, series_id), "
    "s AS (UPDATE studies SET instance_count = instance_count + 1, last_received_at = %s, "
    "updated_at = %s FROM i WHERE studies.id = i.study_id RETURNING i.series_id) "
    "UPDATE series SET instance_count = instance_count + 1 FROM s WHERE series.id = s.series_id"
)
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


class Catalog:
    """Writes ingest rows; safe to share between association threads.

    Parameters
    ----------
    sessions:
        The session factory (its engine is used).
    shared_sqlite:
        Several processes write to the same SQLite file (``[dicom] receivers``):
        the per-instance transaction then also takes an exclusive ``flock`` on
        ``<database>-ingest.lock``, so that writers queue in the kernel and wake at
        once, instead of polling in SQLite's busy handler (which sleeps 1 ms and
        more between tries).
    """

    def __init__(self, sessions: sessionmaker[Session], *, shared_sqlite: bool = False) -> None:
        self._sessions = sessions
        self._engine: Engine = sessions.kw["bind"]
        self._lock = threading.Lock()
        self._study_ids: dict[str, int] = {}
        self._series_ids: dict[str, int] = {}
        self._sqlite = self._engine.dialect.name == "sqlite"
        self._integrity_error: type[Exception] = self._engine.dialect.loaded_dbapi.IntegrityError
        self._raw_pool: queue.Queue[Any] = queue.Queue()
        self._write_lock = threading.Lock()
        self._lock_fd: int | None = None
        database = self._engine.url.database
        if shared_sqlite and self._sqlite and database and database != ":memory:":
            self._lock_fd = os.open(f"{database}-ingest.lock", os.O_RDWR | os.O_CREAT, 0o600)

    def has_instance(self, sop_instance_uid: str) -> bool:
        with self._engine.connect() as conn:
            return conn.execute(_INSTANCE_BY_UID, {"uid": sop_instance_uid}).first() is not None

    def instance_path(self, sop_instance_uid: str) -> str | None:
        with self._engine.connect() as conn:
            return conn.scalar(_INSTANCE_PATH_BY_UID, {"uid": sop_instance_uid})

    def _study_id(self, conn: Connection, uid: str) -> int:
        cached = self._study_ids.get(uid)
        if cached is not None:
            return cached
        study_id = conn.scalar(select(Study.id).where(Study.study_instance_uid == uid))
        if study_id is None:
            study_id = conn.scalar(insert(Study).values(study_instance_uid=uid).returning(Study.id))
            conn.execute(insert(AuditEntry).values(actor="scp", action="study-created",
                                                   study_id=study_id))
        assert study_id is not None
        return int(study_id)

    def _series_id(self, conn: Connection, study_id: int, uid: str, modality: str | None) -> int:
        cached = self._series_ids.get(uid)
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

        One short transaction (this runs once per received instance).  Once the
        study and series are known, it is plain SQL on a DBAPI connection kept
        for the purpose (:meth:`_record_fast`); the first instance of a series
        goes through SQLAlchemy Core, which creates the study and series rows.
        Returns ``False`` when the SOP Instance UID was already recorded (a
        repeated C-STORE is acknowledged but not counted twice).
        """
        now = now or utcnow()
        study_id = self._study_ids.get(rec.study_instance_uid)
        series_id = self._series_ids.get(rec.series_instance_uid)
        if study_id is not None and series_id is not None:
            fresh = self._record_fast(rec, study_id, series_id, now)
            if fresh is not None:
                return fresh
        for attempt in range(3):
            try:
                with self._engine.begin() as conn:
                    study_id = self._study_id(conn, rec.study_instance_uid)
                    series_id = self._series_id(conn, study_id, rec.series_instance_uid,
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
        return False  # pragma: no cover - the loop returns or raises

    def _record_fast(self, rec: InstanceRecord, study_id: int, series_id: int,
                     now: datetime) -> bool | None:
        """The instance row and both counters in one transaction of plain SQL.

        SQLite: ``BEGIN IMMEDIATE``, three statements, ``COMMIT`` (WAL mode).
        PostgreSQL: one statement (``WITH ... INSERT ... UPDATE``) in autocommit,
        one round trip.  ``None`` when it hit a constraint other than a repeated
        SOP Instance UID (a study deleted meanwhile): the caller takes the slow
        path, which re-creates the study and series.
        """
        params = (series_id, study_id, rec.sop_instance_uid, rec.sop_class_uid,
                  rec.transfer_syntax_uid, rec.relative_path, rec.size_bytes, rec.calling_ae)
        conn = self._raw_connection()
        try:
            if self._sqlite:
                stamp = now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
                cur = conn.cursor()
                with self._serialized():
                    try:
                        cur.execute("BEGIN IMMEDIATE")
                        try:
                            cur.execute(_SQLITE_INSERT, (*params, stamp))
                            cur.execute(_SQLITE_BUMP_STUDY, (stamp, stamp, study_id))
                            cur.execute(_SQLITE_BUMP_SERIES, (series_id,))
                        except BaseException:
                            cur.execute("ROLLBACK")
                            raise
                        cur.execute("COMMIT")
                    finally:
                        cur.close()
            else:
                with conn.cursor() as cur:
                    cur.execute(_PG_RECORD, (*params, now, now, now))
        except self._integrity_error:
            self._release(conn)
            if self.has_instance(rec.sop_instance_uid):
                return False
            self.forget()
            return None
        except BaseException:
            self._discard(conn)
            raise
        self._release(conn)
        return True

    @contextmanager
    def _serialized(self) -> Iterator[None]:
        if self._lock_fd is None:
            yield
            return
        with self._write_lock:  # flock does not exclude threads sharing the descriptor
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _raw_connection(self) -> Any:
        try:
            return self._raw_pool.get_nowait()
        except queue.Empty:
            pass
        conn = self._engine.raw_connection()
        if not self._sqlite:
            driver: Any = conn.driver_connection
            driver.autocommit = True
        return conn

    def _discard(self, conn: Any) -> None:
        """Hand a connection back to the engine's pool as the engine expects it."""
        if not self._sqlite and not conn.driver_connection.closed:
            conn.driver_connection.autocommit = False
        conn.close()

    def _release(self, conn: Any) -> None:
        if self._raw_pool.qsize() < 4:
            self._raw_pool.put(conn)
        else:
            self._discard(conn)

    def close(self) -> None:
        """Return the connections kept for :meth:`_record_fast` to the engine's pool."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        while True:
            try:
                conn = self._raw_pool.get_nowait()
            except queue.Empty:
                return
            self._discard(conn)

    def record_refusal(self, study_uid: str | None, action: str, detail: str) -> None:
        """Record a refused instance or association on its study (when known)."""
        with self._engine.begin() as conn:
            study_id = self._study_id(conn, study_uid) if study_uid else None
            conn.execute(insert(AuditEntry).values(actor="scp", action=action, study_id=study_id,
                                                   detail=detail))
            if study_id is not None:
                conn.execute(update(Study).where(Study.id == study_id).values(
                    reason=f"refused: {detail}"[:2000], updated_at=utcnow()))
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
