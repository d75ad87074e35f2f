"""Classical lung segmentation (no network weights).

Method, on a reduced grid of about 2.5 mm voxels (block means, which also
smooth sharp-kernel noise so both kernels give the same mask):

1. air-like voxels: below ``air_hu`` (-400 HU);
2. remove air connected to the in-plane border of the image (outside the body,
   under the table) and keep air inside the body;
3. remove the large airways: the trachea is found in the most superior slices
   as a small round air region near the middle, and grown at a strict
   threshold (``airway_hu``, -950 HU) through the trachea and main bronchi
   with a volume guard against leaking into the parenchyma;
4. keep the two lungs: the largest air components; when both lungs form one
   component (touching at the anterior junction), erode until they separate
   and give each voxel back to the nearest seed;
5. fill holes slice by slice and close along the pleura (a 2D closing of
   ``pleura_close_mm``) so vessels, tumours and consolidation at the lung
   border stay inside the lung;
6. upsample to the volume's grid; left and right from patient x (LPS, via the
   volume's direction cosines).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from model.errors import SegmentationError
from model.volume import CTVolume

__all__ = ["LungMasks", "LungParams", "segment_lungs", "work_grid_factors"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LungMasks:
    """Boolean masks on the volume's grid ``(z, y, x)``.

    ``left`` is the patient's left lung (image right on a standard axial view,
    larger patient x in LPS).
    """

    left: np.ndarray
    right: np.ndarray

    @property
    def both(self) -> np.ndarray:
        return self.left | self.right


@dataclass(frozen=True)
class LungParams:
    """Tuning knobs of :func:`segment_lungs`."""

    grid_mm: float = 2.5
    """In-plane voxel size of the reduced grid used for connectivity."""
    air_hu: float = -400.0
    airway_hu: float = -950.0
    max_airway_ml: float = 250.0
    """Region growing of the airways stops (and is discarded) beyond this volume."""
    min_lung_ml: float = 150.0
    """A component smaller than this is not a lung."""
    pleura_close_mm: float = 10.0
    max_split_erosions: int = 8


def work_grid_factors(spacing: tuple[float, float, float], grid_mm: float) -> int:
    """In-plane block size that brings the pixel spacing close to ``grid_mm``."""
    return max(1, int(round(grid_mm / max(spacing[1], spacing[2]))))


def block_mean(hu: np.ndarray, f: int) -> np.ndarray:
    """Mean over ``f x f`` in-plane blocks (float32), cropping the remainder."""
    if f == 1:
        return hu.astype(np.float32)
    z, y, x = hu.shape
    y2, x2 = (y // f) * f, (x // f) * f
    out = np.empty((z, y2 // f, x2 // f), dtype=np.float32)
    for k in range(z):  # slice by slice keeps the float copy small
        out[k] = hu[k, :y2, :x2].reshape(y2 // f, f, x2 // f, f).mean(axis=(1, 3), dtype=np.float32)
    return out


def upsample_mask(mask: np.ndarray, f: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a block-reduced mask back to ``shape``."""
    if f == 1:
        return mask.copy()
    up = np.zeros(shape, dtype=bool)
    rep = mask.repeat(f, axis=1).repeat(f, axis=2)
    up[:, : rep.shape[1], : rep.shape[2]] = rep
    return up


def _disk(radius: int) -> np.ndarray:
    r = max(radius, 1)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy * yy + xx * xx) <= r * r


def _outside_air(air: np.ndarray) -> np.ndarray:
    """Air connected to the in-plane border of each slice (outside the body)."""
    outside = np.zeros_like(air)
    for k in range(air.shape[0]):
        lab, n = ndi.label(air[k])
        if n == 0:
            continue
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        border = border[border > 0]
        outside[k] = np.isin(lab, border)
    return outside


def _airways(small: np.ndarray, inside_air: np.ndarray, voxel_ml: float,
             params: LungParams) -> np.ndarray:
    """The trachea and main bronchi, grown from a seed in the superior slices."""
    strict = inside_air & (small < params.airway_hu)
    z_top = small.shape[0] - 1
    cy, cx = small.shape[1] / 2.0, small.shape[2] / 2.0
    for k in range(z_top, max(z_top - 8, -1), -1):
        lab, n = ndi.label(strict[k])
        best = None
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            if sl is None:
                continue
            comp = lab[sl] == i
            area_px = int(comp.sum())
            yc = (sl[0].start + sl[0].stop) / 2.0
            xc = (sl[1].start + sl[1].stop) / 2.0
            # a trachea: small, round, within the middle third left-right
            if not 3 <= area_px <= 400 or abs(xc - cx) > small.shape[2] / 6:
                continue
            h = sl[0].stop - sl[0].start
            w = sl[1].stop - sl[1].start
            if max(h, w) > 3 * min(h, w):
                continue
            score = abs(xc - cx) + 0.5 * abs(yc - cy)
            if best is None or score < best[0]:
                best = (score, i)
        if best is None:
            continue
        seed = np.zeros_like(strict)
        seed[k] = lab == best[1]
        lab3, _ = ndi.label(strict)
        ids = np.unique(lab3[seed])
        ids = ids[ids > 0]
        grown = np.isin(lab3, ids)
        if grown.sum() * voxel_ml > params.max_airway_ml:
            logger.info("airway growing leaked (%.0f ml); airways kept in the lung mask",
                        grown.sum() * voxel_ml)
            return np.zeros_like(strict)
        return ndi.binary_dilation(grown, iterations=1) & inside_air
    return np.zeros_like(strict)


