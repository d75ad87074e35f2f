"""The running node: SCP, workers, scheduler ticks and the web page.

Everything runs in one process, except that with ``[dicom] receivers`` above 1
the C-STORE listener runs in that many child processes (:class:`ReceiverPool`).

``lungnode serve`` builds a :class:`Node` and runs it until SIGTERM/SIGINT.
``lungnode worker`` runs only workers (scale-out against PostgreSQL).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from apscheduler.schedulers.background import BackgroundScheduler  # type: ignore[import-untyped]
from sqlalchemy.orm import Session, sessionmaker

from node.catalog import Catalog
from node.db import make_engine, make_session_factory
from node.errors import ConfigError
from node.jobs import claim_job, lease_owner, queue_stable_studies, release_orphaned_leases
from node.migrate import upgrade
from node.outbox import deliver_due
from node.pipeline import NodeContext, Predictor, archive_pending, run_job
from node.scp import StoreSCP, run_receiver
from node.settings import Settings
from node.storage import InstanceStore
from node.web import WebServer

__all__ = ["Node", "ReceiverPool", "receiver_count"]

logger = logging.getLogger(__name__)

def receiver_count(settings: Settings) -> int:
    """``[dicom] receivers`` with 0 resolved to the number of CPU cores (at most 8)."""
    n = settings.dicom.receivers
    return n if n > 0 else max(1, min(8, os.cpu_count() or 1))


class ReceiverPool:
    """``[dicom] receivers`` child processes, each a :class:`StoreSCP` on the same port.

    The kernel spreads incoming associations over the processes (``SO_REUSEPORT``),
    so C-STORE handling is no longer bound to one interpreter.  Each child has its
    own database engine; SQLite serialises their short write transactions
    (``BEGIN IMMEDIATE`` with a busy timeout).  A child that dies is restarted; on
    :meth:`stop` every child gets SIGTERM (SIGKILL after ``grace`` seconds), and a
    child whose parent dies exits by itself.
    """

    def __init__(self, settings: Settings, count: int, *, grace: float = 10.0) -> None:
        self.settings = settings
        self.count = count
        self.grace = grace
        self._ctx = multiprocessing.get_context("spawn")
        self._children: list[tuple[BaseProcess, Connection]] = []
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p, _ in self._children if p.pid is not None and p.is_alive()]

    def _launch(self, index: int) -> tuple[BaseProcess, Connection]:
        parent_end, child_end = self._ctx.Pipe()
        proc = self._ctx.Process(target=run_receiver, args=(self.settings, index, child_end),
                                 name=f"lungnode-receiver-{index}", daemon=False)
        proc.start()
        child_end.close()
        return proc, parent_end

    @staticmethod
    def _await_ready(index: int, proc: BaseProcess, parent_end: Connection) -> None:
        if not parent_end.poll(120):
            proc.kill()
            raise ConfigError(f"receiver process {index} did not start within 120 s")
        try:
            kind, detail = parent_end.recv()
        except EOFError:
            kind, detail = "error", f"receiver process {index} exited with code {proc.exitcode}"
        if kind != "ready":
            proc.join(5)
            raise ConfigError(str(detail))

    def _spawn(self, index: int) -> tuple[BaseProcess, Connection]:
        child = self._launch(index)
        self._await_ready(index, *child)
        return child

    def start(self) -> None:
        """Start every receiver (in parallel) and return once all of them listen."""
        try:
            for i in range(self.count):
                self._children.append(self._launch(i))
            for i, child in enumerate(self._children):
                self._await_ready(i, *child)
        except BaseException:
            self.stop()
            raise
        self._monitor = threading.Thread(target=self._watch, name="receiver-monitor", daemon=True)
        self._monitor.start()
        logger.info("%d receiver processes on port %d: %s", self.count, self.settings.dicom.port,
                    self.pids)

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            for i, (proc, conn) in enumerate(self._children):
                if proc.is_alive() or self._stopping.is_set():
                    continue
                logger.error("receiver process %d (pid %s) ended with code %s; starting another",
                             i, proc.pid, proc.exitcode)
                conn.close()
                try:
                    self._children[i] = self._spawn(i)
                except ConfigError as exc:
                    logger.error("%s", exc)

    def stop(self) -> None:
        self._stopping.set()
        for proc, _ in self._children:
            if proc.is_alive():
                proc.terminate()
        for proc, conn in self._children:
            proc.join(self.grace)
            if proc.is_alive():
                logger.warning("receiver pid %s did not stop in %.0f s; killing it", proc.pid,
                               self.grace)
                proc.kill()
                proc.join(5)
            conn.close()
        if self._monitor is not None:
            self._monitor.join(5)
        self._children.clear()


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
    """

    def __init__(self, settings: Settings, predictor: Predictor | None = None, *,
                 receive: bool = True, work: bool = True, schedule: bool = True) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database.url, echo=settings.database.echo,
                                  durable=settings.storage.fsync)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)
        self.owner = lease_owner()
        self.ctx = NodeContext(settings, self.sessions, self.owner, predictor)
        self.store = InstanceStore(settings.storage.root, min_free_mb=settings.storage.min_free_mb,
                                   fsync=settings.storage.fsync)
        self.catalog = Catalog(self.sessions)
        receivers = receiver_count(settings) if receive else 0
        self.scp = (StoreSCP(settings.dicom, settings.peers, self.store, self.catalog)
                    if receivers == 1 else None)
        self.receivers = ReceiverPool(settings, receivers) if receivers > 1 else None
        self._receive = receive
        self._work = work
        self._schedule = schedule
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._scheduler: BackgroundScheduler | None = None
        self._web: WebServer | None = None

    # -- periodic work ---------------------------------------------------------
    def completion_tick(self) -> None:
        with self.sessions() as session:
            queued = queue_stable_studies(session, self.settings.completion.stable_seconds)
        if queued:
            logger.info("queued analysis of studies %s", queued)

    def outbox_tick(self) -> None:
        peers = {p.name: p for p in self.settings.peers}
        deliver_due(self.sessions, self.settings.storage.root, peers, self.settings.dicom,
                    self.settings.delivery, self.owner)

    def work_once(self) -> bool:
        """Claim and run one job; ``False`` when the queue was empty."""
        with self.sessions() as session:
            claimed = claim_job(session, self.owner, self.settings.worker.lease_seconds)
        if claimed is None:
            return False
        state = run_job(self.ctx, claimed)
        logger.info("job %d ended: study %s %s", claimed.job_id, claimed.study_instance_uid,
                    state.value)
        return True

    def _archive_pending(self) -> None:
        try:
            archive_pending(self.ctx)
        except Exception:  # noqa: BLE001 - a catch-up must not take the node down; the next start retries
            logger.exception("archive catch-up failed")

    def _worker_loop(self) -> None:
        while not self._stop.is_set():
            if not self.work_once():
                self._stop.wait(self.settings.worker.poll_seconds)

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        upgrade(s.database.url)
        s.storage.root.mkdir(parents=True, exist_ok=True)
        with self.sessions() as session:
            release_orphaned_leases(session)
        if self.scp is not None:
            self.scp.start()
        if self.receivers is not None:
            self.receivers.start()
        if self._schedule:
            sched = BackgroundScheduler(timezone="UTC")
            sched.add_job(self.completion_tick, "interval", seconds=s.completion.poll_seconds,
                          id="completion", max_instances=1, coalesce=True)
            if s.delivery.destinations:
                sched.add_job(self.outbox_tick, "interval", seconds=s.delivery.poll_seconds,
                              id="outbox", max_instances=1, coalesce=True)
            sched.start()
            self._scheduler = sched
        if self._work:
            threading.Thread(target=self._archive_pending, name="archive-catch-up", daemon=True).start()
            for i in range(s.worker.count):
                t = threading.Thread(target=self._worker_loop, name=f"worker-{i}", daemon=True)
                t.start()
                self._workers.append(t)
        if s.web.enabled and self._receive:
            self._web = WebServer(s.web.host, s.web.port, self.sessions)
            self._web.start()
        logger.info("node %s ready (%d workers)", s.dicom.ae_title, len(self._workers))

    def wait(self) -> None:
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()
        if self.scp is not None:
            self.scp.stop()
        if self.receivers is not None:
            self.receivers.stop()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
        for t in self._workers:
            t.join(timeout=60)
        if self._web is not None:
            self._web.stop()
        self.engine.dispose()
        logger.info("node stopped")
