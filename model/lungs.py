"""Classical lung segmentation (no network weights).

The connectivity work runs on a reduced grid of about ``grid_mm`` in-plane
and ``slice_grid_mm`` between slices (block means over thin slices, then a
light Gaussian in-plane, so sharp and smooth kernels give the same mask).
Steps:

1. body: per slice, the largest soft-tissue region after an opening that
   detaches the table and arms, holes filled; air (below ``air_hu``) counts
   only inside it, so outside air, the air under and inside the table never
   enters;
2. large airways: the trachea is found in the most superior slices as a round
   air region near the body's middle and tracked slice by slice through the
   main bronchi at a strict threshold (``airway_hu``); a branch stops where
   its air region grows beyond an airway's size (the leak guard, where it
   would run into the lung);
3. gas outside the lungs that partial volume joins to them (a gastric bubble
   under the left dome) is removed: dark regions walled by tissue, not lung;
4. lungs: the largest remaining air components (bowel gas lies lower and is
   smaller); one component straddling the midline is split by erosion and
   nearest-seed growth (lungs touching at the anterior junction);
5. holes per slice are filled (vessels, nodules, a tumour inside the lung);
6. the pleura: dense lung against the chest wall (peripheral consolidation)
   is added by :func:`model.pleura.fill_along_pleura` (the convex envelope of
   the air outline seen from the mediastinum, out to the ribs; and, outside
   the front sector, layers between the air and the ribs of nearby slices
   that run between places where the air touches the wall), then by
   :func:`model.pleura.close_radially` (a grey closing of each lung's outline
   radius over angle and height, which bridges dents narrow in either, stops
   at the ribs of nearby slices and leaves the medial side alone); a closing
   of ``pleura_close_mm`` smooths the outline and holes are filled again;
7. the reduced-grid masks are refined at full resolution within one reduced
   voxel of their outline (air on the lightly smoothed image is lung there,
   as is dense tissue the steps above took in), and left and right are named
   from patient x (LPS, via the volume's direction cosines and origin).

Known limits (``benchmarks/bench_accuracy.py`` measures them): consolidation
against the mediastinum or filling the paravertebral gutter has no air beside
it to bridge and is left out, so the measured involvement reads low above
about 35 % involvement; so is a basal crescent that is dense over its whole
depth.  The alternatives measured and not kept are in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage as ndi

from model import morph
from model.errors import NoLungsError
from model.pleura import close_radially, fill_along_pleura
from model.volume import CTVolume

__all__ = ["LungMasks", "LungParams", "SegmentationMethod", "block_mean", "expand_slices",
           "segment_lungs", "slice_group",
           "upsample_mask", "work_grid_factors"]

logger = logging.getLogger(__name__)

_SQUARE = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class SegmentationMethod:
    """The segmenter that made a :class:`LungMasks`, as the results name it.

    ``name`` is ``"classical"`` (:func:`segment_lungs`) or ``"lungmask"``
    (:mod:`model.learned_lungs`); ``model`` and ``weights_sha256`` name the
    network and its weights file; ``note`` says why this method ran where a
    choice was made (``method = "auto"``, a fallback).
    """

    name: str = "classical"
    model: str | None = None
    weights_sha256: str | None = None
    note: str | None = None

    def parameters(self) -> list[str]:
        """The method as algorithm parameters (TID 4019 TEXT items) of the SR."""
        out = [f"lung segmentation {self.name}" + (f" {self.model}" if self.model else "")]
        if self.weights_sha256:
            out.append(f"lung segmentation weights sha256={self.weights_sha256}")
        if self.note:
            out.append(f"lung segmentation: {self.note}")
        return out

    def describe(self) -> str:
        """One line: ``classical`` or ``lungmask R231 (weights sha256 d5d2fc3d...)``."""
        text = self.name if self.model is None else f"{self.name} {self.model}"
        if self.weights_sha256:
            text += f" (weights sha256 {self.weights_sha256})"
        return text


@dataclass(frozen=True, eq=False)
class LungMasks:
    """Boolean masks on the volume's grid ``(z, y, x)``.

    ``left`` is the patient's left lung (image right on a standard axial view,
    larger patient x in LPS).
    """

    left: np.ndarray
    right: np.ndarray
    box: tuple[slice, slice, slice] | None = None
    """A box (z, y, x slices) that holds every voxel of both masks, when the segmentation knows
    one (it saves the quantification a pass over the masks); ``None``: not known."""
    method: SegmentationMethod = field(default_factory=lambda: SegmentationMethod())
    """Which segmenter made the masks (classical, or lungmask with its model and weights)."""
    lobes: np.ndarray | None = None
    """``uint8`` label volume on the volume's grid when a lobe model made the masks (lungmask's
    LTRCLobes labels: 1 left upper, 2 left lower, 3 right upper, 4 right middle, 5 right lower
    lobe, 0 elsewhere); ``None``: no lobes."""
    segments: np.ndarray | None = None
    """The segment-major ``(3 + lobes with voxels, z, y, x)`` bool stack of the DICOM SEG's
    segments when the analysis arranged one (:func:`node.pipeline.analyse`): ``left`` and
    ``right`` are its layers 0 and 1, the quantification's opacity mask layer 2, the lobes with
    voxels (in label order) layers 3, ...; the SEG is built from it without a copy
    (:func:`node.stages.reports.seg.build_segmentation`).  ``None``: separate arrays."""

    @property
    def both(self) -> np.ndarray:
        return self.left | self.right


@dataclass(frozen=True)
class LungParams:
    """Tuning knobs of :func:`segment_lungs` (HU, millimetres, millilitres)."""

    grid_mm: float = 2.0
    """In-plane voxel size of the reduced grid used for connectivity."""
    slice_grid_mm: float = 3.0
    """Thinner slices are averaged in groups to about this thickness on the reduced grid (3 mm: as
    accurate as 2.5 mm over the accuracy benchmark's seeds, segmentation 1.8 times faster)."""
    smooth_px: float = 0.7
    """In-plane Gaussian sigma on the reduced grid, in its voxels."""
    air_hu: float = -400.0
    """Air-like voxels (lung, airways, gas) lie below this on the smoothed image."""
    body_hu: float = -500.0
    """Soft tissue of the body outline lies above this."""
    table_gap_mm: float = 4.0
    """Radius of the opening that detaches the table (and arms) from the body outline."""
    bone_hu: float = 250.0
    """Ribs lie above this (the pleural step)."""
    rib_hu: float = 150.0
    """Thin ribs on the reduced grid lie above this (where the radial closing stops)."""
    airway_hu: float = -950.0
    """Strict threshold of airway lumen and of gas pockets."""
    min_gas_ml: float = 5.0
    """Gas pockets walled by tissue from this size on are removed (stomach, bowel)."""
    max_airway_cm2: float = 8.0
    """A tracked airway region larger than this on a slice has joined the lung: the branch stops."""
    min_lung_ml: float = 150.0
    """A component smaller than this is not a lung."""
    wall_touch_mm: float = 8.0
    """Air this close to a rib reaches the chest wall."""
    max_gap_deg: float = 100.0
    """Widest angular gap between wall contacts that is filled along the pleura."""
    pleura_close_mm: float = 4.0
    """Radius of the in-plane closing that smooths the outline after the pleural step."""
    max_split_erosions: int = 10
    """In-plane erosions tried to separate two lungs that touch."""


def work_grid_factors(spacing: tuple[float, float, float], grid_mm: float) -> int:
    """In-plane block size that brings the pixel spacing close to ``grid_mm``."""
    return max(1, int(round(grid_mm / max(spacing[1], spacing[2]))))


def block_mean(hu: np.ndarray, f: int, fz: int = 1) -> np.ndarray:
    """Mean over ``f x f`` in-plane blocks and groups of ``fz`` slices (float32).

    The in-plane remainder is cropped; a last group of fewer slices is the mean
    of those it has.
    """
    if f == 1 and fz == 1:
        return hu.astype(np.float32)
    z, y, x = hu.shape
    y2, x2 = (y // f) * f, (x // f) * f
    nz = -(-z // fz)
    out = np.empty((nz, y2 // f, x2 // f), dtype=np.float32)
    for k in range(nz):  # slab by slab: no full-size float copy of the volume
        slab = hu[k * fz:(k + 1) * fz, :y2, :x2]
        total = slab.sum(axis=0, dtype=np.float32) if slab.shape[0] > 1 else slab[0].astype(np.float32)
        # an area resize by a whole factor is the block mean (OpenCV: twice as fast as strided sums)
        out[k] = cv2.resize(total, (x2 // f, y2 // f), interpolation=cv2.INTER_AREA)
        if slab.shape[0] > 1:
            out[k] *= 1.0 / slab.shape[0]
    return out


def slice_group(spacing_z: float, slice_grid_mm: float) -> int:
    """How many slices the reduced grid averages (1 for slices of ``slice_grid_mm`` or thicker)."""
    return max(1, int(round(slice_grid_mm / max(spacing_z, 1e-3))))


def expand_slices(mask: np.ndarray, fz: int, n: int) -> np.ndarray:
    """Repeat each slice of a reduced mask ``fz`` times, cut to ``n`` slices."""
    return mask if fz == 1 else mask.repeat(fz, axis=0)[:n]


def upsample_mask(mask: np.ndarray, f: int, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour upsampling of a block-reduced mask back to ``shape`` (2D or 3D)."""
    if f == 1:
        return mask.copy()
    up = np.zeros(shape, dtype=bool)
    rep = mask.repeat(f, axis=-2).repeat(f, axis=-1)
    up[..., : rep.shape[-2], : rep.shape[-1]] = rep
    return up


_disk = morph.disk


_fill_holes = morph.fill_holes


def _padded(op: Callable[..., np.ndarray], mask: np.ndarray, radius_px: int) -> np.ndarray:
    """A morphological ``op`` of :mod:`model.morph` with an in-plane disk, on a copy padded so the
    border does not act."""
    pad = radius_px + 1
    padded = np.pad(mask, ((0, 0), (pad, pad), (pad, pad)))
    return op(padded, _disk(radius_px))[:, pad:-pad, pad:-pad]


def _body(small: np.ndarray, body_hu: float, open_px: int) -> np.ndarray:
    """Per slice: the largest soft-tissue region (the table detached), holes filled."""
    dense = small > body_hu
    core = morph.largest_per_slice(_padded(morph.opening, dense, open_px))
    return _fill_holes(core | _padded(morph.dilate, core, open_px) & dense)


def _airways(small: np.ndarray, inside: np.ndarray, body: np.ndarray, top_first: bool,
             px_cm2: float, params: LungParams) -> np.ndarray:
    """Trachea and main bronchi: seeded in the superior slices, tracked downwards."""
    strict = inside & (small < params.airway_hu)
    order = list(range(small.shape[0]))
    if not top_first:
        order.reverse()  # superior slice first
    max_px = params.max_airway_cm2 / px_cm2
    seed_slice, seed = -1, None
    for k in order[: max(3, len(order) // 8)]:
        if not body[k].any():
            continue
        cols = np.nonzero(body[k].any(axis=0))[0]
        cx, half = (cols[0] + cols[-1]) / 2.0, (cols[-1] - cols[0]) / 2.0
        lab, n = ndi.label(inside[k] & (small[k] < params.airway_hu + 50.0))
        best: tuple[float, int] | None = None
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            if sl is None:
                continue
            area = int((lab[sl] == i).sum())
            h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            xc = (sl[1].start + sl[1].stop) / 2.0
            if not (0.5 / px_cm2 <= area <= max_px and max(h, w) <= 2.5 * min(h, w)
                    and area >= 0.45 * h * w and abs(xc - cx) < 0.25 * half):
                continue
            if best is None or abs(xc - cx) < best[0]:
                best = (abs(xc - cx), i)
        if best is not None:
            seed_slice, seed = k, lab == best[1]
            break
    airway = np.zeros_like(strict)
    if seed is None:
        logger.info("no trachea found in the superior slices; airways stay in the lung mask")
        return airway
    airway[seed_slice] = seed & strict[seed_slice] if (seed & strict[seed_slice]).any() else seed
    prev = airway[seed_slice]
    for k in order[order.index(seed_slice) + 1:]:
        reach = morph.dilate(prev, _disk(2))
        lab, n = ndi.label(strict[k])
        if n == 0:
            break
        ids = np.unique(lab[reach & (lab > 0)])
        if ids.size == 0:
            break
        areas = np.bincount(lab.ravel(), minlength=n + 1)
        keep = ids[areas[ids] <= max_px]
        if keep.size == 0:
            break
        prev = np.isin(lab, keep)
        airway[k] = prev
    return morph.dilate(airway, _SQUARE) & inside


def _gas_pockets(candidate: np.ndarray, small: np.ndarray, voxel_ml: float,
                 params: LungParams) -> np.ndarray:
    """Gas outside the lungs that partial volume joins to them (a gastric bubble under the dome).

    Regions darker than ``airway_hu`` of at least ``min_gas_ml`` whose in-plane
    surroundings (a ring beyond a two-voxel partial-volume rim) are mostly
    tissue: gas in the stomach or bowel is walled by tissue, an emphysematous
    bulla by lung.  Returned with the rim.
    """
    strict = candidate & (small < params.airway_hu)
    lab, n = ndi.label(strict)
    if n == 0:
        return np.zeros_like(candidate)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    big = np.nonzero(sizes * voxel_ml >= params.min_gas_ml)[0]
    big = big[big > 0]
    gas = np.zeros_like(candidate)
    boxes = ndi.find_objects(lab)
    for i in big:
        sl = tuple(slice(max(0, a.start - 2), a.stop + 2) for a in boxes[i - 1])
        comp = lab[sl] == i
        rim = morph.dilate(comp, _SQUARE, iterations=2)
        ring = morph.dilate(rim, _SQUARE) & ~rim
        if np.count_nonzero(ring & (small[sl] > params.air_hu)) > 0.5 * np.count_nonzero(ring):
            gas[sl] |= rim & candidate[sl]
    return gas


def _split(component: np.ndarray, params: LungParams, min_vox: int) -> list[np.ndarray]:
    """Split one air component into two lungs by erosion and nearest-seed growth."""
    eroded = component
    for _ in range(params.max_split_erosions):
        eroded = morph.erode(eroded, _SQUARE)
        lab, n = ndi.label(eroded)
        if n < 2:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        a, b = np.argsort(sizes)[::-1][:2]
        if sizes[b] < max(min_vox // 10, 1):
            continue
        seeds = np.zeros(lab.shape, dtype=np.int8)
        seeds[lab == a] = 1
        seeds[lab == b] = 2
        box = ndi.find_objects(component.astype(np.int8))[0]
        idx = ndi.distance_transform_edt(seeds[box] == 0, return_distances=False, return_indices=True)
        nearest = np.zeros_like(seeds)
        nearest[box] = seeds[box][tuple(idx)]
        return [component & (nearest == 1), component & (nearest == 2)]
    return [component]


def _pick_lungs(candidate: np.ndarray, body: np.ndarray, voxel_ml: float, uid: str,
                params: LungParams) -> list[np.ndarray]:
    """The one or two lung components (split when both lungs form one component)."""
    lab, n = ndi.label(candidate)
    if n == 0:
        raise NoLungsError(
            f"series {uid}: found no air inside the body: no lungs in the field of view; the series "
            "may not cover the chest or may not be a lung CT")
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    min_vox = int(params.min_lung_ml / voxel_ml)
    largest = int(sizes[order[0]])
    if largest < min_vox:
        raise NoLungsError(
            f"series {uid}: found {largest * voxel_ml:.0f} ml of lung at most: no lungs in the field "
            "of view; the series may not cover the chest or may not be a lung CT")
    first = lab == order[0]
    zs = np.nonzero(first.any(axis=(1, 2)))[0]
    for i in order[1:4]:
        if sizes[i] < max(min_vox, 0.15 * largest):
            break
        other = lab == i
        ozs = np.nonzero(other.any(axis=(1, 2)))[0]
        overlap = min(zs[-1], ozs[-1]) - max(zs[0], ozs[0]) + 1
        if overlap >= 0.5 * (ozs[-1] - ozs[0] + 1):  # bowel gas sits below the lungs
            return [first, other]
    cols = np.nonzero(body.any(axis=(0, 1)))[0]
    mid = (cols[0] + cols[-1]) / 2.0
    col_counts = first.sum(axis=(0, 1))
    share = col_counts[: int(mid)].sum() / max(int(col_counts.sum()), 1)
    if 0.15 < share < 0.85:
        parts = _split(first, params, min_vox)
        if len(parts) == 1:
            logger.warning("series %s: lungs could not be separated; split at the body midline", uid)
            a = first.copy()
            a[:, :, int(mid):] = False
            parts = [a, first & ~a]
        return parts
    logger.warning("series %s: one lung found (%.0f ml)", uid, largest * voxel_ml)
    return [first]


def _box(parts: list[np.ndarray], margin: int) -> tuple[slice, slice, slice]:
    """Bounding box of the lungs: their slices, and in-plane ``margin`` voxels around them."""
    any_z = np.logical_or.reduce([p.any(axis=(1, 2)) for p in parts])
    any_y = np.logical_or.reduce([p.any(axis=(0, 2)) for p in parts])
    any_x = np.logical_or.reduce([p.any(axis=(0, 1)) for p in parts])
    out = []
    for axis, flags in enumerate((any_z, any_y, any_x)):
        idx = np.nonzero(flags)[0]
        pad = 0 if axis == 0 else margin
        out.append(slice(max(0, int(idx[0]) - pad), min(flags.size, int(idx[-1]) + 1 + pad)))
    return out[0], out[1], out[2]


def _centroid(mask: np.ndarray) -> tuple[float, float, float]:
    """Centroid ``(z, y, x)`` in voxel indices (every second voxel in-plane suffices)."""
    z, y, x = np.nonzero(mask[:, ::2, ::2])
    return float(z.mean()), 2.0 * float(y.mean()), 2.0 * float(x.mean())


def _patient_x(volume: CTVolume, z: float, y: float, x: float, f: int) -> float:
    """Patient x (LPS) of slice ``z``, row ``y`` and column ``x`` of a grid ``f`` times coarser in-plane."""
    offset = (f - 1) / 2.0  # block centres
    ijk = np.array([(x * f + offset) * volume.spacing[2], (y * f + offset) * volume.spacing[1],
                    z * volume.spacing[0]])
    return float(volume.origin[0] + (volume.direction @ ijk)[0])


def _refine(volume: CTVolume, f: int, fz: int, left_c: np.ndarray, right_c: np.ndarray, taken_c: np.ndarray,
            airway_c: np.ndarray, air_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution masks: the reduced masks, with their outline redrawn on the image.

    Slice ``k`` of the volume takes slice ``k // fz`` of the reduced masks.
    """
    shape = volume.shape
    left = np.zeros(shape, dtype=bool)
    right = np.zeros(shape, dtype=bool)
    both_c = left_c | right_c
    core = morph.erode(both_c, _SQUARE)
    band = morph.dilate(both_c, _SQUARE) & ~core & ~airway_c
    near_left = morph.dilate(left_c, _SQUARE) & ~right_c
    sigma = 0.5 * f
    core_only = core.any(axis=(1, 2)) & ~band.any(axis=(1, 2))
    for kc in range(core.shape[0]):  # one reduced slice, then the fz volume slices it stands for
        ks = range(kc * fz, min((kc + 1) * fz, shape[0]))
        if core_only[kc]:
            for k in ks:
                left[k] = upsample_mask(core[kc] & near_left[kc], f, shape[1:])
                right[k] = upsample_mask(core[kc] & ~near_left[kc], f, shape[1:])
        if not band[kc].any():
            continue
        rows = np.nonzero(band[kc].any(axis=1))[0]
        cols = np.nonzero(band[kc].any(axis=0))[0]
        r0, r1 = rows[0] * f, min(shape[1], (rows[-1] + 1) * f)
        c0, c1 = cols[0] * f, min(shape[2], (cols[-1] + 1) * f)
        part = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        up = (r1 - r0, c1 - c0)
        core_up = upsample_mask(core[kc][part], f, up)
        band_up = upsample_mask(band[kc][part], f, up)
        taken_up = upsample_mask(taken_c[kc][part], f, up)
        is_left = upsample_mask(near_left[kc][part], f, up)
        for k in ks:
            sub = volume.hu[k, r0:r1, c0:c1].astype(np.float32)
            air = morph.gaussian(sub, sigma, truncate=2.0) < air_hu
            lung = core_up | band_up & (air | taken_up)
            left[k, r0:r1, c0:c1] = lung & is_left
            right[k, r0:r1, c0:c1] = lung & ~is_left
    return left, right


def _anterior_angle(volume: CTVolume) -> float | None:
    """In-plane angle ``arctan2(row, column)`` of the patient's anterior (-y in LPS).

    ``None`` when the slices are not axial.
    """
    ant = -np.array([volume.direction[1, 0], volume.direction[1, 1]])  # patient y along columns, rows
    if np.hypot(*ant) < 0.5:
        return None
    return float(np.arctan2(ant[1], ant[0]))


def segment_lungs(volume: CTVolume, *, params: LungParams = LungParams()) -> LungMasks:
    """Segment the left and right lung of a chest CT (method: module docstring).

    Parameters
    ----------
    volume:
        The HU volume with its geometry.
    params:
        Thresholds and sizes; the defaults suit adult chest CT.

    Returns
    -------
    LungMasks
        Boolean masks on the volume's grid; airways above the hilum excluded.

    Raises
    ------
    NoLungsError
        No lung-sized air region inside the body (a :class:`SegmentationError`; the node rejects
        the study with the message).  One lung alone, or lungs smaller than the node's minimum,
        are returned: :func:`model.quantify.require_lungs` decides.
    """
    uid = volume.series_instance_uid
    f = work_grid_factors(volume.spacing, params.grid_mm)
    fz = slice_group(volume.spacing[0], params.slice_grid_mm)
    sy, sx = volume.spacing[1] * f, volume.spacing[2] * f
    sz = volume.spacing[0] * fz
    small = morph.gaussian(block_mean(volume.hu, f, fz), params.smooth_px, truncate=2.5)
    voxel_ml = sz * sy * sx / 1000.0
    body = _body(small, params.body_hu, max(1, int(round(params.table_gap_mm / sy))))
    air = small < params.air_hu
    inside = air & body
    top_first = (volume.direction[2, 2] * volume.spacing[0]) < 0  # index 0 is superior
    airway = _airways(small, inside, body, top_first, sy * sx / 100.0, params)
    candidate = inside & ~airway
    candidate &= ~_gas_pockets(candidate, small, voxel_ml, params)
    parts = _pick_lungs(candidate, body, voxel_ml, uid, params)
    box = _box(parts, margin=int(np.ceil(30.0 / min(sy, sx))))
    crop = [p[box] for p in parts]
    crop = fill_along_pleura([_fill_holes(p) for p in crop], small[box], body[box], (sy, sx),
                             bone_hu=params.bone_hu, touch_mm=params.wall_touch_mm,
                             max_gap_deg=params.max_gap_deg, slice_mm=sz,
                             anterior_angle=_anterior_angle(volume))
    allowed = body[box] & (small[box] < params.bone_hu) & ~airway[box]
    crop = close_radially(crop, allowed, body[box] & (small[box] > params.rib_hu), (sz, sy, sx))
    radius = max(1, int(round(params.pleura_close_mm / sy)))
    crop = [_fill_holes(p | _padded(morph.closing, p, radius)) & ~airway[box] for p in crop]
    if len(crop) == 2:  # a voxel both lungs grew into goes to the one whose air it was
        overlap = crop[0] & crop[1]
        to_second = overlap & parts[1][box]
        crop[0] &= ~to_second
        crop[1] &= ~(overlap & ~to_second)
    for p, c in zip(parts, crop, strict=True):
        p[box] = c
    xs = [_patient_x(volume, c[0] * fz, c[1], c[2], f) for c in map(_centroid, parts)]
    # one lung alone is named by the side of the body's midline it lies on (the lungs' box is that
    # lung's own: its middle would name the side at random)
    body_cols = np.nonzero(body.any(axis=(0, 1)))[0]
    mid_x = _patient_x(volume, 0.0, 0.0, (body_cols[0] + body_cols[-1]) / 2.0, f)
    if len(parts) == 2:
        left_c, right_c = (parts[0], parts[1]) if xs[0] > xs[1] else (parts[1], parts[0])
    else:
        empty = np.zeros_like(parts[0])
        left_c, right_c = (parts[0], empty) if xs[0] > mid_x else (empty, parts[0])
    taken = (left_c | right_c) & ~air
    if f == 1:
        n = volume.shape[0]
        left, right = expand_slices(left_c, fz, n), expand_slices(right_c, fz, n)
    else:
        left, right = _refine(volume, f, fz, left_c, right_c, taken, airway, params.air_hu)
    left_ml, right_ml = (int(np.count_nonzero(m)) * volume.voxel_volume_ml for m in (left, right))
    if left_ml + right_ml < params.min_lung_ml:
        raise NoLungsError(
            f"series {uid}: found {left_ml + right_ml:.0f} ml of lung: no lungs in the field of view; "
            "the series may not cover the chest or may not be a lung CT")
    logger.info("series %s: lungs %.0f ml left, %.0f ml right", uid, left_ml, right_ml)
    # the reduced masks' box; the outline refinement adds at most one reduced voxel in-plane
    small_box = _box([left_c, right_c], margin=1)
    shape = volume.shape
    full_box = (slice(small_box[0].start * fz, min(shape[0], small_box[0].stop * fz)),
                slice(small_box[1].start * f, min(shape[1], small_box[1].stop * f)),
                slice(small_box[2].start * f, min(shape[2], small_box[2].stop * f)))
    return LungMasks(left=left, right=right, box=full_box)
