"""Lung volumes, percentage of opacity and the MosMedData category.

The dataclasses are the contract used by the reports and the node;
:func:`quantify` measures them (its docstring says how).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

from model import morph
from model.errors import NoLungsError
from model.halo import vessel_halo_mm
from model.lungs import LungMasks, block_mean, slice_group, upsample_mask
from model.volume import CTVolume

__all__ = [
    "LOBES",
    "MIN_SIDE_ML",
    "LobeMeasurement",
    "LungMeasurement",
    "OpacityThresholds",
    "Quantification",
    "QuantifyParams",
    "category_for",
    "ctss_score",
    "image_noise_hu",
    "measure_lobes",
    "quantify",
    "require_lungs",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpacityThresholds:
    """HU ranges: opacity (ground glass) and high opacity (consolidation)."""

    opacity_low: float = -700.0
    opacity_high: float = -300.0
    high_opacity_high: float = 100.0


@dataclass(frozen=True)
class QuantifyParams:
    """Tuning knobs of :func:`quantify` (millimetres, HU)."""

    grid_mm: float = 1.25
    """In-plane voxel size the opacities are classified on (block means)."""
    slice_grid_mm: float = 2.0
    """Thinner slices are averaged in groups to about this thickness before classifying."""
    vessel_radius_mm: float = 5.0
    """Bright structures that vanish under an opening with a disk of this radius are vessels."""
    rim_radius_mm: float | None = None
    """Thinner structures in the opacity range are partial volume; ``None``: 0.45 slice thickness, >= 1.5."""
    min_opacity_mm3: float = 60.0
    """Ground-glass specks smaller than this are noise."""
    ring_fraction: float = 0.35
    """A vessel counts as opacity when this share of the lung around it is opacity."""
    target_noise_hu: float = 15.0
    """The smoothing brings the parenchyma's noise down to about this SD."""
    max_halo_mm: float = 4.0
    """The vessel zone reaches as far as the image's own vessel halo (:mod:`model.halo`), at least
    one grid pixel and at most this far."""
    halo_ring_sd: float = 3.0
    """Next to the vessel zone and along the pleura, the first ring of grid pixels reads denser than
    the lung further in wherever the reconstruction spreads vessels and chest wall into it (a soft
    kernel; a sharp one's overshoot makes it read lower). Where that brings the ring's median within
    this many noise SD (of the smoothed HU) of ``opacity_low``, the ring's threshold is raised by its
    measured excess over the background (:func:`_ring_threshold`); 0: never."""
    max_halo_rim_mm: float = 2.5
    """Where the halo reaches the threshold (a ring's threshold was raised), structures in the opacity
    range thinner than the halo, up to this radius, are its partial volume too (:func:`_opacity`)."""
    extensive_opacity_percent: float = 30.0
    """From this whole-lung PO on, a quality flag says PO may read low: dense disease against
    the mediastinum and in the paravertebral gutters has no air beside it and can stay out of
    the lung mask (``benchmarks/bench_accuracy.py``: within 3 points up to about 30 %
    involvement, 2.4-7.2 points low above, with or without contrast)."""


@dataclass(frozen=True)
class LungMeasurement:
    """Measurements of one lung or both lungs together."""

    volume_ml: float
    percent_opacity: float
    """Percentage of the lung volume between ``opacity_low`` and ``high_opacity_high``
    HU (ground glass and consolidation together, as MosMedData counts involvement)."""
    percent_high_opacity: float
    """Percentage of the lung volume above ``opacity_high`` up to ``high_opacity_high`` HU."""


LOBES: dict[int, str] = {1: "left upper lobe", 2: "left lower lobe", 3: "right upper lobe",
                         4: "right middle lobe", 5: "right lower lobe"}
"""Lobe labels of :attr:`model.lungs.LungMasks.lobes` (lungmask's LTRCLobes) and their names."""


