"""Training runs as the node records them: rows, leases, scheduled slots and the child process.

The trainer (:mod:`training.retrain`) never touches the database; this module
does the node's half.  A run is a :class:`node.db.TrainingRun` row whose state
changes only through :func:`node.work.state.transition_run`:

- ``lungnode train`` creates a run, holds its lease while it trains (a
  heartbeat renews it) and records the candidate, or the error;
- a scheduled run is claimed by inserting a row whose ``slot`` (the schedule's
  fire time) is unique: of two nodes on one PostgreSQL whose schedulers fire
  at the same minute, one insert wins and the other sees the conflict and
  does nothing (APScheduler alone does not coordinate processes);
- the claimed run trains in a child process (``lungnode train --run N``) at
  low priority (``nice``) with capped threads, so training never takes the
  DICOM listener or the analysis down; the node watches the child, and a crash
  or an out-of-memory kill is recorded on the run, nothing else;
- a run whose lease expired (its process is gone) is marked failed by the next
  tick of any node; ``lungnode train --resume N`` continues from its last
  checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.db import DatasetManifest, LabelEvent, RunState, TrainingRun, utcnow
from node.errors import TrainingError
from node.settings import Settings
from node.work.claim import for_update
from node.work.jobs import owner_alive
from node.work.state import transition_run

__all__ = [
    "RunHeartbeat",
    "begin_run",
    "claim_slot",
    "create_run",
    "expire_stale_runs",
    "fail_run",
    "finish_run",
    "labels_since_last_run",
    "latest_dataset",
    "launch_run",
    "run_command",
    "run_params",
]

logger = logging.getLogger(__name__)


def run_params(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """A run's trainer options from ``[training]``; ``overrides`` that are not ``None`` win."""
    t = settings.training
    params: dict[str, Any] = {"architecture": t.architecture, "epochs": t.epochs,
                              "batch_size": t.batch_size, "lr": t.learning_rate, "seed": t.seed,
                              "class_balanced": t.class_balanced}
    params.update({k: v for k, v in overrides.items() if v is not None})
    return params


def create_run(session: Session, *, dataset_id: int | None, trigger: str, created_by: str,
               params: dict[str, Any], slot: str | None = None) -> TrainingRun:
    """A new queued run (the caller commits); its folder is ``runs/run-<id>`` under the learn root."""
    run = TrainingRun(dataset_id=dataset_id, trigger=trigger, created_by=created_by, slot=slot,
                      params=json.dumps(params, sort_keys=True), state=RunState.QUEUED)
    session.add(run)
    session.flush()
    run.run_dir = f"runs/run-{run.id}"
    return run


def labels_since_last_run(session: Session) -> int:
    """Label events recorded since the last run was created (all events when there was none)."""
    last = session.scalar(select(func.max(TrainingRun.created_at)))
    stmt = select(func.count(LabelEvent.id))
    if last is not None:
        stmt = stmt.where(LabelEvent.at > last)
    return int(session.scalar(stmt) or 0)


def claim_slot(sessions: sessionmaker[Session], settings: Settings, fire_time: datetime,
               created_by: str) -> int | None:
    """Claim the scheduled run of ``fire_time``; its id, or ``None`` when not due or taken.

    Not due: fewer than ``[training] min_new_labels`` label events since the
    last run.  Taken: another node inserted the slot's row first (the unique
    ``slot`` column decides, on SQLite and PostgreSQL alike).
    """
    slot = fire_time.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")
    with sessions() as session:
        new_labels = labels_since_last_run(session)
        if new_labels < settings.training.min_new_labels:
            logger.info("scheduled retraining %s skipped: %d new label events, %d needed", slot,
                        new_labels, settings.training.min_new_labels)
            return None
        try:
            # the INSERT (at the flush that gives the run its id) is where the unique slot decides:
            # on PostgreSQL the second node's insert waits for the first commit, then fails
            run = create_run(session, dataset_id=None, trigger="schedule", created_by=created_by,
                             slot=slot, params=run_params(settings, threads=settings.training.threads,
                                                          freeze=True))
            session.commit()
        except IntegrityError:
            session.rollback()
            logger.info("scheduled retraining %s: another node claimed it", slot)
            return None
        logger.info("scheduled retraining %s claimed as run %d (%d new label events)", slot, run.id,
                    new_labels)
        return run.id


def begin_run(session: Session, run_id: int, owner: str, lease_seconds: float, *,
              resume: bool = False) -> TrainingRun:
    """Take the run's lease and mark it running (the caller commits).

    A run whose lease has not expired is taken over only when its process is
    gone (same host, :func:`node.work.jobs.owner_alive`), as after a kill.

    Raises
    ------
    TrainingError
        No such run, a run that already succeeded, or one another live process
        holds (its lease has not expired); resuming a run that never started.
    """
    run = session.scalars(for_update(session, select(TrainingRun).where(TrainingRun.id == run_id),
                                     skip_locked=False)).first()
    if run is None:
        raise TrainingError(f"there is no training run {run_id}; `lungnode train --list` shows them")
    now = utcnow()
    if run.state == RunState.SUCCEEDED:
        raise TrainingError(f"training run {run_id} already succeeded (candidate {run.candidate}); "
                            "start a new run instead")
    if run.state == RunState.RUNNING and run.lease_expires_at is not None and run.lease_expires_at > now \
            and run.lease_owner not in (None, owner) and owner_alive(run.lease_owner):
        raise TrainingError(f"training run {run_id} is running in {run.lease_owner} (pid {run.pid}); "
                            "wait for it, or stop that process and resume after its lease expires "
                            f"({run.lease_expires_at:%Y-%m-%d %H:%M:%S} UTC)")
    if resume and run.state == RunState.QUEUED:
        raise TrainingError(f"training run {run_id} never started; run it with `lungnode train --run "
                            f"{run_id}`")
    transition_run(run, RunState.RUNNING)
    run.lease_owner = owner
    run.lease_expires_at = now + timedelta(seconds=lease_seconds)
    run.pid = os.getpid()
    run.started_at = run.started_at or now
    run.error = None
    return run


