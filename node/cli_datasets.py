"""``lungnode dataset``: frozen datasets, the locked evaluation set and the public-dataset importers
(:mod:`node.learn.datasets`, :mod:`node.learn.importers`)."""

from __future__ import annotations

import getpass
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from model.manifest import Manifest
from node.cli_support import ConfigOpt, console, error, sessions, settings, use_config
from node.errors import LungnodeError
from node.learn import datasets as ds
from node.learn.importers import DEFAULT_HU_WINDOW, ImportReport, import_cov19ctdb, import_mosmed

__all__ = ["dataset_app"]

dataset_app = typer.Typer(help="Frozen datasets, the locked evaluation set, public-dataset importers.",
                          no_args_is_help=True, rich_markup_mode=None)

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]
ByOpt = Annotated[str | None, typer.Option("--by", help="who does it (default: the OS user)")]


def _print(text: str) -> None:
    console.print(text, markup=False, highlight=False)


def _parse_time(value: str | None) -> datetime | None:
    """ISO 8601; a time without a zone is UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        error(f"--as-of {value!r} is not an ISO 8601 time (e.g. 2026-03-01T12:00:00Z)")
        raise typer.Exit(2) from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _manifest_text(m: Manifest) -> None:
    counts = ds.summary(m)
    _print(f"{m.kind} version {m.version} (id {m.id}): {counts['studies']} studies of "
           f"{counts['patients']} patients, as of {m.as_of}, by {m.created_by}")
    _print(f"digest {m.digest}")
    _print(f"folds {m.folds} (fold 0 validates)")
    if m.locked_eval:
        _print(f"locked evaluation set version {m.locked_eval['version']} "
               f"(digest {str(m.locked_eval['digest'])[:12]})")
    for name in ("by_label", "by_source", "by_origin", "by_split"):
        _print(f"{name.replace('_', ' ')}: " + ", ".join(f"{k} {v}" for k, v in counts[name].items()))
    for fold, labels in counts["by_fold"].items():
        _print(f"fold {fold}: " + ", ".join(f"{k} {v}" for k, v in labels.items()))
    for s in m.extra.get("skipped") or []:
        _print(f"skipped {s['study']}: {s['reason']}")


def _json(m: Manifest) -> None:
    """The manifest as one line of JSON (scripts read the last line of the output)."""
    print(json.dumps(json.loads(m.to_json()), sort_keys=True, separators=(",", ":")))


@dataset_app.command("freeze")
def freeze_command(
    as_of: Annotated[str | None, typer.Option("--as-of", help="labels in force at TIME "
                                              "(ISO 8601, naive is UTC; default now)")] = None,
    as_json: JsonOpt = False,
    by: ByOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Freeze the current labels into a dataset manifest (tensors, folds, locked set applied)."""
    use_config(config)
    when = _parse_time(as_of)
    with sessions()() as session:
        try:
            manifest = ds.freeze(session, settings(), as_of=when, created_by=f"cli:{by or getpass.getuser()}")
            session.commit()
        except LungnodeError as exc:
            session.rollback()
            error(f"cannot freeze: {exc}")
            raise typer.Exit(1) from exc
    if as_json:
        _json(manifest)
    else:
        _manifest_text(manifest)


