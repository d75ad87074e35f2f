"""``lungnode label``: the append-only label history of archived studies (:mod:`node.learn.labels`).

Commands: ``set``, ``retract``, ``import`` (CSV), ``list`` (current labels) and
``history`` (every event of one study).  A study is named by its original Study
Instance UID, its de-identified Study UID or its accession number.  Output is
plain text (no markup) or, with ``--json``, JSON.  Exit codes: 0 done, 1 a label
problem (the message says what to fix, e.g. an unknown study or value, or CSV rows
that did not match), 2 a configuration problem.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy.orm import Session

from node.cli_support import ConfigOpt, console, error, sessions, settings, use_config
from node.db import LabelEvent, LabelSource, LearnStudy
from node.errors import LabelError
from node.learn import labels
from node.learn.history import current_labels

__all__ = ["label_app"]

label_app = typer.Typer(help="Severity labels of archived studies (append-only history).",
                        no_args_is_help=True, rich_markup_mode=None)

StudyArg = Annotated[str, typer.Argument(help="original Study Instance UID, de-identified Study UID "
                                         "or accession number", metavar="STUDY")]
ByOpt = Annotated[str | None, typer.Option("--by", help="who labels (default: the OS user)")]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="why, kept in the history")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False)


def _who(by: str | None) -> str:
    return by or getpass.getuser()


@contextmanager
def _labels_session(config: Path | None) -> Iterator[Session]:
    """A session on the configured database; a :class:`LabelError` ends the command with code 1."""
    use_config(config)
    factory = sessions()
    with factory() as session:
        try:
            yield session
        except LabelError as exc:
            session.rollback()
            error(str(exc))
            raise typer.Exit(1) from exc


def _event_dict(event: LabelEvent) -> dict[str, Any]:
    return {"id": event.id, "value": event.value.value if event.value is not None else None,
            "source": event.source.value, "actor": event.actor, "at": event.at.isoformat(),
            "reason": event.reason, "supersedes": event.supersedes_id,
            "source_ref": event.source_ref}


@label_app.command("set")
def set_command(study: StudyArg,
                severity: Annotated[str, typer.Option("--severity", help=f"one of {labels.ALLOWED}")],
                by: ByOpt = None, reason: ReasonOpt = None, config: ConfigOpt = None) -> None:
    """Label an archived study (a new event; the history keeps the earlier ones)."""
    who = _who(by)
    with _labels_session(config) as session:
        event = labels.set_label(session, settings(), study, severity, source=LabelSource.CLI,
                                 actor=who, reason=reason)
        session.commit()
        if event is None:
            _say(f"{study}: already labelled {labels.parse_value(severity).value}; nothing changed")
        else:
            _say(f"{study}: labelled {labels.parse_value(severity).value} by {who} (event {event.id})")


@label_app.command("retract")
def retract_command(study: StudyArg, by: ByOpt = None, reason: ReasonOpt = None,
                    config: ConfigOpt = None) -> None:
    """Withdraw a study's current label (a new event without value)."""
    who = _who(by)
    with _labels_session(config) as session:
        event = labels.retract_label(session, settings(), study, source=LabelSource.CLI, actor=who,
                                     reason=reason)
        session.commit()
        if event is None:
            _say(f"{study}: has no current label; nothing changed")
        else:
            _say(f"{study}: label retracted by {who} (event {event.id})")


@label_app.command("import")
def import_command(
    file: Annotated[Path, typer.Argument(help="CSV with a header: study, severity[, reason]",
                                         metavar="FILE.csv")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="change nothing; say what would "
                                          "happen")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="apply nothing when any row does not "
                                         "match")] = False,
    by: ByOpt = None, config: ConfigOpt = None,
) -> None:
    """Import labels from a CSV file; unmatched rows are listed, never guessed (exit code 1)."""
    with _labels_session(config) as session:
        report = labels.import_csv(session, settings(), file, actor=_who(by), dry_run=dry_run,
                                   strict=strict)
    verb = "would add" if dry_run else "added"
    for row in report.added:
        _say(f"row {row.row}: {row.key} -> {row.pseudo_study_uid}: {verb} {row.value}")
    for row in report.unchanged:
        _say(f"row {row.row}: {row.key} -> {row.pseudo_study_uid}: already {row.value}")
    for bad in report.unmatched:
        error(f"row {bad.row}: {bad.key or '(empty)'}: not imported: {bad.reason}")
    summary = (f"{len(report.added)} {verb}, {len(report.unchanged)} unchanged, "
               f"{len(report.unmatched)} not matched")
    if dry_run:
        summary += " (dry run: nothing was changed)"
    elif not report.applied:
        summary += " (--strict: nothing was applied; fix the rows above and import again)"
    _say(summary)
    if report.unmatched:
        raise typer.Exit(1)


@label_app.command("list")
def list_command(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """The current label of every labelled study (pseudonymous identifiers only)."""
    use_config(config)
    with sessions()() as session:
        rows = [{"study": c.pseudo_study_uid, "patient": c.pseudo_patient_id, "origin": c.origin,
                 "value": c.value, "source": c.source, "actor": c.actor, "at": c.at.isoformat(),
                 "event": c.event_id}
                for c in current_labels(session)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        _say("no labelled studies")
    for r in rows:
        _say(f"{r['study']}  patient {r['patient']}  {r['value']}  {r['source']}  "
             f"{r['actor']}  {r['at']}")


@label_app.command("history")
def history_command(study: StudyArg, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Every label event of one study, oldest first (retractions show as 'retracted')."""
    with _labels_session(config) as session:
        events = labels.history(session, settings(), study)
        learn = session.get_one(LearnStudy, events[0].learn_study_id) if events else None
        rows = [_event_dict(e) for e in events]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if learn is None:
        _say(f"{study}: no label events")
        return
    _say(f"{learn.pseudo_study_uid} (patient {learn.pseudo_patient_id}):")
    for r in rows:
        line = (f"  {r['at']}  event {r['id']}  {r['value'] or 'retracted'}  {r['source']}  "
                f"{r['actor']}")
        if r["supersedes"] is not None:
            line += f"  supersedes {r['supersedes']}"
        if r["reason"]:
            line += f"  reason: {r['reason']}"
        if r["source_ref"]:
            line += f"  [{r['source_ref']}]"
        _say(line)
