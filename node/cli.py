"""``lungnode``: the command line and the composition root.

Only this module wires :mod:`node`, :mod:`model` and :mod:`training` together;
configuration is loaded here once and passed down.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import sys
from collections import defaultdict
from pathlib import Path
from typing import Annotated

import pydicom
import typer
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import or_, select

from node.cli_admin import purge_command
from node.cli_audit import audit_app
from node.cli_datasets import dataset_app
from node.cli_labels import label_app
from node.cli_learning import model_app, runs_command, train_command
from node.cli_support import ConfigOpt, console, err_console, error, sessions, settings, state
from node.db import AuditEntry, Job, ResultObject, Series, Study
from node.errors import ConfigError, DeliveryError, LungnodeError
from node.migrate import upgrade
from node.records import StoredInstance, StoredStudy
from node.settings import Settings

app = typer.Typer(help="lungnode: DICOM analysis node for chest CT.", no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode=None)
deliveries_app = typer.Typer(help="Result deliveries (the outbox).", invoke_without_command=True,
                             rich_markup_mode=None)
db_app = typer.Typer(help="Database schema.", rich_markup_mode=None)
config_app = typer.Typer(help="Configuration.", rich_markup_mode=None)
app.add_typer(deliveries_app, name="deliveries")
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")
app.add_typer(label_app, name="label")
app.add_typer(dataset_app, name="dataset")
app.add_typer(model_app, name="model")
app.add_typer(audit_app, name="audit")

logger = logging.getLogger("lungnode")
_error = error
_settings = settings
_sessions = sessions
_state = state


@app.callback()
def main(config: ConfigOpt = None) -> None:
    """lungnode: receive chest CT, analyse it, send SR/SEG/summary back."""
    _state.config = config
    _state.settings = None


def _load_predictor(s: Settings):  # type: ignore[no-untyped-def]
    """The severity network's predictor, loaded once (``None`` when ``[model] enabled = false``)."""
    if not s.model.enabled:
        return None
    from model.errors import ModelError
    from model.inference import InferenceEngine

    try:
        engine = InferenceEngine.from_registry(s.model.name, s.model.registry, device=s.model.device,
                                               tta=s.model.tta)
    except ModelError as exc:
        _error(f"severity model: {exc}\n"
               "Fix [model] in the configuration, or set enabled = false to run without it.")
        raise typer.Exit(2) from exc
    # torch leaves some 200 000 long-lived objects; the cyclic garbage collector would walk
    # them again and again during every analysis (about 0.5 s of a 600-slice load)
    gc.collect()
    gc.freeze()
    return engine.predict


def _load_segmenter(s: Settings):  # type: ignore[no-untyped-def]
    """The lung segmenter of ``[segmentation]``, its weights loaded and checked once.

    Exit code 2 with the reason when lungmask is configured, cannot be opened
    and no ``fallback = "classical"`` is set.
    """
    from model.errors import ModelError
    from model.learned_lungs import open_segmenter

    g = s.segmentation
    try:
        return open_segmenter(g.method, model=g.model, weights=g.weights, fusion_weights=g.fusion_weights,
                              fallback=g.fallback, device=g.device, threads=g.threads,
                              batch_size=g.batch_size, budget_seconds=g.auto_budget_seconds)
    except ModelError as exc:
        _error(f"lung segmentation: {exc}\n"
               "Fix [segmentation] in the configuration, or set fallback = \"classical\".")
        raise typer.Exit(2) from exc


