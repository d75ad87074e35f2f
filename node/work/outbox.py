"""Delivery of result objects: one outbox row per object and destination.

A C-STORE SCU sends due rows.  A failure reschedules the row with exponential
backoff (``backoff_seconds * 2**(attempts-1)``, capped at
``backoff_max_seconds``) for as long as ``[delivery] horizon_hours`` after the
row was queued: only a failure after the horizon makes it ``dead``, so a
destination down for an hour of maintenance receives every result made
meanwhile.  A dead row waits for an administrator (``lungnode deliveries retry
ID``, ``--dead``, ``--destination NAME``: :func:`retry_delivery`,
:func:`requeue_deliveries`); a re-queued row past its horizon gets one attempt.

While a destination cannot be reached, :class:`DestinationProbe` sends it a
C-ECHO every ``backoff_seconds`` (one per destination, not one per row); once
it answers, every pending row of that destination is due at once, so the
backlog does not wait out its rows' backoff (up to 15 minutes by default).

A row is marked ``sent`` right after the peer acknowledged it, so a
destination that was down receives everything once it is back and nothing
twice after success.  (Should the node die between a peer's acknowledgement
and that commit, the object is sent again after the restart; the receiving
PACS sees the same SOP Instance UID and keeps one copy.)

The study follows its deliveries (:func:`settle_study`, in the transaction
that changes them): ``delivering`` while a delivery of its latest results is
pending or sending, ``delivered`` once all of them were acknowledged,
``delivery-failed`` while one of them is dead.  Deliveries of superseded result
versions are still sent but do not decide the state.

The files are sent by :func:`node.dicom.scu.send_files` (as stored, without
decoding them).  Rows are claimed with :func:`node.work.claim.for_update`, like
jobs, and every change of a row's state goes through
:func:`node.work.state.transition_delivery`, of a study's through
:func:`node.work.state.transition`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from pynetdicom import AE
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.db import (
    AuditEntry,
    Delivery,
    DeliveryState,
    ResultObject,
    Study,
    StudyState,
    utcnow,
)
from node.dicom.scu import send_files
from node.errors import DeliveryError
from node.settings import DeliverySettings, DicomSettings, Peer
from node.work.claim import for_update
from node.work.state import transition, transition_delivery

__all__ = [
    "DeliveryOutcome",
    "DestinationProbe",
    "backoff",
    "deliver_due",
    "echo",
    "requeue_deliveries",
    "retry_delivery",
    "settle_study",
    "delivered_at",
    "study_delivered_at",
]

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
"""Verification SOP Class (C-ECHO)."""

_SETTLED = (StudyState.COMPLETE, StudyState.DELIVERING, StudyState.DELIVERED,
            StudyState.DELIVERY_FAILED)
"""Study states the outbox moves: results committed, no analysis queued or running."""


def backoff(attempts: int, settings: DeliverySettings) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt."""
    return float(min(settings.backoff_seconds * 2 ** max(attempts - 1, 0),
                     settings.backoff_max_seconds))


