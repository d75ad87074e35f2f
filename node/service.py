"""The running node: SCP, workers, scheduler ticks and the web page.

Everything runs in one process: the C-STORE listener (pynetdicom's threaded
server), the worker threads, the APScheduler ticks and the web page.  More
throughput comes from more nodes on one PostgreSQL database (README,
Scale-out).

``lungnode serve`` builds a :class:`Node` and runs it until SIGTERM/SIGINT.
``lungnode worker`` runs only workers (scale-out against PostgreSQL).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler  # type: ignore[import-untyped]
from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from model.learned_lungs import LungSegmenter
from node.db import make_engine, make_session_factory, utcnow
from node.dicom.catalog import Catalog
from node.dicom.scp import StoreSCP
from node.dicom.storage import InstanceStore
from node.errors import ConfigError, TrainingError
from node.learn.labels import LabelRecorder
from node.learn.runs import claim_slot, expire_stale_runs, launch_run
from node.migrate import upgrade
from node.pipeline import NodeContext, Predictor, WarmUpStudy, archive_pending, run_job, warm_up
from node.settings import Settings
from node.web.app import WebServer
from node.work.audit import SEAL_INTERVAL_SECONDS, seal
from node.work.jobs import (
    claim_job,
    lease_owner,
    next_stable_at,
    queue_stable_studies,
    release_lease,
    release_orphaned_leases,
)
from node.work.outbox import DestinationProbe, deliver_due
from node.work.retention import purge

__all__ = ["DatabaseWatch", "Node"]

logger = logging.getLogger(__name__)

RECONNECT_SECONDS = 1.0
"""How often a worker whose database went away tries again (the ticks keep their own intervals)."""


def _db_error_text(exc: SQLAlchemyError) -> str:
    """The driver's one-line reason (``connection refused``...), not SQLAlchemy's SQL and links."""
    text = str(exc.orig) if isinstance(exc, DBAPIError) and exc.orig is not None else str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else '(no message)'}"


def _is_outage(exc: SQLAlchemyError) -> bool:
    """Whether the database could not be reached (as opposed to refusing a statement)."""
    return (isinstance(exc, OperationalError | InterfaceError | PoolTimeout)
            or (isinstance(exc, DBAPIError) and exc.connection_invalidated))


class DatabaseWatch:
    """One log line when a part of the node loses the database, one when it has it back.

    The workers and the ticks keep running through a database outage (PostgreSQL
    restarted, the network to it down): each failed attempt is caught (:meth:`guard`)
    and tried again on the next tick or poll, the engine's ``pool_pre_ping`` replacing
    the dead connections, so the log shows the outage once per part, not once per
    tick.  (The listener answers each C-STORE it cannot record with 0xA700, see
    :mod:`node.dicom.scp`.)
    """

    def __init__(self) -> None:
        self._down: set[str] = set()
        self._lock = threading.Lock()

    def failed(self, part: str, exc: SQLAlchemyError) -> None:
        """Record that ``part`` could not reach the database (logged the first time)."""
        with self._lock:
            first = part not in self._down
            self._down.add(part)
        if first:
            what = "database unavailable" if _is_outage(exc) else "database error"
            logger.error("%s: %s (%s); trying again until it answers", part, what, _db_error_text(exc))

    def ok(self, part: str) -> None:
        """Record that ``part`` reached the database (logged when it had lost it)."""
        if part not in self._down:  # the common case: no lock
            return
        with self._lock:
            was_down = part in self._down
            self._down.discard(part)
        if was_down:
            logger.warning("%s: database reachable again", part)

    @property
    def down(self) -> frozenset[str]:
        """The parts whose last attempt failed."""
        with self._lock:
            return frozenset(self._down)

    @contextmanager
    def guard(self, part: str) -> Iterator[None]:
        """Run the block; a database error ends it, is recorded, and is not raised."""
        try:
            yield
        except SQLAlchemyError as exc:
            self.failed(part, exc)
        else:
            self.ok(part)


class Node:
    """Every long-running part of lungnode, started and stopped together.

    Parameters
    ----------
    settings:
        The loaded configuration.
    predictor:
        The severity network's inference function, loaded once (``None``: no CNN).
    receive, work, schedule:
        Which parts run in this process.
    warm_up_study:
        Writes the small study the workers analyse once at start (``[worker] warm_up``); ``None``:
        no warm-up.
    segmenter:
        The lung segmenter of ``[segmentation]``, its weights loaded (``None``: classical).
    """

    def __init__(self, settings: Settings, predictor: Predictor | None = None, *,
                 receive: bool = True, work: bool = True, schedule: bool = True,
                 warm_up_study: WarmUpStudy | None = None, segmenter: LungSegmenter | None = None) -> None:
        self.settings = settings
        self._warm_up_study = warm_up_study
        self.engine = make_engine(settings.database.url, echo=settings.database.echo,
                                  durable=settings.storage.fsync)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)
        self.owner = lease_owner()
        self.ctx = NodeContext(settings, self.sessions, self.owner, predictor, on_results=self.deliver_soon,
                               segmenter=segmenter)
        self.store = InstanceStore(settings.storage.root, min_free_mb=settings.storage.min_free_mb,
                                   fsync=settings.storage.fsync, overwrite=settings.storage.overwrite,
                                   max_inflated_mb=settings.storage.max_inflated_mb)
        self.catalog = Catalog(self.sessions)
        self.scp = (StoreSCP(settings.dicom, settings.peers, self.store, self.catalog,
                             labels=LabelRecorder.from_settings(self.sessions, settings))
                    if receive else None)
        self._receive = receive
        self._work = work
        self._schedule = schedule
        self.stopping = threading.Event()
        """Set to end :meth:`wait` (``lungnode serve`` sets it on SIGTERM and SIGINT)."""
        self._jobs_ready = threading.Event()  # set when the completion tick queued a job
        self._tick_lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._warm_up_thread: threading.Thread | None = None
        self.scheduler: BackgroundScheduler | None = None
        """The ticks' scheduler while the node runs (``None`` before :meth:`start`)."""
        self._web: WebServer | None = None
        self.training_watchers: list[threading.Thread] = []
        """Threads that wait for scheduled training processes and record how they ended."""
        self.database = DatabaseWatch()
        """Which parts lost the database (each logged once per outage)."""
        self.probe = DestinationProbe()
        """C-ECHO of the destinations the outbox cannot reach; their backlog goes once they answer."""

    # -- periodic work ---------------------------------------------------------
    # The interval ticks are the fallback; hand-offs within the process do not wait for them:
    # the completion tick also runs when the next waiting study becomes stable, a queued job
    # wakes an idle worker, and committed results go to the outbox at once.
    def completion_tick(self) -> None:
        with self.database.guard("completion tick"):
            self._completion_tick()

    def _completion_tick(self) -> None:
        stable = self.settings.completion.stable_seconds
        with self._tick_lock:  # the interval tick and the one set for the next stable study
            with self.sessions() as session:
                queued = queue_stable_studies(session, stable)
                due = next_stable_at(session, stable)
        if queued:
            logger.info("queued analysis of studies %s", queued)
            self._jobs_ready.set()
        self._tick_at(due)

    def _tick_at(self, due: datetime | None) -> None:
        """Run the completion tick once more when the next waiting study becomes stable, if that
        comes before the next interval tick."""
        sched = self.scheduler
        if due is None or sched is None:
            return
        now = utcnow()
        if due >= now + timedelta(seconds=self.settings.completion.poll_seconds):
            return
        sched.add_job(self.completion_tick, "date", run_date=max(due, now) + timedelta(milliseconds=20),
                      id="completion-due", replace_existing=True, misfire_grace_time=None)

    def outbox_tick(self) -> None:
        """Send the due deliveries.  A database outage ends the tick: rows it had claimed stay
        ``sending`` until their lease expires and are sent then (an acknowledged one again: the
        peer keeps one copy of a SOP Instance UID)."""
        peers = {p.name: p for p in self.settings.peers}
        with self.database.guard("outbox"):
            deliver_due(self.sessions, self.settings.storage.root, peers, self.settings.dicom,
                        self.settings.delivery, self.owner, probe=self.probe)

    def audit_tick(self) -> None:
        """Seal the audit rows written since the last seal (:func:`node.work.audit.seal`)."""
        with self.database.guard("audit"), self.sessions() as session:
            seal(session)

    def retention_tick(self) -> None:
        """The retention purge (:func:`node.work.retention.purge`); a database outage skips it."""
        with self.database.guard("retention"):
            purge(self.sessions, self.settings)

    def deliver_soon(self) -> None:
        """Run the outbox now (in the scheduler's threads), not at its next tick."""
        if self.scheduler is not None and self.settings.delivery.destinations:
            self.scheduler.add_job(self.outbox_tick, id="outbox-now", replace_existing=True,
                                    misfire_grace_time=None)

    def work_once(self) -> bool:
        """Claim and run one job; ``False`` when the queue was empty.

        Raises
        ------
        sqlalchemy.exc.SQLAlchemyError
            The database could not be reached for the claim.  A job whose run lost the
            database is not raised for: its lease is given back once the database answers
            again, so any worker takes it over at once (not after ``lease_seconds``).
        """
        with self.sessions() as session:
            claimed = claim_job(session, self.owner, self.settings.worker.lease_seconds)
        if claimed is None:
            return False
        try:
            state = run_job(self.ctx, claimed)
        except SQLAlchemyError as exc:
            self.database.failed("worker", exc)
            self._give_back_when_reachable(claimed.job_id)
            return True
        logger.info("job %d ended: study %s %s", claimed.job_id, claimed.study_instance_uid,
                    state.value)
        return True

    def _give_back_when_reachable(self, job_id: int) -> None:
        """Release this worker's lease on ``job_id`` as soon as the database answers (or leave it
        to :func:`~node.work.jobs.release_orphaned_leases` of the next start when the node stops
        first)."""
        while not self.stopping.is_set():
            try:
                with self.sessions() as session:
                    released = release_lease(session, job_id, self.owner)
            except SQLAlchemyError as exc:
                self.database.failed("worker", exc)
                self.stopping.wait(RECONNECT_SECONDS)
                continue
            self.database.ok("worker")
            if released:
                logger.warning("job %d: interrupted by the database outage; queued again", job_id)
            return

    def _archive_pending(self) -> None:
        try:
            archive_pending(self.ctx)
        except Exception:  # noqa: BLE001 - a catch-up must not take the node down; the next start retries
            logger.exception("archive catch-up failed")

    def _warm_up(self, write_study: WarmUpStudy) -> None:
        try:
            seconds = warm_up(self.ctx, write_study)
        except Exception:  # noqa: BLE001 - only the first study's speed depends on it
            logger.warning("warm-up analysis failed; the first study pays the start-up costs",
                           exc_info=True)
            return
        logger.info("warm-up analysis done in %.1f s", seconds)

    def training_tick(self, fire_time: datetime | None = None) -> None:
        """The ``[training] schedule`` fired: claim this minute's slot and start the run's process.

        The slot is the fire time to the minute (``fire_time``, default now), so nodes sharing
        one database whose schedulers fire together claim the same slot and exactly one of
        them trains.
        """
        fire = (fire_time or utcnow()).replace(second=0, microsecond=0)
        run_id = None
        with self.database.guard("training schedule"):
            run_id = claim_slot(self.sessions, self.settings, fire, created_by=f"schedule@{self.owner}")
        if run_id is None:
            return
        try:
            self.training_watchers.append(
                launch_run(self.sessions, self.settings, run_id, log_dir=self.settings.learn_root / "logs"))
        except TrainingError as exc:
            logger.error("%s", exc)

    def training_lease_tick(self) -> None:
        """Fail training runs whose process stopped renewing its lease (a crash of a whole node)."""
        stale: list[int] = []
        with self.database.guard("training lease tick"), self.sessions() as session:
            stale = expire_stale_runs(session)
        if stale:
            logger.warning("training runs %s stopped renewing their lease; marked failed", stale)

    def _worker_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                worked = self.work_once()
            except SQLAlchemyError as exc:  # the claim: try again once the database is back
                self.database.failed("worker", exc)
                self.stopping.wait(min(RECONNECT_SECONDS, self.settings.worker.poll_seconds))
                continue
            self.database.ok("worker")
            if not worked:
                self._jobs_ready.wait(self.settings.worker.poll_seconds)
                self._jobs_ready.clear()

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        upgrade(s.database.url)
        s.storage.root.mkdir(parents=True, exist_ok=True)
        with self.sessions() as session:
            release_orphaned_leases(session)
        if self.scp is not None:
            try:
                self.scp.start()
            except OSError as exc:
                ports = " or ".join(f"{s.dicom.host}:{p}" for p in (
                    s.dicom.port if s.dicom.plain else None, s.dicom.tls_port) if p is not None)
                raise ConfigError(
                    f"the DICOM listener cannot listen on {ports}: {exc}. Is "
                    "another program (another lungnode, a PACS) using the port? Stop it, or change "
                    "[dicom] port (or tls_port) in the configuration.") from exc
        if self._schedule:
            sched = BackgroundScheduler(timezone="UTC")
            sched.add_job(self.completion_tick, "interval", seconds=s.completion.poll_seconds,
                          id="completion", max_instances=1, coalesce=True)
            if s.delivery.destinations:
                sched.add_job(self.outbox_tick, "interval", seconds=s.delivery.poll_seconds,
                              id="outbox", max_instances=1, coalesce=True)
            sched.add_job(self.retention_tick, "interval", seconds=s.retention.poll_seconds,
                          id="retention", max_instances=1, coalesce=True)
            sched.add_job(self.audit_tick, "interval", seconds=SEAL_INTERVAL_SECONDS, id="audit-seal",
                          max_instances=1, coalesce=True)
            if s.training.schedule:
                # validated when the settings were loaded
                trigger = CronTrigger.from_crontab(s.training.schedule, timezone="UTC")
                sched.add_job(self.training_tick, trigger, id="training", max_instances=1,
                              coalesce=True, misfire_grace_time=30)
                sched.add_job(self.training_lease_tick, "interval",
                              seconds=max(5.0, s.training.lease_seconds / 3), id="training-leases",
                              max_instances=1, coalesce=True)
            sched.start()
            self.scheduler = sched
        if self._work:
            threading.Thread(target=self._archive_pending, name="archive-catch-up", daemon=True).start()
            if s.worker.warm_up and s.worker.count > 0 and self._warm_up_study is not None:
                self._warm_up_thread = threading.Thread(target=self._warm_up, args=(self._warm_up_study,),
                                                        name="warm-up", daemon=True)
                self._warm_up_thread.start()
            for i in range(s.worker.count):
                t = threading.Thread(target=self._worker_loop, name=f"worker-{i}", daemon=True)
                t.start()
                self._workers.append(t)
        if s.web.enabled and self._receive:
            try:
                self._web = WebServer(s.web.host, s.web.port, self.sessions)
            except OSError as exc:
                raise ConfigError(
                    f"the web page cannot listen on {s.web.host}:{s.web.port}: {exc}. Is another "
                    "program using the port? Stop it, or change [web] port in the "
                    "configuration.") from exc
            self._web.start()
        logger.info("node %s ready (%d workers)", s.dicom.ae_title, len(self._workers))

    def wait(self) -> None:
        self.stopping.wait()

    def stop(self) -> None:
        self.stopping.set()
        self._jobs_ready.set()
        if self.scp is not None:
            self.scp.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        for t in self._workers:
            t.join(timeout=60)
        if self._warm_up_thread is not None:  # a second or two: its temporary folder is removed
            self._warm_up_thread.join(timeout=60)
        if self._web is not None:
            self._web.stop()
        self.audit_tick()  # what this node wrote last is sealed before it goes
        self.engine.dispose()
        logger.info("node stopped")