def warm_up_study(folder: Path) -> tuple[Path, ...]:
    """The workers' warm-up study: 60 slices of 128x128 from the phantom generator (2 MB).

    The CLI is the composition root: the service in :mod:`node` does not import :mod:`training`.
    """
    from training.synth import SynthSpec, write_study

    return write_study(folder, SynthSpec(seed=1, involvement=0.1, rows=128, slices=60,
                                         slice_thickness_mm=5.0)).paths


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Run the node: DICOM listener, workers, scheduler and web page."""
    from node.service import Node

    if config is not None:
        _state.config = config
    s = _settings()
    node = Node(s, _load_predictor(s), warm_up_study=warm_up_study, segmenter=_load_segmenter(s))
    try:
        node.start()
    except ConfigError as exc:
        node.stop()
        _error(f"the node cannot start: {exc}")
        raise typer.Exit(2) from exc
    console.print(f"lungnode {s.dicom.ae_title} listening on {s.dicom.host}:{s.dicom.port}; "
                  f"storage {s.storage.root}; database {_safe_url(s.database.url)}")

    def _term(signum: int, frame: object) -> None:
        node.stopping.set()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    node.wait()
    node.stop()


@app.command()
def worker(config: ConfigOpt = None) -> None:
    """Run analysis workers only (scale-out next to a `serve` on a shared PostgreSQL)."""
    from node.service import Node

    if config is not None:
        _state.config = config
    s = _settings()
    node = Node(s, _load_predictor(s), receive=False, schedule=False, warm_up_study=warm_up_study,
                segmenter=_load_segmenter(s))
    node.start()
    signal.signal(signal.SIGTERM, lambda *_: node.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: node.stopping.set())
    node.wait()
    node.stop()


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@app.command()
def echo(peer: str) -> None:
    """C-ECHO a configured peer (over DICOM TLS when the peer has ``tls = true``)."""
    from pynetdicom import AE

    from node.dicom.tls import client_context

    s = _settings()
    try:
        p = s.peer(peer)
    except ConfigError as exc:
        _error(str(exc))
        raise typer.Exit(2) from exc
    ae = AE(ae_title=s.dicom.ae_title)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = s.dicom.network_timeout
    tls_args = (client_context(s.dicom), p.host) if p.tls else None
    assoc = ae.associate(p.host, p.port, ae_title=p.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        _error(f"{peer} ({p.ae_title}@{p.host}:{p.port}) did not accept an association"
               + (" over DICOM TLS (check its certificate, tls_ca_file and that it trusts the "
                  "node's certificate)" if p.tls else ""))
        raise typer.Exit(1)
    status = assoc.send_c_echo()
    assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    if code != 0:
        _error(f"C-ECHO status {code}")
        raise typer.Exit(1)
    console.print(f"{peer}: C-ECHO OK")


def _dicom_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")))
        elif p.is_file():
            files.append(p)
        else:
            _error(f"{p} does not exist")
            raise typer.Exit(2)
    return [f for f in files if pydicom.misc.is_dicom(f)]


@app.command()
def send(paths: list[Path], to: Annotated[str, typer.Option("--to", help="peer name")]) -> None:
    """C-STORE DICOM files or folders to a peer, with a progress bar."""
    from node.dicom.scu import send_files

    s = _settings()
    try:
        peer = s.peer(to)
    except ConfigError as exc:
        _error(str(exc))
        raise typer.Exit(2) from exc
    files = _dicom_files(paths)
    if not files:
        _error("no DICOM files found")
        raise typer.Exit(2)
    with Progress(console=err_console) as progress:
        task = progress.add_task(f"sending to {to}", total=len(files))
        try:
            results = send_files(files, peer, s.dicom, lambda: progress.advance(task))
        except DeliveryError as exc:
            _error(str(exc))
            raise typer.Exit(1) from exc
    bad = [(p, st, m) for p, st, m in results if st is None or (st != 0 and not 0xB000 <= st <= 0xBFFF)]
    for p, st, m in bad:
        _error(f"{p}: {'not sent' if st is None else f'status 0x{st:04X}'} {m}")
    console.print(f"sent {len(results) - len(bad)} of {len(files)} files to {to}")
    if bad:
        raise typer.Exit(1)


@app.command()
def studies(limit: int = 50, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Table of studies with state, reason and deliveries."""
    from node.work.views import study_rows

    with _sessions()() as session:
        rows = study_rows(session, limit)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("id", "Study Instance UID", "state", "inst.", "ver.", "deliveries", "reason")
    for r in rows:
        table.add_row(str(r["id"]), r["study_instance_uid"], r["state"], str(r["instances"]),
                      str(r["result_version"]),
                      ", ".join(f"{k} {v}" for k, v in r["deliveries"].items() if v),
                      r["reason"][:120])
    console.print(table)


def _find_study(session, ref: str) -> Study:  # type: ignore[no-untyped-def]
    cond = Study.study_instance_uid == ref
    if ref.isdigit():
        cond = or_(cond, Study.id == int(ref))
    study = session.scalars(select(Study).where(cond)).first()
    if study is None:
        _error(f"no study {ref!r} (give its id or Study Instance UID)")
        raise typer.Exit(1)
    return study


