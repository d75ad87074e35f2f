"""Lung segmentation and quantification on the real study and on synthetic studies.

The real study (``tests/data/ct``, 30 slices of 8 mm, a lung tumour, no diffuse
disease) is read as two series of different kernels; the synthetic studies come
from :mod:`training.synth` with their true lung and disease masks.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from model.errors import SegmentationError
from model.lungs import LungMasks, segment_lungs
from model.quantify import Quantification, category_for, quantify
from model.volume import CTVolume, load_series
from tests.conftest import B40F, B70F
from training import Phantom, SynthSpec, make_phantom, write_study

ROWS = 192  # synthetic studies of about 2 mm pixels: a second or two each


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    both = int(np.count_nonzero(a & b))
    return 2.0 * both / max(int(np.count_nonzero(a)) + int(np.count_nonzero(b)), 1)


def _volume_of(ph: Phantom, uid: str = "2.25.1") -> CTVolume:
    """The phantom as the volume loader would give it (LPS axes along the array axes)."""
    return CTVolume(hu=ph.hu, spacing=ph.spacing, origin=ph.origin, direction=np.eye(3),
                    series_instance_uid=uid, sop_instance_uids=tuple(f"{uid}.{i}" for i in range(len(ph.hu))),
                    slice_thickness=ph.spacing[0])


def _patient_x(volume: CTVolume, mask: np.ndarray) -> float:
    z, y, x = (float(c.mean()) for c in np.nonzero(mask))
    ijk = np.array([x * volume.spacing[2], y * volume.spacing[1], z * volume.spacing[0]])
    return float(volume.origin[0] + (volume.direction @ ijk)[0])


def _truth_po(ph: Phantom) -> float:
    lungs = ph.left_lung | ph.right_lung
    return 100.0 * np.count_nonzero((ph.ground_glass | ph.consolidation) & lungs) / np.count_nonzero(lungs)


Analysis = tuple[CTVolume, LungMasks, Quantification]


@pytest.fixture(scope="module")
def real() -> dict[str, Analysis]:
    out = {}
    for name, folder in (("B70f", B70F), ("B40f", B40F)):
        volume = load_series(sorted(Path(folder).glob("*.dcm")))
        masks = segment_lungs(volume)
        out[name] = (volume, masks, quantify(volume, masks))
    return out


# --- the real study -------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["B70f", "B40f"])
def test_real_lungs_are_plausible_and_on_their_sides(real: dict[str, Analysis], kernel: str) -> None:
    volume, masks, q = real[kernel]
    assert masks.left.shape == masks.right.shape == volume.shape
    assert masks.left.dtype == masks.right.dtype == np.bool_
    assert not (masks.left & masks.right).any()
    # An adult's lungs over the 24 cm the series covers: a few litres, each lung a good part of it.
    assert 1500.0 < q.total.volume_ml < 6000.0
    assert q.left.volume_ml > 0.25 * q.total.volume_ml and q.right.volume_ml > 0.25 * q.total.volume_ml
    assert q.total.volume_ml == pytest.approx(q.left.volume_ml + q.right.volume_ml)
    # The patient's left lung lies at larger patient x (LPS), whatever the image axes.
    assert _patient_x(volume, masks.left) > _patient_x(volume, masks.right) + 80.0
    # No diffuse disease: a few percent of opacity (the tumour, partial volume at 8 mm).
    assert 0.0 < q.total.percent_opacity < 8.0
    assert q.total.percent_high_opacity <= q.total.percent_opacity
    assert q.severity_category == category_for(q.total.percent_opacity)
    assert q.opacity_mask.shape == volume.shape and not (q.opacity_mask & ~masks.both).any()


def test_sharp_and_smooth_kernels_measure_alike(real: dict[str, Analysis]) -> None:
    (_, sharp_masks, sharp), (_, smooth_masks, smooth) = real["B70f"], real["B40f"]
    assert sharp.total.volume_ml == pytest.approx(smooth.total.volume_ml, rel=0.05)
    for side in ("left", "right", "total"):
        a, b = getattr(sharp, side), getattr(smooth, side)
        assert abs(a.percent_opacity - b.percent_opacity) < 2.0, side
        assert abs(a.percent_high_opacity - b.percent_high_opacity) < 1.0, side
    assert _dice(sharp_masks.both, smooth_masks.both) > 0.97


def _trachea(volume: CTVolume, k: int) -> np.ndarray:
    """The trachea on slice ``k``: the round air region near the body's midline."""
    air = ndimage.gaussian_filter(volume.hu[k].astype(np.float32), 1.0) < -600
    body = ndimage.binary_fill_holes(volume.hu[k] > -500)
    lab, n = ndimage.label(air & body)
    cols = np.nonzero(body.any(axis=0))[0]
    mid = (cols[0] + cols[-1]) / 2.0
    px_cm2 = volume.spacing[1] * volume.spacing[2] / 100.0
    best, best_d = None, np.inf
    for i in range(1, n + 1):
        comp = lab == i
        area = np.count_nonzero(comp) * px_cm2
        d = abs(float(np.nonzero(comp)[1].mean()) - mid) * volume.spacing[2]
        if 0.5 < area < 6.0 and d < 30.0 and d < best_d:
            best, best_d = comp, d
    assert best is not None, f"no trachea on slice {k}"
    return best


