"""Public-dataset importers on small synthetic copies of the MosMedData and COV19-CT-DB layouts."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # type: ignore[import-untyped]
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from model.volume import CTVolume
from node.cli import app
from node.db import LabelEvent, LabelSource, LearnStudy, make_engine, make_session_factory
from node.errors import DatasetError
from node.learn.datasets import freeze
from node.learn.history import current_labels
from node.learn.importers import _jpeg_volume, import_cov19ctdb, import_mosmed
from node.learn.tensors import preprocessing_params, tensor_relpath, write_tensor
from node.migrate import upgrade
from node.settings import Settings
from training.synth import Phantom, SynthSpec, make_phantom

WINDOW = (-1150.0, 350.0)


@pytest.fixture(scope="module")
def phantoms() -> list[Phantom]:
    return [make_phantom(SynthSpec(seed=s, involvement=inv, rows=64, slices=40, slice_thickness_mm=5.0))
            for s, inv in ((401, 0.0), (402, 0.3))]


@pytest.fixture
def node(make_settings: Callable[..., Settings], tmp_path: Path) -> tuple[Settings, sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'lungnode.db'}"
    upgrade(url)
    return make_settings(url, training={"folds": 2}), make_session_factory(make_engine(url))


def _nifti(ph: Phantom, path: Path) -> None:
    """A NIfTI in HU the way MosMedData ships them (SimpleITK takes a (z, y, x) array)."""
    image = sitk.GetImageFromArray(ph.hu)
    image.SetSpacing((ph.spacing[2], ph.spacing[1], ph.spacing[0]))
    image.SetOrigin(ph.origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _jpegs(ph: Phantom, folder: Path) -> None:
    """8-bit slices of the phantom in the lung window, named 0.jpg, 1.jpg ... (z order)."""
    folder.mkdir(parents=True, exist_ok=True)
    low, high = WINDOW
    pixels = np.clip((ph.hu.astype(np.float32) - low) / (high - low) * 255.0, 0, 255).round().astype(np.uint8)
    for z, plane in enumerate(pixels):
        Image.fromarray(plane).save(folder / f"{z}.jpg", quality=95)


def _labels(session: Session) -> dict[str, str]:
    return {c.pseudo_study_uid: c.value for c in current_labels(session)}


def _tensor(settings: Settings, pseudo: str) -> np.ndarray:
    return np.load(settings.learn_root / tensor_relpath(pseudo, preprocessing_params()))


def test_import_mosmed(node: tuple[Settings, sessionmaker[Session]], phantoms: list[Phantom],
                       tmp_path: Path) -> None:
    settings, sessions = node
    root = tmp_path / "MosMedData"
    _nifti(phantoms[0], root / "studies" / "CT-0" / "study_0001.nii.gz")
    _nifti(phantoms[1], root / "studies" / "CT-2" / "study_0002.nii.gz")
    _nifti(phantoms[1], root / "studies" / "CT-4" / "study_0004.nii.gz")
    _nifti(phantoms[1], root / "masks" / "study_0002_mask.nii.gz")
    (root / "studies" / "CT-1").mkdir(parents=True)
    (root / "studies" / "CT-1" / "study_0003.nii.gz").write_bytes(b"not a nifti file")
    with (root / "dataset_registry.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_file", "category"])
        for name, cat in (("study_0001", "CT-0"), ("study_0002", "CT-2"), ("study_0003", "CT-1"),
                          ("study_0004", "CT-3")):
            writer.writerow([f"studies/{cat}/{name}.nii.gz", cat])

    with sessions() as session:
        report = import_mosmed(session, settings, root)
        assert sorted(report.added) == ["mosmed:study_0001", "mosmed:study_0002"]
        skipped = dict(report.skipped)
        assert "CT-3" in skipped["studies/CT-4/study_0004.nii.gz"]
        assert "cannot be read as NIfTI" in skipped["studies/CT-1/study_0003.nii.gz"]
        assert _labels(session) == {"mosmed:study_0001": "non-covid", "mosmed:study_0002": "moderate"}
        event = session.scalars(select(LabelEvent).join(LearnStudy).where(
            LearnStudy.pseudo_study_uid == "mosmed:study_0002")).one()
        assert event.source == LabelSource.IMPORT
        assert event.source_ref == "mosmed:studies/CT-2/study_0002.nii.gz"
        assert "masks/study_0002_mask.nii.gz" in (event.reason or "")
        row = session.scalars(select(LearnStudy).where(
            LearnStudy.pseudo_study_uid == "mosmed:study_0002")).one()
        assert (row.origin, row.pseudo_patient_id) == ("mosmed", "mosmed:study_0002")

        again = import_mosmed(session, settings, root)
        assert again.added == [] and sorted(again.existing) == ["mosmed:study_0001", "mosmed:study_0002"]
        assert session.scalar(select(func.count(LabelEvent.id))) == 2

        manifest = freeze(session, settings, created_by="test")
    size = tuple(preprocessing_params()["input_size"])
    healthy, sick = _tensor(settings, "mosmed:study_0001"), _tensor(settings, "mosmed:study_0002")
    assert healthy.shape == sick.shape == (1, *size) and healthy.dtype == np.float32
    assert sick.mean() > healthy.mean()  # ground glass and consolidation are brighter than lung
    ph = phantoms[1]  # the same tensor as from the phantom itself: axis order and spacing kept
    direct = CTVolume(hu=ph.hu, spacing=ph.spacing, origin=ph.origin, direction=np.eye(3),
                      series_instance_uid="direct", sop_instance_uids=tuple(str(i) for i in range(40)),
                      slice_thickness=ph.spacing[0])
    write_tensor(settings, "direct", direct, preprocessing_params())
    np.testing.assert_allclose(_tensor(settings, "direct"), sick, atol=1e-5)
    assert {i.origin for i in manifest.items} == {"mosmed"} and len(manifest.items) == 2


def test_import_mosmed_refuses_other_layouts(node: tuple[Settings, sessionmaker[Session]],
                                             tmp_path: Path) -> None:
    settings, sessions = node
    with sessions() as session, pytest.raises(DatasetError, match="studies/CT-0"):
        import_mosmed(session, settings, tmp_path)


def test_import_cov19ctdb(node: tuple[Settings, sessionmaker[Session]], phantoms: list[Phantom],
                          tmp_path: Path) -> None:
    settings, sessions = node
    root = tmp_path / "COV19-CT-DB"
    _jpegs(phantoms[1], root / "train" / "covid" / "ct_scan_1")
    _jpegs(phantoms[0], root / "train" / "non-covid" / "ct_scan_2")
    _jpegs(phantoms[1], root / "validation" / "covid" / "ct_scan_1")
    bad = root / "train" / "covid" / "ct_scan_9"
    bad.mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(bad / "first.jpg")
    short = root / "train" / "non-covid" / "ct_scan_3"
    short.mkdir(parents=True)
    for z in range(3):
        Image.fromarray(np.full((64, 64), 40, np.uint8)).save(short / f"{z}.jpg")
    (root / "train_severity.csv").write_text("Name,Category\nct_scan_1,3\n")
    fov = phantoms[0].spacing[2] * phantoms[0].hu.shape[2]

    volume = _jpeg_volume(root / "train" / "covid" / "ct_scan_1", "x", WINDOW, 5.0, fov)
    expected = np.clip(phantoms[1].hu.astype(np.float32), *WINDOW)
    per_slice = np.abs(volume.hu - expected).mean(axis=(1, 2))
    assert per_slice.max() < 25.0  # numeric order (0, 1, 2 ... 10), not 0, 1, 10, 11
    assert volume.spacing == (5.0, fov / 64, fov / 64)

    with sessions() as session:
        report = import_cov19ctdb(session, settings, root, slice_mm=5.0, fov_mm=fov)
        assert sorted(report.added) == ["cov19ctdb:train/covid/ct_scan_1",
                                        "cov19ctdb:train/non-covid/ct_scan_2",
                                        "cov19ctdb:validation/covid/ct_scan_1"]
        skipped = dict(report.skipped)
        assert sorted(skipped) == ["train/covid/ct_scan_9", "train/non-covid/ct_scan_3"]
        assert "named by number" in skipped["train/covid/ct_scan_9"]
        assert "at least 8" in skipped["train/non-covid/ct_scan_3"]
        assert _labels(session) == {"cov19ctdb:train/covid/ct_scan_1": "severe",
                                    "cov19ctdb:train/non-covid/ct_scan_2": "non-covid",
                                    "cov19ctdb:validation/covid/ct_scan_1": "covid-unknown"}
        reasons = session.scalars(select(LabelEvent.reason)).all()
        assert all("mapped to HU -1150..350" in (r or "") for r in reasons)
        again = import_cov19ctdb(session, settings, root, slice_mm=5.0, fov_mm=fov)
        assert again.added == [] and len(again.existing) == 3
        assert session.scalar(select(func.count(LabelEvent.id))) == 3
    sick = _tensor(settings, "cov19ctdb:train/covid/ct_scan_1")
    healthy = _tensor(settings, "cov19ctdb:train/non-covid/ct_scan_2")
    assert sick.shape == healthy.shape and sick.mean() > healthy.mean()


def test_import_cli(node: tuple[Settings, sessionmaker[Session]], tmp_path: Path) -> None:
    """The CLI reports an unusable folder with exit code 1 and a reason; the window is an option."""
    config = str(tmp_path / "lungnode.toml")
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["dataset", "import-cov19ctdb", str(empty), "--config", config])
    assert result.exit_code == 1 and "holds no slice images" in result.stderr
    result = runner.invoke(app, ["dataset", "import-cov19ctdb", str(empty), "--hu-window", "350", "-1150",
                                 "--config", config])
    assert result.exit_code == 1 and "low end must be below" in result.stderr
    result = runner.invoke(app, ["dataset", "import-mosmed", str(empty), "--json", "--config", config])
    assert result.exit_code == 1 and "not a MosMedData folder" in result.stderr