@app.command()
def show(study: str) -> None:
    """Everything the node knows about one study (id or Study Instance UID)."""
    from node.work.outbox import study_delivered_at

    with _sessions()() as session:
        st = _find_study(session, study)
        console.print(f"[bold]study {st.id}[/bold] {st.study_instance_uid}")
        console.print(f"state: {st.state.value}" + (f" - {escape(st.reason)}" if st.reason else ""))
        delivered_at = study_delivered_at(session, st.id)
        if delivered_at is not None:
            console.print(f"delivered: {delivered_at:%Y-%m-%d %H:%M:%S} UTC (last result acknowledged)")
        console.print(f"instances: {st.instance_count} (analysed {st.analysed_instance_count}), "
                      f"last received {st.last_received_at:%Y-%m-%d %H:%M:%S} UTC")
        if st.purged_at is not None:
            console.print(f"purged {st.purged_at:%Y-%m-%d %H:%M:%S} UTC: its instances and result "
                          "files were deleted by retention (the rows below are the record)")
        for se in session.scalars(select(Series).where(Series.study_id == st.id)):
            mark = " [chosen]" if se.series_instance_uid == st.selected_series_uid else ""
            console.print(f"  series {se.series_instance_uid} {se.modality or ''} "
                          f"{se.instance_count} instances{mark}")
        if st.selection_reason:
            console.print(f"selection: {escape(st.selection_reason)}")
        if st.archive_note:
            console.print(f"archive: {escape(st.archive_note)}")
        if st.summary:
            console.print_json(st.summary)
        for job in session.scalars(select(Job).where(Job.study_id == st.id).order_by(Job.id)):
            console.print(f"job {job.id}: {job.state.value}, attempts {job.attempts}"
                          + (f", error: {job.error}" if job.error else ""))
        for obj in session.scalars(select(ResultObject).where(ResultObject.study_id == st.id)
                                   .order_by(ResultObject.id)):
            states = ", ".join(f"{d.destination} {d.state.value}" for d in obj.deliveries)
            console.print(f"result v{obj.version} {obj.kind} {obj.sop_instance_uid} \\[{states}]")
        console.print("audit log:")
        for a in session.scalars(select(AuditEntry).where(AuditEntry.study_id == st.id)
                                 .order_by(AuditEntry.id)):
            console.print(f"  {a.at:%Y-%m-%d %H:%M:%S} {a.actor} {a.action} {escape(a.detail or '')}")


@app.command()
def retry(study: str) -> None:
    """Queue a new analysis of a failed, rejected or complete study."""
    from node.work.jobs import requeue_study

    with _sessions()() as session:
        st = _find_study(session, study)
        try:
            job = requeue_study(session, st, actor="cli")
        except LungnodeError as exc:
            _error(str(exc))
            raise typer.Exit(1) from exc
        console.print(f"study {st.id} queued as job {job.id}")


def _folder_study(folder: Path) -> StoredStudy:
    by_study: dict[str, list[StoredInstance]] = defaultdict(list)
    for f in _dicom_files([folder]):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds:
            continue
        by_study[str(ds.StudyInstanceUID)].append(StoredInstance(
            path=f, sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            series_instance_uid=str(ds.SeriesInstanceUID)))
    if not by_study:
        raise LungnodeError(f"no DICOM instances under {folder}")
    if len(by_study) > 1:
        raise LungnodeError(f"{folder} holds {len(by_study)} studies; give a folder with one")
    uid, instances = next(iter(by_study.items()))
    return StoredStudy(study_instance_uid=uid, instances=tuple(instances))


@app.command()
def analyze(dicom_dir: Path, out: Annotated[Path, typer.Option("--out", help="output folder")]) -> None:
    """Run the pipeline offline on a folder; write SR/SEG/summary to OUT; print JSON."""
    from model.errors import AnalysisError
    from node.pipeline import analyse, report, selection_rules, summarise, write_results
    from node.stages.selection import select_series

    s = _settings()
    try:
        stored = _folder_study(dicom_dir)
        selected = select_series(stored, selection_rules(s.selection))
        analysis = analyse(selected, s.analysis, _load_predictor(s), _load_segmenter(s))
        paths = write_results(report(analysis), out)
    except (LungnodeError, AnalysisError) as exc:
        _error(f"{type(exc).__name__}: {exc}")
        raise typer.Exit(1) from exc
    result = summarise(analysis)
    result["outputs"] = {k: str(v) for k, v in paths.items()}
    print(json.dumps(result, indent=2))


