"""Lobes: PO, PHO and the CT severity score per lobe, into the SR, the SEG, the summary and the JSON.

The study is a 7-slice synthetic chest whose lungs are cut into five lobes
(front to back: the right lung in three, the left in two, with a band of soft
tissue between neighbours) and each lobe filled with one HU level: normal
lung for three of them, ground glass (-500 HU) for the left lower lobe and
consolidation (-260 HU) for the right middle lobe, so each lobe's PO, PHO and
score are known.  The report tests give the quantification these lobes
directly; the end-to-end test lets lungmask's own inference find them, with a
"band" LTRCLobes network (:func:`tests.test_lungmask.band_state_dict`) that
labels each lobe's HU level as that lobe.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from model.lungs import LungMasks, SegmentationMethod
from model.quantify import LOBES, Quantification, ctss_score, measure_lobes, quantify
from model.volume import CTVolume, load_series
from node.stages.reports import ReportContext, ResultObjects, build_reports
from node.stages.reports import codes as lc
from node.stages.reports.summary import summary_lines
from tests.conftest import write_config
from tests.test_lungmask import band_state_dict, paint_slices
from tests.test_reports import dciodvfy_errors
from training.synth import SynthSpec, write_study

REPO = Path(__file__).resolve().parent.parent
LOBE_HU = {1: -930.0, 2: -500.0, 3: -800.0, 4: -260.0, 5: -875.0}
"""Each lobe's HU: 2 ground glass (PO about 100 %), 4 consolidation (PO and PHO about 100 %)."""
LOBE_BANDS = {1: (-960.0, -950.0, -910.0, -900.0), 2: (-560.0, -545.0, -455.0, -440.0),
              3: (-830.0, -820.0, -780.0, -770.0), 4: (-285.0, -278.0, -242.0, -235.0),
              5: (-890.0, -886.0, -864.0, -860.0)}
"""The band network's HU trapezoid of each lobe label (around :data:`LOBE_HU`; clear of the
phantom's fat, about -100 HU, which a band there would label as a lobe)."""
EXPECTED_SCORES = {1: 0, 2: 5, 3: 0, 4: 5, 5: 0}


# -- the score ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("po", "score"), [
    (0.0, 0), (0.99, 0), (1.0, 1), (4.99, 1), (5.0, 2), (25.0, 2), (25.01, 3), (50.0, 3),
    (50.01, 4), (75.0, 4), (75.01, 5), (100.0, 5)])
def test_ctss_score_at_the_edges(po: float, score: int) -> None:
    assert ctss_score(po, normal_below=1.0) == score


def test_ctss_score_zero_is_none_even_without_a_normal_threshold() -> None:
    assert ctss_score(0.0, normal_below=0.0) == 0
    assert ctss_score(0.01, normal_below=0.0) == 1
    assert ctss_score(4.0, normal_below=5.0) == 0  # under the node's normal threshold


def test_measure_lobes_counts_each_lobe_on_the_measurement_grid() -> None:
    lobes = np.zeros((4, 8, 10), dtype=np.uint8)
    lobes[:, :, 0:2] = 1   # 64 voxels
    lobes[:, :, 2:4] = 2
    lobes[:, :, 4:6] = 3
    lobes[:, :, 6:10] = 4  # 128 voxels; lobe 5 absent
    opacity = np.zeros(lobes.shape, dtype=bool)
    high = np.zeros(lobes.shape, dtype=bool)
    opacity[0, :2, 2:4] = True      # lobe 2: 4 of 64 = 6.25 %
    opacity[:, :, 4:6] = True       # lobe 3: all opacity, half of it high
    high[:2, :, 4:6] = True
    opacity[0, 0, 6] = True         # lobe 4: 1 of 128
    out = measure_lobes(lobes, opacity, high, voxel_ml=0.5)
    assert [m.label for m in out] == [1, 2, 3, 4, 5] and out[0].name == "left upper lobe"
    got = {m.label: (m.measurement.volume_ml, m.measurement.percent_opacity,
                     m.measurement.percent_high_opacity, m.score) for m in out}
    assert got == {1: (32.0, 0.0, 0.0, 0), 2: (32.0, 6.25, 0.0, 2), 3: (32.0, 100.0, 50.0, 5),
                   4: (64.0, 100.0 / 128, 0.0, 0), 5: (0.0, 0.0, 0.0, 0)}
    # on a reduced grid (2x2 in-plane blocks, 2 slices a block) each voxel takes its block's flag
    coarse = np.zeros((2, 4, 5), dtype=bool)
    coarse[0, 0, 1] = True  # the block z 0-1, y 0-1, x 2-3: 8 voxels of lobe 2
    reduced = measure_lobes(lobes, coarse, np.zeros_like(coarse), voxel_ml=0.5, f=2, fz=2)
    assert reduced[1].measurement.percent_opacity == 100.0 * 8 / 64 and reduced[1].score == 2