def finish_run(session: Session, run_id: int, *, candidate: str, metrics: dict[str, Any],
               dataset_id: int | None = None) -> None:
    """Record the candidate and its metrics; the run succeeded (commits)."""
    run = session.get_one(TrainingRun, run_id)
    transition_run(run, RunState.SUCCEEDED)
    run.candidate = candidate
    run.metrics = json.dumps(metrics, sort_keys=True)
    if dataset_id is not None:
        run.dataset_id = dataset_id
    run.finished_at = utcnow()
    run.lease_owner = None
    run.lease_expires_at = None
    session.commit()


def fail_run(session: Session, run_id: int, error: str) -> None:
    """Record why the run failed (commits); a run already finished is left alone."""
    run = session.get_one(TrainingRun, run_id)
    if run.state in (RunState.SUCCEEDED, RunState.FAILED):
        return
    transition_run(run, RunState.FAILED)
    run.error = error
    run.finished_at = utcnow()
    run.lease_owner = None
    run.lease_expires_at = None
    session.commit()
    logger.error("training run %d failed: %s", run_id, error)


def expire_stale_runs(session: Session) -> list[int]:
    """Fail running runs whose lease expired or whose process on this host is gone; their ids (commits)."""
    now = utcnow()
    running = session.scalars(for_update(session, select(TrainingRun).where(
        TrainingRun.state == RunState.RUNNING)))
    stale = [r for r in running if (r.lease_expires_at is not None and r.lease_expires_at < now)
             or (r.lease_owner is not None and not owner_alive(r.lease_owner))]
    for run in stale:
        transition_run(run, RunState.FAILED)
        run.error = (f"the run's process ({run.lease_owner}, pid {run.pid}) stopped renewing its lease; "
                     f"`lungnode train --resume {run.id}` continues from its last checkpoint")
        run.finished_at = now
        run.lease_owner = None
        run.lease_expires_at = None
    session.commit()
    return [r.id for r in stale]


class RunHeartbeat:
    """Renews a run's lease every third of ``lease_seconds`` in a background thread."""

    def __init__(self, sessions: sessionmaker[Session], run_id: int, owner: str,
                 lease_seconds: float) -> None:
        self.sessions, self.run_id, self.owner = sessions, run_id, owner
        self.lease_seconds = lease_seconds
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"run-{run_id}-lease", daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.lease_seconds / 3):
            with self.sessions() as session:
                run = session.get(TrainingRun, self.run_id)
                if run is None or run.state != RunState.RUNNING or run.lease_owner != self.owner:
                    return
                run.lease_expires_at = utcnow() + timedelta(seconds=self.lease_seconds)
                session.commit()

    def __enter__(self) -> RunHeartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def run_command(settings: Settings, run_id: int) -> list[str]:
    """The child process's command line: ``nice -n N python -m node.cli --config F train --run ID``."""
    cmd = [sys.executable, "-m", "node.cli"]
    if settings.config_path is not None:
        cmd += ["--config", str(settings.config_path)]
    cmd += ["train", "--run", str(run_id)]
    if settings.training.nice > 0:
        cmd = ["nice", "-n", str(settings.training.nice), *cmd]
    return cmd


def launch_run(sessions: sessionmaker[Session], settings: Settings, run_id: int, *,
               log_dir: Path, command: list[str] | None = None) -> threading.Thread:
    """Start the run's child process and a thread that records how it ended.

    The child gets ``[training] threads`` for torch and the math libraries and
    ``[training] nice``; its output goes to ``<log_dir>/run-<id>.log``.  When
    it exits without having recorded an outcome (a crash, a kill by the
    out-of-memory killer), the run is failed with the exit status.  ``command``
    replaces :func:`run_command` (tests).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    threads = str(settings.training.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "LUNGNODE_TRAINING__THREADS": threads}
    log_path = log_dir / f"run-{run_id}.log"
    log = log_path.open("ab")
    try:
        proc = subprocess.Popen(command or run_command(settings, run_id), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    except OSError as exc:
        log.close()
        with sessions() as session:
            fail_run(session, run_id, f"the training process could not start: {exc}")
        raise TrainingError(f"training run {run_id}: the training process could not start: {exc}") from exc
    log.close()
    logger.info("training run %d started as process %d (log %s)", run_id, proc.pid, log_path)

    def watch() -> None:
        code = proc.wait()
        if code == 0:
            return
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        if code in (-9, 137):
            how += " (SIGKILL: out of memory, or stopped by an administrator)"
        with sessions() as session:
            fail_run(session, run_id, f"the training process ended with {how}; see {log_path}")

    thread = threading.Thread(target=watch, name=f"run-{run_id}-watch", daemon=True)
    thread.start()
    return thread


def latest_dataset(session: Session) -> DatasetManifest | None:
    """The most recent frozen training dataset."""
    return session.scalars(select(DatasetManifest).where(DatasetManifest.kind == "training")
                           .order_by(DatasetManifest.version.desc()).limit(1)).first()