@app.command()
def synth(
    directory: Path,
    involvement: Annotated[float, typer.Option(help="fraction 0..1 of lung diseased")] = 0.2,
    seed: int = 0,
    slices: Annotated[int | None, typer.Option(help="number of slices (default: cover the chest)")] = None,
    thickness: Annotated[float, typer.Option(help="slice thickness and interval, mm")] = 2.5,
    rows: Annotated[int, typer.Option(help="image size (rows = columns)")] = 512,
    kernel: str = "B40f",
    contrast: Annotated[bool, typer.Option(help="scanned after intravenous contrast")] = False,
) -> None:
    """Write a synthetic chest CT study with known ground truth."""
    from training.synth import SynthSpec, write_study

    if not 0.0 <= involvement <= 1.0:
        _error("--involvement is a fraction between 0 and 1")
        raise typer.Exit(2)
    study = write_study(directory, SynthSpec(involvement=involvement, seed=seed, slices=slices,
                                             slice_thickness_mm=thickness, rows=rows, kernel=kernel,
                                             contrast=contrast))
    print(json.dumps({"dicom_dir": str(study.dicom_dir), "files": len(study.paths),
                      "study_instance_uid": study.study_instance_uid,
                      "series_instance_uid": study.series_instance_uid,
                      "truth": str(study.directory / "truth.json")}, indent=2))


@deliveries_app.callback()
def deliveries(ctx: typer.Context, limit: int = 100,
               as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List deliveries (pending, sent, dead) with their last error."""
    if ctx.invoked_subcommand is not None:
        return
    from node.work.views import delivery_rows

    with _sessions()() as session:
        rows = delivery_rows(session, limit)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("id", "Study Instance UID", "object", "ver.", "destination", "state", "attempts",
                  "next attempt", "last error")
    for r in rows:
        table.add_row(str(r["id"]), r["study_instance_uid"], r["kind"], str(r["version"]),
                      r["destination"], r["state"], str(r["attempts"]), r["next_attempt_at"],
                      r["last_error"][:80])
    console.print(table)


@deliveries_app.command("retry")
def deliveries_retry(
    delivery_id: Annotated[int | None, typer.Argument(help="one delivery's id")] = None,
    dead: Annotated[bool, typer.Option("--dead", help="every dead delivery")] = False,
    destination: Annotated[str | None, typer.Option(
        "--destination", help="the deliveries to this destination (dead and pending)")] = None,
) -> None:
    """Re-queue deliveries for an immediate attempt: one by ID, or --dead and/or --destination."""
    from node.work.outbox import requeue_deliveries, retry_delivery

    if (delivery_id is None) == (not dead and destination is None):
        _error("give a delivery id, or --dead and/or --destination NAME (not both kinds)")
        raise typer.Exit(2)
    with _sessions()() as session:
        try:
            if delivery_id is not None:
                d = retry_delivery(session, delivery_id, actor="cli")
                console.print(f"delivery {d.id} to {d.destination} re-queued")
                return
            ids = requeue_deliveries(session, "cli", dead=dead, destination=destination)
        except LungnodeError as exc:
            _error(str(exc))
            raise typer.Exit(1) from exc
    console.print(f"{len(ids)} deliveries re-queued" + (f": {', '.join(map(str, ids))}" if ids else ""))


@db_app.command("upgrade")
def db_upgrade(revision: str = "head", config: ConfigOpt = None) -> None:
    """Create or upgrade the database schema (Alembic)."""
    if config is not None:
        _state.config = config
    s = _settings()
    changed = upgrade(s.database.url, revision)
    console.print(f"database {_safe_url(s.database.url)} "
                  f"{'upgraded to' if changed else 'already at'} {revision}")


@config_app.command("show")
def config_show(config: ConfigOpt = None) -> None:
    """Print the effective configuration (file + environment) as JSON."""
    if config is not None:
        _state.config = config
    s = _settings()
    data = s.model_dump(mode="json")
    data["database"]["url"] = _safe_url(s.database.url)
    print(json.dumps(data, indent=2))


app.command("train")(train_command)
app.command("runs")(runs_command)
app.command("purge")(purge_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
