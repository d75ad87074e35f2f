"""The sealed audit chain: every audit row carries the hash of the row before it.

Rows of ``audit_log`` (:class:`node.db.AuditEntry`) are written by many
processes and threads (several ``lungnode serve`` on one PostgreSQL, the SCP's
association threads, the workers, the CLI); each writer only inserts.  Hashing
at insert time would race: two writers would both take the same row as their
predecessor.  So rows are inserted unsealed (``prev_hash`` and ``row_hash``
``NULL``) and :func:`seal`, run by every node every
:data:`SEAL_INTERVAL_SECONDS` and when it stops, hashes the unsealed rows in id
order under a lock that one sealer holds at a time::

    row_hash = sha256(prev_hash + canonical JSON of id, at, actor, action, study_id, detail)

with ``prev_hash`` the ``row_hash`` of the row before (:data:`GENESIS` for the
first).  :func:`check` (``lungnode audit verify``) recomputes the chain and
names the first row that does not fit: a row edited, deleted from the middle
(the row after it no longer points to its predecessor), or inserted with a
forged hash; unsealed rows after the last sealed one are the ones the next seal
takes, counted, not an error.

Id order is chain order, so no row may commit with an id below one already
sealed.  SQLite has one writer at a time (the node begins every transaction
``IMMEDIATE``), so a row's id and its commit come before the sealer's turn.
On PostgreSQL, ids are drawn from a sequence and transactions commit in any
order; the trigger of migration ``0004`` therefore draws a row's id only after
taking a shared advisory lock that it holds until its transaction ends, and the
sealer takes the same lock exclusively (:func:`_lock`): when it holds it, every
row that has an id is committed or rolled back, and later rows get higher ids.

The same migration makes the table append-only in the database (triggers on
SQLite and PostgreSQL): ``DELETE`` is refused, and ``UPDATE`` only when it sets
``prev_hash`` and ``row_hash`` from ``NULL`` once, leaving every other column
as it was, which is what :func:`seal` does.

What the chain cannot show: rows removed from its end together with nothing
after them (the last sealed rows), and a whole chain recomputed by someone who
can also change the database's triggers.  Each seal logs the id and hash of the
chain's head (:func:`seal`), so the log kept elsewhere anchors it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from node.db import AuditEntry

__all__ = [
    "GENESIS",
    "SEAL_INTERVAL_SECONDS",
    "AuditCheck",
    "canonical",
    "check",
    "row_hash",
    "seal",
    "verify",
]

logger = logging.getLogger(__name__)

GENESIS = "0" * 64
"""The ``prev_hash`` of the first row."""

SEAL_INTERVAL_SECONDS = 10.0
"""How often a node seals (its scheduler's ``audit-seal`` job)."""

ADVISORY_LOCK_KEY = 0x6C756E67_61756474  # "lungaudt": the key the trigger of migration 0004 shares
"""PostgreSQL advisory lock key: inserts hold it shared, the sealer exclusively."""

_BATCH = 1000

_TABLE = AuditEntry.metadata.tables["audit_log"]
_SEAL_ROW = (update(_TABLE).where(_TABLE.c.id == bindparam("b_id"), _TABLE.c.row_hash.is_(None))
             .values(prev_hash=bindparam("b_prev"), row_hash=bindparam("b_hash")))
"""Rows hashed per sealing transaction: inserts on PostgreSQL wait while a seal holds its lock."""


def canonical(entry: AuditEntry) -> bytes:
    """The bytes of a row that its hash covers: sorted-key, compact JSON, UTF-8.

    ``at`` is ISO 8601 in UTC with microseconds (what both databases keep).
    """
    at = entry.at.astimezone(UTC).isoformat(timespec="microseconds") if entry.at else None
    return json.dumps({"id": entry.id, "at": at, "actor": entry.actor, "action": entry.action,
                       "study_id": entry.study_id, "detail": entry.detail},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def row_hash(prev_hash: str, entry: AuditEntry) -> str:
    """``sha256(prev_hash + canonical(entry))`` as 64 hex digits."""
    return hashlib.sha256(prev_hash.encode("ascii") + canonical(entry)).hexdigest()


def _lock(session: Session) -> bool:
    """Take the sealer's lock for the session's transaction; ``False`` when busy (PostgreSQL).

    PostgreSQL: ``pg_try_advisory_xact_lock`` on :data:`ADVISORY_LOCK_KEY`, which
    every audit insert holds shared until its transaction ends (migration 0004).
    The sealer tries rather than waits: a waiting exclusive request would queue
    new inserts behind it, and an insert whose transaction waits on a row another
    inserter holds could then deadlock with it.  SQLite: the transaction began
    ``IMMEDIATE`` (:func:`node.db.make_engine`) and holds the single writer lock.
    """
    if session.get_bind().dialect.name != "postgresql":
        return True
    return bool(session.scalar(select(func.pg_try_advisory_xact_lock(ADVISORY_LOCK_KEY))))


def seal(session: Session, *, wait_seconds: float = 5.0) -> int:
    """Hash every unsealed row in id order, after the chain's head; how many were sealed.

    Commits (one transaction per :data:`_BATCH` rows, so that inserts never wait
    long for the lock).  Safe to run in several processes at once: one seals,
    the others find nothing left or give up after ``wait_seconds`` without the
    lock (PostgreSQL), returning what they sealed.

    Parameters
    ----------
    session
        A session on the node's database (its transaction is committed or rolled back).
    wait_seconds
        How long to keep trying for the lock while inserts are in flight.
    """
    sealed = 0
    deadline = time.monotonic() + wait_seconds
    while True:
        if not _lock(session):
            session.rollback()
            if time.monotonic() >= deadline:
                logger.debug("audit seal: the lock stayed busy; the next seal takes the rows")
                return sealed
            time.sleep(0.05)
            continue
        head = session.execute(select(AuditEntry.id, AuditEntry.row_hash)
                               .where(AuditEntry.row_hash.is_not(None))
                               .order_by(AuditEntry.id.desc()).limit(1)).first()
        head_id, prev = (int(head[0]), str(head[1])) if head is not None else (0, GENESIS)
        rows = list(session.scalars(select(AuditEntry).where(
            AuditEntry.row_hash.is_(None), AuditEntry.id > head_id)
            .order_by(AuditEntry.id).limit(_BATCH)))
        if not rows:
            session.rollback()
            return sealed
        hashes = []
        for row in rows:
            digest = row_hash(prev, row)
            hashes.append({"b_id": row.id, "b_prev": prev, "b_hash": digest})
            prev = digest
        session.execute(_SEAL_ROW, hashes)  # one executemany, no ORM bookkeeping per row
        session.commit()
        for row in rows:  # their loaded hashes are stale: later reads of the session load them again
            session.expunge(row)
        sealed += len(rows)
        logger.info("audit chain sealed through row %d (head %s, %d rows this time)",
                    rows[-1].id, prev, len(rows))
        if len(rows) < _BATCH:
            return sealed
        deadline = time.monotonic() + wait_seconds


@dataclass(frozen=True)
class AuditCheck:
    """What :func:`check` found."""

    sealed: int
    """Rows that fit the chain (up to the first bad one)."""
    unsealed: int
    """Rows after the last sealed one, waiting for the next seal."""
    bad_id: int | None = None
    """The first row that does not fit; ``None``: the chain is intact."""
    problem: str | None = None
    """What is wrong with that row, in words (for the CLI)."""
    head: str = GENESIS
    """The ``row_hash`` of the last row checked (the chain's head when intact)."""

    @property
    def intact(self) -> bool:
        return self.bad_id is None


def _rows(session: Session) -> Iterator[AuditEntry]:
    """Every row in id order, a few thousand at a time (any id, zero and negative ones too)."""
    stmt = select(AuditEntry).order_by(AuditEntry.id).limit(5000).execution_options(populate_existing=True)
    batch = list(session.scalars(stmt))
    while batch:
        yield from batch
        last = batch[-1].id
        session.expunge_all()
        batch = list(session.scalars(stmt.where(AuditEntry.id > last)))


def _describe(entry: AuditEntry) -> str:
    at = entry.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if entry.at else "?"
    return f"row {entry.id} (at {at}, action {entry.action})"


def check(session: Session) -> AuditCheck:
    """Recompute the chain from the first row; reads only (seals nothing).

    A sealed row is bad when its ``prev_hash`` is not the hash of the sealed row
    before it (a row before it was removed, or it was inserted with a forged
    hash) or when its content no longer gives its ``row_hash`` (edited).  An
    unsealed row followed by a sealed one is bad as well: its hashes were
    removed, or it was inserted after later rows were sealed.
    """
    prev = GENESIS
    sealed = 0
    pending: AuditEntry | None = None  # the first unsealed row seen after the last sealed one
    unsealed = 0
    for entry in _rows(session):
        if entry.row_hash is None:
            pending = pending or entry
            unsealed += 1
            continue
        if pending is not None:
            return AuditCheck(sealed, unsealed, pending.id,
                              f"{_describe(pending)} is not sealed but row {entry.id} after it is: "
                              "its hashes were removed, or it was inserted afterwards", prev)
        if entry.prev_hash != prev:
            return AuditCheck(sealed, 0, entry.id,
                              f"{_describe(entry)} was altered or a row before it was removed "
                              "(it does not follow the sealed row before it: a row was removed, "
                              "inserted with a forged hash, or edited and hashed again)", prev)
        if row_hash(prev, entry) != entry.row_hash:
            return AuditCheck(sealed, 0, entry.id,
                              f"{_describe(entry)} was altered or a row before it was removed "
                              "(its content no longer matches its hash)", prev)
        prev = entry.row_hash
        sealed += 1
    return AuditCheck(sealed, unsealed, None, None, prev)


def verify(session: Session) -> int | None:
    """The id of the first row that breaks the chain, or ``None`` when it is intact."""
    return check(session).bad_id

