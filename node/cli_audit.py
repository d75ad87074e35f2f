"""``lungnode audit``: the sealed audit log (:mod:`node.work.audit`).

Commands: ``verify`` (recompute the hash chain; seals nothing), ``seal`` (hash the
rows not sealed yet; the node does it every few seconds and when it stops) and
``list`` (the latest rows, of one study with ``--study``).  Exit codes: 0 done
or intact, 1 the chain is broken or the study is unknown, 2 a configuration
problem.
"""

from __future__ import annotations

import json
from datetime import UTC
from typing import Annotated, Any

import typer
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from node.cli_support import ConfigOpt, console, error, sessions, use_config
from node.db import AuditEntry, Study
from node.work.audit import check, seal

__all__ = ["audit_app"]

audit_app = typer.Typer(help="The sealed audit log: who sent what and when, what went where, "
                             "labels, models and purges.", no_args_is_help=True,
                        rich_markup_mode=None)


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False)


@audit_app.command("verify")
def verify_command(config: ConfigOpt = None) -> None:
    """Recompute the hash chain and name the first row that was altered (exit 1), sealing nothing."""
    use_config(config)
    with sessions()() as session:
        result = check(session)
    if result.intact:
        _say(f"audit chain intact: {result.sealed} rows sealed, {result.unsealed} not yet sealed")
        _say(f"head {result.head}")
        return
    error(f"{result.problem}; {result.sealed} rows before it are intact")
    raise typer.Exit(1)


@audit_app.command("seal")
def seal_command(config: ConfigOpt = None) -> None:
    """Hash the rows not sealed yet (the running node does this every 10 s and when it stops)."""
    use_config(config)
    with sessions()() as session:
        count = seal(session, wait_seconds=30.0)
    _say(f"sealed {count} rows")


def _study_id(session: Session, ref: str) -> int:
    cond = Study.study_instance_uid == ref
    if ref.isdigit():
        cond = or_(cond, Study.id == int(ref))
    found = session.scalars(select(Study.id).where(cond)).first()
    if found is None:
        error(f"no study {ref!r} (give its id or Study Instance UID; `lungnode studies` lists them)")
        raise typer.Exit(1)
    return int(found)


@audit_app.command("list")
def list_command(
    study: Annotated[str | None, typer.Option("--study", help="only this study (id or Study "
                                              "Instance UID)", metavar="UID")] = None,
    limit: Annotated[int, typer.Option("--limit", help="the latest N rows")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    config: ConfigOpt = None,
) -> None:
    """The latest audit rows, oldest first: time, actor, action, study, detail, sealed or not."""
    use_config(config)
    with sessions()() as session:
        stmt = select(AuditEntry, Study.study_instance_uid).outerjoin(
            Study, Study.id == AuditEntry.study_id)
        if study is not None:
            stmt = stmt.where(AuditEntry.study_id == _study_id(session, study))
        rows = list(session.execute(stmt.order_by(AuditEntry.id.desc()).limit(max(limit, 0))))
    rows.reverse()
    out: list[dict[str, Any]] = [
        {"id": a.id, "at": a.at.astimezone(UTC).isoformat(), "actor": a.actor, "action": a.action,
         "study_instance_uid": uid, "detail": a.detail, "sealed": a.row_hash is not None}
        for a, uid in rows]
    if as_json:
        print(json.dumps(out, indent=2))
        return
    for r in out:
        seal_mark = "" if r["sealed"] else " (not yet sealed)"
        _say(f"{r['id']:>6} {r['at'][:19]}Z {r['actor']} {r['action']}"
             + (f" study {r['study_instance_uid']}" if r["study_instance_uid"] else "")
             + (f": {r['detail']}" if r["detail"] else "") + seal_mark)
