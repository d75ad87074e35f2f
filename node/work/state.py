"""The study state table and the one function that changes a study's state."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from node.db import AuditEntry, Study, StudyState
from node.errors import IllegalTransition

__all__ = ["TRANSITIONS", "transition"]

logger = logging.getLogger(__name__)

S = StudyState

TRANSITIONS: dict[StudyState, frozenset[StudyState]] = {
    # stable (no instance for stable_seconds): a job is queued
    S.RECEIVING: frozenset({S.QUEUED}),
    # a worker claimed the job
    S.QUEUED: frozenset({S.ANALYSING}),
    # results built (complete), nothing to analyse (rejected), an error (failed),
    # or the worker's lease expired and the job went back to the queue
    S.ANALYSING: frozenset({S.COMPLETE, S.REJECTED, S.FAILED, S.QUEUED, S.ANALYSING}),
    # more instances arrived after an analysis, or an administrator retries
    S.COMPLETE: frozenset({S.QUEUED}),
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
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(
            f"study {study.study_instance_uid}: {old.value} -> {new.value} is not allowed"
        )
    study.state = new
    study.reason = reason
    session.add(AuditEntry(actor=actor, action=f"state:{new.value}", study_id=study.id,
                           detail=f"{old.value} -> {new.value}" + (f": {reason}" if reason else "")))
    logger.info("study %s (id %s): %s -> %s", study.study_instance_uid, study.id, old.value,
                new.value)
