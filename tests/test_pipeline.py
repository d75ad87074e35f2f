"""Bad studies through the running node: each ends with a clear reason on the study,
nothing received is lost, and no result is sent."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, generate_uid
from sqlalchemy import func, select

from node.cli import warm_up_study
from node.db import AuditEntry, Instance, ResultObject, Study, StudyState, UidMapping
from node.errors import AnonymizationError
from node.service import Node
from node.settings import Settings
from tests.conftest import B40F
from tests.dcmtk import wait_for
from tests.peers import free_port, storescu


@pytest.fixture
def node(tmp_path: Path, make_settings: Callable[..., Settings]) -> Iterator[Node]:
    settings = make_settings(f"sqlite:///{tmp_path / 'n.db'}", port=free_port(),
                             peers=[{"name": "ct", "ae_title": "STORESCU", "host": "127.0.0.1",
                                     "port": 104}])
    n = Node(settings)
    n.start()
    yield n
    n.stop()


def _copy(tmp_path: Path, name: str, edit: Callable[[int, pydicom.Dataset], None],
          count: int = 30) -> Path:
    out = tmp_path / name
    out.mkdir()
    study, series = generate_uid(), generate_uid()
    for i, f in enumerate(sorted(B40F.iterdir())[:count]):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        edit(i, ds)
        ds.save_as(out / f.name, enforce_file_format=True)
    return out


def _final(node: Node, timeout: float = 120) -> Study:
    def ended() -> Study | None:
        with node.sessions() as s:
            study = s.scalars(select(Study)).first()
        if study is not None and study.state in (StudyState.COMPLETE, StudyState.REJECTED,
                                                 StudyState.FAILED):
            return study
        return None

    return wait_for(ended, timeout, 0.2, "the study to reach an end state")


def _count(node: Node, table: type) -> int:
    """Rows of ``table``, read in a fresh session (what another process has committed)."""
    with node.sessions() as s:
        return s.scalar(select(func.count()).select_from(table)) or 0


def _send(node: Node, folder: Path, extra: tuple[str, ...] = ()) -> None:
    storescu([folder], "127.0.0.1", node.settings.dicom.port, "LUNGNODE", extra_args=extra)


def _no_results(node: Node, instances: int) -> None:
    with node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(ResultObject)) == 0
        assert s.scalar(select(func.count()).select_from(Instance)) == instances


def test_series_of_three_slices_is_rejected_with_the_reason(node: Node, tmp_path: Path) -> None:
    _send(node, _copy(tmp_path, "three", lambda i, ds: None, count=3))
    study = _final(node)
    assert study.state == StudyState.REJECTED
    assert "has 3 slices; at least 20 are needed" in (study.reason or "")
    _no_results(node, 3)


def test_mixed_orientations_are_rejected_with_the_reason(node: Node, tmp_path: Path) -> None:
    def tilt(i: int, ds: pydicom.Dataset) -> None:
        if i % 2:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.99619, -0.08716]  # 5 degrees gantry tilt

    _send(node, _copy(tmp_path, "mixed", tilt))
    study = _final(node)
    assert study.state == StudyState.REJECTED
    assert "orientation" in (study.reason or "")
    _no_results(node, 30)


def test_cut_short_compressed_image_is_refused_on_arrival_and_named_in_the_outcome(
        node: Node, tmp_path: Path) -> None:
    """A JPEG 2000 slice cut short is refused at C-STORE (0xC000, checked by the end marker); the
    series then has a gap, so the study is rejected, and the reason names the refused slice."""
    bad_uid: list[str] = []

    def corrupt(i: int, ds: pydicom.Dataset) -> None:
        ds.compress(JPEG2000Lossless)
        if i == 12:
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
            ds.PixelData = encapsulate([frame[:200]])  # the codestream is cut short
            bad_uid.append(ds.SOPInstanceUID)

    storescu([_copy(tmp_path, "corrupt", corrupt)], "127.0.0.1", node.settings.dicom.port, "LUNGNODE",
             extra_args=("--propose-j2k-lossless", "--no-halt"))
    study = _final(node)
    assert study.state == StudyState.REJECTED
    reason = study.reason or ""
    assert "irregular slice spacing" in reason and "slices are missing" in reason
    assert "1 instance(s) of this study were refused on arrival" in reason
    assert f"SOP {bad_uid[0]}" in reason and "end marker" in reason
    _no_results(node, 29)


def test_results_first_then_the_de_identified_archive(node: Node, tmp_path: Path) -> None:
    _send(node, _copy(tmp_path, "good", lambda i, ds: None))
    study = _final(node)
    assert study.state == StudyState.COMPLETE, study.reason
    # the archive follows the committed results
    wait_for(lambda: _count(node, UidMapping), 60, 0.2, "the archive's UID mapping")
    with node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(ResultObject)) == 3
        new_study = s.scalar(select(UidMapping.anonymized_uid).where(
            UidMapping.original_uid == study.study_instance_uid))
    assert new_study is not None and new_study != study.study_instance_uid
    files = sorted((node.settings.archive_root / new_study).rglob("*.dcm"))
    assert len(files) == 30
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.StudyInstanceUID == new_study and ds.PatientIdentityRemoved == "YES"


def test_a_failing_archive_keeps_the_results_and_says_why(node: Node, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import node.pipeline as pipeline

    def broken(*args: object, **kwargs: object) -> None:
        raise AnonymizationError("archive disk is read-only")

    monkeypatch.setattr(pipeline, "anonymize", broken)
    _send(node, _copy(tmp_path, "good", lambda i, ds: None))
    study = _final(node)
    assert study.state == StudyState.COMPLETE, study.reason
    def archive_failed() -> AuditEntry | None:
        with node.sessions() as s:
            return s.scalars(select(AuditEntry).where(AuditEntry.action == "archive-failed")).first()

    entry = wait_for(archive_failed, 60, 0.2, "the archive-failed audit entry")
    assert "archive disk is read-only" in (entry.detail or "")
    assert "lungnode retry" in (entry.detail or "")
    with node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(ResultObject)) == 3
        assert s.scalar(select(func.count()).select_from(UidMapping)) == 0


def test_an_archive_left_out_by_a_stop_is_written_by_the_next_start(
        tmp_path: Path, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop between committing the results and writing the archive loses no archive copy."""
    import node.pipeline as pipeline

    settings = make_settings(f"sqlite:///{tmp_path / 'n.db'}", port=free_port(),
                             peers=[{"name": "ct", "ae_title": "STORESCU", "host": "127.0.0.1",
                                     "port": 104}])
    real_archive = pipeline.archive_series
    monkeypatch.setattr(pipeline, "archive_series", lambda *a, **k: False)  # the worker "stops" right here
    first = Node(settings)
    first.start()
    try:
        _send(first, _copy(tmp_path, "good", lambda i, ds: None))
        assert _final(first).state == StudyState.COMPLETE
    finally:
        first.stop()
    with first.sessions() as s:
        assert s.scalar(select(func.count()).select_from(UidMapping)) == 0
    monkeypatch.setattr(pipeline, "archive_series", real_archive)
    second = Node(settings)
    second.start()
    try:
        wait_for(lambda: _count(second, UidMapping), 60, 0.2, "the archive written by the next start")
        assert len(list(settings.archive_root.rglob("*.dcm"))) == 30
    finally:
        second.stop()


