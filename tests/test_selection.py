"""Series selection on the real study and on edited copies of its files.

Every edited series is a copy of real slices written with pydicom into
tmp_path: a 3-slice series, a localizer, mixed orientations, a DERIVED series,
a non-CT instance, thinner and thicker slices, Enhanced CT, no kernel tag.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import EnhancedCTImageStorage, PositronEmissionTomographyImageStorage, generate_uid

from node.errors import SelectionError
from node.records import SelectedSeries, SeriesCandidate, StoredInstance, StoredStudy
from node.stages.selection import SelectionRules, classify_kernel, measure_noise_hu, select_series
from tests.conftest import B40F, B70F

Edit = Callable[[Dataset, int], None]


def _files(series: Path) -> list[Path]:
    return sorted(series.glob("*.dcm"))


def study_of(*sources: Path | Iterable[Path]) -> StoredStudy:
    """A StoredStudy of the given series folders or files, as the database would list it."""
    paths: list[Path] = []
    for src in sources:
        paths += _files(src) if isinstance(src, Path) and src.is_dir() else list(
            [src] if isinstance(src, Path) else src)
    instances = []
    study_uid = ""
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        study_uid = str(ds.StudyInstanceUID)
        instances.append(StoredInstance(path=p, sop_instance_uid=str(ds.SOPInstanceUID),
                                        sop_class_uid=str(ds.SOPClassUID),
                                        series_instance_uid=str(ds.SeriesInstanceUID)))
    return StoredStudy(study_instance_uid=study_uid, instances=tuple(instances))


def copy_series(src: Path, dest: Path, edit: Edit | None = None, count: int | None = None,
                keep_uids: bool = False) -> Path:
    """Copy (some of) a real series as a new series, editing each file with pydicom."""
    dest.mkdir(parents=True)
    series_uid = generate_uid()
    for i, path in enumerate(_files(src)[:count]):
        ds = pydicom.dcmread(path)
        if not keep_uids:
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if edit is not None:
            edit(ds, i)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.save_as(dest / path.name, enforce_file_format=True)
    return dest


def series_uid(folder: Path) -> str:
    return str(pydicom.dcmread(_files(folder)[0], stop_before_pixels=True).SeriesInstanceUID)


def candidate(selected: SelectedSeries, uid: str) -> SeriesCandidate:
    return next(c for c in selected.candidates if c.series_instance_uid == uid)


def restack(thickness: float, number: int) -> Edit:
    """Make slice ``i`` lie at ``thickness * i`` below the first, with that thickness."""
    def edit(ds: Dataset, i: int) -> None:
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, 312.0 - thickness * i]
        ds.SliceLocation = 312.0 - thickness * i
        ds.SliceThickness = thickness
        ds.SeriesNumber = number
    return edit


# --------------------------------------------------------------------------- the real study


def test_smooth_preference_chooses_b40f_in_z_order() -> None:
    selected = select_series(study_of(B70F, B40F), SelectionRules())

    assert selected.series_instance_uid == series_uid(B40F)
    assert {c.kernel: c.kernel_class for c in selected.candidates} == {"B70f": "sharp", "B40f": "smooth"}
    assert all(c.eligible for c in selected.candidates)
    assert "series 3 (B40f, 8.0 mm, 30 slices) chosen" in selected.reason
    assert "smooth kernel B40f preferred over sharp B70f" in selected.reason
    assert "QIBA" in selected.reason
    assert len(selected.paths) == 30 and all(p.parent == B40F for p in selected.paths)
    z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in selected.paths]
    assert z == sorted(z) and len(set(z)) == 30


def test_sharp_preference_chooses_b70f() -> None:
    selected = select_series(study_of(B70F, B40F), SelectionRules(kernel_preference="sharp"))

    assert selected.series_instance_uid == series_uid(B70F)
    assert "sharp kernel B70f preferred over smooth B40f" in selected.reason


def test_any_preference_ignores_the_kernel() -> None:
    selected = select_series(study_of(B40F, B70F), SelectionRules(kernel_preference="any"))

    assert selected.series_instance_uid == series_uid(B70F)  # series 2 before series 3
    assert "lowest series number" in selected.reason
    assert "kernel" not in selected.reason.split("chosen:")[1]


@pytest.mark.parametrize(("kernel", "expected"), [
    ("B70f", "sharp"), ("B40f", "smooth"), ("B30s", "smooth"), ("B60f", "sharp"), ("Br40d", "smooth"),
    ("Bl57d", "sharp"), ("Hr64h", "sharp"), ("Qr40", "smooth"), ("I70f\\3", "sharp"), ("I40f\\2", "smooth"),
    ("B50f", "unknown"), ("STANDARD", "smooth"), ("SOFT", "smooth"), ("DETAIL", "smooth"),
    ("LUNG", "sharp"), ("BONE", "sharp"), ("BONEPLUS", "sharp"), ("EDGE", "sharp"), ("A", "smooth"),
    ("B", "smooth"), ("C", "smooth"), ("L", "sharp"), ("YA", "sharp"), ("YB", "sharp"), ("D", "sharp"),
    ("E", "sharp"), ("FC01", "smooth"), ("FC13", "smooth"), ("FC18", "smooth"), ("FC51", "sharp"),
    ("FC86", "sharp"), ("FC30", "unknown"), ("B_SOFT_B", "smooth"), ("XYZ", "unknown"), ("", "unknown"),
    (None, "unknown"),
])
def test_kernel_table(kernel: str | None, expected: str) -> None:
    assert classify_kernel(kernel) == expected


def test_noise_ranks_b70f_noisier_without_kernel_tag(tmp_path: Path) -> None:
    def drop_kernel(ds: Dataset, i: int) -> None:
        del ds.ConvolutionKernel

    sharp = copy_series(B70F, tmp_path / "b70f", drop_kernel, keep_uids=True)
    smooth = copy_series(B40F, tmp_path / "b40f", drop_kernel, keep_uids=True)
    selected = select_series(study_of(sharp, smooth), SelectionRules())

    by_uid = {c.series_instance_uid: c for c in selected.candidates}
    noisy, quiet = by_uid[series_uid(B70F)], by_uid[series_uid(B40F)]
    assert noisy.kernel is None and quiet.kernel is None
    assert noisy.noise_hu is not None and quiet.noise_hu is not None
    assert noisy.noise_hu > 2 * quiet.noise_hu
    assert quiet.kernel_class == "smooth"
    assert selected.series_instance_uid == series_uid(B40F)
    assert "noise" in selected.reason
    # With a threshold both stay under, both are "smooth" and the lower noise decides.
    lenient = select_series(study_of(sharp, smooth), SelectionRules(sharp_noise_hu=1000.0))
    assert {c.kernel_class for c in lenient.candidates} == {"smooth"}
    assert lenient.series_instance_uid == series_uid(B40F)
    assert "lower measured noise" in lenient.reason
    # The measurement itself, on the same middle slice of each original series.
    middle = _files(B70F)[15].name
    sharp_noise, smooth_noise = measure_noise_hu(B70F / middle), measure_noise_hu(B40F / middle)
    assert sharp_noise is not None and smooth_noise is not None and sharp_noise > 2 * smooth_noise


def test_unknown_kernel_above_threshold_is_sharp(tmp_path: Path) -> None:
    def rename(ds: Dataset, i: int) -> None:
        ds.ConvolutionKernel = "XK99"

    sharp = copy_series(B70F, tmp_path / "b70f", rename, keep_uids=True)
    noise = measure_noise_hu(_files(sharp)[15])
    assert noise is not None
    low = select_series(study_of(sharp), SelectionRules(sharp_noise_hu=noise / 2))
    high = select_series(study_of(sharp), SelectionRules(sharp_noise_hu=noise * 2))
    assert low.candidates[0].kernel_class == "sharp"
    assert high.candidates[0].kernel_class == "smooth"


# --------------------------------------------------------------------------- refused series


def test_three_slice_series_is_refused(tmp_path: Path) -> None:
    short = copy_series(B40F, tmp_path / "short", count=3)
    selected = select_series(study_of(B40F, short), SelectionRules())

    c = candidate(selected, series_uid(short))
    assert not c.eligible
    assert c.reason == "has 3 slices; at least 20 are needed"
    assert selected.series_instance_uid == series_uid(B40F)
    assert "1 other series not eligible" in selected.reason


def test_localizer_is_refused(tmp_path: Path) -> None:
    def localizer(ds: Dataset, i: int) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.SeriesDescription = "Topogram  0.6  T20f"
        ds.SeriesNumber = 1

    topogram = copy_series(B40F, tmp_path / "topogram", localizer, count=25)
    selected = select_series(study_of(B40F, topogram), SelectionRules())

    reason = candidate(selected, series_uid(topogram)).reason
    assert "is a localizer" in reason and "LOCALIZER" in reason
    assert "is not axial (slice normal 90 degrees" in reason
    assert selected.series_instance_uid == series_uid(B40F)


def test_localizer_recognised_by_description(tmp_path: Path) -> None:
    def scout(ds: Dataset, i: int) -> None:
        ds.SeriesDescription = "SCOUT"

    topogram = copy_series(B40F, tmp_path / "scout", scout)
    selected = select_series(study_of(B40F, topogram), SelectionRules())
    assert "is a localizer (description 'SCOUT')" in candidate(selected, series_uid(topogram)).reason


def test_mixed_orientations_are_refused(tmp_path: Path) -> None:
    tilt = math.radians(3.0)

    def tilted(ds: Dataset, i: int) -> None:
        if i % 2:
            ds.ImageOrientationPatient = [1, 0, 0, 0, math.cos(tilt), math.sin(tilt)]

    mixed = copy_series(B40F, tmp_path / "mixed", tilted)
    selected = select_series(study_of(B40F, mixed), SelectionRules())

    reason = candidate(selected, series_uid(mixed)).reason
    assert reason.startswith("mixes image orientations")
    assert selected.series_instance_uid == series_uid(B40F)


def test_derived_series_is_refused(tmp_path: Path) -> None:
    def derived(ds: Dataset, i: int) -> None:
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]

    mpr = copy_series(B40F, tmp_path / "mpr", derived)
    selected = select_series(study_of(B70F, mpr), SelectionRules())

    reason = candidate(selected, series_uid(mpr)).reason
    assert reason.startswith("is derived, not an original acquisition (Image Type DERIVED\\SECONDARY\\AXIAL)")
    assert selected.series_instance_uid == series_uid(B70F)


def test_non_ct_instance_is_refused_and_ct_chosen(tmp_path: Path) -> None:
    def pet(ds: Dataset, i: int) -> None:
        ds.SOPClassUID = PositronEmissionTomographyImageStorage
        ds.Modality = "PT"

    pt = copy_series(B40F, tmp_path / "pt", pet, count=1)
    selected = select_series(study_of(B40F, pt), SelectionRules())

    reason = candidate(selected, series_uid(pt)).reason
    assert reason == "is not CT (Positron Emission Tomography Image Storage, modality PT)"
    assert selected.series_instance_uid == series_uid(B40F)

    with pytest.raises(SelectionError) as err:
        select_series(study_of(pt), SelectionRules())
    assert "has no CT images" in str(err.value)
    assert series_uid(pt) in str(err.value)


def test_ct_image_with_other_modality_is_refused(tmp_path: Path) -> None:
    def modality(ds: Dataset, i: int) -> None:
        ds.Modality = "OT"

    other = copy_series(B40F, tmp_path / "ot", modality)
    with pytest.raises(SelectionError) as err:
        select_series(study_of(other), SelectionRules())
    assert "has modality OT, not CT" in str(err.value)


def test_enhanced_ct_is_refused_with_a_reason(tmp_path: Path) -> None:
    def enhanced(ds: Dataset, i: int) -> None:
        ds.SOPClassUID = EnhancedCTImageStorage

    multi = copy_series(B40F, tmp_path / "enhanced", enhanced, count=2)
    selected = select_series(study_of(B40F, multi), SelectionRules())
    reason = candidate(selected, series_uid(multi)).reason
    assert reason.startswith("is Enhanced CT (multi-frame), which this node does not analyse")


def test_thinner_slices_win_over_kernel(tmp_path: Path) -> None:
    thin_sharp = copy_series(B70F, tmp_path / "thin", restack(4.0, 7))
    selected = select_series(study_of(B40F, thin_sharp), SelectionRules())

    assert selected.series_instance_uid == series_uid(thin_sharp)
    assert "series 7 (B70f, 4.0 mm, 30 slices) chosen: thinnest eligible slices (4.0 mm; others 8.0 mm)" \
        in selected.reason
    assert candidate(selected, series_uid(thin_sharp)).slice_thickness_mm == 4.0


def test_kernel_decides_within_thickness_tolerance(tmp_path: Path) -> None:
    thin_sharp = copy_series(B70F, tmp_path / "sharp", restack(4.0, 7))
    near_smooth = copy_series(B40F, tmp_path / "smooth", restack(4.4, 8))
    selected = select_series(study_of(thin_sharp, near_smooth, B40F), SelectionRules())

    assert selected.series_instance_uid == series_uid(near_smooth)
    assert "thinnest eligible slices (4.0 mm; others 8.0 mm)" in selected.reason
    assert "smooth kernel B40f preferred over sharp B70f" in selected.reason


def test_more_slices_then_series_number(tmp_path: Path) -> None:
    fewer = copy_series(B40F, tmp_path / "fewer", restack(8.0, 1), count=25)
    selected = select_series(study_of(fewer, B40F), SelectionRules())
    assert selected.series_instance_uid == series_uid(B40F)
    assert "more slices (30 vs 25)" in selected.reason


def test_too_thick_slices_are_refused(tmp_path: Path) -> None:
    thick = copy_series(B40F, tmp_path / "thick", restack(12.0, 9))
    selected = select_series(study_of(B40F, thick), SelectionRules())
    reason = candidate(selected, series_uid(thick)).reason
    assert reason == "has 12.0 mm slices; at most 10 mm are accepted"


def test_nothing_eligible_lists_every_series(tmp_path: Path) -> None:
    short = copy_series(B40F, tmp_path / "short", count=3)

    def localizer(ds: Dataset, i: int) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]

    def derived(ds: Dataset, i: int) -> None:
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]

    scout = copy_series(B70F, tmp_path / "scout", localizer, count=2)
    mpr = copy_series(B40F, tmp_path / "mpr", derived)
    study = study_of(short, scout, mpr)

    with pytest.raises(SelectionError) as err:
        select_series(study, SelectionRules())
    message = str(err.value)
    lines = message.splitlines()
    assert lines[0] == f"study {study.study_instance_uid} has no series that can be analysed:"
    assert len(lines) == 4
    assert any(series_uid(short) in line and "has 3 slices; at least 20 are needed" in line for line in lines)
    assert any(series_uid(scout) in line and "is a localizer" in line for line in lines)
    assert any(series_uid(mpr) in line and "is derived" in line for line in lines)


def test_empty_study_and_bad_rules() -> None:
    with pytest.raises(SelectionError, match="has no stored instances"):
        select_series(StoredStudy("1.2.3", ()), SelectionRules())
    with pytest.raises(ValueError, match="kernel_preference"):
        SelectionRules(kernel_preference="medium")  # type: ignore[arg-type]


def test_unreadable_file_refuses_its_series(tmp_path: Path) -> None:
    broken = copy_series(B40F, tmp_path / "broken")
    broken_uid = series_uid(broken)
    victim = _files(broken)[4]
    study = study_of(B70F, broken)
    victim.write_bytes(b"not a DICOM file")
    selected = select_series(study, SelectionRules())
    reason = candidate(selected, broken_uid).reason
    assert reason.startswith(f"has an unreadable file {victim.name}")
    assert selected.series_instance_uid == series_uid(B70F)