@pytest.mark.parametrize("kernel", ["B70f", "B40f"])
def test_trachea_is_not_lung_above_the_carina(real: dict[str, Analysis], kernel: str) -> None:
    volume, masks, _ = real[kernel]
    superior = np.argsort(volume.origin[2] + volume.direction[2, 2] * volume.spacing[0]
                          * np.arange(volume.shape[0]))[::-1]
    for k in superior[:4]:  # the top 3 cm, well above the carina
        assert not (masks.both[k] & _trachea(volume, int(k))).any(), f"trachea in the lungs on slice {k}"
    assert masks.both[superior[:4]].any()  # while the apices are there


@pytest.mark.parametrize("kernel", ["B70f", "B40f"])
def test_the_mask_covers_the_visibly_dark_lung(real: dict[str, Analysis], kernel: str) -> None:
    """Dark (air-like) voxels inside the body are lung, but for the airways and stomach gas."""
    volume, masks, _ = real[kernel]
    hu = ndimage.gaussian_filter(volume.hu.astype(np.float32), (0.0, 1.0, 1.0))
    body = np.stack([ndimage.binary_fill_holes(s > -500) for s in volume.hu])
    dark = (hu < -600) & body
    assert np.count_nonzero(dark & masks.both) >= 0.97 * np.count_nonzero(dark)
    # what stays out is small: trachea, main bronchi, the gastric bubble (about 50 ml here)
    assert np.count_nonzero(dark & ~masks.both) * volume.voxel_volume_ml < 100.0


def test_real_study_quality_flags(real: dict[str, Analysis]) -> None:
    _, masks, q = real["B70f"]
    assert masks.both[0].any()  # the series starts below the lung bases
    assert any(f.startswith("lungs not fully covered") for f in q.quality_flags)
    assert any(f.startswith("slice thickness 8 mm") for f in q.quality_flags)
    assert not any(f.startswith(("lung volume", "heavy image noise")) for f in q.quality_flags)
    assert q.noise_hu is not None and q.noise_hu > 0


