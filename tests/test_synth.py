"""Synthetic chest CT generator: determinism, ground truth, anatomy, DICOM output."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from model.quantify import category_for
from model.volume import load_series
from training import Phantom, SynthSpec, SynthSpecError, kernel_is_sharp, make_phantom, write_study

ROWS = 128  # small studies: each phantom takes well under a second


@pytest.fixture(scope="module")
def healthy() -> Phantom:
    return make_phantom(SynthSpec(seed=4, involvement=0.0, rows=ROWS))


@pytest.fixture(scope="module")
def diseased() -> Phantom:
    return make_phantom(SynthSpec(seed=7, involvement=0.35, rows=ROWS, consolidation_fraction=0.3))


STUDY_SPEC = SynthSpec(seed=5, involvement=0.3, rows=ROWS, slices=40, kernel="B70f",
                       patient_name="TEST^SYNTH", patient_id="SYNTEST1")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return write_study(tmp_path_factory.mktemp("synth") / "study", STUDY_SPEC)


def _lungs(ph: Phantom) -> np.ndarray:
    return ph.left_lung | ph.right_lung


def _digest(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_same_spec_gives_same_phantom_and_another_seed_does_not() -> None:
    spec = SynthSpec(seed=3, involvement=0.2, rows=64, slices=30)
    a, b = make_phantom(spec), make_phantom(spec)
    for name in ("hu", "left_lung", "right_lung", "ground_glass", "consolidation"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert (a.spacing, a.origin) == (b.spacing, b.origin)
    other = make_phantom(SynthSpec(seed=4, involvement=0.2, rows=64, slices=30))
    assert not np.array_equal(a.hu, other.hu)
    assert not np.array_equal(a.left_lung, other.left_lung)


@pytest.mark.parametrize(("seed", "involvement"), [(0, 0.0), (1, 0.1), (2, 0.4), (3, 0.8)])
def test_involvement_matches_the_spec_and_shows_in_the_hu(seed: int, involvement: float) -> None:
    ph = make_phantom(SynthSpec(seed=seed, involvement=involvement, rows=ROWS))
    lungs = _lungs(ph)
    disease = ph.ground_glass | ph.consolidation
    assert abs(disease.sum() / lungs.sum() - involvement) < 0.01
    # The masks describe the image: diseased voxels are opacities, the rest of the lung is not.
    if disease.any():
        assert ((ph.hu[disease] >= -750) & (ph.hu[disease] <= 150)).mean() > 0.9
    normal = ph.hu[lungs & ~disease]
    assert (normal < -700).mean() > 0.9  # vessels are the rest
    # A plain threshold count lands near the truth (vessels add a few points).
    measured = ((ph.hu >= -700) & (ph.hu <= 100) & lungs).sum() / lungs.sum()
    assert involvement - 0.04 < measured < involvement + 0.08


def test_more_involvement_of_the_same_patient_grows_the_same_lesions() -> None:
    low = make_phantom(SynthSpec(seed=9, involvement=0.1, rows=64))
    high = make_phantom(SynthSpec(seed=9, involvement=0.3, rows=64))
    assert np.array_equal(low.left_lung, high.left_lung)
    low_d, high_d = low.ground_glass | low.consolidation, high.ground_glass | high.consolidation
    assert not (low_d & ~high_d).any()
    assert high_d.sum() > 2.5 * low_d.sum()


def test_masks_are_subsets_of_the_lungs_and_disjoint(diseased: Phantom) -> None:
    ph = diseased
    lungs = _lungs(ph)
    for mask in (ph.hu, ph.left_lung, ph.right_lung, ph.ground_glass, ph.consolidation):
        assert mask.shape == ph.hu.shape
    assert ph.hu.dtype == np.int16 and ph.left_lung.dtype == bool
    assert not (ph.left_lung & ph.right_lung).any()
    assert not (ph.ground_glass & ~lungs).any()
    assert not (ph.consolidation & ~lungs).any()
    assert not (ph.ground_glass & ph.consolidation).any()
    share = ph.consolidation.sum() / (ph.ground_glass | ph.consolidation).sum()
    assert abs(share - 0.3) < 0.01


@pytest.mark.parametrize("seed", [0, 5, 12])
def test_left_lung_is_on_the_patients_left_and_smaller(seed: int) -> None:
    ph = make_phantom(SynthSpec(seed=seed, involvement=0.0, rows=64))
    x = ph.origin[0] + np.arange(ph.hu.shape[2]) * ph.spacing[2]  # patient x (LPS: + is left)
    left_x = x[np.nonzero(ph.left_lung)[2]]
    right_x = x[np.nonzero(ph.right_lung)[2]]
    assert left_x.min() > right_x.max()
    assert ph.left_lung.sum() < ph.right_lung.sum()
    # z increases towards the head: the apex is narrower than the base.
    area = _lungs(ph).sum(axis=(1, 2))
    zs = np.nonzero(area)[0]
    lo, hi = zs[0], zs[-1]
    assert area[hi - (hi - lo) // 10] < area[lo + (hi - lo) * 4 // 10]


def test_hu_of_the_structures(healthy: Phantom, diseased: Phantom) -> None:
    h, lungs = healthy.hu, _lungs(healthy)
    assert abs(np.median(h[:, :4, :4]) + 1000) < 20  # air outside the body
    assert -900 < np.median(h[lungs]) < -780  # parenchyma
    vessel_share = (h[lungs] > -300).mean()
    assert 0.01 < vessel_share < 0.08  # vessel trees inside the lungs
    tissue = h[h > -300]
    assert ((tissue > -130) & (tissue < -70)).mean() > 0.1  # fat
    assert ((tissue > 20) & (tissue < 80)).mean() > 0.3  # muscle, organs
    assert (h > 600).sum() > 0.003 * h.size  # cortical bone
    assert h.max() > 700
    d = diseased
    assert -650 < np.median(d.hu[d.ground_glass]) < -400
    assert -80 < np.median(d.hu[d.consolidation]) < 40


def test_contrast_enhances_blood_and_organs_of_the_same_patient() -> None:
    spec = SynthSpec(seed=7, involvement=0.35, rows=ROWS, slice_thickness_mm=5.0)
    plain, enhanced = make_phantom(spec), make_phantom(replace(spec, contrast=True))
    for name in ("left_lung", "right_lung", "ground_glass", "consolidation"):
        assert np.array_equal(getattr(plain, name), getattr(enhanced, name)), name  # same patient, same masks
    lungs = _lungs(plain)
    # aerated lung, fat and bone do not change; soft tissue of about 40 HU becomes blood of 150+ HU
    healthy_lung = lungs & ~plain.ground_glass & ~plain.consolidation & (plain.hu < -600)
    assert abs(float(np.median(enhanced.hu[healthy_lung])) - float(np.median(plain.hu[healthy_lung]))) < 5
    soft = (plain.hu > 25) & (plain.hu < 60) & ~lungs
    rise = enhanced.hu[soft].astype(np.int32) - plain.hu[soft]
    assert (rise > 90).mean() > 0.05  # heart chambers, great vessels
    assert np.median(enhanced.hu[lungs & (enhanced.hu > 100)]) > 140  # pulmonary vessels
    cons = plain.consolidation
    gain = float(np.median(enhanced.hu[cons])) - float(np.median(plain.hu[cons]))
    assert 10 < gain < 45  # consolidation enhances a little
    fat = (plain.hu > -120) & (plain.hu < -80) & ~lungs
    assert np.median(np.abs(enhanced.hu[fat].astype(np.int32) - plain.hu[fat])) < 3


def test_table_lies_under_the_body(healthy: Phantom) -> None:
    h = healthy.hu
    mid = h[h.shape[0] // 2]
    dense_rows = np.nonzero((mid > 150).mean(axis=1) > 0.3)[0]
    body_rows = np.nonzero((mid > -300).any(axis=1))[0]
    assert len(dense_rows) and dense_rows.min() > np.nonzero(_lungs(healthy)[h.shape[0] // 2].any(1))[0].max()
    assert dense_rows.max() <= body_rows.max()


def test_trachea_splits_into_two_main_bronchi(diseased: Phantom) -> None:
    ph = diseased
    lungs = _lungs(ph)
    xl = np.nonzero(ph.left_lung)[2].mean()
    xr = np.nonzero(ph.right_lung)[2].mean()
    rows = np.nonzero(lungs.any(axis=(0, 2)))[0]
    band = np.zeros(ph.hu.shape[1:], bool)
    band[rows.min():rows.max() + 1, int(xr):int(xl) + 1] = True
    air = ndimage.binary_opening((ph.hu < -900) & ~lungs & band, np.ones((1, 2, 2)))
    labels, _ = ndimage.label(air)
    at_top = np.unique(labels[-1][labels[-1] > 0])
    assert len(at_top) == 1, "one air tube (the trachea) between the lungs in the top slice"
    tree = labels == at_top[0]
    zs = np.nonzero(tree.any(axis=(1, 2)))[0]
    assert (zs[-1] - zs[0]) * ph.spacing[0] > 40.0
    pieces = [ndimage.label(tree[k])[1] for k in zs]
    assert pieces[-1] == 1 and max(pieces) == 2  # bronchi below the carina
    assert not (tree & lungs).any()


def test_partial_coverage_cuts_the_lung(tmp_path: Path) -> None:
    full = make_phantom(SynthSpec(seed=6, rows=64))
    full_lungs = _lungs(full)
    assert not full_lungs[0].any() and not full_lungs[-1].any()
    st = write_study(tmp_path / "partial", SynthSpec(seed=6, rows=64, coverage="partial"))
    masks = np.load(st.directory / "truth.npz")
    lungs = masks["left_lung"] | masks["right_lung"]
    area = lungs.sum(axis=(1, 2))
    cut = st.truth["coverage"]["cut"]
    end = -1 if cut == "apex" else 0
    assert cut in ("apex", "base")
    assert area[end] > 0.25 * area.max()
    assert area[-1 - end] == 0
    assert st.truth["geometry"]["spacing_mm"] == list(full.spacing)  # same grid, fewer slices
    assert lungs.sum() < 0.95 * full_lungs.sum()
    assert st.truth["lung_volume_ml"]["total"] < 0.95 * full_lungs.sum() * np.prod(full.spacing) / 1000


def test_sharp_kernel_is_noisier_and_edge_enhanced() -> None:
    def high_pass(kernel: str) -> float:
        ph = make_phantom(SynthSpec(seed=2, rows=ROWS, slices=12, kernel=kernel))
        h = ph.hu.astype(np.float32)
        smooth = ndimage.uniform_filter(h, (1, 5, 5))
        tissue = ndimage.binary_erosion((smooth > 0) & (smooth < 100), np.ones((1, 7, 7)))
        return float(np.std((h - smooth)[tissue]))

    soft, sharp = high_pass("B40f"), high_pass("B70f")
    assert 3.0 < soft < 40.0
    assert sharp > 1.8 * soft
    assert kernel_is_sharp("B70f") and kernel_is_sharp("LUNG") and kernel_is_sharp("Br64")
    assert not kernel_is_sharp("B40f") and not kernel_is_sharp("STANDARD") and not kernel_is_sharp("Br40")


def test_files_read_back_as_the_phantom(study) -> None:  # type: ignore[no-untyped-def]
    ph = make_phantom(STUDY_SPEC)
    assert [p.name for p in study.paths] == [f"IM{i:04d}.dcm" for i in range(1, 41)]
    vol = load_series(list(study.paths))
    assert np.array_equal(vol.hu, ph.hu)
    assert np.allclose(vol.spacing, ph.spacing) and np.allclose(vol.origin, ph.origin)
    assert vol.kernel == "B70f"
    assert vol.sop_instance_uids[-1] == pydicom.dcmread(study.paths[0]).SOPInstanceUID  # IM0001 on top
    masks = np.load(study.directory / "truth.npz")
    for name in ("left_lung", "right_lung", "ground_glass", "consolidation"):
        assert masks[name].dtype == bool
        assert np.array_equal(masks[name], getattr(ph, name)), name


def test_headers_and_truth(study) -> None:  # type: ignore[no-untyped-def]
    ds = pydicom.dcmread(study.paths[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert ds.PatientName == "TEST^SYNTH" and ds.PatientID == "SYNTEST1"
    assert ds.PatientPosition == "HFS" and ds.BodyPartExamined == "CHEST"
    assert (float(ds.RescaleIntercept), float(ds.RescaleSlope)) == (-1024.0, 1.0)
    for keyword in ("InstitutionName", "ReferringPhysicianName", "OperatorsName", "StationName",
                    "PatientBirthDate", "AccessionNumber", "StudyDate"):
        assert str(ds.get(keyword, "")), keyword
    truth = json.loads((study.directory / "truth.json").read_text())
    assert truth == json.loads(json.dumps(study.truth))
    assert truth["study_instance_uid"] == ds.StudyInstanceUID == study.study_instance_uid
    assert truth["series_instance_uid"] == ds.SeriesInstanceUID == study.series_instance_uid
    assert truth["patient"]["birth_date"] == ds.PatientBirthDate
    assert truth["severity_category"] == category_for(truth["involvement_percent"]["total"])
    assert abs(truth["involvement_percent"]["total"] - 30.0) < 1.0
    inv = truth["involvement_percent"]
    vol = truth["lung_volume_ml"]
    assert abs(vol["left"] + vol["right"] - vol["total"]) < 0.01
    assert min(inv["left"], inv["right"]) <= inv["total"] <= max(inv["left"], inv["right"])
    assert abs(truth["ground_glass_percent"]["total"] + truth["consolidation_percent"]["total"]
               - inv["total"]) < 0.01
    assert truth["files"][0] == "dicom/IM0001.dcm"


def test_the_phantom_is_not_taken_for_the_nodes_results(study) -> None:  # type: ignore[no-untyped-def]
    """The node marks its results with Manufacturer ``lungnode`` and the routing script never sends
    those back to it; a synthetic study must not carry that mark."""
    from node.stages.reports import MANUFACTURER as RESULTS_MANUFACTURER

    ds = pydicom.dcmread(study.paths[0], stop_before_pixels=True)
    assert ds.Manufacturer.lower() != RESULTS_MANUFACTURER.lower()
    assert not ds.SeriesDescription.lower().startswith(RESULTS_MANUFACTURER.lower())
    lua = (Path(__file__).resolve().parent.parent / "deploy" / "orthanc" / "route-to-lungnode.lua")
    assert f"'{RESULTS_MANUFACTURER}'" in lua.read_text()


def test_dciodvfy_finds_no_errors(study) -> None:  # type: ignore[no-untyped-def]
    tool = shutil.which("dciodvfy")
    assert tool, "dicom3tools dciodvfy is needed (apt-get install dicom3tools)"
    for path in (study.paths[0], study.paths[len(study.paths) // 2]):
        run = subprocess.run([tool, "-new", str(path)], capture_output=True, text=True, timeout=60)
        report = run.stdout + run.stderr
        assert "CTImage" in report
        assert not [line for line in report.splitlines() if line.startswith("Error")], report


def test_a_contrast_series_says_so_in_its_header(tmp_path: Path) -> None:
    study = write_study(tmp_path / "c", SynthSpec(seed=5, rows=64, slices=4, contrast=True))
    ds = pydicom.dcmread(study.paths[0])
    assert ds.ContrastBolusAgent and ds.ContrastBolusRoute == "IV"
    assert "C+" in ds.SeriesDescription
    assert study.truth["spec"]["contrast"] is True
    plain = write_study(tmp_path / "p", SynthSpec(seed=5, rows=64, slices=4))
    assert "ContrastBolusAgent" not in pydicom.dcmread(plain.paths[0])
    tool = shutil.which("dciodvfy")
    assert tool, "dicom3tools dciodvfy is needed (apt-get install dicom3tools)"
    run = subprocess.run([tool, "-new", str(study.paths[0])], capture_output=True, text=True, timeout=60)
    report = run.stdout + run.stderr
    assert not [line for line in report.splitlines() if line.startswith("Error")], report


def test_writing_is_deterministic_and_overwrites(tmp_path: Path) -> None:
    spec = SynthSpec(seed=8, rows=64, slices=24)
    a = write_study(tmp_path / "a", spec)
    b = write_study(tmp_path / "b", spec)
    assert _digest(a.directory) == _digest(b.directory)
    assert (a.study_instance_uid, a.series_instance_uid) == (b.study_instance_uid, b.series_instance_uid)
    shorter = write_study(tmp_path / "a", SynthSpec(seed=8, rows=64, slices=10))
    assert sorted(p.name for p in shorter.dicom_dir.iterdir()) == [f"IM{i:04d}.dcm" for i in range(1, 11)]
    assert np.load(shorter.directory / "truth.npz")["left_lung"].shape[0] == 10
    again = write_study(tmp_path / "a", spec)
    assert _digest(again.directory) == _digest(b.directory)


def test_second_series_joins_a_given_study(tmp_path: Path) -> None:
    first = write_study(tmp_path / "s2", SynthSpec(seed=1, rows=64, slices=10, series_number=2))
    second_spec = SynthSpec(seed=1, rows=64, slices=10, series_number=3, kernel="B70f",
                            study_instance_uid=first.study_instance_uid)
    second = write_study(tmp_path / "s3", second_spec)
    assert second.study_instance_uid == first.study_instance_uid
    assert second.series_instance_uid != first.series_instance_uid
    a, b = pydicom.dcmread(first.paths[0]), pydicom.dcmread(second.paths[0])
    assert a.FrameOfReferenceUID == b.FrameOfReferenceUID  # same patient, same position
    assert (a.PatientName, a.PatientID, a.StudyDate) == (b.PatientName, b.PatientID, b.StudyDate)
    assert a.SOPInstanceUID != b.SOPInstanceUID and b.SeriesNumber == 3
    other = write_study(tmp_path / "other", SynthSpec(seed=1, rows=64, slices=10, involvement=0.5))
    assert other.study_instance_uid != first.study_instance_uid


def test_implicit_little_endian_is_written_when_asked(tmp_path: Path) -> None:
    spec = SynthSpec(seed=2, rows=64, slices=4, transfer_syntax=str(pydicom.uid.ImplicitVRLittleEndian))
    st = write_study(tmp_path / "implicit", spec)
    assert pydicom.dcmread(st.paths[0]).file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    assert np.array_equal(load_series(list(st.paths)).hu, make_phantom(spec).hu)


@pytest.mark.parametrize(("field", "value", "words"), [
    ("involvement", 1.5, "involvement"),
    ("coverage", "half", "coverage"),
    ("rows", 8, "rows"),
    ("transfer_syntax", "1.2.840.10008.1.2.4.50", "dcmcjpeg"),
])
def test_bad_specs_are_refused_with_a_reason(field: str, value: object, words: str) -> None:
    with pytest.raises(SynthSpecError, match=words):
        SynthSpec(**{field: value})  # type: ignore[arg-type]
