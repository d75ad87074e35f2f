"""Delivery of result objects: one outbox row per object and destination.

A C-STORE SCU sends due rows; a failure reschedules the row with exponential
backoff (``backoff_seconds * 2**(attempts-1)``, capped) and after
``max_attempts`` the row is ``dead`` until an administrator re-queues it with
``lungnode deliveries retry ID``.  A row is marked ``sent`` right after the
peer acknowledged it, so a destination that was down receives everything once
it is back and nothing twice after success.  (Should the node die between a
peer's acknowledgement and that commit, the object is sent again after the
restart; the receiving PACS sees the same SOP Instance UID and keeps one copy.)

The files are sent by :func:`node.dicom.scu.send_files` (as stored, without
decoding them).  Rows are claimed with :func:`node.work.claim.for_update`, like
jobs, and every change of a row's state goes through
:func:`node.work.state.transition_delivery`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from node.db import AuditEntry, Delivery, DeliveryState, ResultObject, utcnow
from node.dicom.scu import send_files
from node.errors import DeliveryError
from node.settings import DeliverySettings, DicomSettings, Peer
from node.work.claim import for_update
from node.work.state import transition_delivery

__all__ = ["DeliveryOutcome", "backoff", "deliver_due", "retry_delivery"]

logger = logging.getLogger(__name__)


def backoff(attempts: int, settings: DeliverySettings) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt."""
    return float(min(settings.backoff_seconds * 2 ** max(attempts - 1, 0),
                     settings.backoff_max_seconds))


@dataclass(frozen=True)
class DeliveryOutcome:
    sent: int
    failed: int
    dead: int


def _ok(status: int | None) -> bool:
    return status is not None and (status == 0 or 0xB000 <= status <= 0xBFFF)


def deliver_due(sessions: sessionmaker[Session], storage_root: Path, peers: dict[str, Peer],
                dicom: DicomSettings, settings: DeliverySettings, owner: str,
                now: datetime | None = None, lease_seconds: float = 300.0) -> DeliveryOutcome:
    """Send every delivery that is due; returns counts. Safe to run concurrently."""
    now = now or utcnow()
    with sessions() as session:
        stmt = select(Delivery).where(or_(
            (Delivery.state == DeliveryState.PENDING) & (Delivery.next_attempt_at <= now),
            (Delivery.state == DeliveryState.SENDING) & (Delivery.lease_expires_at < now),
        )).order_by(Delivery.id).limit(500)
        rows = session.scalars(for_update(session, stmt)).all()
        batch: dict[str, list[tuple[int, Path]]] = defaultdict(list)
        for d in rows:
            transition_delivery(d, DeliveryState.SENDING)
            d.lease_owner = owner
            d.lease_expires_at = now + timedelta(seconds=lease_seconds)
            obj = session.get_one(ResultObject, d.result_object_id)
            batch[d.destination].append((d.id, storage_root / obj.path))
        session.commit()
    sent = failed = dead = 0
    for destination, items in batch.items():
        peer = peers.get(destination)
        outcomes: dict[int, tuple[int | None, str]]
        if peer is None:
            outcomes = {i: (None, f"destination {destination!r} is no longer in [[peers]]")
                        for i, _ in items}
        else:
            try:
                results = send_files([p for _, p in items], peer, dicom)
                outcomes = {i: (status, msg) for (i, _), (_, status, msg) in zip(items, results,
                                                                                  strict=True)}
            except (DeliveryError, OSError) as exc:
                outcomes = {i: (None, str(exc)) for i, _ in items}
        with sessions() as session:
            for delivery_id, (status, msg) in outcomes.items():
                d = session.get_one(Delivery, delivery_id)
                if d.lease_owner != owner:
                    continue
                d.lease_owner = None
                d.attempts += 1
                if _ok(status):
                    transition_delivery(d, DeliveryState.SENT)
                    d.sent_at = utcnow()
                    d.last_error = None
                    obj = session.get_one(ResultObject, d.result_object_id)
                    to = f" ({peer.ae_title}@{peer.host}:{peer.port})" if peer is not None else ""
                    session.add(AuditEntry(  # what went where
                        actor="outbox", action="delivery-sent", study_id=obj.study_id,
                        detail=f"delivery {d.id}: {obj.kind} v{obj.version} {obj.sop_instance_uid} "
                               f"to {d.destination}{to}, status 0x{status or 0:04X}, attempt {d.attempts}"))
                    sent += 1
                    continue
                err = msg if status is None else f"status 0x{status:04X} {msg}".strip()
                d.last_error = err
                if d.attempts >= settings.max_attempts:
                    transition_delivery(d, DeliveryState.DEAD)
                    dead += 1
                    session.add(AuditEntry(
                        actor="outbox", action="delivery-dead",
                        study_id=session.get_one(ResultObject, d.result_object_id).study_id,
                        detail=f"delivery {d.id} to {d.destination} gave up after "
                               f"{d.attempts} attempts: {err}"))
                    logger.error("delivery %d to %s dead after %d attempts: %s", d.id,
                                 d.destination, d.attempts, err)
                else:
                    transition_delivery(d, DeliveryState.PENDING)
                    d.next_attempt_at = utcnow() + timedelta(seconds=backoff(d.attempts, settings))
                    failed += 1
                    logger.warning("delivery %d to %s failed (attempt %d): %s", d.id,
                                   d.destination, d.attempts, err)
            session.commit()
    return DeliveryOutcome(sent=sent, failed=failed, dead=dead)


def retry_delivery(session: Session, delivery_id: int, actor: str) -> Delivery:
    """Re-queue a dead (or failing) delivery for an immediate attempt. Commits."""
    d = session.get(Delivery, delivery_id)
    if d is None:
        raise DeliveryError(f"no delivery with id {delivery_id}; see `lungnode deliveries`")
    if d.state == DeliveryState.SENT:
        raise DeliveryError(f"delivery {delivery_id} was already sent at {d.sent_at}")
    transition_delivery(d, DeliveryState.PENDING)
    d.attempts = 0
    d.next_attempt_at = utcnow()
    d.lease_owner = None
    session.add(AuditEntry(actor=actor, action="delivery-retry",
                           study_id=session.get_one(ResultObject, d.result_object_id).study_id,
                           detail=f"delivery {delivery_id} to {d.destination} re-queued"))
    session.commit()
    return d
