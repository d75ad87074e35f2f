"""The orchestrator: chains the stages for one job and records what happened.

Stages are pure functions (selection, anonymisation, volume, lungs,
quantification, inference, reports); this module is the only place that
catches their errors, writes state to the database and turns an error into a
reason on the study.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from model.errors import AnalysisError, NoLungsError
from model.learned_lungs import LOBE_NAMES, LungSegmenter
from model.lungs import LungMasks
from model.prediction import Prediction
from model.quantify import OpacityThresholds, Quantification, quantify, require_lungs
from model.volume import CTVolume, load_series_with_headers
from node.db import (
    AuditEntry,
    Delivery,
    Job,
    JobState,
    ResultObject,
    Study,
    StudyState,
    UidMapping,
    utcnow,
)
from node.dicom.catalog import stored_study
from node.dicom.storage import atomic_write
from node.errors import BurnedInAnnotationError, LungnodeError, SelectionError
from node.records import SelectedSeries
from node.settings import AnalysisSettings, SelectionSettings, Settings
from node.stages.anonymize import anonymize
from node.stages.reports import ReportContext, ResultObjects, build_reports
from node.stages.reports.seg import share_segment_stack
from node.stages.selection import SelectionRules, select_series
from node.work.claim import for_update
from node.work.jobs import ClaimedJob, finish_job_failed, renew_lease
from node.work.state import transition, transition_job

__all__ = [
    "ALGORITHM_NAME",
    "ALGORITHM_VERSION",
    "Analysis",
    "NodeContext",
    "Predictor",
    "analyse",
    "archive_series",
    "report",
    "run_job",
    "selection_rules",
    "summarise",
    "write_results",
]

logger = logging.getLogger(__name__)

ALGORITHM_NAME = "lungnode"
ALGORITHM_VERSION = "0.1.0"

Predictor = Callable[[CTVolume, LungMasks], Prediction]
"""Runs the severity network on a volume (see :mod:`model.inference`)."""


@dataclass(frozen=True, eq=False)
class Analysis:
    """Everything measured for one series."""

    selected: SelectedSeries
    volume: CTVolume
    masks: LungMasks
    quantification: Quantification
    prediction: Prediction | None
    source_headers: tuple[Dataset, ...]
    timings: dict[str, float] = field(default_factory=dict)


def selection_rules(s: SelectionSettings) -> SelectionRules:
    return SelectionRules(min_slices=s.min_slices, max_slice_thickness_mm=s.max_slice_thickness_mm,
                          kernel_preference=s.kernel_preference, sharp_noise_hu=s.sharp_noise_hu,
                          max_matrix=s.max_matrix, max_voxels=s.max_voxels)


def analyse(selected: SelectedSeries, settings: AnalysisSettings,
            predictor: Predictor | None = None, segmenter: LungSegmenter | None = None) -> Analysis:
    """Load, segment, quantify and (when a predictor is given) classify one series.

    ``segmenter`` chooses the lung segmentation (:class:`model.learned_lungs.LungSegmenter`,
    ``None``: the classical method).
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    volume, headers = load_series_with_headers(list(selected.paths))
    timings["load"] = time.perf_counter() - t0
    thresholds = OpacityThresholds(settings.opacity_low_hu, settings.opacity_high_hu,
                                   settings.high_opacity_high_hu)
    # classical, lungmask or auto ([segmentation]); timings segment / segment_lungmask / quantify
    masks, quant, seg_timings = (segmenter or LungSegmenter()).run(
        volume, lambda m: quantify(volume, m, thresholds, normal_below_percent=settings.normal_below_percent))
    timings.update(seg_timings)
    # an abdominal CT or a scan of one lung: no severity (it would read CT-0), the study is rejected
    require_lungs(quant, volume.series_instance_uid, min_total_ml=settings.min_lung_volume_ml)
    # the lungs, the opacity and the lobes as layers of one stack, the SEG's pixels: the reports
    # then pass it to highdicom without a full-size copy (471 MB for 600 slices of 512x512, at the
    # memory peak); the separate arrays are freed when masks and quant are rebound here
    masks, opacity = share_segment_stack(masks, quant.opacity_mask)
    quant = replace(quant, opacity_mask=opacity)
    del opacity
    prediction = None
    if predictor is not None:
        t0 = time.perf_counter()
        prediction = predictor(volume, masks)
        timings["cnn"] = time.perf_counter() - t0
    return Analysis(selected, volume, masks, quant, prediction, headers, timings)


