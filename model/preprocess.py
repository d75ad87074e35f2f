"""Preprocessing shared by training and inference (the one implementation).

Steps, for one study:

1. crop to the bounding box of both lungs (:class:`model.lungs.LungMasks`,
   arrays ``(z, y, x)`` on the volume's grid), grown by ``margin_mm`` of
   physical distance on every side (clipped to the volume);
2. clip to the HU window (default -1000..400) and scale to 0..1;
3. resize to the model's input size (depth, height, width).  Axes that shrink
   are first averaged over the voxels each output voxel covers (area
   interpolation, so a 0.6 mm and a 5 mm series both give the mean over about
   the same physical thickness instead of picking isolated thin slices), then
   axes that grow are interpolated trilinearly.  Because the crop spans the
   lungs in millimetres and is resized to a fixed size, studies of different
   slice spacing, pixel spacing and field of view arrive alike.

The crop, the window and the resampling are symmetric under a left-right
mirror of the volume, so the mirror test-time augmentation of
:mod:`model.inference` is exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.errors import ModelError
from model.lungs import LungMasks
from model.volume import CTVolume

__all__ = [
    "MIN_LUNG_EXTENT_MM",
    "PreprocessConfig",
    "lung_box",
    "preprocess",
    "preprocess_array",
    "resize_volume",
]

logger = logging.getLogger(__name__)

MIN_LUNG_EXTENT_MM: tuple[float, float, float] = (40.0, 40.0, 60.0)
"""Smallest lung bounding box (z, y, x in mm) the severity network accepts; an
adult's lungs span about 200-300 mm in each direction."""


@dataclass(frozen=True)
class PreprocessConfig:
    """How a study becomes the network's input; stored in each model card."""

    input_size: tuple[int, int, int] = (64, 128, 128)
    """Depth, height, width of the network input."""
    window: tuple[float, float] = (-1000.0, 400.0)
    """HU range mapped to 0..1 (values outside are clipped)."""
    margin_mm: float = 5.0
    """Margin around the lungs' bounding box, in mm."""

    def __post_init__(self) -> None:
        if len(self.input_size) != 3 or any(int(s) < 4 for s in self.input_size):
            raise ModelError(f"input_size must be three sizes of at least 4 voxels, not {self.input_size}")
        if len(self.window) != 2 or not self.window[0] < self.window[1]:
            raise ModelError(f"the HU window must be (low, high) with low < high, not {self.window}")
        if self.margin_mm < 0:
            raise ModelError(f"margin_mm must not be negative, not {self.margin_mm}")


def lung_box(mask: np.ndarray, spacing: tuple[float, float, float], margin_mm: float,
             *, series: str = "?") -> tuple[slice, slice, slice]:
    """Bounding box ``(z, y, x)`` of ``mask`` grown by ``margin_mm``.

    Parameters
    ----------
    mask:
        Boolean ``(z, y, x)`` lung mask.
    spacing:
        Voxel size in mm ``(z, y, x)``.
    margin_mm:
        Added on each side (rounded to whole voxels per axis), clipped to the array.
    series:
        Series Instance UID, for messages.

    Raises
    ------
    ModelError
        Empty mask, or lungs smaller than :data:`MIN_LUNG_EXTENT_MM` along an axis.
    """
    if mask.ndim != 3:
        raise ModelError(f"series {series}: the lung mask must be 3D (z, y, x), not {mask.ndim}D")
    if not mask.any():
        raise ModelError(f"series {series}: the lung mask is empty; the severity network needs the lungs "
                         "(check the lung segmentation of this series)")
    box = []
    for axis, name in enumerate("zyx"):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        extent = (hi - lo) * float(spacing[axis])
        if extent < MIN_LUNG_EXTENT_MM[axis]:
            raise ModelError(
                f"series {series}: the lungs span only {extent:.0f} mm along {name} "
                f"({hi - lo} voxels of {spacing[axis]:.2f} mm); the severity network needs at least "
                f"{MIN_LUNG_EXTENT_MM[axis]:.0f} mm: send a series that covers the chest")
        m = int(round(margin_mm / float(spacing[axis])))
        box.append(slice(max(0, lo - m), min(mask.shape[axis], hi + m)))
    return box[0], box[1], box[2]


def resize_volume(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Resize ``(N, C, D, H, W)`` to ``size``: area averaging where an axis shrinks, then
    trilinear interpolation where it grows."""
    shape = tuple(int(s) for s in x.shape[2:])
    target = tuple(int(s) for s in size)
    if shape == target:
        return x
    inter = tuple(min(s, t) for s, t in zip(shape, target, strict=True))
    if inter != shape:
        x = F.interpolate(x, size=inter, mode="area")
    if inter != target:
        x = F.interpolate(x, size=target, mode="trilinear", align_corners=False)
    return x


def preprocess_array(hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float],
                     config: PreprocessConfig = PreprocessConfig(), *, series: str = "?") -> torch.Tensor:
    """The network input ``(1, D, H, W)`` (float32, 0..1) of one HU volume.

    Parameters
    ----------
    hu:
        ``(z, y, x)`` Hounsfield units (any integer or float type).
    mask:
        Boolean lung mask on the same grid (both lungs).
    spacing:
        Voxel size in mm ``(z, y, x)``.
    config:
        Input size, window and margin (from the model card).
    series:
        Series Instance UID, for messages.

    Raises
    ------
    ModelError
        Shapes that differ, an empty or too small lung mask, non-positive
        spacing, or NaN/infinite values inside the lungs' box.
    """
    if hu.ndim != 3:
        raise ModelError(f"series {series}: the volume must be 3D (z, y, x), not {hu.ndim}D")
    if hu.shape != mask.shape:
        raise ModelError(f"series {series}: volume {hu.shape} and lung mask {mask.shape} differ in shape; "
                         "the masks must come from this volume")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ModelError(f"series {series}: voxel spacing {spacing} is not three positive sizes in mm")
    box = lung_box(np.asarray(mask, dtype=bool), spacing, config.margin_mm, series=series)
    low, high = (float(v) for v in config.window)
    raw = np.ascontiguousarray(hu[box])
    if np.issubdtype(raw.dtype, np.integer) and low.is_integer() and high.is_integer():
        # clip in the integer type (no NaN possible), then one conversion to float32
        if raw.dtype.kind == "u" or raw.dtype.itemsize > 4:
            raw = raw.astype(np.int32)  # types torch cannot clamp, or needlessly wide
        crop = torch.from_numpy(raw).clamp_(int(low), int(high)).float()
    else:
        crop = torch.from_numpy(raw.astype(np.float32, copy=False))
        if not bool(torch.isfinite(crop).all()):
            raise ModelError(f"series {series}: the volume holds NaN or infinite values inside the lungs; "
                             "the HU conversion of this series is broken")
        crop = crop.clamp_(low, high)
    # averaging and interpolation are linear: scaling the small output equals scaling the crop
    out = resize_volume(crop[None, None], config.input_size)[0]
    return out.sub_(low).mul_(1.0 / (high - low)).clamp_(0.0, 1.0)


def preprocess(volume: CTVolume, masks: LungMasks,
               config: PreprocessConfig = PreprocessConfig()) -> torch.Tensor:
    """The network input ``(1, D, H, W)`` of a study: :func:`preprocess_array` on its volume.

    Raises
    ------
    ModelError
        See :func:`preprocess_array`.
    """
    return preprocess_array(volume.hu, masks.both, volume.spacing, config,
                            series=volume.series_instance_uid)
