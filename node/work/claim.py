"""Locking the rows a worker claims, the same way for jobs and deliveries.

On PostgreSQL a claim selects its rows with ``SELECT ... FOR UPDATE SKIP
LOCKED``: two workers scanning the same queue never take the same row and never
wait for each other.  On SQLite the statement is left as it is: every
transaction the node opens starts with ``BEGIN IMMEDIATE`` (see
:func:`node.db.make_engine`), so the select and the update that follows run
under the database's single writer lock, which is the same guarantee.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

__all__ = ["for_update"]

_S = TypeVar("_S", bound=Select[Any])


def for_update(session: Session, stmt: _S, *, skip_locked: bool = True) -> _S:
    """``stmt`` locking the rows it selects until ``session`` commits.

    Parameters
    ----------
    session
        The session that runs the statement; its dialect decides the lock.
    stmt
        A ``SELECT`` of the rows to claim or change.
    skip_locked
        ``True`` (a queue scan): rows another worker holds are skipped.
        ``False`` (one known row): wait for the other worker's commit.
    """
    if session.get_bind().dialect.name == "postgresql":
        return stmt.with_for_update(skip_locked=skip_locked)
    return stmt