def test_left_and_right_follow_patient_x_not_the_image_axes(real: dict[str, Analysis]) -> None:
    volume, masks, q = real["B40f"]
    # The same study stored with columns running to the patient's right and slices head first.
    d = volume.direction.copy()
    d[:, 0] *= -1
    d[:, 2] *= -1
    last = np.array([volume.shape[2] - 1, 0, volume.shape[0] - 1], dtype=float)
    origin = np.asarray(volume.origin) + volume.direction @ (last * np.array(
        [volume.spacing[2], volume.spacing[1], volume.spacing[0]]))
    flipped = replace(volume, hu=volume.hu[::-1, :, ::-1].copy(), direction=d,
                      origin=(float(origin[0]), float(origin[1]), float(origin[2])))
    fm = segment_lungs(flipped)
    assert _dice(fm.left[::-1, :, ::-1], masks.left) > 0.98
    assert _dice(fm.right[::-1, :, ::-1], masks.right) > 0.98
    assert _patient_x(flipped, fm.left) == pytest.approx(_patient_x(volume, masks.left), abs=3.0)
    fq = quantify(flipped, fm)
    # the reduced measuring grid's blocks start from the other side: 4.56 against 4.00 % with the
    # measured vessel halo (a 3x3 zone on 1.3 mm blocks; 4.95 against 4.72 % with the old one-voxel one)
    assert fq.total.percent_opacity == pytest.approx(q.total.percent_opacity, abs=0.75)


@pytest.mark.parametrize("kernel", ["B70f", "B40f"])
def test_the_segmentation_box_holds_the_lungs_and_measures_alike(real: dict[str, Analysis],
                                                                  kernel: str) -> None:
    """The box segment_lungs hands quantify (to save it a pass over the masks)."""
    volume, masks, q = real[kernel]
    assert masks.box is not None
    outside = np.ones(volume.shape, dtype=bool)
    outside[masks.box] = False
    assert not (masks.left & outside).any() and not (masks.right & outside).any()
    assert (masks.left | masks.right)[masks.box].sum() == (masks.left | masks.right).sum() > 0
    unboxed = quantify(volume, LungMasks(left=masks.left, right=masks.right))
    for a, b in ((q.left, unboxed.left), (q.right, unboxed.right), (q.total, unboxed.total)):
        assert a.volume_ml == b.volume_ml  # counted exactly either way
        # the box only moves the smoothing's image border: a few voxels at most
        assert a.percent_opacity == pytest.approx(b.percent_opacity, abs=0.05)
        assert a.percent_high_opacity == pytest.approx(b.percent_high_opacity, abs=0.05)


# --- synthetic studies with known truth -----------------------------------------------------


@pytest.mark.parametrize(("seed", "involvement", "kernel", "thickness", "contrast"), [
    (40, 0.0, "B70f", 5.0, False),
    (41, 0.05, "B40f", 5.0, False),
    (42, 0.1, "B70f", 2.5, False),
    (45, 0.1, "B40f", 2.5, False),
    (104, 0.17, "B40f", 3.0, False),  # peripheral consolidation along the ribs (the radial closing's case)
    (102, 0.08, "B70f", 5.0, False),
    # with intravenous contrast the blood pool reads as dense as the ribs' marrow (150-320 HU) and the
    # pulmonary vessels above the opacity range; the lungs and the involvement measure as without
    (41, 0.05, "B40f", 5.0, True),
    (104, 0.17, "B70f", 3.0, True),
])
def test_synthetic_lungs_and_involvement(seed: int, involvement: float, kernel: str,
                                         thickness: float, contrast: bool) -> None:
    ph = make_phantom(SynthSpec(seed=seed, involvement=involvement, kernel=kernel, rows=ROWS,
                                slice_thickness_mm=thickness, contrast=contrast))
    volume = _volume_of(ph)
    masks = segment_lungs(volume)
    assert _dice(masks.left, ph.left_lung) >= 0.97
    assert _dice(masks.right, ph.right_lung) >= 0.97
    q = quantify(volume, masks)
    truth = _truth_po(ph)
    assert abs(q.total.percent_opacity - truth) <= 3.0
    assert q.severity_category == category_for(truth)


