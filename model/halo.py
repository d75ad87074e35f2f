"""How far the partial-volume halo around the lung's vessels reaches, measured on the image.

A smooth reconstruction kernel (B40f, STANDARD, Philips "B") spreads every
vessel into a wider halo than a sharp one (B70f, LUNG, Philips "L"). Where the
parenchyma is dense (the dependent lung of a supine patient), that halo rises
above the ground-glass threshold and reads as opacity around every vessel:
the smooth series of one acquisition then reads several points higher than
its sharp twin. A fixed exclusion zone around the vessels cannot fit both, so
:func:`vessel_halo_mm` measures the halo of the image at hand: the median HU
of the lung in thin shells at growing distance from the vessels, and the
distance at which it falls below the ground-glass threshold.
:func:`model.quantify.quantify` widens its vessel zone to that distance.
"""

from __future__ import annotations

import cv2
import numpy as np

from model import morph
from model.lungs import LungMasks
from model.volume import CTVolume

__all__ = ["vessel_halo_mm"]

_SHELL_MM = 0.5
_REACH_MM = 6.0
_BACKGROUND_MM = (4.0, 6.0)
_EDGE_MM = 3.0  # lung within this of the pleura is left out: the chest wall has a halo too
_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)  # scipy's default structure


def vessel_halo_mm(volume: CTVolume, masks: LungMasks, *, level: float, core_hu: float,
                   slices: int = 24, margin_hu: float = 30.0) -> float | None:
    """Distance (mm, in-plane) from the vessels at which the lung's median HU falls below ``level``.

    Measured on up to ``slices`` slices through the lungs, on the image's own
    grid: vessel cores are lung pixels above ``core_hu`` (a one-pixel opening
    removes noise); the lung pixels around them are grouped in 0.5 mm shells by
    their distance to the nearest core, out to 6 mm; the crossing of ``level``
    is interpolated between the shells' medians.

    Returns ``None`` when it cannot be measured: too few vessels, or a lung whose
    background (the shells 4-6 mm from the vessels) is within ``margin_hu`` of
    ``level``, as in widespread ground glass, where the halo and the disease
    cannot be told apart.
    """
    lung_z = np.nonzero(masks.left.any(axis=(1, 2)) | masks.right.any(axis=(1, 2)))[0]
    if lung_z.size == 0:
        return None
    spacing = (float(volume.spacing[1]), float(volume.spacing[2]))
    edges = np.arange(_SHELL_MM, _REACH_MM + 1e-6, _SHELL_MM)
    shells: list[list[np.ndarray]] = [[] for _ in range(edges.size - 1)]
    erode = max(1, int(round(_EDGE_MM / min(spacing))))
    # evenly spread and rounded to the nearest slice, so the same study stored in the other slice order
    # is measured on the same slices
    picks = np.unique(np.round(np.linspace(0, lung_z.size - 1, min(slices, lung_z.size))).astype(int))
    for z in lung_z[picks]:
        lung = masks.left[z] | masks.right[z]
        ys, xs = np.nonzero(lung)
        box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        lung = lung[box]
        hu = volume.hu[z][box].astype(np.float32)
        # OpenCV through model.morph: scipy's erosion, opening and distance took 12 ms a slice
        inner = morph.erode(lung, _CROSS, iterations=erode)
        cores = morph.opening(lung & (hu > core_hu), _CROSS)
        if not cores.any() or not inner.any():
            continue
        # Euclidean distance in pixels (in-plane pixels are square in CT), then in mm
        pixels = cv2.distanceTransform((~cores).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        distance = np.asarray(pixels, dtype=np.float32) * np.float32((spacing[0] + spacing[1]) / 2.0)
        around = inner & ~cores
        index = np.searchsorted(edges, distance[around], side="left") - 1
        values = hu[around]
        for i in range(len(shells)):
            shells[i].append(values[index == i])
    medians = []
    for parts in shells:
        v = np.concatenate(parts) if parts else np.empty(0, np.float32)
        medians.append(float(np.median(v)) if v.size >= 50 else np.nan)
    centres = (edges[:-1] + edges[1:]) / 2.0
    profile = np.array(medians)
    far = (centres >= _BACKGROUND_MM[0]) & (centres <= _BACKGROUND_MM[1]) & np.isfinite(profile)
    if not far.any() or float(np.median(profile[far])) > level - margin_hu:
        return None
    known = np.isfinite(profile)
    centres, profile = centres[known], profile[known]
    below = np.nonzero(profile < level)[0]
    if below.size == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(centres[0])
    # linear between the last shell above the level and the first below it
    t = (profile[i - 1] - level) / (profile[i - 1] - profile[i])
    return float(centres[i - 1] + t * (centres[i] - centres[i - 1]))
