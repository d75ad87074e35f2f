"""Database: typed SQLAlchemy 2 ORM models, engine and session factory.

Every table is created by Alembic migrations (``lungnode db upgrade``); the
models here are what the code reads and writes.  The database holds UIDs,
states and paths, never patient names, IDs or birth dates: those stay in the
DICOM files.
"""

from __future__ import annotations

import enum
import functools
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker
from sqlalchemy.types import TypeDecorator

__all__ = [
    "AuditEntry",
    "Base",
    "Delivery",
    "DeliveryState",
    "Instance",
    "Job",
    "JobState",
    "DatasetManifest",
    "LabelEvent",
    "LabelSource",
    "LabelValue",
    "LearnStudy",
    "PatientFold",
    "RunState",
    "TrainingRun",
    "ResultObject",
    "Series",
    "Study",
    "StudyState",
    "UidMapping",
    "make_engine",
    "make_session_factory",
    "utcnow",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UtcDateTime()}


class StudyState(enum.StrEnum):
    """Where a study is in the pipeline; changed only by :func:`node.work.state.transition`."""

    RECEIVING = "receiving"
    QUEUED = "queued"
    ANALYSING = "analysing"
    COMPLETE = "complete"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    DELIVERY_FAILED = "delivery-failed"
    REJECTED = "rejected"
    FAILED = "failed"


class JobState(enum.StrEnum):
    """Where an analysis job is; changed only by :func:`node.work.state.transition_job`."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class DeliveryState(enum.StrEnum):
    """Where a delivery is; changed only by :func:`node.work.state.transition_delivery`."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DEAD = "dead"


class LabelValue(enum.StrEnum):
    """A study's severity label: the network's five classes, or COVID-19 of unknown severity."""

    NON_COVID = "non-covid"
    MILD = "mild"
    MODERATE = "moderate"
    SEVERE = "severe"
    CRITICAL = "critical"
    COVID_UNKNOWN = "covid-unknown"
    """COVID-19 present, severity not known: a partial label (trains P(COVID) only)."""


class LabelSource(enum.StrEnum):
    """Where a label event came from."""

    CLI = "cli"
    CSV = "csv"
    WEB = "web"
    DICOM = "dicom"
    IMPORT = "import"
    """A public dataset's own label (``lungnode dataset import-...``)."""


class RunState(enum.StrEnum):
    """Where a training run is."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


def _enum(cls: type[enum.StrEnum]) -> Enum:
    return Enum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e],
                validate_strings=True)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[StudyState] = mapped_column(_enum(StudyState), default=StudyState.RECEIVING,
                                              index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    """Why the study is in its state (rejection, failure), in words."""
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    analysed_instance_count: Mapped[int] = mapped_column(Integer, default=0)
    """Instances present when the last analysis started (new ones trigger another)."""
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    selected_series_uid: Mapped[str | None] = mapped_column(UID)
    selection_reason: Mapped[str | None] = mapped_column(Text)
    result_version: Mapped[int] = mapped_column(Integer, default=0)
    summary: Mapped[str | None] = mapped_column(Text)
    """JSON of the latest measurements (same keys as ``lungnode analyze``)."""
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    purged_at: Mapped[datetime | None] = mapped_column()
    """When retention deleted the study's originals and results (its rows stay, for the record)."""
    archive_note: Mapped[str | None] = mapped_column(Text)
    """Why the study was not archived for training (burned-in annotation ...), in words."""

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))
    """Relative to the storage root."""
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32), default="analyze")
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    """Instances of the study when the job was queued."""
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)


