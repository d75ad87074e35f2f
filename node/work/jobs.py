"""The job queue in the database: stable studies become jobs, workers claim them.

Claims are atomic (:func:`node.work.claim.for_update`: ``SELECT ... FOR UPDATE
SKIP LOCKED`` on PostgreSQL, the single writer lock on SQLite), and every change
of a job's state goes through :func:`node.work.state.transition_job`.  A claim
is a lease: a worker renews it while it works; a job whose lease expired (its
worker died) is claimed again.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

import psutil
from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.db import Delivery, DeliveryState, Job, JobState, Study, StudyState, utcnow
from node.work.claim import for_update
from node.work.state import transition, transition_job

__all__ = [
    "ClaimedJob",
    "claim_job",
    "finish_job_failed",
    "lease_owner",
    "owner_alive",
    "queue_stable_studies",
    "release_lease",
    "release_orphaned_leases",
    "renew_lease",
    "requeue_study",
]

logger = logging.getLogger(__name__)

MAX_JOB_ATTEMPTS = 3


def lease_owner() -> str:
    """``host:pid:start-time`` of this process: unique, and checkable after a restart."""
    proc = psutil.Process(os.getpid())
    return f"{socket.gethostname()}:{proc.pid}:{proc.create_time():.3f}"


def owner_alive(owner: str) -> bool:
    """Whether the process of a :func:`lease_owner` string still runs (other hosts: assumed)."""
    host, _, rest = owner.partition(":")
    if host != socket.gethostname():
        return True  # another machine's worker: only its lease can tell
    pid_text, _, started = rest.partition(":")
    try:
        proc = psutil.Process(int(pid_text))
        return f"{proc.create_time():.3f}" == started
    except (psutil.NoSuchProcess, ValueError):
        return False


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    study_id: int
    study_instance_uid: str
    attempt: int


_WAITING = (
    Study.instance_count > Study.analysed_instance_count,
    Study.state.in_([StudyState.RECEIVING, StudyState.COMPLETE, StudyState.DELIVERING,
                     StudyState.DELIVERED, StudyState.DELIVERY_FAILED, StudyState.REJECTED,
                     StudyState.FAILED]),
)
"""A study waits for analysis: it has instances no analysis has seen, and no job is queued or running."""


def next_stable_at(session: Session, stable_seconds: float) -> datetime | None:
    """When the next study waiting for analysis becomes stable (``None``: none waits).

    The study that received its last instance longest ago; the completion tick
    queues it at this time or later.
    """
    last = session.scalar(select(func.min(Study.last_received_at)).where(*_WAITING))
    session.commit()
    return None if last is None else last + timedelta(seconds=stable_seconds)


def queue_stable_studies(session: Session, stable_seconds: float,
                         now: datetime | None = None) -> list[int]:
    """Queue an analysis job for every study idle for ``stable_seconds``.

    A study needs analysis when it has instances that no analysis has seen yet
    (``instance_count > analysed_instance_count``).  Commits; returns the study ids.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stable_seconds)
    stmt = select(Study).where(*_WAITING, Study.last_received_at <= cutoff).order_by(Study.last_received_at)
    queued = []
    for study in session.scalars(for_update(session, stmt)).all():
        transition(session, study, StudyState.QUEUED,
                   reason=f"stable: no instance for {stable_seconds:g} s", actor="scheduler")
        session.add(Job(study_id=study.id, instance_count=study.instance_count, created_at=now))
        queued.append(study.id)
    session.commit()
    return queued


def claim_job(session: Session, owner: str, lease_seconds: float,
              now: datetime | None = None) -> ClaimedJob | None:
    """Claim the oldest queued job (or one whose lease expired). Commits."""
    now = now or utcnow()
    stmt = select(Job).where(or_(
        Job.state == JobState.QUEUED,
        (Job.state == JobState.RUNNING) & (Job.lease_expires_at < now),
    )).order_by(Job.id).limit(1)
    while True:
        job = session.scalars(for_update(session, stmt)).first()
        if job is None:
            session.commit()
            return None
        study = session.get_one(Study, job.study_id)
        if job.state == JobState.RUNNING and job.attempts >= MAX_JOB_ATTEMPTS:
            msg = (f"analysis did not finish in {job.attempts} attempts (worker stopped or "
                   f"timed out each time); check the worker's log, then `lungnode retry <study>`")
            _fail(session, job, study, msg, now)
            session.commit()
            continue
        transition_job(job, JobState.RUNNING)
        job.lease_owner = owner
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        job.attempts += 1
        job.started_at = now
        transition(session, study, StudyState.ANALYSING,
                   reason=f"job {job.id}, attempt {job.attempts}", actor="worker")
        study.analysed_instance_count = study.instance_count
        claimed = ClaimedJob(job.id, study.id, study.study_instance_uid, job.attempts)
        session.commit()
        logger.info("claimed job %d (study id %d, attempt %d)", job.id, study.id, job.attempts)
        return claimed


