"""The classical opacity measurement reads alike on a sharp and a smooth kernel (issue 14).

Each pair is one synthetic phantom (same seed and spec) reconstructed with a
smooth (B40f) and a sharp (B70f) kernel; the three span the generator's noise
levels (about 12, 19 and 24 HU SD smooth, 2.5 times that sharp), slice
thickness 1-5 mm and in-plane pixels 1.5-1.9 mm.  Target of the issue: a PO
difference of at most 2 points per pair (``benchmarks/bench_accuracy.py
--kernel-pairs`` measures 20 pairs against 1 point mean, 2 points worst).
The category is not compared: the healthy pair reads 0.78 % (CT-0) smooth and
1.75 % (CT-1) sharp, within the target but across the 1 % CT-0 boundary.

A softer smooth kernel over denser parenchyma (the generator's ``psf_mm`` and
``parenchyma_offset_hu``) reproduces what a held-back real L/B pair showed:
the soft series reads higher, at the vessels' partial-volume halos.  The
vessel zone follows the halo measured on each image (:mod:`model.halo`).
"""

from __future__ import annotations

import numpy as np
import pytest

from model.halo import vessel_halo_mm
from model.lungs import LungMasks, segment_lungs
from model.quantify import Quantification, QuantifyParams, quantify
from model.volume import CTVolume, load_series
from tests.conftest import B40F, B70F
from training import SynthSpec, make_phantom

WORST_PO_POINTS = 2.0
VOLUME_FRACTION = 0.02


def _volume(spec: SynthSpec) -> CTVolume:
    ph = make_phantom(spec)
    return CTVolume(hu=ph.hu, spacing=ph.spacing, origin=ph.origin, direction=np.eye(3),
                    series_instance_uid="2.25.3",
                    sop_instance_uids=tuple(f"2.25.3.{i}" for i in range(len(ph.hu))),
                    slice_thickness=ph.spacing[0], kernel=spec.kernel)


def _measure(seed: int, involvement: float, thickness_mm: float, rows: int, kernel: str) -> Quantification:
    volume = _volume(SynthSpec(seed=seed, involvement=involvement, kernel=kernel, rows=rows,
                               slice_thickness_mm=thickness_mm))
    return quantify(volume, segment_lungs(volume))


@pytest.mark.parametrize(("seed", "involvement", "thickness_mm", "rows"), [
    (500, 0.0, 1.0, 192),    # healthy, thin slices, coarse pixels, 19 / 57 HU noise
    (502, 0.133, 5.0, 256),  # low noise (12 / 38 HU), thick slices
    (512, 0.333, 5.0, 192),  # the noisiest (24 / 72 HU), a third involved
])
def test_sharp_and_smooth_kernel_of_one_phantom_read_alike(seed: int, involvement: float, thickness_mm: float,
                                                           rows: int) -> None:
    smooth = _measure(seed, involvement, thickness_mm, rows, "B40f")
    sharp = _measure(seed, involvement, thickness_mm, rows, "B70f")
    # the sharp kernel is the noisier one, as measured in the image: the smoothing has something to adapt to
    assert smooth.noise_hu is not None and sharp.noise_hu is not None
    assert sharp.noise_hu > 2.0 * smooth.noise_hu
    diff = abs(sharp.total.percent_opacity - smooth.total.percent_opacity)
    assert diff <= WORST_PO_POINTS, (smooth.total.percent_opacity, sharp.total.percent_opacity)
    dv = abs(sharp.total.volume_ml - smooth.total.volume_ml) / smooth.total.volume_ml
    assert dv <= VOLUME_FRACTION


def test_a_soft_kernel_over_dense_lung_is_brought_to_its_sharp_twin_by_the_measured_halo() -> None:
    """The soft series (point spread 1.2 mm, parenchyma 100 HU denser) measures a wider halo than
    its sharp twin; with the old fixed one-voxel halo it read 12.6 points above it (10 % true), with
    the measured halo about 2 (``bench_accuracy.py --soft-pairs``: mean 2.44 -> 1.11 over 20 pairs)."""
    common = {"seed": 617, "involvement": 0.1, "rows": 256, "slice_thickness_mm": 5.0,
              "parenchyma_offset_hu": 100.0}
    soft = _volume(SynthSpec(kernel="B40f", psf_mm=1.2, **common))  # type: ignore[arg-type]
    sharp = _volume(SynthSpec(kernel="B70f", **common))  # type: ignore[arg-type]
    soft_masks, sharp_masks = segment_lungs(soft), segment_lungs(sharp)
    soft_q, sharp_q = quantify(soft, soft_masks), quantify(sharp, sharp_masks)
    assert soft_q.vessel_halo_mm is not None and sharp_q.vessel_halo_mm is not None
    assert soft_q.vessel_halo_mm > sharp_q.vessel_halo_mm + 1.0
    fixed = quantify(soft, soft_masks, params=QuantifyParams(max_halo_mm=0.0, halo_ring_sd=0.0))
    measured_gap = abs(soft_q.total.percent_opacity - sharp_q.total.percent_opacity)
    fixed_gap = abs(fixed.total.percent_opacity - sharp_q.total.percent_opacity)
    assert fixed_gap > 8.0, fixed_gap  # the pattern is reproduced ...
    assert measured_gap < 3.0, (soft_q.total.percent_opacity, sharp_q.total.percent_opacity)  # ... and mended