@dataclass(frozen=True)
class LobeMeasurement:
    """Measurements of one lobe and its CT severity score (:func:`ctss_score`)."""

    label: int
    """The lobe's label in :attr:`model.lungs.LungMasks.lobes` (a key of :data:`LOBES`)."""
    measurement: LungMeasurement
    score: int
    """CTSS lobe score 0-5 from ``measurement.percent_opacity``."""

    @property
    def name(self) -> str:
        """``left upper lobe`` ... ``right lower lobe``."""
        return LOBES[self.label]


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
    noise_hu: float | None = None
    """Noise SD in the lung parenchyma (HU), when it could be measured."""
    vessel_halo_mm: float | None = None
    """How far the vessels' partial-volume halo stays above the ground-glass threshold (mm), as
    measured by :func:`model.halo.vessel_halo_mm`; ``None``: not measurable, or not used because
    the opacity is extensive (:attr:`QuantifyParams.extensive_opacity_percent`), where the halo is
    partly disease; one grid pixel is used then."""
    lobes: tuple[LobeMeasurement, ...] = ()
    """The five lobes in label order when a lobe model made the masks; empty: no lobes."""

    @property
    def ctss(self) -> int | None:
        """CT severity score 0-25: the sum of the lobes' scores; ``None`` without lobes."""
        return sum(lobe.score for lobe in self.lobes) if self.lobes else None


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


def ctss_score(percent_opacity: float, normal_below: float = 1.0) -> int:
    """CT severity score of one lobe, 0-5, from its percentage of opacity (PO).

    Pan et al., Radiology 2020: 0 none, 1 under 5 %, 2 5-25 %, 3 26-50 %,
    4 51-75 %, 5 over 75 % of the lobe involved.  The published bins are in
    whole percent; on a continuous PO the boundaries are: 0 when PO is 0 or
    below ``normal_below`` (the node's ``normal_below_percent``, as for
    CT-0: partial volume at vessels and the pleura always leaves a little),
    1 from there to under 5, 2 from 5 up to and including 25, 3 over 25 up to
    and including 50, 4 over 50 up to and including 75, 5 over 75.
    """
    if percent_opacity <= 0.0 or percent_opacity < normal_below:
        return 0
    if percent_opacity < 5.0:
        return 1
    for score, upper in ((2, 25.0), (3, 50.0), (4, 75.0)):
        if percent_opacity <= upper:
            return score
    return 5


def measure_lobes(lobes: np.ndarray, opacity: np.ndarray, high_opacity: np.ndarray, voxel_ml: float,
                  *, f: int = 1, fz: int = 1, normal_below_percent: float = 1.0
                  ) -> tuple[LobeMeasurement, ...]:
    """Volume, PO, PHO and CTSS score of each of the five lobes.

    Counted as :func:`quantify` counts the lungs: the lobe's full-resolution
    voxels, each with the opacity flags of its block of the measurement grid.

    Parameters
    ----------
    lobes:
        ``uint8`` label volume (:data:`LOBES`, 0 elsewhere), ``(z, y, x)``.
    opacity, high_opacity:
        Boolean opacity and high-opacity flags on the grid of ``fz x f x f``
        blocks of ``lobes`` (with ``f = fz = 1``: the same grid).
    voxel_ml:
        Volume of one voxel of ``lobes``.
    normal_below_percent:
        A lobe's PO under this scores 0 (:func:`ctss_score`).

    Returns
    -------
    tuple of LobeMeasurement
        All five lobes in label order; a lobe without voxels has volume 0 and score 0.
    """
    out = []
    for label in LOBES:
        counts, _ = _block_counts(lobes == label, f, fz)
        m = _measure(counts, opacity, high_opacity, voxel_ml)
        out.append(LobeMeasurement(label=label, measurement=m,
                                   score=ctss_score(m.percent_opacity, normal_below_percent)))
    return tuple(out)


