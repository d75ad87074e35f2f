"""Read-only views of the work: studies with their delivery counts, deliveries.

Shared by the command line (``lungnode studies``, ``lungnode deliveries``) and
the web page, so both show the same rows.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.db import Delivery, DeliveryState, ResultObject, Study

__all__ = ["delivery_rows", "study_rows"]


def study_rows(session: Session, limit: int = 200) -> list[dict[str, Any]]:
    """Studies, newest first, with delivery counts (what ``lungnode studies`` shows)."""
    counts: dict[tuple[int, str], int] = {}
    for study_id, state, n in session.execute(
        select(ResultObject.study_id, Delivery.state, func.count())
        .join(ResultObject, ResultObject.id == Delivery.result_object_id)
        .group_by(ResultObject.study_id, Delivery.state)
    ):
        counts[(study_id, state.value)] = n
    rows = []
    for st in session.scalars(select(Study).order_by(Study.last_received_at.desc()).limit(limit)):
        rows.append({
            "id": st.id, "study_instance_uid": st.study_instance_uid, "state": st.state.value,
            "reason": (f"purged {st.purged_at:%Y-%m-%d %H:%M} UTC (retention); " if st.purged_at
                       else "") + (st.reason or ""),
            "purged_at": st.purged_at.isoformat(timespec="seconds") if st.purged_at else None,
            "instances": st.instance_count,
            "last_received_at": st.last_received_at.isoformat(timespec="seconds"),
            "result_version": st.result_version,
            "deliveries": {s.value: counts.get((st.id, s.value), 0) for s in DeliveryState},
            "selection_reason": st.selection_reason or "",
        })
    return rows


def delivery_rows(session: Session, limit: int = 500) -> list[dict[str, Any]]:
    """Deliveries, newest first, with their study and result object (``lungnode deliveries``)."""
    rows = []
    for d, obj, uid in session.execute(
        select(Delivery, ResultObject, Study.study_instance_uid)
        .join(ResultObject, ResultObject.id == Delivery.result_object_id)
        .join(Study, Study.id == ResultObject.study_id)
        .order_by(Delivery.id.desc()).limit(limit)
    ):
        rows.append({
            "id": d.id, "study_instance_uid": uid, "kind": obj.kind, "version": obj.version,
            "destination": d.destination, "state": d.state.value, "attempts": d.attempts,
            "next_attempt_at": d.next_attempt_at.isoformat(timespec="seconds"),
            "last_error": d.last_error or "",
        })
    return rows
