"""``lungnode purge``: the retention rules now (:mod:`node.work.retention`), or what they would do."""

from __future__ import annotations

import getpass
import json
from typing import Annotated

import typer

from node.cli_support import ConfigOpt, console, error, sessions, settings, use_config
from node.work.retention import PurgeItem, PurgeReport, purge

__all__ = ["purge_command"]


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    units = ("KB", "MB", "GB", "TB")
    value, i = n / 1024, 0
    while value >= 1024 and i < len(units) - 1:
        value, i = value / 1024, i + 1
    return f"{value:.1f} {units[i]}"


def _item(i: PurgeItem) -> dict[str, object]:
    return {"kind": i.kind, "study_id": i.study_id, "uid": i.uid, "rule": i.rule, "reason": i.reason,
            "bytes": i.bytes, "files": i.files}


def _print(report: PurgeReport, dry_run: bool) -> None:
    plan = report.plan
    items = plan.items if dry_run else tuple(report.done)
    for i in items:  # one line each: UIDs stay whole (a table would wrap them)
        study = f"study {i.study_id}" if i.study_id is not None else "no study row"
        console.print(f"{i.kind:<9} {i.uid} ({study}) {_size(i.bytes)} in {i.files} files; "
                      f"{i.rule}: {i.reason}", markup=False, highlight=False)
    verb = "would delete" if dry_run else "deleted"
    total = sum(i.bytes for i in items)
    console.print(f"{verb} {len(items)} item(s), {_size(total)}; storage file system "
                  f"{plan.usage.free_percent:.1f} % free"
                  + (f"; archive {_size(plan.archive_bytes)}" if plan.archive_bytes is not None else ""),
                  markup=False, highlight=False)
    for note in plan.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    for item, why in report.skipped:
        console.print(f"skipped {item.kind} of {item.uid}: {why}", markup=False, highlight=False)
    for message in report.errors:
        error(f"not deleted: {message}")


def purge_command(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would go; delete nothing")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of text")] = False,
    by: Annotated[str | None, typer.Option("--by", help="who purges (default: the OS user)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Delete patient data past its retention now ([retention]); --dry-run only lists it."""
    use_config(config)
    s = settings()
    report = purge(sessions(), s, actor=f"cli:{by or getpass.getuser()}", dry_run=dry_run)
    if as_json:
        plan = report.plan
        print(json.dumps({
            "dry_run": dry_run,
            "planned": [_item(i) for i in plan.items],
            "deleted": [_item(i) for i in report.done],
            "skipped": [{**_item(i), "why": why} for i, why in report.skipped],
            "free_percent": round(plan.usage.free_percent, 2),
            "archive_bytes": plan.archive_bytes,
            "notes": list(plan.notes),
            "errors": report.errors,
        }, indent=2))
    else:
        _print(report, dry_run)
    if report.errors:
        raise typer.Exit(1)