def horizon(delivery: Delivery, settings: DeliverySettings) -> datetime:
    """When ``delivery`` stops being retried: ``horizon_hours`` after it was queued."""
    return delivery.created_at + timedelta(hours=settings.horizon_hours)


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one :func:`deliver_due` pass did."""

    sent: int
    failed: int
    """Failed and rescheduled (within the horizon)."""
    dead: int
    """Failed after the horizon."""
    unreachable: frozenset[str] = field(default_factory=frozenset)
    """Destinations no association could be made with."""
    released: int = 0
    """Pending rows the probe made due (their destination answered C-ECHO again)."""


def _ok(status: int | None) -> bool:
    return status is not None and (status == 0 or 0xB000 <= status <= 0xBFFF)


def echo(peer: Peer, dicom: DicomSettings) -> str | None:
    """C-ECHO ``peer``; ``None`` when it answered with status 0x0000, else why not, in words."""
    ae = AE(ae_title=dicom.ae_title)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = dicom.acse_timeout
    ae.dimse_timeout = dicom.dimse_timeout
    ae.network_timeout = dicom.network_timeout
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        return (f"{peer.name} ({peer.ae_title}@{peer.host}:{peer.port}) "
                + ("rejected the association" if assoc.is_rejected
                   else "could not be reached or aborted the association"))
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    return None if code == 0 else f"{peer.name} answered C-ECHO with status {code}"


@dataclass
class _Reach:
    down: bool | None = None
    """``True``: the last association (send or probe) failed; ``False``: it was made;
    ``None``: not known (since this process started)."""
    probed_at: datetime | None = None


class DestinationProbe:
    """C-ECHO of destinations that failed, so that their backlog goes as soon as they answer.

    The outbox tells it which destinations it could not associate with
    (:meth:`unreachable`) and which it could (:meth:`reachable`).
    :meth:`probe` sends a C-ECHO to each destination that has rows waiting
    after a failure and was unreachable (or not known since the start), at
    most once per ``backoff_seconds``; when it answers, its pending rows are
    due at once.  A destination that takes associations but refuses the
    objects is not probed: C-ECHO would say nothing about it, and releasing its
    rows at every probe would undo their backoff.  One object per process
    (the node holds one); safe to use from several threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._probing = threading.Lock()
        self._reach: dict[str, _Reach] = defaultdict(_Reach)

    def unreachable(self, destinations: Iterable[str], at: datetime) -> None:
        """No association could be made with ``destinations`` at ``at`` (a failed probe)."""
        with self._lock:
            for name in destinations:
                self._reach[name] = _Reach(down=True, probed_at=at)

    def reachable(self, destinations: Iterable[str]) -> None:
        """An association was made with ``destinations``."""
        with self._lock:
            for name in destinations:
                self._reach[name].down = False

    def probe(self, sessions: sessionmaker[Session], peers: dict[str, Peer], dicom: DicomSettings,
              settings: DeliverySettings, now: datetime | None = None) -> dict[str, int]:
        """Probe the failing destinations that are due; returns destination to rows released.

        Returns at once (``{}``) while another thread probes.
        """
        if not self._probing.acquire(blocking=False):
            return {}
        try:
            now = now or utcnow()
            with sessions() as session:
                waiting = set(session.scalars(select(Delivery.destination).distinct().where(
                    Delivery.state == DeliveryState.PENDING, Delivery.attempts > 0,
                    Delivery.next_attempt_at > now)))
            released: dict[str, int] = {}
            for name in sorted(waiting):
                peer = peers.get(name)
                with self._lock:
                    reach = self._reach[name]
                    due = (reach.probed_at is None
                           or now - reach.probed_at >= timedelta(seconds=settings.backoff_seconds))
                    if peer is None or reach.down is False or not due:
                        continue
                    reach.probed_at = now
                why = echo(peer, dicom)
                with self._lock:
                    self._reach[name].down = why is not None
                if why is not None:
                    logger.debug("destination %s still unreachable: %s", name, why)
                    continue
                with sessions() as session:
                    res = session.execute(update(Delivery).where(
                        Delivery.destination == name, Delivery.state == DeliveryState.PENDING,
                        Delivery.next_attempt_at > now).values(next_attempt_at=now))
                    session.commit()
                released[name] = int(res.rowcount)  # type: ignore[attr-defined]
                logger.info("destination %s answers C-ECHO again: %d waiting deliveries are due "
                            "now", name, released[name])
            return released
        finally:
            self._probing.release()