def _fail(session: Session, job: Job, study: Study, message: str, now: datetime) -> None:
    transition_job(job, JobState.FAILED)
    job.error = message
    job.finished_at = now
    job.lease_owner = None
    transition(session, study, StudyState.FAILED, reason=message, actor="worker")


def finish_job_failed(session: Session, job_id: int, owner: str, message: str,
                      state: StudyState = StudyState.FAILED) -> bool:
    """End a job with an error (study ``failed`` or ``rejected``). Commits.

    Returns ``False`` (and changes nothing) when this worker no longer holds the lease.
    """
    job = session.scalars(for_update(session, select(Job).where(Job.id == job_id),
                                     skip_locked=False)).one()
    if job.state != JobState.RUNNING or job.lease_owner != owner:
        session.rollback()
        return False
    study = session.get_one(Study, job.study_id)
    now = utcnow()
    transition_job(job, JobState.FAILED if state == StudyState.FAILED else JobState.DONE)
    job.error = message
    job.finished_at = now
    job.lease_owner = None
    transition(session, study, state, reason=message, actor="worker")
    session.commit()
    return True


def renew_lease(sessions: sessionmaker[Session], job_id: int, owner: str,
                lease_seconds: float) -> bool:
    """Extend this worker's lease on a job; ``False`` when it was lost.

    A database that cannot be reached (restarted, unreachable) is not a lost lease:
    ``True``, and the next renewal tries again.  Should the lease expire meanwhile and
    another worker take the job, the commit of the results sees it and discards them.
    """
    try:
        with sessions() as session:
            res = session.execute(update(Job).where(
                Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.RUNNING,
            ).values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds)))
            session.commit()
            return bool(res.rowcount)  # type: ignore[attr-defined]
    except SQLAlchemyError as exc:
        logger.warning("job %d: lease not renewed, the database is unavailable (%s)", job_id,
                       type(exc).__name__)
        return True


def release_lease(session: Session, job_id: int, owner: str) -> bool:
    """Make a running job of ``owner`` claimable at once (its run was cut short). Commits.

    The job stays ``running`` with an expired lease, which :func:`claim_job` takes
    over like the job of a stopped worker (the attempt counts).  ``False`` when
    ``owner`` no longer holds it (the job ended, or another worker has it).
    """
    res = session.execute(update(Job).where(
        Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.RUNNING,
    ).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    session.commit()
    return bool(res.rowcount)  # type: ignore[attr-defined]


def release_orphaned_leases(session: Session) -> int:
    """Expire leases held by processes of this host that no longer exist.

    After a crash and restart the jobs and deliveries the dead process held are
    claimable at once instead of after their lease timeout.  Commits.
    """
    now = utcnow()
    released = 0
    for job in session.scalars(select(Job).where(Job.state == JobState.RUNNING)).all():
        if job.lease_owner and not owner_alive(job.lease_owner):
            job.lease_expires_at = now - timedelta(seconds=1)
            released += 1
    for d in session.scalars(select(Delivery).where(Delivery.state == DeliveryState.SENDING)).all():
        if d.lease_owner and not owner_alive(d.lease_owner):
            d.lease_expires_at = now - timedelta(seconds=1)
            released += 1
    session.commit()
    if released:
        logger.warning("released %d leases of stopped processes", released)
    return released


def requeue_study(session: Session, study: Study, actor: str) -> Job:
    """Queue a new analysis of ``study`` now (administrator retry). Commits."""
    transition(session, study, StudyState.QUEUED, reason=f"re-queued by {actor}", actor=actor)
    job = Job(study_id=study.id, instance_count=study.instance_count)
    session.add(job)
    session.commit()
    return job