def test_warm_up_analyses_a_synthetic_study_and_leaves_nothing(
        tmp_path: Path, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture) -> None:
    """`[worker] warm_up`: at start a worker analyses a small synthetic study once (the one-time
    costs of a process's first analysis); no row, no file in storage, no temporary folder left,
    and the folder of a warm-up whose process was killed is removed."""
    import logging
    import tempfile

    stale = Path(tempfile.mkdtemp(prefix=f"lungnode-warm-up-{_dead_pid()}-"))  # its process ended
    (stale / "left-over.dcm").write_bytes(b"x")  # a warm-up killed half-way
    before = set(Path(tempfile.gettempdir()).glob("lungnode-warm-up-*")) - {stale}
    settings = make_settings(f"sqlite:///{tmp_path / 'db.sqlite'}", port=free_port(),
                             worker={"warm_up": True})
    caplog.set_level(logging.INFO, logger="node.service")
    n = Node(settings, warm_up_study=warm_up_study)  # what `lungnode serve` passes
    n.start()
    try:
        def warmed_up() -> bool:
            assert "warm-up analysis failed" not in caplog.text, caplog.text
            return "warm-up analysis done" in caplog.text

        wait_for(warmed_up, 180, 0.2, "the warm-up analysis")
        with n.sessions() as s:
            assert s.scalar(select(func.count()).select_from(Study)) == 0
            assert s.scalar(select(func.count()).select_from(ResultObject)) == 0
    finally:
        n.stop()
    assert not [p for p in settings.storage.root.rglob("*") if p.is_file()]
    assert set(Path(tempfile.gettempdir()).glob("lungnode-warm-up-*")) == before  # the stale one too


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