def deliver_due(sessions: sessionmaker[Session], storage_root: Path, peers: dict[str, Peer],
                dicom: DicomSettings, settings: DeliverySettings, owner: str,
                now: datetime | None = None, lease_seconds: float = 300.0,
                probe: DestinationProbe | None = None) -> DeliveryOutcome:
    """Send every delivery that is due; returns counts. Safe to run concurrently.

    With ``probe``, the destinations that could not be reached are recorded on
    it, it probes the failing ones, and the rows it released are sent in the
    same call.
    """
    first = _deliver_once(sessions, storage_root, peers, dicom, settings, owner, now,
                          lease_seconds, probe)
    if probe is None:
        return first
    released = sum(probe.probe(sessions, peers, dicom, settings, now).values())
    if not released:
        return first
    again = _deliver_once(sessions, storage_root, peers, dicom, settings, owner, now,
                          lease_seconds, probe)
    return DeliveryOutcome(sent=first.sent + again.sent, failed=first.failed + again.failed,
                           dead=first.dead + again.dead,
                           unreachable=first.unreachable | again.unreachable, released=released)


def _deliver_once(sessions: sessionmaker[Session], storage_root: Path, peers: dict[str, Peer],
                  dicom: DicomSettings, settings: DeliverySettings, owner: str,
                  now: datetime | None, lease_seconds: float,
                  probe: DestinationProbe | None) -> DeliveryOutcome:
    claim_at = now or utcnow()
    with sessions() as session:
        stmt = select(Delivery).where(or_(
            (Delivery.state == DeliveryState.PENDING) & (Delivery.next_attempt_at <= claim_at),
            (Delivery.state == DeliveryState.SENDING) & (Delivery.lease_expires_at < claim_at),
        )).order_by(Delivery.id).limit(500)
        rows = session.scalars(for_update(session, stmt)).all()
        batch: dict[str, list[tuple[int, Path]]] = defaultdict(list)
        for d in rows:
            transition_delivery(d, DeliveryState.SENDING)
            d.lease_owner = owner
            d.lease_expires_at = claim_at + timedelta(seconds=lease_seconds)
            obj = session.get_one(ResultObject, d.result_object_id)
            batch[d.destination].append((d.id, storage_root / obj.path))
        session.commit()
    sent = failed = dead = 0
    unreachable: set[str] = set()
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
                if probe is not None:
                    probe.reachable([destination])
            except (DeliveryError, OSError) as exc:
                outcomes = {i: (None, str(exc)) for i, _ in items}
                unreachable.add(destination)
                if probe is not None:
                    probe.unreachable([destination], max(claim_at, utcnow()))
        with sessions() as session:
            studies: set[int] = set()
            for delivery_id, (status, msg) in outcomes.items():
                d = session.get_one(Delivery, delivery_id)
                if d.lease_owner != owner:
                    continue
                obj = session.get_one(ResultObject, d.result_object_id)
                studies.add(obj.study_id)
                at = max(claim_at, utcnow())
                d.lease_owner = None
                d.attempts += 1
                if _ok(status):
                    transition_delivery(d, DeliveryState.SENT)
                    d.sent_at = at
                    d.last_error = None
                    sent += 1
                    to = f" ({peer.ae_title}@{peer.host}:{peer.port})" if peer is not None else ""
                    session.add(AuditEntry(  # what went where
                        actor="outbox", action="delivery-sent", study_id=obj.study_id,
                        detail=f"delivery {d.id}: {obj.kind} v{obj.version} {obj.sop_instance_uid} "
                               f"to {d.destination}{to}, status 0x{status or 0:04X}, attempt {d.attempts}"))
                    logger.info("delivered to %s: delivery %d, SOP instance %s, at %s",
                                destination, d.id, obj.sop_instance_uid,
                                at.isoformat(timespec="milliseconds"))
                    continue
                err = msg if status is None else f"status 0x{status:04X} {msg}".strip()
                d.last_error = err
                end = horizon(d, settings)
                if at >= end:
                    transition_delivery(d, DeliveryState.DEAD)
                    dead += 1
                    session.add(AuditEntry(
                        actor="outbox", action="delivery-dead", study_id=obj.study_id,
                        detail=f"delivery {d.id} to {d.destination} gave up after "
                               f"{d.attempts} attempts over {settings.horizon_hours:g} hours "
                               f"([delivery] horizon_hours): {err}"))
                    logger.error("delivery %d to %s dead after %d attempts (horizon %g h): %s",
                                 d.id, d.destination, d.attempts, settings.horizon_hours, err)
                else:
                    transition_delivery(d, DeliveryState.PENDING)
                    d.next_attempt_at = min(at + timedelta(seconds=backoff(d.attempts, settings)),
                                            end)
                    failed += 1
                    logger.warning("delivery %d to %s failed (attempt %d): %s", d.id,
                                   d.destination, d.attempts, err)
            for study_id in sorted(studies):  # one order: two senders never wait on each other
                settle_study(session, study_id)
            session.commit()
    return DeliveryOutcome(sent=sent, failed=failed, dead=dead, unreachable=frozenset(unreachable))