def _vessels_in_ground_glass(vessel_hu: float) -> Quantification:
    """A slab of lung, ground glass on its left half, crossed by straight vessels of ``vessel_hu``."""
    rng = np.random.default_rng(3)
    hu = np.full((40, 96, 96), 40.0, np.float32)
    lung = np.zeros(hu.shape, bool)
    lung[:, 8:88, 8:88] = True
    hu[lung] = -850.0
    hu[:, 8:88, 8:48] = -550.0
    yy, xx = np.mgrid[:96, :96]
    for cy in (20, 36, 52, 68):
        for cx in (20, 36, 60, 76):
            hu[:, (yy - cy) ** 2 + (xx - cx) ** 2 <= 4] = vessel_hu  # 2.5 mm radius, along z
    hu += rng.normal(0.0, 8.0, hu.shape).astype(np.float32)
    volume = CTVolume(hu=np.rint(hu).astype(np.int16), spacing=(2.5, 1.25, 1.25), origin=(0.0, 0.0, 0.0),
                      direction=np.eye(3), series_instance_uid="2.25.9",
                      sop_instance_uids=tuple(f"2.25.9.{i}" for i in range(40)), slice_thickness=2.5)
    left = lung.copy()
    left[:, :, :48] = False
    return quantify(volume, LungMasks(left=left, right=lung & ~left))


def test_a_vessel_inside_ground_glass_counts_with_or_without_contrast() -> None:
    plain, enhanced = _vessels_in_ground_glass(40.0), _vessels_in_ground_glass(250.0)
    # the right lung (columns 8-47) is all ground glass, vessels included; the left one has none
    assert plain.right.percent_opacity > 97.0
    assert abs(enhanced.right.percent_opacity - plain.right.percent_opacity) < 1.0
    assert plain.left.percent_opacity < 1.0 and enhanced.left.percent_opacity < 1.0


def test_moderate_involvement_reads_low_but_keeps_its_category() -> None:
    """Known limit: consolidation against the mediastinum and in the gutters is left out.

    At 35 % the lungs still overlap the truth well and the category holds, but
    the percentage reads several points low (see the module docstring of
    :mod:`model.lungs`); this pins the present behaviour, not the target.
    """
    ph = make_phantom(SynthSpec(seed=46, involvement=0.35, kernel="B70f", rows=ROWS))
    masks = segment_lungs(_volume_of(ph))
    assert min(_dice(masks.left, ph.left_lung), _dice(masks.right, ph.right_lung)) >= 0.94
    q = quantify(_volume_of(ph), masks)
    truth = _truth_po(ph)
    assert truth - 8.0 <= q.total.percent_opacity <= truth + 1.0
    assert q.severity_category == category_for(truth) == "CT-2"


def test_more_involvement_of_the_same_patient_measures_more() -> None:
    low, high = (make_phantom(SynthSpec(seed=9, involvement=f, rows=128, slice_thickness_mm=5.0))
                 for f in (0.1, 0.25))
    measured = [quantify(_volume_of(p), segment_lungs(_volume_of(p))).total.percent_opacity
                for p in (low, high)]
    assert 1.0 < measured[0] < measured[1]


def test_written_study_read_back(tmp_path: Path) -> None:
    """Through DICOM files and the volume loader, a sharp kernel, superior slice first."""
    study = write_study(tmp_path / "s", SynthSpec(seed=5, involvement=0.1, kernel="B70f", rows=ROWS))
    volume = load_series(list(study.paths))
    truth = np.load(study.directory / "truth.npz")
    masks = segment_lungs(volume)
    assert _dice(masks.left, truth["left_lung"]) >= 0.97
    assert _dice(masks.right, truth["right_lung"]) >= 0.97
    q = quantify(volume, masks)
    assert abs(q.total.percent_opacity - study.truth["involvement_percent"]["total"]) <= 3.0
    assert q.total.volume_ml == pytest.approx(study.truth["lung_volume_ml"]["total"], rel=0.03)


@pytest.fixture(scope="module")
def healthy() -> Phantom:
    return make_phantom(SynthSpec(seed=3, involvement=0.0, rows=128, slice_thickness_mm=5.0))


def test_partial_coverage_is_flagged(healthy: Phantom) -> None:
    q = quantify(_volume_of(healthy), segment_lungs(_volume_of(healthy)))
    assert not any(f.startswith("lungs not fully covered") for f in q.quality_flags)
    ph = make_phantom(SynthSpec(seed=3, involvement=0.0, rows=128, slice_thickness_mm=5.0,
                                coverage="partial"))
    q = quantify(_volume_of(ph), segment_lungs(_volume_of(ph)))
    assert any(f.startswith("lungs not fully covered") for f in q.quality_flags)


