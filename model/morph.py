"""In-plane image operations on ``(z, y, x)`` stacks, slice by slice with OpenCV.

The lung segmentation and the opacity measurement spend most of their time in
binary morphology with disks, Gaussian smoothing and per-slice hole filling.
``scipy.ndimage`` does these 4-15 times slower than OpenCV's vectorised
kernels (measured on 100 slices of 256x256: a dilation with a disk of radius
5 took 77 ms against 5 ms), so these functions do the work with OpenCV and
give scipy's results: the same border handling (outside the image counts as
background for dilation and erosion, a mirrored edge for the Gaussian), the
same footprints, which ``tests/test_morph.py`` checks against scipy.

Every function takes a 2D image or a 3D stack and works within slices only.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["closing", "dilate", "disk", "erode", "fill_holes", "gaussian", "largest_per_slice", "opening"]

_CONSTANT = cv2.BORDER_CONSTANT


def disk(radius: int) -> np.ndarray:
    """A 2D disk footprint of ``radius`` pixels (at least 1), a little fuller than the circle."""
    r = max(int(radius), 1)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy * yy + xx * xx) <= r * r + r // 2


def _stack(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """A C-contiguous 3D view (or copy) of ``image`` and whether it was 2D."""
    flat = image.ndim == 2
    arr = image[None] if flat else image
    return np.ascontiguousarray(arr), flat


def _kernel(footprint: np.ndarray) -> np.ndarray:
    fp = np.asarray(footprint, dtype=bool)
    if fp.ndim == 3:  # a (1, h, w) structure of scipy's in-plane ops
        fp = fp[0]
    return fp.astype(np.uint8)


def _binary(op: int, mask: np.ndarray, footprint: np.ndarray, iterations: int) -> np.ndarray:
    src, flat = _stack(mask.astype(bool, copy=False))
    kernel = _kernel(footprint)
    out = np.empty(src.shape, dtype=np.uint8)
    src8 = src.view(np.uint8)
    for k in range(src.shape[0]):
        out[k] = cv2.morphologyEx(src8[k], op, kernel, iterations=iterations, borderType=_CONSTANT,
                                  borderValue=0)
    res = out.view(bool)
    return res[0] if flat else res


def dilate(mask: np.ndarray, footprint: np.ndarray, iterations: int = 1) -> np.ndarray:
    """``scipy.ndimage.binary_dilation`` of each slice with a symmetric 2D ``footprint``."""
    return _binary(cv2.MORPH_DILATE, mask, footprint, iterations)


def erode(mask: np.ndarray, footprint: np.ndarray, iterations: int = 1) -> np.ndarray:
    """``scipy.ndimage.binary_erosion`` of each slice (outside the image is background)."""
    return _binary(cv2.MORPH_ERODE, mask, footprint, iterations)


def opening(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_opening`` of each slice."""
    return dilate(erode(mask, footprint), footprint)


def closing(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_closing`` of each slice.

    As scipy's, the erosion also erodes at the image's edge (pad to avoid it).
    """
    return erode(dilate(mask, footprint), footprint)


def gaussian(image: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter`` in-plane (``sigma`` in pixels, mirrored edges), float32."""
    src, flat = _stack(image.astype(np.float32, copy=False))
    radius = int(truncate * float(sigma) + 0.5)
    if radius < 1 or sigma <= 0:
        return (src[0] if flat else src).copy()
    size = 2 * radius + 1
    out = np.empty(src.shape, dtype=np.float32)
    for k in range(src.shape[0]):
        out[k] = cv2.GaussianBlur(src[k], (size, size), sigmaX=float(sigma), sigmaY=float(sigma),
                                  borderType=cv2.BORDER_REFLECT)
    return out[0] if flat else out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Each slice with its holes filled: background not 4-connected to the slice's border."""
    src, flat = _stack(mask.astype(bool, copy=False))
    z, h, w = src.shape
    out = np.empty(src.shape, dtype=bool)
    canvas = np.zeros((h + 2, w + 2), dtype=np.uint8)
    flood_mask = np.zeros((h + 4, w + 4), dtype=np.uint8)
    for k in range(z):
        if not src[k].any():
            out[k] = False
            continue
        canvas[:] = 0
        canvas[1:-1, 1:-1] = src[k].view(np.uint8)
        flood_mask[:] = 0
        cv2.floodFill(canvas, flood_mask, (0, 0), 2, flags=4)
        out[k] = canvas[1:-1, 1:-1] != 2
    return out[0] if flat else out


def largest_per_slice(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of each slice (ties: the first by label)."""
    src, flat = _stack(mask.astype(bool, copy=False))
    out = np.zeros(src.shape, dtype=bool)
    for k in range(src.shape[0]):
        if not src[k].any():
            continue
        n, lab, stats, _ = cv2.connectedComponentsWithStats(src[k].view(np.uint8), connectivity=8)
        best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        out[k] = lab == best
    return out[0] if flat else out
