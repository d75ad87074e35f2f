"""The classical opacity measurement reads alike on a sharp and a smooth kernel (issue 14).

Each pair is one synthetic phantom (same seed and spec) reconstructed with a
smooth (B40f) and a sharp (B70f) kernel; the three span the generator's noise
levels (about 12, 19 and 24 HU SD smooth, 2.5 times that sharp), slice
thickness 1-5 mm and in-plane pixels 1.5-1.9 mm.  Target of the issue: a PO
difference of at most 2 points per pair (``benchmarks/bench_accuracy.py
--kernel-pairs`` measures 20 pairs against 1 point mean, 2 points worst).
The category is not compared: the healthy pair reads 0.78 % (CT-0) smooth and
1.75 % (CT-1) sharp, within the target but across the 1 % CT-0 boundary.
"""

from __future__ import annotations

import numpy as np
import pytest

from model.lungs import segment_lungs
from model.quantify import Quantification, quantify
from model.volume import CTVolume
from training import SynthSpec, make_phantom

WORST_PO_POINTS = 2.0
VOLUME_FRACTION = 0.02


def _measure(seed: int, involvement: float, thickness_mm: float, rows: int, kernel: str) -> Quantification:
    ph = make_phantom(SynthSpec(seed=seed, involvement=involvement, kernel=kernel, rows=rows,
                                slice_thickness_mm=thickness_mm))
    volume = CTVolume(hu=ph.hu, spacing=ph.spacing, origin=ph.origin, direction=np.eye(3),
                      series_instance_uid="2.25.3",
                      sop_instance_uids=tuple(f"2.25.3.{i}" for i in range(len(ph.hu))),
                      slice_thickness=ph.spacing[0], kernel=kernel)
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