def test_a_small_lung_volume_is_flagged(healthy: Phantom) -> None:
    lungs = healthy.left_lung | healthy.right_lung
    ml = np.cumsum(lungs.sum(axis=(1, 2))[::-1]) * np.prod(healthy.spacing) / 1000.0
    top = int(np.searchsorted(ml, 800.0))  # the upper slices that hold about 0.8 l of lung
    cut = replace(healthy, hu=healthy.hu[len(ml) - 1 - top:])
    q = quantify(_volume_of(cut), segment_lungs(_volume_of(cut)))
    assert 500.0 < q.total.volume_ml < 1100.0
    assert any(f.startswith("lung volume") for f in q.quality_flags)


def test_heavy_noise_is_flagged(healthy: Phantom) -> None:
    rng = np.random.default_rng(0)
    hu = np.clip(healthy.hu + rng.normal(0.0, 150.0, healthy.hu.shape), -1024, 3071).astype(np.int16)
    noisy = replace(healthy, hu=hu)
    q = quantify(_volume_of(noisy), segment_lungs(_volume_of(noisy)))
    assert any(f.startswith("heavy image noise") for f in q.quality_flags)
    assert q.noise_hu is not None and q.noise_hu > 80.0


def test_no_lungs_raises_an_actionable_error(healthy: Phantom) -> None:
    zs = np.nonzero((healthy.left_lung | healthy.right_lung).any(axis=(1, 2)))[0]
    assert zs[0] >= 3
    abdomen = replace(healthy, hu=healthy.hu[: zs[0]])  # below the lung bases
    with pytest.raises(SegmentationError, match=r"series 2\.25\.7: found (\d+ ml of lung|no air).*not cover"):
        segment_lungs(_volume_of(abdomen, uid="2.25.7"))
    water = replace(healthy, hu=np.zeros((20, 64, 64), np.int16))
    with pytest.raises(SegmentationError, match=r"series 2\.25\.8: found no air inside the body"):
        segment_lungs(_volume_of(water, uid="2.25.8"))


def test_extensive_opacity_is_flagged_as_possibly_underestimated() -> None:
    """Above about 30 % involvement the benchmark measures PO reading low: the result says so."""
    ph = make_phantom(SynthSpec(seed=12, involvement=0.6, rows=128, slice_thickness_mm=5.0))
    q = quantify(_volume_of(ph), segment_lungs(_volume_of(ph)))
    assert q.total.percent_opacity >= 30.0
    assert any(f.startswith("extensive opacity") for f in q.quality_flags)


def test_moderate_opacity_is_not_flagged_as_extensive(healthy: Phantom) -> None:
    q = quantify(_volume_of(healthy), segment_lungs(_volume_of(healthy)))
    assert not any(f.startswith("extensive opacity") for f in q.quality_flags)
    ph = make_phantom(SynthSpec(seed=12, involvement=0.15, rows=128, slice_thickness_mm=5.0))
    q = quantify(_volume_of(ph), segment_lungs(_volume_of(ph)))
    assert 5.0 < q.total.percent_opacity < 30.0
    assert not any(f.startswith("extensive opacity") for f in q.quality_flags)


def test_every_quality_flag_has_its_own_code() -> None:
    """The SR codes each flag quantify can raise (OTHER is for flags it does not know)."""
    from node.stages.reports import codes as lc

    flags = {
        "lungs not fully covered by the scan (lung on the first or last slice)": "PARTCOV",
        "slice thickness 8 mm is over 5 mm": "THICK",
        "lung volume 900 ml is outside the plausible adult range (1500-9000 ml)": "VOLRANGE",
        "heavy image noise (120 HU SD in the lung parenchyma)": "NOISE",
        "extensive opacity (55 % of the lungs): dense disease ...": "EXTENSIVE",
        "something new": "OTHER",
    }
    assert {f: lc.flag_code(f).value for f in flags} == flags
