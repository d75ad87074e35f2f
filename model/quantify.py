"""Lung volumes, percentage of opacity and the MosMedData category.

Implementation owned by the analysis work; the dataclasses below are the
contract used by the reports and the node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from model.lungs import LungMasks, block_mean, upsample_mask
from model.volume import CTVolume

__all__ = [
    "LungMeasurement",
    "OpacityThresholds",
    "Quantification",
    "category_for",
    "image_noise_hu",
    "quantify",
]


@dataclass(frozen=True)
class OpacityThresholds:
    """HU ranges: opacity (ground glass) and high opacity (consolidation)."""

    opacity_low: float = -700.0
    opacity_high: float = -300.0
    high_opacity_high: float = 100.0


@dataclass(frozen=True)
class LungMeasurement:
    """Measurements of one lung or both lungs together."""

    volume_ml: float
    percent_opacity: float
    """Percentage of the lung volume between ``opacity_low`` and ``high_opacity_high``
    HU (ground glass and consolidation together, as MosMedData counts involvement)."""
    percent_high_opacity: float
    """Percentage of the lung volume above ``opacity_high`` up to ``high_opacity_high`` HU."""


@dataclass(frozen=True, eq=False)
class Quantification:
    """Result of :func:`quantify` for one series."""

    left: LungMeasurement
    right: LungMeasurement
    total: LungMeasurement
    severity_category: str
    """MosMedData CT-0..CT-4 from ``total.percent_opacity``."""
    thresholds: OpacityThresholds
    opacity_mask: np.ndarray
    """Boolean ``(z, y, x)`` mask of opacity voxels inside the lungs (for the SEG)."""
    quality_flags: tuple[str, ...] = ()
    """Human-readable caveats (partial coverage, thick slices, ...)."""


def category_for(percent_opacity: float, normal_below: float = 1.0) -> str:
    """MosMedData category from the percentage of lung involved.

    CT-0 no opacity, CT-1 under 25 %, CT-2 25-50 %, CT-3 50-75 %, CT-4 over 75 %.
    A measured percentage under ``normal_below`` counts as no opacity: partial
    volume at vessel walls and the pleura always leaves a little.
    """
    if percent_opacity < normal_below:
        return "CT-0"
    if percent_opacity < 25.0:
        return "CT-1"
    if percent_opacity < 50.0:
        return "CT-2"
    if percent_opacity < 75.0:
        return "CT-3"
    return "CT-4"


def _reduced(volume: CTVolume, f: int) -> tuple[np.ndarray, float]:
    voxel_ml = volume.spacing[0] * volume.spacing[1] * volume.spacing[2] * f * f / 1000.0
    return block_mean(volume.hu, f), voxel_ml


def _reduce_mask(mask: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return mask
    z, y, x = mask.shape
    y2, x2 = (y // f) * f, (x // f) * f
    return mask[:, :y2, :x2].reshape(z, y2 // f, f, x2 // f, f).mean(axis=(2, 4)) >= 0.5


def _lung_box(mask: np.ndarray, f: int) -> tuple[slice, slice, slice]:
    """Bounding box of the lungs, in-plane edges on multiples of the block size ``f``."""
    if not mask.any():
        return (slice(0, mask.shape[0]), slice(0, mask.shape[1]), slice(0, mask.shape[2]))
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.nonzero(mask.any(axis=other))[0]
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if axis > 0:
            lo = (lo // f) * f
            hi = min(mask.shape[axis], -(-hi // f) * f)
        box.append(slice(lo, hi))
    return box[0], box[1], box[2]


def _measure(mask: np.ndarray, opacity: np.ndarray, high: np.ndarray, voxel_ml: float) -> LungMeasurement:
    n = int(mask.sum())
    if n == 0:
        return LungMeasurement(0.0, 0.0, 0.0)
    return LungMeasurement(
        volume_ml=n * voxel_ml,
        percent_opacity=100.0 * int((opacity & mask).sum()) / n,
        percent_high_opacity=100.0 * int((high & mask).sum()) / n,
    )


def quantify(volume: CTVolume, masks: LungMasks, thresholds: OpacityThresholds = OpacityThresholds(),
             *, normal_below_percent: float = 1.0, grid_mm: float = 1.2,
             vessel_radius_mm: float = 2.5) -> Quantification:
    """Lung volumes, percentage of opacity (PO) and of high opacity (PHO) per lung.

    Measured on a grid of about ``grid_mm`` in-plane (2x2 block means of a
    typical 0.7 mm image), which halves the noise of a sharp kernel so the
    percentages do not depend on the kernel.  Opacity voxels lie in
    ``[opacity_low, high_opacity_high]`` HU; vessels are excluded as far as a
    threshold allows: dense structures thinner than ``vessel_radius_mm``
    (tubes) vanish under a morphological opening, blobs of ground glass or
    consolidation survive it.

    Parameters
    ----------
    volume, masks:
        The HU volume and its lung masks (on the volume's grid).
    thresholds:
        HU ranges of opacity and high opacity.
    normal_below_percent:
        Below this whole-lung PO the category is CT-0.

    Returns
    -------
    Quantification
        Per lung and whole-lung measurements, the MosMedData category, the
        opacity mask on the volume's grid and quality flags.
    """
    f = max(1, int(round(grid_mm / max(volume.spacing[1], volume.spacing[2]))))
    box = _lung_box(masks.both, f)
    sub = CTVolume(hu=volume.hu[box], spacing=volume.spacing, origin=volume.origin,
                   direction=volume.direction, series_instance_uid=volume.series_instance_uid,
                   sop_instance_uids=(), slice_thickness=volume.slice_thickness)
    hu, voxel_ml = _reduced(sub, f)
    left = _reduce_mask(masks.left[box], f)
    right = _reduce_mask(masks.right[box], f)
    lungs = left | right
    dense = lungs & (hu >= thresholds.opacity_low) & (hu <= thresholds.high_opacity_high)
    r_y = max(1, int(round(vessel_radius_mm / (volume.spacing[1] * f))))
    r_z = max(0, int(round(vessel_radius_mm / volume.spacing[0])))
    zz, yy, xx = np.mgrid[-r_z:r_z + 1, -r_y:r_y + 1, -r_y:r_y + 1]
    ball = (xx * xx + yy * yy) / r_y ** 2 + (zz * zz) / max(r_z, 1) ** 2 <= 1.0
    opacity = ndi.binary_opening(dense, structure=ball)
    high = opacity & (hu > thresholds.opacity_high)
    result_l = _measure(left, opacity, high, voxel_ml)
    result_r = _measure(right, opacity, high, voxel_ml)
    total = _measure(lungs, opacity, high, voxel_ml)
    flags = _quality_flags(volume, masks, total)
    opacity_full = np.zeros(volume.shape, dtype=bool)
    opacity_full[box] = upsample_mask(opacity, f, sub.shape)
    opacity_full &= masks.both
    return Quantification(
        left=result_l, right=result_r, total=total,
        severity_category=category_for(total.percent_opacity, normal_below_percent),
        thresholds=thresholds, opacity_mask=opacity_full, quality_flags=tuple(flags),
    )


def image_noise_hu(volume: CTVolume, masks: LungMasks) -> float | None:
    """Noise SD in HU from differences of neighbouring pixels in the lung parenchyma.

    Neighbour differences cancel the anatomy and keep the noise (robust SD of
    the difference / sqrt 2); measured on up to five slices through the lungs.
    """
    zs = np.nonzero(masks.both.any(axis=(1, 2)))[0]
    if zs.size == 0:
        return None
    diffs = []
    for z in zs[np.linspace(0, zs.size - 1, min(5, zs.size)).astype(int)]:
        sl = volume.hu[z].astype(np.float32)
        inner = masks.both[z, :, 1:] & masks.both[z, :, :-1] & (sl[:, 1:] < -600) & (sl[:, :-1] < -600)
        diffs.append((sl[:, 1:] - sl[:, :-1])[inner])
    d = np.concatenate(diffs)
    if d.size < 500:
        return None
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def _quality_flags(volume: CTVolume, masks: LungMasks, total: LungMeasurement) -> list[str]:
    flags = []
    both = masks.both
    if both[0].any() or both[-1].any():
        flags.append("lungs not fully covered by the scan (lung on the first or last slice)")
    if volume.slice_thickness > 5.0:
        flags.append(f"slice thickness {volume.slice_thickness:g} mm is over 5 mm")
    if not 1500.0 <= total.volume_ml <= 9000.0:
        flags.append(f"lung volume {total.volume_ml:.0f} ml is outside the plausible adult range "
                     "(1500-9000 ml)")
    noise = image_noise_hu(volume, masks)
    if noise is not None and noise > 80.0:
        flags.append(f"heavy image noise ({noise:.0f} HU SD in the lung parenchyma)")
    return flags