def _lung_box(masks: LungMasks, f: int, fz: int) -> tuple[slice, slice, slice]:
    """A box around the lungs on the measurement grid: edges on multiples of ``f`` in-plane and of
    ``fz`` in z (so the blocks, and the numbers, do not depend on how tight the box is).

    The segmentation's box when the masks carry one; else per mask and axis a
    reduction (no full-size union is made).
    """
    shape = masks.left.shape
    if masks.box is not None:
        spans = [(b.start or 0, shape[axis] if b.stop is None else b.stop)
                 for axis, b in enumerate(masks.box)]
    else:
        spans = []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            idx = np.nonzero(np.logical_or.reduce([m.any(axis=other) for m in (masks.left, masks.right)]))[0]
            if idx.size == 0:
                return (slice(0, 0), slice(0, 0), slice(0, 0))
            spans.append((int(idx[0]), int(idx[-1]) + 1))
    box = []
    for axis, (lo, hi) in enumerate(spans):
        step = fz if axis == 0 else f
        lo = (lo // step) * step
        hi = min(shape[axis] if axis == 0 else (shape[axis] // f) * f, -(-hi // step) * step)
        box.append(slice(lo, max(lo, hi)))
    return box[0], box[1], box[2]


def _block_counts(mask: np.ndarray, f: int, fz: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Voxels of ``mask`` in each ``fz x f x f`` block (uint16) and each block's size in voxels.

    The in-plane remainder is left out (as :func:`block_mean` does); a last
    group of fewer slices counts those it has.
    """
    z, y, x = mask.shape
    y2, x2 = (y // f) * f, (x // f) * f
    nz = -(-z // fz)
    m8 = mask.view(np.uint8)
    counts = np.empty((nz, y2 // f, x2 // f), dtype=np.uint16)
    for k in range(nz):
        slab = m8[k * fz:(k + 1) * fz, :y2, :x2]
        total = slab[0] if len(slab) == 1 else np.add.reduce(slab, axis=0, dtype=np.uint16)
        if f == 1:
            counts[k] = total
            continue
        # an area resize by a whole factor is the block mean; times the block's area it is the
        # count, exact in float32 (OpenCV: twice as fast as strided adds)
        mean = cv2.resize(total.astype(np.float32), (x2 // f, y2 // f), interpolation=cv2.INTER_AREA)
        np.rint(mean * (f * f), out=mean)
        counts[k] = mean
    sizes = np.minimum(fz, z - np.arange(nz) * fz)[:, None, None] * (f * f)
    return counts, sizes


def _disk(radius_px: float) -> np.ndarray:
    """A 2D disk of radius ``radius_px`` (fractional radii allowed)."""
    r = max(1, int(np.floor(radius_px)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy * yy + xx * xx) <= radius_px * radius_px + 0.25


def _neighbour_noise(hu: np.ndarray, masks: Sequence[np.ndarray]) -> float | None:
    """Noise SD from differences of neighbouring pixels of normal parenchyma (robust SD / sqrt 2).

    ``masks``: the lung as the union of these (left and right), taken slice by slice.
    """
    zs = np.nonzero(np.logical_or.reduce([m.any(axis=(1, 2)) for m in masks]))[0]
    if zs.size == 0:
        return None
    diffs = []
    for z in zs[np.linspace(0, zs.size - 1, min(7, zs.size)).astype(int)]:
        sl = hu[z].astype(np.float32)
        lung = np.logical_or.reduce([m[z] for m in masks])
        inner = lung[:, 1:] & lung[:, :-1] & (sl[:, 1:] < -600) & (sl[:, :-1] < -600)
        diffs.append((sl[:, 1:] - sl[:, :-1])[inner])
    d = np.concatenate(diffs)
    if d.size < 500:
        return None
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def image_noise_hu(volume: CTVolume, masks: LungMasks) -> float | None:
    """Noise SD in HU from differences of neighbouring pixels in the lung parenchyma.

    Neighbour differences cancel the anatomy and keep the noise; measured on up
    to seven slices through the lungs.  ``None`` when too few pixels qualify.
    """
    return _neighbour_noise(volume.hu, [masks.left, masks.right])


def _smooth_in_lung(hu: np.ndarray, lung: np.ndarray, sigma: float) -> np.ndarray:
    """In-plane Gaussian of the HU inside the lung only (normalised convolution).

    The chest wall and the mediastinum do not bleed into the lung's border, so
    the pleura does not read as a rim of ground glass.
    """
    out = np.empty_like(hu)
    for k in range(hu.shape[0]):
        m = lung[k].astype(np.float32)
        if not m.any():
            out[k] = hu[k]
            continue
        num = morph.gaussian(hu[k] * m, sigma, truncate=2.5)
        den = morph.gaussian(m, sigma, truncate=2.5)
        out[k] = np.where(den > 0.05, num / np.maximum(den, 0.05), hu[k])
    return out


def _opacity(hu: np.ndarray, lung: np.ndarray, thresholds: OpacityThresholds, params: QuantifyParams,
             pixel_mm: float, voxel_mm3: float, sigma: float, rim_mm: float, halo_px: float,
             ring_noise_hu: float | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """Opacity and high-opacity masks on the reduced grid (steps: :func:`quantify`), and whether a
    ring's threshold was raised.

    ``ring_noise_hu``: the noise SD of the smoothed HU; given, the threshold is raised in the first
    ring around the vessel zone and inside the pleura (:func:`_ring_threshold`). Where it is, the
    halo reaches the threshold, and structures in the opacity range thinner than the halo (the rim
    test at the halo's radius, up to ``max_halo_rim_mm``) are partial volume too: small vessels a
    soft kernel has spread below ``opacity_high`` and widened beyond the rim radius. They are left out
    of the ground glass but not widened by the halo (widening them, or using the halo as the rim
    radius everywhere, also took the edges of ground-glass patches).
    """
    light = _smooth_in_lung(hu, lung, 0.7)
    bright = lung & (light > thresholds.opacity_high)
    blobs = morph.opening(bright, _disk(params.vessel_radius_mm / pixel_mm))
    solid = blobs & (light <= thresholds.high_opacity_high)
    dense = lung & (light >= thresholds.opacity_low)
    thin = dense & ~morph.opening(dense, _disk(rim_mm / pixel_mm))
    vessel_zone = morph.dilate((bright & ~blobs) | thin, _disk(halo_px)) & lung
    # a vessel filled with contrast reads above high_opacity_high; inside ground glass it is involved
    # lung all the same (as an unenhanced one is)
    in_range = vessel_zone & (light >= thresholds.opacity_low)
    del light, bright, blobs, thin
    support = lung & ~vessel_zone
    smooth = _smooth_in_lung(hu, support, sigma)
    low: np.ndarray | None = None
    if ring_noise_hu is not None and params.halo_ring_sd > 0.0:
        low = _ring_threshold(smooth, support, vessel_zone, lung, thresholds.opacity_low,
                              params.halo_ring_sd * ring_noise_hu)
    faint = support & (smooth >= (thresholds.opacity_low if low is None else low)) & (
        smooth <= thresholds.opacity_high)
    del smooth
    if low is not None:
        halo_rim = max(rim_mm, min(params.max_halo_rim_mm, halo_px * pixel_mm))
        halo_thin = dense & ~morph.opening(dense, _disk(halo_rim / pixel_mm)) & ~vessel_zone
        faint &= ~halo_thin
        in_range |= halo_thin
    del dense
    lab, n = ndi.label(faint)
    specks = np.bincount(lab.ravel(), minlength=n + 1) * voxel_mm3 < params.min_opacity_mm3
    specks[0] = False
    faint &= ~specks[lab]
    del lab
    opacity = faint | solid
    return opacity | _surrounded(in_range, opacity, lung, params.ring_fraction), solid, low is not None


_RING_QUANTILE = 20.0
"""Ring and background are compared at this percentile: below the ground glass that disease adds
to a ring (peripheral disease lines the pleura), so the comparison is of normal lung."""


def _ring_threshold(smooth: np.ndarray, support: np.ndarray, zone: np.ndarray, lung: np.ndarray,
                    level: float, margin: float) -> np.ndarray | None:
    """Per-pixel ground-glass threshold: ``level``, raised in the first ring of pixels around the
    vessel zone and in the first inside the pleura by how much that ring reads above the background.

    Measured on ``smooth`` (the HU as classified): each ring's 20th percentile against that of the
    lung more than one pixel from both (the background). A soft kernel spreads vessels and the
    chest wall into these rings; on coarse pixels (1.8-2 mm) neither the vessel zone nor the rim test
    can cover the part of a pixel that the spread reaches, and over dense lung the ring then reads as
    ground glass. Raising the ring's threshold by its excess keeps its false-positive rate that of
    the background. Only where it matters: when the ring's median comes within ``margin`` HU of
    ``level`` (:attr:`QuantifyParams.halo_ring_sd` noise SD: the ring's normal lung then reaches the
    threshold); elsewhere the ring keeps ``level`` and its ground glass. A ring that reads lower (a
    sharp kernel's overshoot) keeps ``level``. ``None``: no ring raised.
    """
    out = np.full(smooth.shape, level, np.float32)
    ring_v = np.zeros(smooth.shape, bool)
    ring_b = np.zeros(smooth.shape, bool)
    for k in np.nonzero(support.any(axis=(1, 2)))[0]:
        # distance in grid pixels; the first ring is the 8-neighbourhood (distance 1 and 1.41)
        dv = cv2.distanceTransform((~zone[k]).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        db = cv2.distanceTransform(lung[k].view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        ring_v[k] = (dv >= 0.5) & (dv < 1.5)
        ring_b[k] = (db >= 0.5) & (db < 1.5)
    bg = support & ~ring_v & ~ring_b
    ring_b &= ~zone
    if np.count_nonzero(bg) < 500:
        return None
    base = float(np.percentile(smooth[bg], _RING_QUANTILE))
    raised = False
    for ring in (ring_v, ring_b):
        values = smooth[ring & support]
        if values.size < 200:
            continue
        low, median = (float(v) for v in np.percentile(values, [_RING_QUANTILE, 50.0]))
        excess = low - base
        if excess > 0.0 and median + margin >= level:
            out[ring] = np.maximum(out[ring], level + excess)
            raised = True
    return out if raised else None


def _surrounded(zone: np.ndarray, opacity: np.ndarray, lung: np.ndarray, fraction: float) -> np.ndarray:
    """Parts of ``zone`` (connected within a slice) whose surrounding ring is mostly opacity.

    A vessel inside ground glass is involved lung (MosMedData counts it); one
    in normal lung with a fleck of partial volume beside it is not.
    """
    # per slice: 4-connected parts (numbered on from the slices before) and the largest part
    # number within a 4-neighbourhood (OpenCV's dilation of the numbers as float32: exact below 2**24)
    lab = np.zeros(zone.shape, dtype=np.int32)
    ring_lab = np.zeros(zone.shape, dtype=np.int32)
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    n = 0
    for k in np.nonzero(zone.any(axis=(1, 2)))[0]:
        count, lab_k = cv2.connectedComponents(zone[k].view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
        if count <= 1:
            continue
        lab[k] = np.where(lab_k > 0, lab_k + n, 0)
        ring_lab[k] = cv2.dilate(lab[k].astype(np.float32), cross)
        n += count - 1
    if n == 0:
        return zone
    ring = lung & (lab == 0) & (ring_lab > 0)
    ids = ring_lab[ring]
    total = np.bincount(ids, minlength=n + 1)
    involved = np.bincount(ids, weights=opacity[ring], minlength=n + 1)
    keep = involved >= fraction * np.maximum(total, 1)
    keep[0] = False
    return keep[lab]


def _measure(counts: np.ndarray, opacity: np.ndarray, high: np.ndarray, voxel_ml: float) -> LungMeasurement:
    """Volume and percentages from the lung voxels per reduced voxel and its opacity flags.

    Equals counting on the full-resolution mask with the flags upsampled to it:
    a flag holds for every voxel of its block.
    """
    n = int(counts.sum(dtype=np.int64))
    if n == 0:
        return LungMeasurement(0.0, 0.0, 0.0)
    return LungMeasurement(
        volume_ml=n * voxel_ml,
        percent_opacity=100.0 * int(counts[opacity].sum(dtype=np.int64)) / n,
        percent_high_opacity=100.0 * int(counts[high].sum(dtype=np.int64)) / n,
    )


def quantify(volume: CTVolume, masks: LungMasks, thresholds: OpacityThresholds = OpacityThresholds(),
             *, normal_below_percent: float = 1.0, params: QuantifyParams = QuantifyParams()
             ) -> Quantification:
    """Lung volumes, percentage of opacity (PO) and of high opacity (PHO) per lung.

    Method, on the lungs' bounding box at about ``params.grid_mm`` in-plane
    (block means of the image):

    - kernel independence: the HU are smoothed in-plane inside the lungs only
      (normalised convolution, so the chest wall does not bleed into the
      lung's border), with a Gaussian whose width follows the noise measured
      in the parenchyma (down to about ``target_noise_hu``): a sharp kernel
      (B70f) is smoothed more than a smooth one (B40f) and both read alike;
    - vessels: voxels above ``opacity_high`` that vanish under an in-plane
      opening with a disk of ``vessel_radius_mm`` are thin bright tubes
      (vessels, bronchial walls); structures in the opacity range thinner than
      the rim radius (``rim_radius_mm``, by default 0.45 slice thickness and at
      least 1.5 mm: thick slices smear oblique vessels into faint bands) are
      partial volume of vessels, fissures and pleura.  Both, with a halo as
      wide as the image's own (:func:`model.halo.vessel_halo_mm`: a smooth
      kernel spreads vessels wider than a sharp one; at least one grid voxel,
      at most ``max_halo_mm``), are not opacity, unless their surrounding ring is mostly opacity
      (``ring_fraction``): a vessel inside ground glass is involved lung,
      whether or not it is filled with contrast.  Bright regions wider than
      the disk (consolidation, a tumour) stay;
    - ground glass: voxels in ``[opacity_low, opacity_high]`` outside the
      vessel zone, less specks under ``min_opacity_mm3``;
    - halo rings (with a measured halo, under ``extensive_opacity_percent``):
      where the first ring of pixels around the vessel zone or inside the
      pleura reads denser than the background, with its median within
      ``halo_ring_sd`` noise SD of ``opacity_low`` (a soft kernel over dense
      lung), that ring's threshold rises by its excess and
      structures thinner than the halo are left out of the ground glass
      (:func:`_opacity`, :func:`_ring_threshold`): on 1.8-2 mm pixels the
      vessel zone cannot widen by a fraction of a pixel;
    - PO counts ground glass and consolidation (``(opacity_high,
      high_opacity_high]``), as MosMedData counts involvement; PHO the latter.

    Volumes and percentages count the full-resolution lung voxels, each with
    the opacity flags of its block of the reduced grid (per block, so no pass
    over the full volume is needed); ``opacity_mask`` is that upsampling.

    Parameters
    ----------
    volume, masks:
        The HU volume and its lung masks (on the volume's grid).
    thresholds:
        HU ranges of opacity and high opacity.
    normal_below_percent:
        Below this whole-lung PO the category is CT-0.
    params:
        Measurement grid, vessel and rim sizes, smoothing target.

    Returns
    -------
    Quantification
        Per lung and whole-lung measurements, the MosMedData category, the
        opacity mask on the volume's grid and quality flags; with a lobe
        label volume on ``masks`` (a lobe model), the five lobes' measurements
        and CTSS scores (:func:`measure_lobes`) and a flag naming any lobe not found.
    """
    px_mm = max(volume.spacing[1], volume.spacing[2])
    f = max(1, int(round(params.grid_mm / px_mm)))
    fz = slice_group(volume.spacing[0], params.slice_grid_mm)
    box = _lung_box(masks, f, fz)
    opacity_full = np.zeros(volume.shape, dtype=bool)
    noise: float | None = None
    halo: float | None = None
    left_box, right_box = masks.left[box], masks.right[box]
    voxel_ml = volume.voxel_volume_ml
    # left and right do not overlap (segment_lungs gives each voxel to one lung), so the lung
    # voxels of a block are the left's and the right's
    left_n, sizes = _block_counts(left_box, f, fz)
    right_n, _ = _block_counts(right_box, f, fz)
    opacity = high = np.zeros(left_n.shape, dtype=bool)
    lung_n = left_n.astype(np.int64) + right_n
    if lung_n.any():
        hu = block_mean(volume.hu[box], f, fz)
        lung = lung_n * 2 >= sizes
        noise = _neighbour_noise(volume.hu[box], [left_box, right_box])
        q_noise = _neighbour_noise(hu, [lung])
        sigma, smooth_noise = 0.5, None
        if q_noise is not None:  # white-ish noise falls as 1 / (2 sigma sqrt(pi)) under a Gaussian
            sigma = float(np.clip(q_noise / (2.0 * np.sqrt(np.pi) * params.target_noise_hu), 0.5, 2.5))
            smooth_noise = q_noise / (2.0 * np.sqrt(np.pi) * sigma)
        rim_mm = params.rim_radius_mm
        if rim_mm is None:
            rim_mm = max(1.5, 0.45 * max(volume.slice_thickness, volume.spacing[0] * fz))
        voxel_mm3 = volume.spacing[0] * volume.spacing[1] * volume.spacing[2] * f * f * fz
        halo = vessel_halo_mm(volume, masks, level=thresholds.opacity_low, core_hu=thresholds.opacity_high)
        halo_px = 1.0 if halo is None else float(np.clip(halo, 0.0, params.max_halo_mm)) / (px_mm * f)
        opacity, high, raised = _opacity(hu, lung, thresholds, params, px_mm * f, voxel_mm3, sigma,
                                         rim_mm, max(1.0, halo_px),
                                         smooth_noise if halo is not None else None)
        if halo is not None and 100.0 * float((lung_n * opacity).sum()) / float(lung_n.sum()) >= (
                params.extensive_opacity_percent):
            # extensive disease lines the vessels and the pleura too: the measured halo and the rings'
            # excess are then partly disease, and widening the vessel zone by it cost up to 0.8 points
            # at 55-60 % involvement
            halo = None
            if halo_px > 1.0 or raised:  # otherwise the first pass already is the one-voxel one
                opacity, high, _ = _opacity(hu, lung, thresholds, params, px_mm * f, voxel_mm3, sigma,
                                            rim_mm, 1.0)
        del hu, lung
        # the opacity mask on the volume's grid, slice by slice (no full-size temporaries)
        out = opacity_full[box]
        plane = left_box.shape[1:]
        for k in np.nonzero(opacity.any(axis=(1, 2)))[0]:
            marked = upsample_mask(opacity[k], f, plane)
            for z in range(k * fz, min((k + 1) * fz, out.shape[0])):
                out[z] = marked & (left_box[z] | right_box[z])
        logger.debug("series %s: noise %s HU, smoothing sigma %.2f px of %.2f mm, vessel halo %s mm",
                     volume.series_instance_uid, noise, sigma, px_mm * f, halo)
    # counted per block of the reduced grid: the same as counting the full-resolution masks with
    # the opacity flags upsampled to them, without passes over the full volume
    left = _measure(left_n, opacity, high, voxel_ml)
    right = _measure(right_n, opacity, high, voxel_ml)
    total = _measure(lung_n, opacity, high, voxel_ml)
    flags = _quality_flags(volume, masks, total, noise, params)
    lobes: tuple[LobeMeasurement, ...] = ()
    if masks.lobes is not None:
        lobes = measure_lobes(masks.lobes[box], opacity, high, voxel_ml, f=f, fz=fz,
                              normal_below_percent=normal_below_percent)
        missing = [lobe.name for lobe in lobes if lobe.measurement.volume_ml == 0.0]
        if missing:
            flags.append(f"lobes not found: {', '.join(missing)} (scored 0 in the CTSS)")
    return Quantification(
        left=left, right=right, total=total,
        severity_category=category_for(total.percent_opacity, normal_below_percent),
        thresholds=thresholds, opacity_mask=opacity_full, quality_flags=tuple(flags),
        noise_hu=noise, lobes=lobes, vessel_halo_mm=halo,
    )


MIN_SIDE_ML = 150.0
"""A side with less lung than this counts as not found (the classical segmentation's smallest lung
component, :attr:`model.lungs.LungParams.min_lung_ml`; a learned segmenter's stray voxels on the
other side stay below it)."""


def require_lungs(q: Quantification, series_uid: str, *, min_total_ml: float,
                  min_side_ml: float = MIN_SIDE_ML) -> None:
    """Refuse a series whose lungs are too small or one-sided to report a severity for.

    An abdominal CT routed to the node by mistake shows the lung bases (a few
    hundred millilitres) or none; without this check it would come back as
    ``CT-0``.  A scan with one lung only cannot be compared with the
    MosMedData bins, which count both lungs.

    Parameters
    ----------
    q:
        The quantification of the segmented lungs.
    series_uid:
        Named in the message.
    min_total_ml:
        Both lungs together must hold at least this much (``[analysis] min_lung_volume_ml``).
    min_side_ml:
        A side counts as found from this volume on.

    Raises
    ------
    NoLungsError
        Less than ``min_total_ml`` in total, or a side under ``min_side_ml``; the message starts
        ``no lungs in the field of view: <ml> ml found, <sides>``.
    """
    sides = sum(m.volume_ml >= min_side_ml for m in (q.left, q.right))
    total = q.total.volume_ml
    if total >= min_total_ml and sides == 2:
        return
    found = {0: "no side", 1: "one side", 2: "both sides"}[sides]
    why = (f"at least {min_total_ml:.0f} ml of lung are needed ([analysis] min_lung_volume_ml)"
           if total < min_total_ml else f"both lungs are needed (a side counts from {min_side_ml:.0f} ml)")
    raise NoLungsError(
        f"no lungs in the field of view: {total:.0f} ml found, {found} (left {q.left.volume_ml:.0f} ml, "
        f"right {q.right.volume_ml:.0f} ml) in series {series_uid}; {why}. The series may not cover "
        "the chest (an abdominal CT routed here?) or may not be a lung CT; no severity is reported")


def _quality_flags(volume: CTVolume, masks: LungMasks, total: LungMeasurement,
                   noise: float | None, params: QuantifyParams) -> list[str]:
    flags = []
    if any(m[0].any() or m[-1].any() for m in (masks.left, masks.right)):
        flags.append("lungs not fully covered by the scan (lung on the first or last slice)")
    if volume.slice_thickness > 5.0:
        flags.append(f"slice thickness {volume.slice_thickness:g} mm is over 5 mm")
    if not 1500.0 <= total.volume_ml <= 9000.0:
        flags.append(f"lung volume {total.volume_ml:.0f} ml is outside the plausible adult range "
                     "(1500-9000 ml)")
    if noise is not None and noise > 80.0:
        flags.append(f"heavy image noise ({noise:.0f} HU SD in the lung parenchyma)")
    if total.percent_opacity >= params.extensive_opacity_percent:
        flags.append(f"extensive opacity ({total.percent_opacity:.0f} % of the lungs): dense disease "
                     "against the mediastinum or the spine may lie outside the lung mask, so the "
                     "opacity percentages may read low (by up to about 7 points on the "
                     "validation phantoms)")
    return flags