@dataset_app.command("lock")
def lock_command(
    fold: Annotated[int | None, typer.Option("--fold", help="lock the patients of this fold")] = None,
    study: Annotated[list[str] | None, typer.Option("--study", help="lock the patient of this "
                                                    "pseudonymous study (repeatable)")] = None,
    as_json: JsonOpt = False,
    by: ByOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Declare the locked evaluation set (a new version keeps every patient of the previous one)."""
    use_config(config)
    if (fold is None) == (not study):
        error("give either --fold N or one or more --study S")
        raise typer.Exit(2)
    with sessions()() as session:
        try:
            manifest = ds.lock(session, settings(), fold=fold, studies=study,
                               created_by=f"cli:{by or getpass.getuser()}")
            session.commit()
        except LungnodeError as exc:
            session.rollback()
            error(f"cannot lock: {exc}")
            raise typer.Exit(1) from exc
    if as_json:
        _json(manifest)
        return
    _manifest_text(manifest)
    _print(f"locked patients: {len(manifest.extra.get('patients') or [])}")


def _find(ident: str) -> Manifest:
    with sessions()() as session:
        try:
            return ds.find(session, settings(), ident)
        except LungnodeError as exc:
            error(str(exc))
            raise typer.Exit(1) from exc


@dataset_app.command("show")
def show_command(
    ident: Annotated[str, typer.Argument(metavar="ID", help="id, dataset-N, locked-eval-N or a file")],
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """One manifest: counts by label, source and fold, digest, as-of time, locked set."""
    use_config(config)
    manifest = _find(ident)
    if as_json:
        _json(manifest)
    else:
        _manifest_text(manifest)


@dataset_app.command("diff")
def diff_command(
    a: Annotated[str, typer.Argument(metavar="A")],
    b: Annotated[str, typer.Argument(metavar="B")],
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Studies added, removed and relabelled from manifest A to manifest B."""
    use_config(config)
    result = ds.diff(_find(a), _find(b))
    if as_json:
        print(json.dumps(result, sort_keys=True))
        return
    _print(f"{result['a']['kind']} {result['a']['version']} -> {result['b']['kind']} "
           f"{result['b']['version']}: {len(result['added'])} added, {len(result['removed'])} removed, "
           f"{len(result['relabelled'])} relabelled")
    for s in result["added"]:
        _print(f"+ {s}")
    for s in result["removed"]:
        _print(f"- {s}")
    for r in result["relabelled"]:
        _print(f"~ {r['study']}: {r['from']} -> {r['to']}")
    for r in result["moved"]:
        _print(f"> {r['study']}: {r['from'][0]} fold {r['from'][1]} -> {r['to'][0]} fold {r['to'][1]}")


@dataset_app.command("list")
def list_command(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Every frozen dataset and locked evaluation set."""
    use_config(config)
    with sessions()() as session:
        rows = ds.list_datasets(session)
    if as_json:
        print(json.dumps(rows, sort_keys=True))
        return
    if not rows:
        _print("no datasets yet; `lungnode dataset freeze` freezes the current labels")
    for r in rows:
        _print(f"{r['id']}: {r['kind']} version {r['version']}, {r['study_count']} studies, "
               f"as of {r['as_of']}, digest {r['digest'][:12]}, {r['path']}")


def _report(report: ImportReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.as_dict(), sort_keys=True))
        return
    _print(f"{report.dataset}: {len(report.added)} added, {len(report.existing)} already imported, "
           f"{len(report.skipped)} skipped")
    for entry, reason in report.skipped:
        _print(f"skipped {entry}: {reason}")
    for note in report.notes:
        _print(f"note: {note}")


def _run_import(what: str, fn: Any, *args: Any, **kwargs: Any) -> ImportReport:
    with sessions()() as session:
        try:
            report: ImportReport = fn(session, settings(), *args, **kwargs)
            session.commit()
        except LungnodeError as exc:
            session.rollback()
            error(f"cannot import {what}: {exc}")
            raise typer.Exit(1) from exc
    return report


@dataset_app.command("import-mosmed")
def import_mosmed_command(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="MosMedData folder (holds studies/)")],
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Import MosMedData (studies/CT-0..CT-4/*.nii.gz) with its labels and tensors."""
    use_config(config)
    _report(_run_import("MosMedData", import_mosmed, directory), as_json)


@dataset_app.command("import-cov19ctdb")
def import_cov19ctdb_command(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="COV19-CT-DB folder")],
    hu_window: Annotated[tuple[float, float], typer.Option(
        "--hu-window", metavar="LOW HIGH",
        help="HU that 8-bit 0 and 255 stand for")] = DEFAULT_HU_WINDOW,
    slice_mm: Annotated[float, typer.Option("--slice-mm", help="assumed slice interval in mm")] = 2.5,
    fov_mm: Annotated[float, typer.Option("--fov-mm", help="assumed field of view in mm")] = 350.0,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Import COV19-CT-DB (folders of numbered JPEG slices; severity CSVs) with labels and tensors."""
    use_config(config)
    if slice_mm <= 0 or fov_mm <= 0:
        error("--slice-mm and --fov-mm must be positive")
        raise typer.Exit(2)
    _report(_run_import("COV19-CT-DB", import_cov19ctdb, directory, hu_window=hu_window,
                        slice_mm=slice_mm, fov_mm=fov_mm), as_json)