class ResultObject(Base):
    __tablename__ = "result_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    """``sr``, ``seg`` or ``summary``."""
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    deliveries: Mapped[list[Delivery]] = relationship(back_populates="result_object")


class Delivery(Base):
    """One result object to one destination: the outbox row."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("result_object_id", "destination",
                                       name="uq_deliveries_object_destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_object_id: Mapped[int] = mapped_column(
        ForeignKey("result_objects.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState),
                                                 default=DeliveryState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    result_object: Mapped[ResultObject] = relationship(back_populates="deliveries")


class UidMapping(Base):
    """Original UID to de-identified UID, kept so one study maps consistently."""

    __tablename__ = "uid_map"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    original_uid: Mapped[str] = mapped_column(UID, unique=True)
    anonymized_uid: Mapped[str] = mapped_column(UID, index=True)


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    """``scp``, ``worker``, ``outbox``, ``cli:<user>`` ..."""
    action: Mapped[str] = mapped_column(String(64))
    study_id: Mapped[int | None] = mapped_column(
        ForeignKey("studies.id", ondelete="SET NULL"), index=True)
    detail: Mapped[str | None] = mapped_column(Text)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    """``row_hash`` of the row sealed before this one (the chain); ``None`` until sealed."""
    row_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    """sha256 over this row's content and ``prev_hash``, written when the row is sealed."""


class LearnStudy(Base):
    """A study that can be training material: an archived (de-identified) study or an imported one.

    Holds pseudonyms only: the de-identified Study Instance UID and Patient ID of the
    archive copy (or the public dataset's own identifiers), never the originals.
    """

    __tablename__ = "learn_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    origin: Mapped[str] = mapped_column(String(16))
    """``archive``, ``mosmed`` or ``cov19ctdb``."""
    study_id: Mapped[int | None] = mapped_column(
        ForeignKey("studies.id", ondelete="SET NULL"), unique=True)
    """The node's study (archive origin only)."""
    pseudo_study_uid: Mapped[str] = mapped_column(String(128), unique=True)
    pseudo_patient_id: Mapped[str] = mapped_column(String(128), index=True)
    source_path: Mapped[str] = mapped_column(String(512))
    """Archive: the archived series folder relative to the archive root; imports: the source file
    or folder as imported."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LabelEvent(Base):
    """One entry of a study's append-only label history; the current label is derived."""

    __tablename__ = "label_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    learn_study_id: Mapped[int] = mapped_column(
        ForeignKey("learn_studies.id", ondelete="CASCADE"), index=True)
    value: Mapped[LabelValue | None] = mapped_column(_enum(LabelValue))
    """``None``: a retraction of the event it supersedes."""
    source: Mapped[LabelSource] = mapped_column(_enum(LabelSource))
    actor: Mapped[str] = mapped_column(String(128))
    """Who: a user name, ``AE_TITLE/observer`` for DICOM, the dataset for imports."""
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    supersedes_id: Mapped[int | None] = mapped_column(ForeignKey("label_events.id"))
    source_ref: Mapped[str | None] = mapped_column(String(200), index=True)
    """What carried it: ``sr:<SOP Instance UID>``, ``csv:<file sha256>``, ``mosmed:<file>`` ..."""


class PatientFold(Base):
    """The fold of a pseudonymous patient: assigned once, never moved."""

    __tablename__ = "patient_folds"

    pseudo_patient_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    fold: Mapped[int] = mapped_column(Integer)
    stratum: Mapped[str] = mapped_column(String(16))
    """The label the patient had when the fold was assigned (the stratification)."""
    assigned_at: Mapped[datetime] = mapped_column(default=utcnow)


