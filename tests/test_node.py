"""End to end: a real Orthanc sends a study to the node; SR, SEG and summary
image come back into the same study in Orthanc.  Then more instances arrive
and a second result version references the first."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import select

from node.db import Delivery, DeliveryState, Study, StudyState
from node.service import Node
from node.settings import Settings
from tests.conftest import B40F, B70F
from tests.dcmtk import wait_for
from tests.peers import Orthanc, free_port, storescu

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture
def orthanc_and_node(tmp_path: Path, db_url: str,
                     make_settings: Callable[..., Settings]) -> Iterator[tuple[Orthanc, Node]]:
    node_port = free_port()
    modalities = {"lungnode": ("LUNGNODE", "127.0.0.1", node_port)}
    with Orthanc(tmp_path / "orthanc", modalities=modalities) as orthanc:
        settings = make_settings(
            db_url, port=node_port,
            peers=[{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                    "port": orthanc.dicom_port}],
            delivery={"destinations": ["orthanc"]},
        )
        node = Node(settings)
        node.start()
        try:
            yield orthanc, node
        finally:
            node.stop()


def _results_in_orthanc(orthanc: Orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    oid = orthanc.find_study(study_uid)
    found: dict[str, list[pydicom.Dataset]] = {SR_CLASS: [], SEG_CLASS: [], SC_CLASS: []}
    if oid is None:
        return found
    for inst in orthanc.study_instances(oid):
        if inst["SOPClassUID"] in found:
            found[inst["SOPClassUID"]].append(orthanc.instance_dataset(inst["ID"]))
    return found


def test_orthanc_round_trip_and_reanalysis(orthanc_and_node: tuple[Orthanc, Node], tmp_path: Path) -> None:
    orthanc, node = orthanc_and_node
    storescu([B40F], "127.0.0.1", orthanc.dicom_port, orthanc.aet)
    source = pydicom.dcmread(sorted(B40F.iterdir())[0], stop_before_pixels=True)
    oid = orthanc.find_study(source.StudyInstanceUID)
    assert oid is not None
    orthanc.store_to_modality("lungnode", [oid])

    def complete() -> dict[str, list[pydicom.Dataset]] | None:
        found = _results_in_orthanc(orthanc, source.StudyInstanceUID)
        return found if all(len(v) == 1 for v in found.values()) else None

    found = wait_for(complete, 180, 0.2, "SR, SEG and summary image in Orthanc")
    assert isinstance(found, dict)
    sr_ds, seg_ds, sc_ds = found[SR_CLASS][0], found[SEG_CLASS][0], found[SC_CLASS][0]
    for ds in (sr_ds, seg_ds, sc_ds):
        for attr in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber",
                     "PatientBirthDate"):
            assert ds.get(attr) == source.get(attr), attr
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    with node.sessions() as s:
        study = s.scalars(select(Study)).one()
        assert study.state in (StudyState.DELIVERING, StudyState.DELIVERED)  # marked sent or not yet
        assert study.selected_series_uid == source.SeriesInstanceUID
        summary = json.loads(study.summary or "{}")
        assert 2000 < summary["lung_volume_ml"]["total"] < 9000
    numbers = sr_numbers(sr_ds)
    for side in ("left", "right"):
        assert numbers[(f"{side} lung", "Volume")] == pytest.approx(summary["lung_volume_ml"][side], abs=0.1)
        assert numbers[(f"{side} lung", "Percentage of lung volume with opacity")] == pytest.approx(
            summary["percent_opacity"][side], abs=0.01)
    assert numbers[("both lungs", "Volume")] == pytest.approx(summary["lung_volume_ml"]["total"], abs=0.1)
    codes_found = sr_codes(sr_ds)
    assert ("Severity category (MosMedData)", summary["severity_category"]) in codes_found
    assert ("Scope of measurement", "WHOLEPERLUNG") in codes_found
    proc = subprocess.run(["dsrdump", str(_as_file(sr_ds, tmp_path / "sr.dcm"))], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "Imaging Measurement Report" in proc.stdout
    seg = hd.seg.segread(_as_file(seg_ds, tmp_path / "seg.dcm"))
    referenced = {r.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence
                  for r in item.ReferencedInstanceSequence}
    b40f_uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in B40F.iterdir()}
    assert referenced <= b40f_uids and referenced
    labels = {d.SegmentLabel.lower() for d in seg.SegmentSequence}
    assert any("left" in lab for lab in labels) and any("right" in lab for lab in labels)

    # more instances (the sharp-kernel series) arrive: a second version
    storescu([B70F], "127.0.0.1", orthanc.dicom_port, orthanc.aet)
    b70f_uid = pydicom.dcmread(next(B70F.iterdir()), stop_before_pixels=True).SeriesInstanceUID
    series_id = orthanc.find(b70f_uid, "Series")
    assert series_id is not None
    orthanc.store_to_modality("lungnode", [series_id])  # the new CT series, as the routing Lua does

    def second() -> list[pydicom.Dataset] | None:
        srs = _results_in_orthanc(orthanc, source.StudyInstanceUID)[SR_CLASS]
        return srs if len(srs) == 2 else None

    srs = wait_for(second, 180, 0.2, "the second SR")
    assert isinstance(srs, list)
    new = next(d for d in srs if d.SOPInstanceUID != sr_ds.SOPInstanceUID)
    preds = [r.ReferencedSOPInstanceUID for item in new.PredecessorDocumentsSequence
             for s in item.ReferencedSeriesSequence for r in s.ReferencedSOPSequence]
    assert preds == [sr_ds.SOPInstanceUID]
    with node.sessions() as s:
        study = s.scalars(select(Study)).one()
        assert study.result_version == 2
        assert study.instance_count == 60
    wait_for(lambda: _deliveries_sent(node), 60, 0.2, "deliveries marked sent")


def _deliveries_sent(node: Node) -> bool:
    """Whether every delivery is marked sent, read in a session of its own: a session kept open
    across the polls holds SQLite's write lock (the node begins every transaction IMMEDIATE), so
    the outbox could not mark them sent, and it would keep returning the rows it loaded first."""
    with node.sessions() as s:
        ds = list(s.scalars(select(Delivery)))
        return bool(ds) and all(d.state == DeliveryState.SENT for d in ds)


def _walk(items, group: str | None = None):  # type: ignore[no-untyped-def]
    for item in items:
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        if item.ValueType == "TEXT" and name == "Tracking Identifier":
            group = item.TextValue
        yield group, name, item
        if "ContentSequence" in item:
            inner = list(item.ContentSequence)
            ids = [i.TextValue for i in inner if i.ValueType == "TEXT"
                   and i.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"]
            yield from _walk(inner, ids[0] if ids else group)


def sr_numbers(ds: pydicom.Dataset) -> dict[tuple[str | None, str], float]:
    """(tracking identifier of the group, concept name) -> numeric value."""
    return {(g, n): float(i.MeasuredValueSequence[0].NumericValue)
            for g, n, i in _walk(ds.ContentSequence) if i.ValueType == "NUM"}


def sr_codes(ds: pydicom.Dataset) -> set[tuple[str, str]]:
    return {(n, i.ConceptCodeSequence[0].CodeValue) for _, n, i in _walk(ds.ContentSequence)
            if i.ValueType == "CODE"}


def _as_file(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_hand_offs_do_not_wait_for_the_interval_ticks(
        tmp_path: Path, db_url: str, make_settings: Callable[..., Settings]) -> None:
    """With every interval at an hour, one completion tick while the study is still arriving
    is enough: it sets a tick for when the study becomes stable, that tick wakes the idle
    worker, and the committed results go to the destination at once."""
    from tests.peers import StoreSCP

    port = free_port()
    with StoreSCP(tmp_path / "received", aet="RECEIVER") as receiver:
        settings = make_settings(
            db_url, port=port,
            peers=[{"name": "receiver", "ae_title": "RECEIVER", "host": "127.0.0.1",
                    "port": receiver.port},
                   {"name": "ct", "ae_title": "STORESCU", "host": "127.0.0.1", "port": 104}],
            completion={"stable_seconds": 8.0, "poll_seconds": 3600.0},
            worker={"poll_seconds": 3600.0},
            delivery={"destinations": ["receiver"], "poll_seconds": 3600.0},
        )
        node = Node(settings)
        node.start()
        try:
            storescu([B40F], "127.0.0.1", port, "LUNGNODE")
            node.completion_tick()  # what the interval tick does when it finds the study arriving
            with node.sessions() as s:
                study = s.scalars(select(Study)).one()
                assert study.state == StudyState.RECEIVING  # not stable yet: 8 s
            assert node.scheduler is not None and node.scheduler.get_job("completion-due") is not None
            received = receiver.wait_for_files(3, timeout=180)
            classes = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in received}
            assert classes == {SR_CLASS, SEG_CLASS, SC_CLASS}
            wait_for(lambda: _deliveries_sent(node), 60, 0.2, "deliveries marked sent")
            with node.sessions() as s:
                assert s.scalars(select(Study)).one().state == StudyState.DELIVERED
        finally:
            node.stop()