def report(analysis: Analysis, *, version: int = 1, predecessor_sr: Dataset | None = None) -> ResultObjects:
    """The SR, SEG and summary image of an analysis, as this algorithm (name and version) makes them."""
    return build_reports(ReportContext(
        volume=analysis.volume, masks=analysis.masks, quantification=analysis.quantification,
        prediction=analysis.prediction, algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION,
        version=version, predecessor_sr=predecessor_sr), analysis.source_headers)


_WARM_UP_PREFIX = "lungnode-warm-up-"


def _remove_stale_warm_ups() -> None:
    """Remove the warm-up folders of processes that ended without removing theirs (killed)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_WARM_UP_PREFIX}*-*"):
        pid = folder.name[len(_WARM_UP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


WarmUpStudy = Callable[[Path], tuple[Path, ...]]
"""Writes a small chest CT series into the folder it is given and returns the files.  The service
does not import :mod:`training` (the design's one-way dependencies); the composition root
(:mod:`node.cli`) passes the synthetic generator in."""


def warm_up(ctx: NodeContext, write_study: WarmUpStudy) -> float:
    """Analyse a small synthetic study once, before the first real one; the seconds it took.

    The first analysis in a process pays one-time costs: torch picks and builds
    its CPU kernels, highdicom loads the standard's tables, and the NumPy,
    OpenCV and SciPy code paths run for the first time.  On the build machine,
    analysing and reporting a 300-slice study took a fresh process 3.7-3.8 s,
    2.7-3.0 s after this warm-up and 2.2-2.3 s from the second study on (the
    rest of the first study's extra is fresh memory for its full-size arrays,
    which the warm-up's small arrays do not touch).  The warm-up study
    (``write_study``; the node uses 60 slices of 128x128 from
    :mod:`training.synth`, 2 MB) and its results are written to a temporary
    folder of the system's and removed; nothing is recorded in the database.
    """
    t0 = time.perf_counter()
    _remove_stale_warm_ups()
    with tempfile.TemporaryDirectory(prefix=f"{_WARM_UP_PREFIX}{os.getpid()}-") as tmp:
        paths = tuple(sorted(write_study(Path(tmp) / "study")))
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        selected = SelectedSeries(str(first.StudyInstanceUID), str(first.SeriesInstanceUID), paths, "warm-up")
        # the classical segmentation: a lungmask run here (a minute on a CPU) would hold the
        # segmenter while the first real study waits
        analysis = analyse(selected, ctx.settings.analysis, ctx.predictor)
        write_results(report(analysis), Path(tmp) / "results")
    return time.perf_counter() - t0


def summarise(analysis: Analysis) -> dict[str, Any]:
    """The JSON object of ``lungnode analyze`` (and the study's stored summary)."""
    q = analysis.quantification
    out: dict[str, Any] = {
        "study_instance_uid": analysis.selected.study_instance_uid,
        "series_instance_uid": analysis.volume.series_instance_uid,
        "selection_reason": analysis.selected.reason,
        "slices": analysis.volume.shape[0],
        "lung_volume_ml": {"left": round(q.left.volume_ml, 1), "right": round(q.right.volume_ml, 1),
                           "total": round(q.total.volume_ml, 1)},
        "percent_opacity": {"left": round(q.left.percent_opacity, 2),
                            "right": round(q.right.percent_opacity, 2),
                            "total": round(q.total.percent_opacity, 2)},
        "percent_high_opacity": {"left": round(q.left.percent_high_opacity, 2),
                                 "right": round(q.right.percent_high_opacity, 2),
                                 "total": round(q.total.percent_high_opacity, 2)},
        "severity_category": q.severity_category,
        "quality_flags": list(q.quality_flags),
        "algorithm": {"name": ALGORITHM_NAME, "version": ALGORITHM_VERSION},
        "segmentation": _segmentation_summary(analysis.masks, analysis.volume.voxel_volume_ml),
        "timings_s": {k: round(v, 3) for k, v in analysis.timings.items()},
    }
    if q.lobes:  # a lobe model made the masks: per lobe and the CT severity score 0-25
        out["lobes"] = {lobe.name: {"volume_ml": round(lobe.measurement.volume_ml, 1),
                                    "percent_opacity": round(lobe.measurement.percent_opacity, 2),
                                    "percent_high_opacity": round(lobe.measurement.percent_high_opacity, 2),
                                    "score": lobe.score} for lobe in q.lobes}
        out["ctss"] = q.ctss
    p = analysis.prediction
    if p is not None:
        out["model"] = {"name": p.model_name, "version": p.model_version,
                        "sha256": p.model_sha256, "device": p.device, "validity": p.model_validity}
        out["probabilities"] = {k: round(v, 4) for k, v in p.probabilities.items()}
        out["predicted_class"] = p.predicted_class
        out["p_covid"] = round(p.p_covid, 4)
    return out


def _segmentation_summary(masks: LungMasks, voxel_ml: float) -> dict[str, Any]:
    """The segmenter that made the masks: method, model, weights' sha256, why (and lobes' volumes)."""
    m = masks.method
    out: dict[str, Any] = {"method": m.name, "model": m.model, "weights_sha256": m.weights_sha256}
    if m.note:
        out["note"] = m.note
    if masks.lobes is not None:
        counts = np.bincount(masks.lobes.ravel(), minlength=6)
        out["lobes_ml"] = {LOBE_NAMES[i]: round(float(counts[i]) * voxel_ml, 1)
                           for i in LOBE_NAMES}
    return out


def write_results(objects: ResultObjects, out_dir: Path) -> dict[str, Path]:
    """Write the SR, SEG and summary image as part-10 files; returns kind to path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, ds in (("sr", objects.sr), ("seg", objects.seg), ("summary", objects.summary)):
        path = out_dir / f"{kind}.dcm"
        buffer = pydicom.filebase.DicomBytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        atomic_write(path, buffer.getvalue())
        paths[kind] = path
    return paths


@dataclass
class NodeContext:
    """What a worker needs; built once by the composition root (``serve``/``worker``)."""

    settings: Settings
    sessions: sessionmaker[Session]
    owner: str
    predictor: Predictor | None = None
    on_results: Callable[[], None] | None = None
    """Called once a job's results are committed (the node sends them at once instead of at its
    next outbox tick); an error it raises is logged, not the job's."""
    segmenter: LungSegmenter | None = None
    """The lung segmenter (``[segmentation]``, weights loaded once); ``None``: classical."""


def _anonymization_salt(archive_root: Path) -> str:
    """A per-installation secret for the UID hash, created on first use."""
    path = archive_root / ".salt"
    if not path.exists():
        archive_root.mkdir(parents=True, exist_ok=True)
        atomic_write(path, secrets.token_hex(32).encode())
    return path.read_text().strip()


class _Heartbeat:
    """Renews the job's lease in the background while the stages run."""

    def __init__(self, ctx: NodeContext, job_id: int) -> None:
        self.ctx, self.job_id = ctx, job_id
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"lease-{job_id}")

    def _run(self) -> None:
        lease = self.ctx.settings.worker.lease_seconds
        while not self._stop.wait(max(lease / 3.0, 0.5)):
            if not renew_lease(self.ctx.sessions, self.job_id, self.ctx.owner, lease):
                self.lost.set()
                return

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_job(ctx: NodeContext, claimed: ClaimedJob) -> StudyState:
    """Run one claimed analysis job to its end state; never raises for bad data."""
    s = ctx.settings
    with ctx.sessions() as session:
        stored = stored_study(session, claimed.study_id, s.storage.root)
        study = session.get_one(Study, claimed.study_id)
        version = study.result_version + 1
        previous_sr = session.scalars(
            select(ResultObject).where(ResultObject.study_id == study.id,
                                       ResultObject.kind == "sr")
            .order_by(ResultObject.version.desc())).first()
        previous_sr_path = s.storage.root / previous_sr.path if previous_sr else None
        uid_map = {m.original_uid: m.anonymized_uid for m in session.scalars(
            select(UidMapping).where(UidMapping.study_id == study.id))}
    try:
        with _Heartbeat(ctx, claimed.job_id) as heartbeat:
            selected = select_series(stored, selection_rules(s.selection))
            _record_selection(ctx, claimed, selected)
            analysis = analyse(selected, s.analysis, ctx.predictor, ctx.segmenter)
            predecessor = (pydicom.dcmread(previous_sr_path, stop_before_pixels=True)
                           if previous_sr_path and previous_sr_path.exists() else None)
            objects = report(analysis, version=version, predecessor_sr=predecessor)
            rel_dir = f"results/{claimed.study_instance_uid}/v{version}-job{claimed.job_id}"
            paths = write_results(objects, s.storage.root / rel_dir)
            if heartbeat.lost.is_set():
                logger.warning("job %d: lease lost; results discarded", claimed.job_id)
                return StudyState.ANALYSING
            state = _commit_results(ctx, claimed, version, objects, paths, rel_dir, summarise(analysis))
        if state in (StudyState.COMPLETE, StudyState.DELIVERING) and ctx.on_results is not None:
            try:
                ctx.on_results()
            except Exception:  # noqa: BLE001 - the results are committed; the outbox tick sends them
                logger.exception("job %d: could not start the delivery at once", claimed.job_id)
        if state in (StudyState.COMPLETE, StudyState.DELIVERING) and s.analysis.anonymize:
            archive_series(ctx, claimed.study_id, f"job {claimed.job_id}", selected, uid_map)
        return state
    except (SelectionError, NoLungsError) as exc:  # not a chest CT to analyse: rejected, not failed
        with ctx.sessions() as session:
            finish_job_failed(session, claimed.job_id, ctx.owner,
                              str(exc) + _refusals_note(session, claimed.study_id), StudyState.REJECTED)
        return StudyState.REJECTED
    except (AnalysisError, LungnodeError, OSError) as exc:
        msg = f"{type(exc).__name__}: {exc}"
    except (OperationalError, InterfaceError):
        raise  # the database went away, not the study's fault: the worker queues the job again
    except Exception as exc:  # noqa: BLE001 - an unforeseen error must not stop the worker
        logger.exception("job %d: unexpected error", claimed.job_id)
        msg = f"internal error ({type(exc).__name__}: {exc}); please report it with the log"
    with ctx.sessions() as session:
        finish_job_failed(session, claimed.job_id, ctx.owner, msg + _refusals_note(session, claimed.study_id),
                          StudyState.FAILED)
    return StudyState.FAILED


def _refusals_note(session: Session, study_id: int) -> str:
    """What the failure reason adds about instances of the study refused on arrival (often the cause:
    a slice refused leaves a gap), or ``""``."""
    refused = list(session.scalars(
        select(AuditEntry.detail).where(AuditEntry.study_id == study_id,
                                        AuditEntry.action == "instance-refused")
        .order_by(AuditEntry.id)))
    if not refused:
        return ""
    more = f" (and {len(refused) - 1} more; see the audit log)" if len(refused) > 1 else ""
    return f"\n{len(refused)} instance(s) of this study were refused on arrival: {refused[0]}{more}"


def _record_selection(ctx: NodeContext, claimed: ClaimedJob, selected: SelectedSeries) -> None:
    with ctx.sessions() as session:
        study = session.get_one(Study, claimed.study_id)
        study.selected_series_uid = selected.series_instance_uid
        study.selection_reason = selected.reason
        session.add(AuditEntry(actor="worker", action="series-selected", study_id=study.id,
                               detail=selected.reason))
        session.commit()


def archive_series(ctx: NodeContext, study_id: int, label: str, selected: SelectedSeries,
             uid_map: dict[str, str]) -> bool:
    """The de-identified copy of the analysed series, after the results are committed.

    The archive feeds training, not the radiologist: it runs once the results
    are in the outbox (de-identifying a 300-slice series takes longer than
    analysing it), and a failure is recorded on the study (audit entry
    ``archive-failed``) without withdrawing the results.  ``lungnode retry``
    analyses and archives again; :func:`archive_pending` catches up after a
    crash between the two.  A series that may show identity in its pixels
    (:class:`~node.errors.BurnedInAnnotationError`) is not archived for
    training: the reason goes to ``Study.archive_note`` (``lungnode show``) and
    the audit log (``archive-refused``).  A written copy is recorded as
    ``archived``.
    """
    s = ctx.settings
    try:
        archived = anonymize(selected, s.archive_root, uid_map, salt=_anonymization_salt(s.archive_root))
        _record_uid_map(ctx, study_id, uid_map, archived.uid_map)
        with ctx.sessions() as session:
            study = session.get_one(Study, study_id)
            if study.archive_note and study.archive_note.startswith(_NOT_ARCHIVED):
                study.archive_note = None
            session.add(AuditEntry(actor="worker", action="archived", study_id=study_id,
                                   detail=f"series {selected.series_instance_uid}: {len(archived.paths)} "
                                          f"files de-identified as {archived.directory.parent.name}/"
                                          f"{archived.directory.name}; {archived.profile}"))
            session.commit()
        return True
    except BurnedInAnnotationError as exc:
        logger.warning("%s: not archived for training: %s", label, exc)
        with ctx.sessions() as session:
            study = session.get_one(Study, study_id)
            study.archive_note = f"{_NOT_ARCHIVED}: {exc}"
            session.add(AuditEntry(actor="worker", action="archive-refused", study_id=study_id,
                                   detail=str(exc)))
            session.commit()
        return False
    except (LungnodeError, OSError) as exc:
        logger.error("%s: de-identified archive not written: %s", label, exc)
        with ctx.sessions() as session:
            session.add(AuditEntry(actor="worker", action="archive-failed", study_id=study_id,
                                   detail=f"{type(exc).__name__}: {exc}; the results were sent; "
                                          "fix the cause, then `lungnode retry <study>` to archive"))
            session.commit()
        return False


_NOT_ARCHIVED = "not archived for training"


def archive_pending(ctx: NodeContext) -> int:
    """Write the archive copies that a stop between results and archive left out.

    Studies with results (complete, or in a delivery state) with an analysed
    series and no UID mapping yet (the mapping is recorded with the archive
    copy) are archived now; returns how many were written.  The node runs
    this once when its first worker starts.
    """
    s = ctx.settings
    if not s.analysis.anonymize:
        return 0
    with ctx.sessions() as session:
        mapped = select(UidMapping.study_id)
        todo = [(st.id, st.study_instance_uid, st.selected_series_uid) for st in session.scalars(
            select(Study).where(Study.state.in_([StudyState.COMPLETE, StudyState.DELIVERING,
                                                 StudyState.DELIVERED, StudyState.DELIVERY_FAILED]),
                                Study.archive_note.is_(None),  # refused (burned-in) or purged
                                Study.selected_series_uid.is_not(None), Study.id.not_in(mapped)))]
    written = 0
    for study_id, study_uid, series_uid in todo:
        with ctx.sessions() as session:
            stored = stored_study(session, study_id, s.storage.root)
        paths = tuple(i.path for i in stored.instances if i.series_instance_uid == series_uid)
        if not paths:
            continue
        selected = SelectedSeries(study_uid, str(series_uid), paths, "archive after a stop")
        if archive_series(ctx, study_id, f"study {study_id}", selected, {}):
            logger.info("study %d: de-identified archive written after a stop", study_id)
            written += 1
    return written


def _record_uid_map(ctx: NodeContext, study_id: int, known: dict[str, str],
                    new_map: dict[str, str]) -> None:
    added = {k: v for k, v in new_map.items() if k not in known}
    if not added:
        return
    with ctx.sessions() as session:
        for original, anon in added.items():
            session.add(UidMapping(study_id=study_id, original_uid=original,
                                   anonymized_uid=anon))
        session.commit()


def _commit_results(ctx: NodeContext, claimed: ClaimedJob, version: int, objects: ResultObjects,
                    paths: dict[str, Path], rel_dir: str, summary: dict[str, Any]) -> StudyState:
    """Record results, outbox rows and the end state in one transaction."""
    with ctx.sessions() as session:
        stmt = select(Job).where(Job.id == claimed.job_id)
        job = session.scalars(for_update(session, stmt, skip_locked=False)).one()
        if job.state != JobState.RUNNING or job.lease_owner != ctx.owner:
            session.rollback()
            logger.warning("job %d: lease lost before commit; results discarded", claimed.job_id)
            return StudyState.ANALYSING
        study = session.get_one(Study, claimed.study_id)
        destinations = ctx.settings.delivery.destinations
        queued = 0
        for kind, ds in (("sr", objects.sr), ("seg", objects.seg), ("summary", objects.summary)):
            if kind == "summary" and not ctx.settings.delivery.send_summary_image:
                continue
            obj = ResultObject(study_id=study.id, job_id=job.id, version=version, kind=kind,
                               sop_class_uid=str(ds.SOPClassUID),
                               sop_instance_uid=str(ds.SOPInstanceUID),
                               series_instance_uid=str(ds.SeriesInstanceUID),
                               path=f"{rel_dir}/{paths[kind].name}")
            session.add(obj)
            session.flush()
            for dest in destinations:
                session.add(Delivery(result_object_id=obj.id, destination=dest))
                queued += 1
        now = utcnow()
        transition_job(job, JobState.DONE)
        job.finished_at = now
        job.lease_owner = None
        study.result_version = version
        study.summary = json.dumps(summary)
        model = summary.get("model")
        session.add(AuditEntry(  # which algorithm and model produced the results
            actor="worker", action="analysed", study_id=study.id,
            detail=f"job {job.id}, result version {version}: series {summary['series_instance_uid']}, "
                   f"{summary['severity_category']}; {ALGORITHM_NAME} {ALGORITHM_VERSION}"
                   + (f", model {model['name']} {model['version']} sha256 {model['sha256']} on "
                      f"{model['device']}" if model else ", no model")))
        # with destinations the study is delivering until the outbox settles its deliveries
        # (node.work.outbox.settle_study); without, its results are complete where they are
        state = StudyState.DELIVERING if queued else StudyState.COMPLETE
        note = (f"result version {version}: {summary['severity_category']}, "
                f"{summary['percent_opacity']['total']:.1f} % opacity")
        transition(session, study, state, actor="worker",
                   reason=f"{note}; 0 of {queued} deliveries sent" if queued else note)
        session.commit()
    return state
