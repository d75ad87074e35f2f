"""Who sent what and when: one audit row per study received on an association.

The C-STORE handler (:mod:`node.dicom.scp`) records each instance; this module
watches the same associations from pynetdicom's notification events, without
touching that handler: ``EVT_DIMSE_RECV`` counts the C-STORE requests,
``EVT_DIMSE_SENT`` the node's answers (stored or refused, by status), and when
the association is released or aborted (or its connection closes) it writes,
in one transaction, an ``received`` audit row per study with the calling AE
title, its address, the association's time span and the counts.  Only UIDs,
counts and AE titles are written, never a patient attribute.  Associations
that carried no C-STORE (C-ECHO) write nothing.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.events import Event
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from node.db import AuditEntry, Instance, Study, utcnow

__all__ = ["ReceiptLog"]

logger = logging.getLogger(__name__)

_CHUNK = 500  # SOP Instance UIDs per IN (...) lookup


@dataclass
class _Receipt:
    calling: str
    address: str
    started: datetime
    requests: int = 0
    stored: list[str] = field(default_factory=list)
    refused: Counter[int] = field(default_factory=Counter)


def _ok(status: int) -> bool:
    return status == 0 or 0xB000 <= status <= 0xBFFF


class ReceiptLog:
    """Collects each association's C-STORE outcomes and writes them to the audit log at its end.

    Parameters
    ----------
    engine
        The node's database engine (the catalog's).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._open: dict[object, _Receipt] = {}

    def handlers(self) -> list[tuple[evt.EventType, object]]:
        """The ``(event, handler)`` pairs to give ``AE.start_server`` next to the SCP's own."""
        return [
            (evt.EVT_DIMSE_RECV, self._on_recv),
            (evt.EVT_DIMSE_SENT, self._on_sent),
            (evt.EVT_RELEASED, lambda event: self._finish(event, "released")),
            (evt.EVT_ABORTED, lambda event: self._finish(event, "aborted")),
            (evt.EVT_CONN_CLOSE, lambda event: self._finish(event, "closed")),
        ]

    def _receipt(self, event: Event) -> _Receipt:
        with self._lock:
            receipt = self._open.get(event.assoc)
            if receipt is None:
                requestor = event.assoc.requestor
                receipt = _Receipt(calling=str(requestor.ae_title).strip(),
                                   address=f"{requestor.address}:{requestor.port}", started=utcnow())
                self._open[event.assoc] = receipt
            return receipt

    def _on_recv(self, event: Event) -> None:
        if isinstance(event.message, C_STORE_RQ):
            self._receipt(event).requests += 1

    def _on_sent(self, event: Event) -> None:
        if not isinstance(event.message, C_STORE_RSP):
            return
        command = event.message.command_set
        status = int(command.get("Status", 0xC000))
        receipt = self._receipt(event)
        if _ok(status):
            receipt.stored.append(str(command.get("AffectedSOPInstanceUID", "")))
        else:
            receipt.refused[status] += 1

    def _finish(self, event: Event, outcome: str) -> None:
        with self._lock:
            receipt = self._open.pop(event.assoc, None)
        if receipt is None or (receipt.requests == 0 and not receipt.stored and not receipt.refused):
            return
        try:
            self._write(receipt, outcome)
        except SQLAlchemyError as exc:
            logger.error("association from %s at %s (%d stored, %d refused): receipt not recorded "
                         "in the audit log: %s", receipt.calling, receipt.address,
                         len(receipt.stored), sum(receipt.refused.values()), type(exc).__name__)

    def _write(self, receipt: _Receipt, outcome: str) -> None:
        ended = utcnow()
        uids = sorted(set(receipt.stored))
        by_study: dict[tuple[int, str], int] = {}
        with self._engine.begin() as conn:
            for i in range(0, len(uids), _CHUNK):
                rows = conn.execute(
                    select(Study.id, Study.study_instance_uid, func.count(Instance.id))
                    .join(Instance, Instance.study_id == Study.id)
                    .where(Instance.sop_instance_uid.in_(uids[i:i + _CHUNK]))
                    .group_by(Study.id, Study.study_instance_uid))
                for study_id, study_uid, count in rows:
                    key = (int(study_id), str(study_uid))
                    by_study[key] = by_study.get(key, 0) + int(count)
            other = len(uids) - sum(by_study.values())
            refused = ", ".join(f"0x{code:04X} x{n}" for code, n in sorted(receipt.refused.items()))
            span = (f"{receipt.started.astimezone(UTC):%Y-%m-%d %H:%M:%S}"
                    f"-{ended.astimezone(UTC):%H:%M:%S} UTC")
            common = (f"from AE {receipt.calling!r} at {receipt.address}, association {span} "
                      f"{outcome}: {receipt.requests} C-STORE requests, {len(uids)} stored"
                      + (f" ({other} not CT images of a study: labelling SRs)" if other else "")
                      + (f", {sum(receipt.refused.values())} refused ({refused})" if refused else ""))
            actor = f"scp:{receipt.calling}"[:64]
            if not by_study:
                conn.execute(insert(AuditEntry).values(actor=actor, action="received", study_id=None,
                                                       detail=common))
            for (study_id, study_uid), count in sorted(by_study.items()):
                conn.execute(insert(AuditEntry).values(
                    actor=actor, action="received", study_id=study_id,
                    detail=f"{count} instances of study {study_uid} {common}"
                           + (f"; {len(by_study)} studies in the association" if len(by_study) > 1
                              else "")))
        logger.info("association from %s at %s %s: %d C-STORE requests, %d stored in %d studies, "
                    "%d refused", receipt.calling, receipt.address, outcome, receipt.requests,
                    len(uids), len(by_study), sum(receipt.refused.values()))
