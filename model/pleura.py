"""Dense lung along the chest wall: the pleural step of :mod:`model.lungs`.

Air thresholds lose the lung where disease fills it up to the pleura
(peripheral consolidation): the air outline then shows a dent against the
chest wall.  This module fills such dents, slice by slice, along rays from a
point in the mediastinum (the lungs' centroid):

- per angle bin (one degree) the outermost air of the lung on the ray gives
  the air outline, and the innermost bone beyond it the rib;
- the outline's convex envelope (seen from outside, across gaps of at most
  ``max_gap_deg``) bridges every dent; rays where the envelope lies outside
  the air are filled from the air out to the envelope;
- the chest wall is convex, so a chord across a wide dent runs inside it:
  where a rib lies just beyond the envelope the ray is filled out to the rib,
  less the air-to-rib gap measured where the air touches a rib elsewhere;
- single stray rays are removed by an opening (a consolidation is thicker).

Rays never fill inwards (the heart, the mediastinum, a diaphragm dome inside
a basal crescent stay out), and a ray with no air is not filled.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["fill_along_pleura"]

_BINS = 360


def _disk(radius: int) -> np.ndarray:
    r = max(radius, 1)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy * yy + xx * xx) <= r * r + r // 2


def fill_along_pleura(parts: list[np.ndarray], hu: np.ndarray, body: np.ndarray,
                      spacing_yx: tuple[float, float], *, bone_hu: float = 250.0,
                      touch_mm: float = 8.0, max_gap_deg: float = 100.0) -> list[np.ndarray]:
    """Each lung mask with the dense lung along its chest wall added.

    Parameters
    ----------
    parts:
        One or two boolean lung masks ``(z, y, x)`` (air-based, holes filled).
    hu:
        The (reduced, smoothed) HU volume of the same grid.
    body:
        The body mask (nothing is added outside it).
    spacing_yx:
        Row and column spacing of the grid in mm.
    bone_hu:
        Threshold of the ribs.
    touch_mm:
        Air this close to a rib touches the wall (for the air-to-rib gap).
    max_gap_deg:
        Widest dent bridged.

    Returns
    -------
    list of numpy.ndarray
        The grown masks, in the order of ``parts``.
    """
    both = np.logical_or.reduce(parts)
    _, yy, xx = np.nonzero(both[:, ::2, ::2])
    cy, cx = 2.0 * float(yy.mean()), 2.0 * float(xx.mean())
    sy, sx = spacing_yx
    gy, gx = np.indices(hu.shape[1:], dtype=np.float32)
    dy, dx = (gy - cy) * sy, (gx - cx) * sx
    radius = np.hypot(dy, dx)
    ang = np.arctan2(dy, dx)
    bone = (hu > bone_hu) & body
    bz, by, bx = np.nonzero(bone)
    thick = _disk(max(1, int(round(2.0 / min(sy, sx)))))[None]
    n_z = hu.shape[0]
    max_gap = int(max_gap_deg * _BINS / 360.0)
    out = []
    for part in parts:
        pz, py, px = np.nonzero(part)
        mean_ang = float(np.angle(np.exp(1j * ang[py, px]).mean()))
        tb = (((ang - mean_ang + np.pi) / (2 * np.pi) * _BINS).astype(np.int32)) % _BINS  # span centred
        r_out = np.full(n_z * _BINS, -np.inf, np.float32)
        np.maximum.at(r_out, pz * _BINS + tb[py, px], radius[py, px])
        r_out = r_out.reshape(n_z, _BINS)
        valid = np.isfinite(r_out)
        lo = np.where(valid, r_out, np.inf)
        bkey = bz * _BINS + tb[by, bx]
        br = radius[by, bx]
        beyond = br > lo.ravel()[bkey]
        r_rib = np.full(n_z * _BINS, np.inf, np.float32)
        np.minimum.at(r_rib, bkey[beyond], br[beyond])
        hi = _reach(r_out, valid, r_rib.reshape(n_z, _BINS), touch_mm, max_gap)
        added = np.zeros_like(part)
        for k in np.nonzero((hi > lo).any(axis=1))[0]:
            added[k] = (radius > lo[k][tb]) & (radius <= hi[k][tb]) & body[k] & ~bone[k] & ~part[k]
        out.append(part | ndi.binary_opening(added, structure=thick))
    return out


def _envelope(r_out: np.ndarray, valid: np.ndarray, max_gap: int) -> np.ndarray:
    """Radius, per angle bin, of the air outline's convex envelope seen from outside.

    The outline points (one per bin with air) are scanned in angular order and a
    point is dropped while it lies on the centre's side of the chord joining
    its neighbours (Graham's scan); chords wider than ``max_gap`` bins are not
    drawn (``-inf`` there and outside the outline's angular span).
    """
    nb = r_out.shape[0]
    out = np.full(nb, -np.inf, np.float32)
    idx = np.nonzero(valid)[0]
    if idx.size < 2:
        return out
    th = (idx + 0.5) * (2 * np.pi / nb)
    px, py = r_out[idx] * np.cos(th), r_out[idx] * np.sin(th)
    stack: list[int] = []
    for j in range(idx.size):
        while len(stack) >= 2:
            a, b = stack[-2], stack[-1]
            ex, ey = px[j] - px[a], py[j] - py[a]
            side_b = ex * (py[b] - py[a]) - ey * (px[b] - px[a])
            side_o = ex * (0.0 - py[a]) - ey * (0.0 - px[a])
            if side_b * side_o >= 0.0 and idx[j] - idx[a] <= max_gap:
                stack.pop()
            else:
                break
        stack.append(j)
    for a, b in zip(stack[:-1], stack[1:], strict=True):
        i0, i1 = idx[a], idx[b]
        out[i0] = r_out[i0]
        if i1 - i0 > max_gap:
            continue
        bins = np.arange(i0, i1 + 1)
        t = (bins + 0.5) * (2 * np.pi / nb)
        dx, dy = px[b] - px[a], py[b] - py[a]
        num = px[a] * dy - py[a] * dx
        den = np.cos(t) * dy - np.sin(t) * dx
        out[bins] = np.where(np.abs(den) > 1e-6, num / np.where(den == 0, 1.0, den), r_out[bins])
    out[idx[stack[-1]]] = r_out[idx[stack[-1]]]
    return out


def _reach(r_out: np.ndarray, valid: np.ndarray, r_rib: np.ndarray, touch_mm: float,
           max_gap: int) -> np.ndarray:
    """Per slice and angle bin: the radius to fill the ray to, ``-inf`` where nothing is filled."""
    depth = np.full(r_out.shape, np.inf, np.float32)
    ok = valid & np.isfinite(r_rib)
    depth[ok] = r_rib[ok] - r_out[ok]
    touch = depth <= touch_mm
    gap = float(np.median(depth[touch])) if touch.any() else 0.0
    hi = np.full(r_out.shape, -np.inf, np.float32)
    for k in np.nonzero(valid.sum(axis=1) >= 2)[0]:
        hull = _envelope(r_out[k], valid[k], max_gap)
        wall = r_rib[k] - gap
        ribs = np.isfinite(wall) & (wall > hull - 3.0) & (wall < hull + 12.0)
        reach = np.where(ribs, np.maximum(hull, wall), hull)
        dent = hull - np.where(valid[k], r_out[k], np.inf)
        hi[k] = np.where(dent > 1.5, reach, -np.inf)
    return hi