# -- the study -------------------------------------------------------------------------------------------

def _cut(study_dir: Path) -> np.ndarray:
    """The synthetic study's lungs cut into lobes, front to back, with four rows of tissue between
    neighbours: the lobe labels in the volume's order (the truth's z order)."""
    truth = np.load(study_dir / "truth.npz")
    parts = {"right_lung": (3, 4, 5), "left_lung": (1, 2)}  # front to back
    labels = np.zeros(truth["right_lung"].shape, dtype=np.uint8)
    for key, lobes in parts.items():
        lung = truth[key]
        ys = np.nonzero(lung.any(axis=(0, 2)))[0]
        edges = np.linspace(ys[0], ys[-1] + 1, len(lobes) + 1).astype(int)
        for lobe, lo, hi in zip(lobes, edges[:-1], edges[1:], strict=True):
            part = np.zeros_like(lung)
            part[:, lo + 2:hi - 2, :] = True  # four rows of tissue between lobes
            labels[lung & part] = lobe
    return labels


@pytest.fixture(scope="module")
def lobe_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A 7-slice synthetic study with five lobes of known HU; its DICOM folder and lobe labels."""
    study = write_study(tmp_path_factory.mktemp("lobes") / "synth",
                        SynthSpec(seed=3, involvement=0.0, rows=128, slices=7, slice_thickness_mm=5.0))
    labels = _cut(study.directory)
    lungs = np.load(study.directory / "truth.npz")
    body_lung = lungs["right_lung"] | lungs["left_lung"]
    rng = np.random.default_rng(5)

    def paint(z: int, hu: np.ndarray) -> None:
        hu[body_lung[z]] = 40.0  # the tissue between lobes
        for lobe, value in LOBE_HU.items():
            mask = labels[z] == lobe
            hu[mask] = value + rng.normal(0.0, 3.0, int(mask.sum()))

    paint_slices(study.paths, paint)
    return study.dicom_dir, labels


@pytest.fixture(scope="module")
def measured(lobe_study: tuple[Path, np.ndarray]) -> tuple[CTVolume, LungMasks, Quantification]:
    dicom_dir, labels = lobe_study
    volume = load_series(sorted(dicom_dir.glob("*.dcm")))
    masks = LungMasks(left=np.isin(labels, (1, 2)), right=np.isin(labels, (3, 4, 5)), lobes=labels,
                      method=SegmentationMethod(name="lungmask", model="LTRCLobes",
                                                weights_sha256="ab" * 32))
    return volume, masks, quantify(volume, masks)


def test_quantify_measures_each_lobe_and_the_ctss(measured: tuple[CTVolume, LungMasks, Quantification]
                                                  ) -> None:
    volume, masks, q = measured
    assert [lobe.label for lobe in q.lobes] == list(LOBES)
    by = {lobe.label: lobe for lobe in q.lobes}
    for label, lobe in by.items():
        assert lobe.measurement.volume_ml == pytest.approx(
            float((masks.lobes == label).sum()) * volume.voxel_volume_ml), label
        assert lobe.score == EXPECTED_SCORES[label], (label, lobe)
    assert by[2].measurement.percent_opacity > 90 and by[2].measurement.percent_high_opacity < 5
    assert by[4].measurement.percent_high_opacity > 90
    assert q.ctss == 10
    assert sum(lobe.measurement.volume_ml for lobe in q.lobes) == pytest.approx(q.total.volume_ml)
    # the lungs' numbers are the lobes' together
    left_po = sum(by[k].measurement.percent_opacity * by[k].measurement.volume_ml for k in (1, 2))
    assert left_po / q.left.volume_ml == pytest.approx(q.left.percent_opacity)
    no_lobes = quantify(volume, LungMasks(left=masks.left, right=masks.right))
    assert no_lobes.lobes == () and no_lobes.ctss is None
    assert no_lobes.total == q.total


@pytest.fixture(scope="module")
def reports(measured: tuple[CTVolume, LungMasks, Quantification],
            tmp_path_factory: pytest.TempPathFactory) -> tuple[ResultObjects, dict[str, Path]]:
    volume, masks, q = measured
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in volume.paths]
    ctx = ReportContext(volume=volume, masks=masks, quantification=q, prediction=None,
                        algorithm_name="lungnode", algorithm_version="0.1.0")
    objects = build_reports(ctx, headers)
    folder = tmp_path_factory.mktemp("lobe-results")
    paths = {}
    for name in ("sr", "seg", "summary"):
        paths[name] = folder / f"{name}.dcm"
        pydicom.dcmwrite(paths[name], getattr(objects, name), enforce_file_format=True)
    return objects, paths


def _code(item: pydicom.Dataset) -> tuple[str, str]:
    return str(item.CodeValue), str(item.CodingSchemeDesignator)


def test_sr_has_a_group_per_lobe_with_its_snomed_site_and_the_ctss(
        reports: tuple[ResultObjects, dict[str, Path]],
        measured: tuple[CTVolume, LungMasks, Quantification]) -> None:
    _, paths = reports
    _, _, q = measured
    assert dciodvfy_errors(paths["sr"]) == []
    sr = hd.sr.srread(paths["sr"])
    seg = hd.seg.segread(paths["seg"])
    groups = sr.content.get_volumetric_roi_measurement_groups()
    lobe_groups = {str(g.tracking_identifier): g for g in groups
                   if str(g.tracking_identifier).endswith("lobe")}
    assert sorted(lobe_groups) == sorted(LOBES.values())
    expected_sites = {"left upper lobe": ("45653009", "7771000"), "left lower lobe": ("90572001", "7771000"),
                      "right upper lobe": ("45653009", "24028007"),
                      "right middle lobe": ("72481006", "24028007"),
                      "right lower lobe": ("90572001", "24028007")}
    segments = {str(s.TrackingID): int(s.SegmentNumber) for s in seg.SegmentSequence}
    for lobe in q.lobes:
        group = lobe_groups[lobe.name]
        site = group.finding_sites[0]
        assert (site.value.value, site.value.scheme_designator) == (expected_sites[lobe.name][0], "SCT")
        assert site.laterality.value == expected_sites[lobe.name][1]
        assert group.referenced_segment.referenced_segment_numbers == [segments[lobe.name]]
        values = {m.name.value: m.value for m in group.get_measurements()}
        assert values["PO"] == pytest.approx(round(lobe.measurement.percent_opacity, 2))
        assert values["PHO"] == pytest.approx(round(lobe.measurement.percent_high_opacity, 2))
        assert values["118565006"] == pytest.approx(round(lobe.measurement.volume_ml, 1))
        assert values["CTSSLOBE"] == lobe.score
    whole = next(g for g in sr.content.get_image_measurement_groups()
                 if str(g.tracking_identifier) == "both lungs")
    assert {m.name.value: m.value for m in whole.get_measurements()}["CTSS"] == 10
    scope = [e for e in whole.get_qualitative_evaluations() if e.name.value == "SCOPE"]
    assert scope[0].value.value == lc.WHOLE_AND_PER_LOBE.value


def test_seg_has_a_segment_per_lobe_on_its_voxels(reports: tuple[ResultObjects, dict[str, Path]],
                                                   measured: tuple[CTVolume, LungMasks, Quantification]
                                                   ) -> None:
    _, paths = reports
    volume, masks, _ = measured
    assert masks.lobes is not None
    assert dciodvfy_errors(paths["seg"]) == []
    seg = hd.seg.segread(paths["seg"])
    by_label = {str(s.SegmentLabel): s for s in seg.SegmentSequence}
    assert list(by_label) == ["Left lung", "Right lung", "Lung opacity", "Left upper lobe",
                              "Left lower lobe", "Right upper lobe", "Right middle lobe",
                              "Right lower lobe"]
    for number, (label, (concept, side)) in enumerate(lc.LOBE_SITES.items(), start=4):
        item = seg.SegmentSequence[number - 1]
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert _code(prop) == (concept.value, "SCT")
        assert prop.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == lc.LATERALITY[side].value
        region = item.AnatomicRegionSequence[0]
        assert _code(region) == (concept.value, "SCT")
        assert region.AnatomicRegionModifierSequence[0].CodeValue == lc.LATERALITY[side].value
        # the segment's pixels, slice by source image, are the lobe's voxels
        for z, uid in enumerate(volume.sop_instance_uids):
            if not (masks.lobes[z] == label).any():
                continue
            frame = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[uid], segment_numbers=[number])[0, ..., 0]
            assert (frame.astype(bool) == (masks.lobes[z] == label)).all(), (label, z)


def test_summary_text_gives_the_ctss_and_each_lobe(measured: tuple[CTVolume, LungMasks, Quantification],
                                                  reports: tuple[ResultObjects, dict[str, Path]]) -> None:
    _, _, q = measured
    text = [line for line, _ in summary_lines(q, None, "lungnode 0.1.0")]
    assert "CTSS 10 of 25 (Pan et al.; lobe score 0-5)" in text
    assert "Whole lung and per lung; lobes are not measured" not in text
    lobe_lines = [line for line in text if "lobe" in line and "score" in line and "PO" in line]
    assert len(lobe_lines) == 5
    assert any(line.strip().startswith("left lower lobe") and line.endswith("score 5") for line in lobe_lines)
    no_lobes = quantify(measured[0], LungMasks(left=measured[1].left, right=measured[1].right))
    plain = [line for line, _ in summary_lines(no_lobes, None, "lungnode 0.1.0")]
    assert "Whole lung and per lung; lobes are not measured" in plain
    assert not any("CTSS" in line for line in plain)
    assert dciodvfy_errors(reports[1]["summary"]) == []


# -- end to end through lungmask -----------------------------------------------------------------

@pytest.fixture
def lobe_weights(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "band-ltrclobes.pth"
    torch.save(band_state_dict(6, LOBE_BANDS), path)
    yield path


def test_analyze_with_ltrclobes_prints_lobes_and_ctss(tmp_path: Path, lobe_weights: Path,
                                                      lobe_study: tuple[Path, np.ndarray]) -> None:
    dicom_dir, labels = lobe_study
    cfg = write_config(tmp_path / "lobes.toml", {
        "selection": {"min_slices": 4},
        "analysis": {"min_lung_volume_ml": 100.0},
        "segmentation": {"method": "lungmask", "model": "LTRCLobes", "weights": str(lobe_weights),
                         "threads": 2, "batch_size": 5},
        "model": {"enabled": False}})
    res = subprocess.run([sys.executable, "-m", "node.cli", "--config", str(cfg), "analyze", str(dicom_dir),
                          "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["segmentation"]["model"] == "LTRCLobes"
    assert sorted(out["lobes"]) == sorted(LOBES.values())
    volume = load_series(sorted(dicom_dir.glob("*.dcm")))
    for label, name in LOBES.items():
        lobe = out["lobes"][name]
        assert set(lobe) == {"volume_ml", "percent_opacity", "percent_high_opacity", "score"}
        truth_ml = float((labels == label).sum()) * volume.voxel_volume_ml
        # lungmask resamples each slice to 256 x 256 and back: a lobe of this small phantom loses
        # some of its border (up to about a fifth measured), never its place
        assert abs(lobe["volume_ml"] - truth_ml) < 0.3 * truth_ml, (name, lobe, truth_ml)
        assert lobe["score"] == EXPECTED_SCORES[label], (name, lobe)
    assert out["ctss"] == sum(lobe["score"] for lobe in out["lobes"].values()) == 10
    assert dciodvfy_errors(Path(out["outputs"]["sr"])) == []
