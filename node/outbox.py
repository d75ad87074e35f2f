"""Delivery of result objects: one outbox row per object and destination.

A C-STORE SCU sends due rows; a failure reschedules the row with exponential
backoff (``backoff_seconds * 2**(attempts-1)``, capped) and after
``max_attempts`` the row is ``dead`` until an administrator re-queues it with
``lungnode deliveries retry ID``.  A row is marked ``sent`` right after the
peer acknowledged it, so a destination that was down receives everything once
it is back and nothing twice after success.  (Should the node die between a
peer's acknowledgement and that commit, the object is sent again after the
restart; the receiving PACS sees the same SOP Instance UID and keeps one copy.)
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
from pynetdicom import AE, evt
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from node.db import AuditEntry, Delivery, DeliveryState, ResultObject, utcnow
from node.errors import DeliveryError
from node.scp import tune_connection
from node.settings import DeliverySettings, DicomSettings, Peer

__all__ = ["DeliveryOutcome", "backoff", "deliver_due", "retry_delivery", "send_files"]

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


def send_files(paths: list[Path], peer: Peer, dicom: DicomSettings,
               progress: object | None = None) -> list[tuple[Path, int | None, str]]:
    """C-STORE ``paths`` to ``peer`` over one association.

    Returns ``(path, status, message)`` per file; ``status`` is ``None`` when
    the file was not sent.  Raises :class:`DeliveryError` when the association
    cannot be established.
    """
    classes: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        classes[str(ds.SOPClassUID)].add(str(ds.file_meta.TransferSyntaxUID))
    ae = AE(ae_title=dicom.ae_title)
    ae.acse_timeout = dicom.acse_timeout
    ae.dimse_timeout = dicom.dimse_timeout
    ae.network_timeout = dicom.network_timeout
    ae.maximum_pdu_size = dicom.max_pdu
    if sum(len(v) for v in classes.values()) > 128:
        raise DeliveryError("more than 128 SOP class / transfer syntax combinations in one send")
    for sop_class, syntaxes in classes.items():
        # one context per stored transfer syntax: files are sent as they are, not re-encoded
        for syntax in sorted(syntaxes):
            ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, tune_connection)])
    if not assoc.is_established:
        # pynetdicom reports a refused TCP connection as an abort too
        why = ("rejected the association" if assoc.is_rejected
               else "could not be reached or aborted the association")
        raise DeliveryError(
            f"peer {peer.name} ({peer.ae_title}@{peer.host}:{peer.port}) {why}; check that it "
            f"runs and knows this node's AE title {dicom.ae_title}"
        )
    results: list[tuple[Path, int | None, str]] = []
    try:
        for path in paths:
            if not assoc.is_established:
                results.append((path, None, "association ended before this file"))
                continue
            status = assoc.send_c_store(path)
            code = int(status.Status) if status and "Status" in status else None
            if code is None:
                results.append((path, None, "no response from peer (timeout or abort)"))
            else:
                comment = str(status.get("ErrorComment", ""))
                results.append((path, code, comment))
            if progress is not None:
                progress()  # type: ignore[operator]
    finally:
        if assoc.is_established:
            assoc.release()
    return results


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
        if session.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        rows = session.scalars(stmt).all()
        batch: dict[str, list[tuple[int, Path]]] = defaultdict(list)
        for d in rows:
            d.state = DeliveryState.SENDING
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
                    d.state = DeliveryState.SENT
                    d.sent_at = utcnow()
                    d.last_error = None
                    sent += 1
                    continue
                err = msg if status is None else f"status 0x{status:04X} {msg}".strip()
                d.last_error = err
                if d.attempts >= settings.max_attempts:
                    d.state = DeliveryState.DEAD
                    dead += 1
                    session.add(AuditEntry(
                        actor="outbox", action="delivery-dead",
                        study_id=session.get_one(ResultObject, d.result_object_id).study_id,
                        detail=f"delivery {d.id} to {d.destination} gave up after "
                               f"{d.attempts} attempts: {err}"))
                    logger.error("delivery %d to %s dead after %d attempts: %s", d.id,
                                 d.destination, d.attempts, err)
                else:
                    d.state = DeliveryState.PENDING
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
    d.state = DeliveryState.PENDING
    d.attempts = 0
    d.next_attempt_at = utcnow()
    d.lease_owner = None
    session.add(AuditEntry(actor=actor, action="delivery-retry",
                           study_id=session.get_one(ResultObject, d.result_object_id).study_id,
                           detail=f"delivery {delivery_id} to {d.destination} re-queued"))
    session.commit()
    return d