class DatasetManifest(Base):
    """A frozen dataset (``training``) or a locked evaluation set (``locked-eval``)."""

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("kind", "version", name="uq_datasets_kind_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64), index=True)
    as_of: Mapped[datetime] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(String(512))
    """The manifest JSON, relative to ``[training] root``."""
    study_count: Mapped[int] = mapped_column(Integer)
    summary: Mapped[str | None] = mapped_column(Text)
    """JSON: label counts by class and source, folds."""


class TrainingRun(Base):
    """One training of a candidate model on a frozen dataset."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"),
                                                   index=True)
    state: Mapped[RunState] = mapped_column(_enum(RunState), default=RunState.QUEUED, index=True)
    trigger: Mapped[str] = mapped_column(String(16))
    """``cli`` or ``schedule``."""
    slot: Mapped[str | None] = mapped_column(String(64), unique=True)
    """Scheduled runs: the schedule's fire time; unique, so two nodes start one run per slot."""
    created_by: Mapped[str] = mapped_column(String(128))
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    pid: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    run_dir: Mapped[str | None] = mapped_column(String(512))
    """Checkpoints, log and report, relative to ``[training] root``."""
    candidate: Mapped[str | None] = mapped_column(String(128))
    """The model name written into the candidates' registry."""
    params: Mapped[str | None] = mapped_column(Text)
    """JSON of the run's options (epochs, seed, architecture ...)."""
    metrics: Mapped[str | None] = mapped_column(Text)
    """JSON of the best epoch's validation metrics."""
    error: Mapped[str | None] = mapped_column(Text)


def _sqlite_pragmas(dbapi_connection: object, connection_record: object, *,
                   durable: bool = False) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _pg_async_commit(dbapi_connection: object, connection_record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("SET synchronous_commit TO off")
    cursor.close()
    dbapi_connection.commit()  # type: ignore[attr-defined]


def _pg_transactional_again(dbapi_connection: object, connection_record: object) -> None:
    """A connection returns to the pool in transaction mode, whoever switched it to autocommit.

    A connection that came back to the pool still in autocommit (a holder that
    switched it, through the driver, and was collected without ``close()``)
    would make ``SELECT ... FOR UPDATE`` of the next user lock nothing, and two
    workers could claim one job; the node itself never switches it.
    """
    if dbapi_connection is not None and getattr(dbapi_connection, "autocommit", False):
        dbapi_connection.autocommit = False  # type: ignore[attr-defined]


def make_engine(url: str, *, echo: bool = False, durable: bool | None = None) -> Engine:
    """Create the engine; SQLite gets WAL mode, foreign keys and a busy timeout.

    ``durable`` (the node passes ``[storage] fsync``) decides whether a commit
    is flushed to the device before it returns: ``True``: SQLite
    ``synchronous=FULL``; ``False``: SQLite ``synchronous=NORMAL`` and
    PostgreSQL ``synchronous_commit=off`` (a commit survives a crash of the
    node, not a power loss or operating-system crash); ``None``: SQLite NORMAL
    and the server's own PostgreSQL setting.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30,
                                                             "check_same_thread": False})
        event.listen(engine, "connect", functools.partial(_sqlite_pragmas, durable=bool(durable)))
        # pysqlite's own transaction handling defers BEGIN; emit it ourselves so a
        # writer takes the lock at the start of its transaction (single-writer claim).
        event.listen(engine, "connect", _disable_pysqlite_begin)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    # pool_pre_ping: a connection the server dropped (PostgreSQL restarted) is replaced when it is
    # next checked out, so the node carries on once the server is back; connect_timeout: an
    # unreachable server fails a connection attempt in seconds, it does not hang a worker
    connect_args = {"connect_timeout": 10} if url.startswith("postgresql") else {}
    engine = create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=20,
                           connect_args=connect_args)
    if url.startswith("postgresql"):
        event.listen(engine, "checkin", _pg_transactional_again)
    if durable is False and url.startswith("postgresql"):
        event.listen(engine, "connect", _pg_async_commit)
    return engine


def _disable_pysqlite_begin(dbapi_connection: object, connection_record: object) -> None:
    dbapi_connection.isolation_level = None  # type: ignore[attr-defined]


_SINGLE_READ_OPTION = "lungnode_single_read"
SINGLE_READ = {_SINGLE_READ_OPTION: True}
"""Execution options of a connection that runs one reading statement: on SQLite it takes no lock
(no ``BEGIN IMMEDIATE``; the statement is its own snapshot), so the receiver's per-instance lookup
does not queue behind writers; elsewhere it changes nothing."""


def _sqlite_begin_immediate(conn: Connection) -> None:
    if conn.get_execution_options().get(_SINGLE_READ_OPTION):
        return  # pysqlite is in autocommit mode (_disable_pysqlite_begin): no transaction at all
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: Engine) -> sessionmaker:  # type: ignore[type-arg]
    return sessionmaker(engine, expire_on_commit=False)