def _split(component: np.ndarray, params: LungParams, min_vox: int) -> list[np.ndarray]:
    """Split one air component into two lungs by erosion and nearest-seed growth."""
    eroded = component
    for _ in range(params.max_split_erosions):
        eroded = ndi.binary_erosion(eroded, structure=np.ones((1, 3, 3), bool))
        lab, n = ndi.label(eroded)
        if n >= 2:
            sizes = ndi.sum_labels(np.ones_like(lab), lab, range(1, n + 1))
            order = np.argsort(sizes)[::-1]
            if sizes[order[1]] >= max(min_vox // 8, 1):
                seeds = np.zeros(lab.shape, dtype=np.int8)
                seeds[lab == order[0] + 1] = 1
                seeds[lab == order[1] + 1] = 2
                _, idx = ndi.distance_transform_edt(seeds == 0, return_indices=True)
                nearest = seeds[tuple(idx)]
                return [component & (nearest == 1), component & (nearest == 2)]
    return [component]


def _close_and_fill(mask: np.ndarray, radius_px: int) -> np.ndarray:
    out = np.zeros_like(mask)
    disk = _disk(radius_px)
    pad = radius_px + 1
    for k in range(mask.shape[0]):
        if not mask[k].any():
            continue
        sl = np.pad(mask[k], pad)
        closed = ndi.binary_closing(sl, structure=disk)[pad:-pad, pad:-pad]
        out[k] = ndi.binary_fill_holes(closed | mask[k])
    return out


def segment_lungs(volume: CTVolume, *, params: LungParams = LungParams()) -> LungMasks:
    """Segment the left and right lung of a chest CT.

    Parameters
    ----------
    volume:
        The HU volume with its geometry.
    params:
        Thresholds and sizes; the defaults suit adult chest CT.

    Raises
    ------
    SegmentationError
        No lung-sized air region inside the body.
    """
    f = work_grid_factors(volume.spacing, params.grid_mm)
    small = block_mean(volume.hu, f)
    voxel_ml = volume.spacing[0] * volume.spacing[1] * f * volume.spacing[2] * f / 1000.0
    min_vox = int(params.min_lung_ml / voxel_ml)
    air = small < params.air_hu
    inside = air & ~_outside_air(air)
    airways = _airways(small, inside, voxel_ml, params)
    candidate = inside & ~airways
    lab, n = ndi.label(candidate)
    if n == 0:
        raise SegmentationError(
            f"series {volume.series_instance_uid}: no air inside the body; the series may not "
            "be a chest CT")
    sizes = ndi.sum_labels(np.ones_like(lab), lab, range(1, n + 1))
    order = np.argsort(sizes)[::-1]
    largest = sizes[order[0]]
    if largest < min_vox:
        raise SegmentationError(
            f"series {volume.series_instance_uid}: found {largest * voxel_ml:.0f} ml of lung at "
            f"most; the series may not cover the chest or may not be a lung CT")
    parts = [lab == order[0] + 1]
    if n > 1 and sizes[order[1]] >= max(min_vox, 0.15 * largest):
        parts.append(lab == order[1] + 1)
    else:
        parts = _split(parts[0], params, min_vox)
    radius = max(1, int(round(params.pleura_close_mm / (volume.spacing[1] * f))))
    parts = [_close_and_fill(p, radius) for p in parts]
    # patient x of each part's centroid decides the side
    xs = []
    for p in parts:
        zc, yc, xc = (float(c.mean()) for c in np.nonzero(p))
        ijk = np.array([xc * f, yc * f, zc])  # column, row, slice index
        xs.append(float(volume.origin[0] + (volume.direction @ (ijk * np.array(
            [volume.spacing[2], volume.spacing[1], volume.spacing[0]])))[0]))
    shape = volume.shape
    if len(parts) == 1:
        whole = upsample_mask(parts[0], f, shape)
        logger.warning("series %s: lungs could not be separated; split at the body midline",
                       volume.series_instance_uid)
        cols = np.nonzero(parts[0].any(axis=(0, 1)))[0]
        mid = int((cols.min() + cols.max() + 1) / 2 * f)
        a = whole.copy()
        a[:, :, mid:] = False
        b = whole & ~a
        col_sign = volume.direction[0, 0]
        left, right = (b, a) if col_sign >= 0 else (a, b)
    else:
        a, b = (upsample_mask(p, f, shape) for p in parts)
        left, right = (a, b) if xs[0] > xs[1] else (b, a)
    left &= ~right
    logger.info("series %s: lungs %.0f ml left, %.0f ml right", volume.series_instance_uid,
                left.sum() * volume.voxel_volume_ml, right.sum() * volume.voxel_volume_ml)
    return LungMasks(left=left, right=right)