def _result_note(study: Study) -> str:
    """``result version N: CT-1, 3.2 % opacity`` (what the pipeline writes on the study)."""
    note = f"result version {study.result_version}"
    try:
        summary = json.loads(study.summary or "{}")
        return (f"{note}: {summary['severity_category']}, "
                f"{summary['percent_opacity']['total']:.1f} % opacity")
    except (ValueError, KeyError, TypeError):
        return note


def settle_study(session: Session, study_id: int, actor: str = "outbox") -> StudyState | None:
    """Give the study the state its latest results' deliveries call for; the caller commits.

    ``delivery-failed`` when one is dead, else ``delivering`` when one is pending
    or sending, else ``delivered``.  A study being analysed again (queued,
    analysing) or rejected/failed keeps its state, and so does one whose latest
    results have no deliveries (no destinations).  The study row is locked
    first, so two senders finishing deliveries of one study together cannot
    both read the other's row as still sending.  Returns the new state, or
    ``None`` when nothing changed.
    """
    stmt = select(Study).where(Study.id == study_id).execution_options(populate_existing=True)
    study = session.scalars(for_update(session, stmt, skip_locked=False)).one()
    if study.state not in _SETTLED:
        return None
    counts = dict(session.execute(
        select(Delivery.state, func.count())
        .join(ResultObject, ResultObject.id == Delivery.result_object_id)
        .where(ResultObject.study_id == study_id, ResultObject.version == study.result_version)
        .group_by(Delivery.state)).all())
    total = sum(counts.values())
    if not total:
        return None
    dead = counts.get(DeliveryState.DEAD, 0)
    sent = counts.get(DeliveryState.SENT, 0)
    note = _result_note(study)
    if dead:
        new = StudyState.DELIVERY_FAILED
        last = session.scalars(
            select(Delivery.last_error).join(ResultObject,
                                             ResultObject.id == Delivery.result_object_id)
            .where(ResultObject.study_id == study_id, ResultObject.version == study.result_version,
                   Delivery.state == DeliveryState.DEAD).order_by(Delivery.id)).first()
        reason = (f"{note}; {dead} of {total} deliveries dead ({last}); fix the destination, "
                  "then `lungnode deliveries retry --dead`")
    elif sent < total:
        new = StudyState.DELIVERING
        reason = f"{note}; {sent} of {total} deliveries sent"
    else:
        new = StudyState.DELIVERED
        reason = f"{note}; all {total} deliveries sent"
    if new == study.state:
        return None
    transition(session, study, new, reason=reason, actor=actor)
    return new


def delivered_at(session: Session, study_ids: Sequence[int]) -> dict[int, datetime | None]:
    """When every result object of each study's latest results was acknowledged (latest ``sent_at``).

    ``None`` for a study whose latest results have a delivery pending, sending or
    dead; studies without results, or whose latest results have no deliveries at
    all (no destinations were configured when they were made), are left out.
    Deliveries of superseded versions are not considered.  One query per 500 studies.
    """
    rows: dict[int, list[tuple[int, DeliveryState | None, datetime | None]]] = defaultdict(list)
    ids = list(study_ids)
    for start in range(0, len(ids), 500):
        for sid, version, state, sent in session.execute(
            select(ResultObject.study_id, ResultObject.version, Delivery.state, Delivery.sent_at)
            .outerjoin(Delivery, Delivery.result_object_id == ResultObject.id)
            .where(ResultObject.study_id.in_(ids[start:start + 500]))
        ):
            rows[sid].append((version, state, sent))
    out: dict[int, datetime | None] = {}
    for sid, found in rows.items():
        latest = max(v for v, _s, _t in found)
        deliveries = [(s, t) for v, s, t in found if v == latest and s is not None]
        if not deliveries:
            continue
        done = all(s == DeliveryState.SENT and t is not None for s, t in deliveries)
        out[sid] = max(t for _s, t in deliveries if t is not None) if done else None
    return out


