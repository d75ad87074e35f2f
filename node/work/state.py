"""The state tables of studies, jobs, deliveries and training runs, and the functions that change them.

Each table maps a state to the states it may move to; one function per kind of
row performs every change of its state and refuses any change the table does
not list, so a bug shows as :class:`~node.errors.IllegalTransition` instead of
a row in a state nothing expects.
"""

from __future__ import annotations

import logging
from typing import TypeVar

from sqlalchemy.orm import Session, object_session

from node.db import (
    AuditEntry,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    RunState,
    Study,
    StudyState,
    TrainingRun,
)
from node.errors import IllegalTransition

_E = TypeVar("_E", StudyState, JobState, DeliveryState, RunState)

__all__ = [
    "DELIVERY_TRANSITIONS",
    "JOB_TRANSITIONS",
    "RUN_TRANSITIONS",
    "TRANSITIONS",
    "transition",
    "transition_delivery",
    "transition_job",
    "transition_run",
]

logger = logging.getLogger(__name__)


def _check(table: dict[_E, frozenset[_E]], old: _E, new: _E, what: str) -> None:
    if new not in table[old]:
        raise IllegalTransition(f"{what}: {old.value} -> {new.value} is not allowed")

S = StudyState

TRANSITIONS: dict[StudyState, frozenset[StudyState]] = {
    # stable (no instance for stable_seconds): a job is queued
    S.RECEIVING: frozenset({S.QUEUED}),
    # a worker claimed the job
    S.QUEUED: frozenset({S.ANALYSING}),
    # results built and queued for the destinations (delivering) or, with no destinations,
    # complete; nothing to analyse (rejected), an error (failed), or the worker's lease
    # expired and the job went back to the queue
    S.ANALYSING: frozenset({S.COMPLETE, S.DELIVERING, S.REJECTED, S.FAILED, S.QUEUED,
                            S.ANALYSING}),
    # more instances arrived after an analysis, or an administrator retries (every end state
    # and every delivery state); a study completed before the delivery states existed takes
    # the state of its deliveries when the outbox next settles them
    S.COMPLETE: frozenset({S.QUEUED, S.DELIVERING, S.DELIVERED, S.DELIVERY_FAILED}),
    # the outbox: every result reached every destination (delivered), or one delivery
    # passed its horizon (delivery-failed)
    S.DELIVERING: frozenset({S.DELIVERED, S.DELIVERY_FAILED, S.QUEUED}),
    S.DELIVERED: frozenset({S.QUEUED}),
    # an administrator re-queued the dead deliveries (`lungnode deliveries retry --dead`)
    S.DELIVERY_FAILED: frozenset({S.DELIVERING, S.QUEUED}),
    S.REJECTED: frozenset({S.QUEUED}),
    S.FAILED: frozenset({S.QUEUED}),
}


def transition(
    session: Session, study: Study, new: StudyState, *, reason: str | None = None,
    actor: str = "node",
) -> None:
    """Move ``study`` to ``new``, recording the reason and an audit entry.

    Raises
    ------
    IllegalTransition
        The state table does not allow the change.
    """
    old = study.state
    _check(TRANSITIONS, old, new, f"study {study.study_instance_uid}")
    study.state = new
    study.reason = reason
    session.add(AuditEntry(actor=actor, action=f"state:{new.value}", study_id=study.id,
                           detail=f"{old.value} -> {new.value}" + (f": {reason}" if reason else "")))
    logger.info("study %s (id %s): %s -> %s", study.study_instance_uid, study.id, old.value,
                new.value)


J = JobState

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # a worker claimed the job
    J.QUEUED: frozenset({J.RUNNING}),
    # results committed or nothing to analyse (done), an error or too many attempts
    # (failed), or its lease expired and another worker claimed it again (running)
    J.RUNNING: frozenset({J.DONE, J.FAILED, J.RUNNING}),
    # a job ends once; a new analysis of the study is a new job
    J.DONE: frozenset(),
    J.FAILED: frozenset(),
}


def transition_job(job: Job, new: JobState) -> None:
    """Move ``job`` to ``new``; the caller sets the other columns and commits.

    Raises
    ------
    IllegalTransition
        :data:`JOB_TRANSITIONS` does not allow the change.
    """
    old = job.state
    _check(JOB_TRANSITIONS, old, new, f"job {job.id}")
    job.state = new
    logger.debug("job %s (study id %s): %s -> %s", job.id, job.study_id, old.value, new.value)


D = DeliveryState

DELIVERY_TRANSITIONS: dict[DeliveryState, frozenset[DeliveryState]] = {
    # a sender claimed the row, or an administrator asked for an attempt now
    D.PENDING: frozenset({D.SENDING, D.PENDING}),
    # acknowledged (sent), failed and rescheduled (pending), failed after its horizon
    # (dead), or the sender's lease expired and another sender claimed it again (sending)
    D.SENDING: frozenset({D.SENT, D.PENDING, D.DEAD, D.SENDING}),
    # the peer has the object; sending it again is never needed
    D.SENT: frozenset(),
    # an administrator re-queued it (`lungnode deliveries retry ID`, `--dead`, `--destination`)
    D.DEAD: frozenset({D.PENDING}),
}


def transition_delivery(delivery: Delivery, new: DeliveryState) -> None:
    """Move ``delivery`` to ``new``; the caller sets the other columns and commits.

    Raises
    ------
    IllegalTransition
        :data:`DELIVERY_TRANSITIONS` does not allow the change.
    """
    old = delivery.state
    _check(DELIVERY_TRANSITIONS, old, new, f"delivery {delivery.id} to {delivery.destination}")
    delivery.state = new
    logger.debug("delivery %s to %s: %s -> %s", delivery.id, delivery.destination, old.value,
                 new.value)


R = RunState
RUN_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    # its process started training
    R.QUEUED: frozenset({R.RUNNING, R.FAILED}),
    # a candidate was written (succeeded), an error, a crash or an expired lease (failed), or
    # `lungnode train --resume` took over a run whose process is gone (running)
    R.RUNNING: frozenset({R.SUCCEEDED, R.FAILED, R.RUNNING}),
    # `lungnode train --resume` continues from the last checkpoint
    R.FAILED: frozenset({R.RUNNING}),
    # a run ends once; training again is a new run
    R.SUCCEEDED: frozenset(),
}


def transition_run(run: TrainingRun, new: RunState) -> None:
    """Move ``run`` to ``new``; the caller sets the other columns and commits.

    Raises
    ------
    IllegalTransition
        :data:`RUN_TRANSITIONS` does not allow the change.
    """
    old = run.state
    _check(RUN_TRANSITIONS, old, new, f"training run {run.id}")
    run.state = new
    session = object_session(run)
    if session is not None:  # every start and end of a training run is in the audit log
        session.add(AuditEntry(actor=f"training:{run.lease_owner or run.created_by}"[:64],
                               action=f"run:{new.value}",
                               detail=f"training run {run.id} ({run.trigger}, by {run.created_by}, "
                                      f"dataset {run.dataset_id}): {old.value} -> {new.value}"))
    logger.info("training run %s: %s -> %s", run.id, old.value, new.value)