def test_on_coarse_pixels_the_halo_rings_bring_a_soft_kernel_to_its_sharp_twin() -> None:
    """1.0 mm slices, 1.96 mm pixels, healthy lung 100 HU denser: the halo (about 2 mm) is one pixel,
    so the vessel zone cannot widen; the soft series' first rings around the vessels and inside the
    pleura read above -700 and made it 2.1 points higher than its sharp twin. The rings' raised
    threshold and the halo-wide rim test (:func:`model.quantify._ring_threshold`) leave the sharp
    series, whose rings read lower, as it was (``bench_accuracy.py --soft-pairs``, seed 612)."""
    common = {"seed": 612, "involvement": 0.0, "rows": 192, "slice_thickness_mm": 1.0,
              "parenchyma_offset_hu": 100.0}
    soft = _volume(SynthSpec(kernel="B40f", psf_mm=0.8, **common))  # type: ignore[arg-type]
    sharp = _volume(SynthSpec(kernel="B70f", **common))  # type: ignore[arg-type]
    soft_masks, sharp_masks = segment_lungs(soft), segment_lungs(sharp)
    without = QuantifyParams(halo_ring_sd=0.0)
    soft_q, sharp_q = quantify(soft, soft_masks), quantify(sharp, sharp_masks)
    soft_without = quantify(soft, soft_masks, params=without)
    sharp_without = quantify(sharp, sharp_masks, params=without)
    assert soft_without.total.percent_opacity - sharp_without.total.percent_opacity > 1.5  # the pattern ...
    assert abs(soft_q.total.percent_opacity - sharp_q.total.percent_opacity) < 1.0  # ... mended
    assert soft_q.total.percent_opacity < soft_without.total.percent_opacity - 1.5
    assert sharp_q.total.percent_opacity == sharp_without.total.percent_opacity


def test_the_real_studys_smooth_series_has_the_wider_halo_and_both_read_alike() -> None:
    """tests/data/ct, one acquisition: B40f's halo reaches about 1.9 mm, B70f's about 1.6; with the
    measured halo the two read within half a point (0.82 points with the fixed halo)."""
    found = {}
    for kernel, folder in (("B70f", B70F), ("B40f", B40F)):
        volume = load_series(sorted(folder.glob("*.dcm")))
        found[kernel] = quantify(volume, segment_lungs(volume))
    sharp, smooth = found["B70f"], found["B40f"]
    assert sharp.vessel_halo_mm is not None and smooth.vessel_halo_mm is not None
    assert smooth.vessel_halo_mm > sharp.vessel_halo_mm
    assert abs(smooth.total.percent_opacity - sharp.total.percent_opacity) < 0.5


def test_no_halo_without_lungs_or_in_a_lung_too_dense_to_tell() -> None:
    volume = _volume(SynthSpec(seed=3, involvement=0.0, rows=96, slice_thickness_mm=5.0))
    empty = np.zeros(volume.shape, dtype=bool)
    assert vessel_halo_mm(volume, LungMasks(empty, empty), level=-700.0, core_hu=-300.0) is None
    masks = segment_lungs(volume)
    assert vessel_halo_mm(volume, masks, level=-700.0, core_hu=-300.0) is not None
    # a threshold the parenchyma itself reaches: halo and background cannot be told apart
    assert vessel_halo_mm(volume, masks, level=-900.0, core_hu=-300.0) is None


def test_extensive_opacity_keeps_the_one_voxel_halo() -> None:
    """At 30 % PO and more the vessels' surroundings are partly disease: the measured halo is not used
    (widening the zone by it read 0.8 points low at 55-60 % involvement in ``bench_accuracy.py``)."""
    volume = _volume(SynthSpec(seed=9, involvement=0.35, rows=256, slice_thickness_mm=5.0))
    masks = segment_lungs(volume)
    assert vessel_halo_mm(volume, masks, level=-700.0, core_hu=-300.0) is not None  # measurable ...
    q = quantify(volume, masks)
    assert q.total.percent_opacity >= 30.0
    assert q.vessel_halo_mm is None  # ... and not used
    fixed = quantify(volume, masks, params=QuantifyParams(max_halo_mm=0.0))
    assert q.total.percent_opacity == fixed.total.percent_opacity
