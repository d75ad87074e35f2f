"""No severity for a scan without lungs, and the severity CNN's validity in every output.

The scans without lungs are made from the real study (``tests/data/ct``): the
lungs that the product's segmentation finds (a few voxels wider) are filled
with soft-tissue HU through pydicom's public API, both lungs (a body with no
air-filled lungs: what an abdominal CT routed by mistake shows the node) or
the left one only.  They go through the running node as the other pipeline
tests send studies (storescu), and through ``lungnode analyze``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from scipy import ndimage as ndi
from sqlalchemy import func, select

from model.errors import ModelError, NoLungsError
from model.inference import InferenceEngine
from model.lungs import LungMasks, segment_lungs
from model.prediction import DEFAULT_VALIDITY
from model.quantify import quantify, require_lungs
from model.registry import ModelCard, read_card, validity_statement
from model.volume import load_series
from node.db import Delivery, ResultObject, Study, StudyState
from node.pipeline import analyse, report, summarise, write_results
from node.records import SelectedSeries
from node.service import Node
from node.settings import AnalysisSettings, Settings
from node.stages.reports.sr import VALIDITY
from node.stages.reports.summary import summary_lines
from tests.conftest import B40F
from tests.dcmtk import wait_for
from tests.peers import free_port, storescu
from tests.test_reports import dciodvfy_errors

REPO = Path(__file__).resolve().parent.parent
SHIPPED_VALIDITY = "trained on synthetic phantoms; not validated on patient data"

pytestmark = pytest.mark.filterwarnings(
    "ignore:The string .* is unlikely to represent the intended person name:UserWarning")


@pytest.fixture(scope="module")
def real_masks() -> LungMasks:
    return segment_lungs(load_series(sorted(B40F.glob("*.dcm"))))


def _filled(folder: Path, masks: LungMasks, sides: tuple[str, ...]) -> Path:
    """A copy of the real series, in a new study, with the lungs of ``sides`` filled with soft
    tissue (40 HU and noise; the mask grown by 3 pixels in-plane takes the partial-volume rim)."""
    fill = np.zeros(masks.left.shape, dtype=bool)
    for side in sides:
        fill |= getattr(masks, side)
    fill = ndi.binary_dilation(fill, structure=np.ones((1, 7, 7), dtype=bool))
    rng = np.random.default_rng(14)
    volume = load_series(sorted(B40F.glob("*.dcm")))  # its slice order is the masks' order
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in B40F.glob("*.dcm")}
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for z, uid in enumerate(volume.sop_instance_uids):
        ds = pydicom.dcmread(by_uid[uid])
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        hu[fill[z]] = 40.0 + rng.normal(0.0, 12.0, int(fill[z].sum()))
        stored = np.round((hu - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
        ds.PixelData = np.clip(stored, 0, 65535).astype(np.uint16).tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"{z:03d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def no_lungs(real_masks: LungMasks, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _filled(tmp_path_factory.mktemp("abdomen") / "series", real_masks, ("left", "right"))


@pytest.fixture(scope="module")
def one_lung(real_masks: LungMasks, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _filled(tmp_path_factory.mktemp("one-lung") / "series", real_masks, ("left",))


@pytest.fixture
def node(tmp_path: Path, make_settings: Callable[..., Settings]) -> Iterator[Node]:
    # a destination: a result, had one been made, would have a delivery row
    settings = make_settings(f"sqlite:///{tmp_path / 'n.db'}", port=free_port(),
                             peers=[{"name": "ct", "ae_title": "STORESCU", "host": "127.0.0.1",
                                     "port": 104},
                                    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                     "port": free_port()}],
                             delivery={"destinations": ["pacs"]})
    n = Node(settings)
    n.start()
    yield n
    n.stop()


def _uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID)


def test_a_scan_without_lungs_or_with_one_lung_is_rejected_and_nothing_is_sent(
        node: Node, no_lungs: Path, one_lung: Path) -> None:
    storescu([no_lungs, one_lung], "127.0.0.1", node.settings.dicom.port, "LUNGNODE")
    uids = {_uid(no_lungs): "no lungs", _uid(one_lung): "one lung"}

    def ended() -> dict[str, Study] | None:
        with node.sessions() as s:
            studies = {st.study_instance_uid: st for st in s.scalars(select(Study))}
        done = {u: st for u, st in studies.items() if st.state in (
            StudyState.COMPLETE, StudyState.DELIVERING, StudyState.REJECTED, StudyState.FAILED)}
        return done if set(done) == set(uids) else None

    studies = wait_for(ended, 120, 0.2, "both studies to reach an end state")
    assert isinstance(studies, dict)
    for uid, study in studies.items():
        assert study.state == StudyState.REJECTED, (uids[uid], study.state, study.reason)
        assert "no lungs in the field of view" in (study.reason or ""), study.reason
        assert study.result_version == 0 and study.summary is None
    reason = studies[_uid(one_lung)].reason or ""
    assert "ml found, one side (left 0 ml, right " in reason  # the right lung is left as it was
    with node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(ResultObject)) == 0
        assert s.scalar(select(func.count()).select_from(Delivery)) == 0


def _analyze(folder: Path, out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", "analyze", str(folder), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_analyze_exits_with_the_reason_and_writes_nothing(no_lungs: Path, one_lung: Path,
                                                          tmp_path: Path) -> None:
    res = _analyze(no_lungs, tmp_path / "out")
    assert res.returncode == 1, res.stdout
    assert "NoLungsError" in res.stderr and "no lungs in the field of view" in res.stderr
    assert res.stdout == ""
    assert not (tmp_path / "out").exists()
    # the minimum is a setting: the real study's lungs (about 2700 ml) are too few under 5000 ml
    res = _analyze(B40F, tmp_path / "out", LUNGNODE_ANALYSIS__MIN_LUNG_VOLUME_ML="5000")
    assert res.returncode == 1, res.stdout
    assert "ml found, both sides" in res.stderr and "at least 5000 ml" in res.stderr


def test_require_lungs_counts_total_and_sides(one_lung: Path) -> None:
    volume = load_series(sorted(one_lung.glob("*.dcm")))
    masks = segment_lungs(volume)  # the classical segmentation returns the one lung it finds
    assert not masks.left.any() and masks.right.any()
    q = quantify(volume, masks)
    with pytest.raises(NoLungsError, match=r"^no lungs in the field of view: \d+ ml found, one side"):
        require_lungs(q, volume.series_instance_uid, min_total_ml=1000.0)
    both = replace(q, left=q.right, total=replace(q.total, volume_ml=2 * q.right.volume_ml))
    require_lungs(both, "x", min_total_ml=1000.0)  # both sides, enough lung: no error
    with pytest.raises(NoLungsError, match=r"both sides .* at least 9000 ml"):
        require_lungs(both, "x", min_total_ml=9000.0)
    assert AnalysisSettings().min_lung_volume_ml == 1000.0


# ------------------------------------------------------------------------------- model validity


def test_card_validity_defaults_and_retrained_statements() -> None:
    shipped = read_card()
    assert shipped.validity == SHIPPED_VALIDITY
    data = json.loads(shipped.to_json())
    del data["validity"]
    assert ModelCard.from_dict(data).validity == DEFAULT_VALIDITY == "validation on patient data not stated"
    with pytest.raises(ModelError, match="validity must be a sentence"):
        ModelCard.from_dict({**data, "validity": " "})
    assert validity_statement({"synthetic": 400}, dataset="dataset training v1") == (
        "trained on 400 synthetic phantoms (dataset training v1); not validated on patient data")
    text = validity_statement({"archive": 100, "mosmed": 20}, dataset="dataset training v3",
                              locked_origins={"archive": 30}, locked_macro_f1=0.8123)
    assert text == ("trained on 120 studies (100 of this node's archive, 20 MosMedData; "
                    "dataset training v3); tested once on a locked set of 30 patient studies: "
                    "macro F1 0.81 (internal test, no external validation)")
    assert validity_statement({"archive": 5}, dataset="d").endswith("; not validated on patient data")


def test_the_shipped_model_says_what_it_was_trained_on_in_every_output(tmp_path: Path) -> None:
    """SR (TEXT Comment in the CNN group, read back with highdicom, dciodvfy clean), summary
    image text and the ``lungnode analyze`` JSON (``summarise``) carry the card's statement."""
    paths = tuple(sorted(B40F.glob("*.dcm")))
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    selected = SelectedSeries(str(first.StudyInstanceUID), str(first.SeriesInstanceUID), paths, "test")
    analysis = analyse(selected, AnalysisSettings(), InferenceEngine.from_registry(device="cpu").predict)
    assert analysis.prediction is not None
    assert analysis.prediction.model_validity == SHIPPED_VALIDITY
    assert summarise(analysis)["model"]["validity"] == SHIPPED_VALIDITY
    written = write_results(report(analysis), tmp_path / "out")
    assert dciodvfy_errors(written["sr"]) == []
    sr = hd.sr.srread(written["sr"])
    groups = {g.tracking_identifier: g for g in sr.content.get_image_measurement_groups()}
    items = groups["CNN severity"][0].ContentSequence
    names = [i.ConceptNameCodeSequence[0].CodeValue for i in items]
    comments = [i.TextValue for i in items if i.ValueType == "TEXT"
                and i.ConceptNameCodeSequence[0].CodeValue == VALIDITY.value]
    assert comments == [SHIPPED_VALIDITY] and VALIDITY.scheme_designator == "DCM"
    assert names.index(VALIDITY.value) > names.index("CNNCLASS")  # after the class it qualifies
    lines = [text for text, _ in summary_lines(analysis.quantification, analysis.prediction, "lungnode")]
    cnn = next(i for i, t in enumerate(lines) if t.startswith("CNN class:"))
    assert lines[cnn + 1].strip() == SHIPPED_VALIDITY