def study_delivered_at(session: Session, study_id: int) -> datetime | None:
    """When the last delivery of the study's latest results was acknowledged; ``None`` unless
    all were (see :func:`delivered_at`)."""
    return delivered_at(session, [study_id]).get(study_id)


def _requeue(session: Session, d: Delivery, actor: str, why: str) -> int:
    """Make ``d`` due now (audited); returns its study's id.  The caller settles and commits."""
    old = d.state
    transition_delivery(d, DeliveryState.PENDING)
    d.attempts = 0
    d.next_attempt_at = utcnow()
    d.lease_owner = None
    study_id = session.get_one(ResultObject, d.result_object_id).study_id
    session.add(AuditEntry(actor=actor, action="delivery-retry", study_id=study_id,
                           detail=f"delivery {d.id} to {d.destination} re-queued ({old.value}; "
                                  f"{why})"))
    return study_id


def retry_delivery(session: Session, delivery_id: int, actor: str) -> Delivery:
    """Re-queue a dead (or failing) delivery for an immediate attempt. Commits.

    A delivery past its horizon gets that one attempt (it is dead again if it fails).
    """
    d = session.get(Delivery, delivery_id)
    if d is None:
        raise DeliveryError(f"no delivery with id {delivery_id}; see `lungnode deliveries`")
    if d.state == DeliveryState.SENT:
        raise DeliveryError(f"delivery {delivery_id} was already sent at {d.sent_at}")
    if d.state == DeliveryState.SENDING:
        raise DeliveryError(f"delivery {delivery_id} is being sent now; see `lungnode deliveries`")
    study_id = _requeue(session, d, actor, f"delivery {delivery_id}")
    settle_study(session, study_id, actor=actor)
    session.commit()
    return d


def requeue_deliveries(session: Session, actor: str, *, dead: bool = False,
                       destination: str | None = None) -> list[int]:
    """Re-queue deliveries in bulk for an immediate attempt; returns their ids. Commits.

    Parameters
    ----------
    dead
        Re-queue the dead deliveries (of ``destination`` when it is given).
    destination
        Re-queue the deliveries to this destination: its dead ones with
        ``dead``, else its dead and pending ones (pending ones are due at once).

    Each re-queued delivery gets an audit entry; the studies take the state of
    their deliveries again (``delivery-failed`` -> ``delivering``).
    """
    if not dead and destination is None:
        raise DeliveryError("say which deliveries to re-queue: --dead, --destination NAME, "
                            "or a delivery id")
    states = [DeliveryState.DEAD] if dead else [DeliveryState.DEAD, DeliveryState.PENDING]
    stmt = select(Delivery).where(Delivery.state.in_(states)).order_by(Delivery.id)
    if destination is not None:
        stmt = stmt.where(Delivery.destination == destination)
    rows = session.scalars(for_update(session, stmt, skip_locked=True)).all()
    why = " ".join(w for w in ("--dead" if dead else "",
                               f"--destination {destination}" if destination else "") if w)
    studies = {_requeue(session, d, actor, why) for d in rows}
    for study_id in sorted(studies):
        settle_study(session, study_id, actor=actor)
    session.commit()
    if rows:
        logger.info("%s re-queued %d deliveries (%s)", actor, len(rows), why)
    return [d.id for d in rows]
