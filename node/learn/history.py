"""The current label of each study, derived from the append-only label history.

Label events are never updated or deleted (:class:`node.db.LabelEvent`): a
change is a new event that supersedes the one before, a retraction an event
without a value.  The current label of a study is its latest event (by time,
then id) at a given moment; a study whose latest event is a retraction has no
label.  Asking ``as_of`` an earlier time gives the labels as they were then,
which is what makes a frozen dataset reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db import LabelEvent, LearnStudy

__all__ = ["CurrentLabel", "current_labels", "latest_event"]


@dataclass(frozen=True)
class CurrentLabel:
    """A study's label in force, with the event that set it."""

    learn_study_id: int
    pseudo_study_uid: str
    pseudo_patient_id: str
    origin: str
    event_id: int
    value: str
    source: str
    actor: str
    at: datetime


def current_labels(session: Session, as_of: datetime | None = None) -> list[CurrentLabel]:
    """Every study's label in force at ``as_of`` (now when ``None``), by pseudonymous study ID.

    Studies whose latest event is a retraction, or that had no event yet at
    ``as_of``, are left out.
    """
    stmt = select(LabelEvent, LearnStudy).join(LearnStudy, LabelEvent.learn_study_id == LearnStudy.id)
    if as_of is not None:
        stmt = stmt.where(LabelEvent.at <= as_of)
    latest: dict[int, tuple[LabelEvent, LearnStudy]] = {}
    for event, study in session.execute(stmt.order_by(LabelEvent.at, LabelEvent.id)):
        latest[study.id] = (event, study)
    out = [
        CurrentLabel(learn_study_id=study.id, pseudo_study_uid=study.pseudo_study_uid,
                     pseudo_patient_id=study.pseudo_patient_id, origin=study.origin,
                     event_id=event.id, value=str(event.value), source=str(event.source),
                     actor=event.actor, at=event.at)
        for event, study in latest.values() if event.value is not None
    ]
    return sorted(out, key=lambda c: c.pseudo_study_uid)


def latest_event(session: Session, learn_study_id: int) -> LabelEvent | None:
    """The study's latest label event (a retraction included), or ``None``."""
    stmt = (select(LabelEvent).where(LabelEvent.learn_study_id == learn_study_id)
            .order_by(LabelEvent.at.desc(), LabelEvent.id.desc()).limit(1))
    return session.scalars(stmt).first()
