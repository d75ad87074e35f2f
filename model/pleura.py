"""Dense lung along the chest wall: the pleural steps of :mod:`model.lungs`.

:func:`fill_along_pleura` works per slice (below); :func:`close_radially`
closes each lung's outline over angle and height (its docstring).

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

import logging
from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi

from model import morph

logger = logging.getLogger(__name__)

__all__ = ["close_radially", "fill_along_pleura"]

_BINS = 360


_disk = morph.disk


def fill_along_pleura(parts: list[np.ndarray], hu: np.ndarray, body: np.ndarray,
                      spacing_yx: tuple[float, float], *, bone_hu: float = 250.0,
                      touch_mm: float = 8.0, max_gap_deg: float = 100.0, slice_mm: float = 0.0,
                      rib_window_mm: float = 14.0, max_depth_mm: float = 60.0,
                      anterior_angle: float | None = None, anterior_sector_deg: float = 65.0,
                      posterior_sector_deg: float = 70.0
                      ) -> list[np.ndarray]:
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
    slice_mm:
        Slice interval; ribs of the slices within ``rib_window_mm`` give the wall
        (ribs cross a slice only in places).  ``0``: this slice's ribs only.
    rib_window_mm:
        Half height of that window (ribs repeat every 20-30 mm).
    max_depth_mm:
        Deepest fill from the air outline out to the ribs.
    anterior_angle:
        In-plane angle (``arctan2(row, column)``) of the patient's anterior
        direction; rays within ``anterior_sector_deg`` of it are not filled out to
        the ribs (the anterior mediastinum and the heart lie between the lungs
        and the front ribs over a wide span).  ``None``: no sector is excluded.
        Within ``posterior_sector_deg`` of the back, a layer along the ribs
        next to air against the wall on one side is filled (dependent
        consolidation often reaches the spine).

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
    thick = _disk(max(1, int(round(2.0 / min(sy, sx)))))
    n_z = hu.shape[0]
    max_gap = int(max_gap_deg * _BINS / 360.0)
    out = []
    for part in parts:
        pz, py, px = np.nonzero(part)
        weight = part.sum(axis=0, dtype=np.float64)  # voxels per pixel: the mean direction per pixel
        mean_ang = float(np.arctan2((weight * np.sin(ang)).sum(), (weight * np.cos(ang)).sum()))
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
        r_rib = r_rib.reshape(n_z, _BINS)
        window = int(rib_window_mm // slice_mm) if slice_mm > 0 else 0
        wall = _wall(r_rib, lo, window)
        one_side = np.zeros(_BINS, dtype=bool)
        if anterior_angle is not None:
            centres = mean_ang - np.pi + (np.arange(_BINS) + 0.5) * (2 * np.pi / _BINS)
            off = np.abs(np.angle(np.exp(1j * (centres - anterior_angle))))
            wall[:, off < np.deg2rad(anterior_sector_deg)] = np.inf
            one_side = off > np.deg2rad(180.0 - posterior_sector_deg)
        hi, to_wall = _reach(r_out, valid, r_rib, wall, touch_mm, max_gap, max_depth_mm, one_side)
        added = np.zeros_like(part)
        along = np.zeros_like(part)
        for k in np.nonzero((hi > lo).any(axis=1) | (to_wall > lo).any(axis=1))[0]:
            keep = body[k] & ~bone[k] & ~part[k] & (radius > lo[k][tb])
            added[k] = keep & (radius <= hi[k][tb])
            along[k] = keep & (radius <= to_wall[k][tb])
        out.append(part | morph.opening(added, thick) | along)
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
    xs, ys, bins_of = px.tolist(), py.tolist(), idx.tolist()  # Python floats: the scan is scalar work
    for j in range(idx.size):
        while len(stack) >= 2:
            a, b = stack[-2], stack[-1]
            ex, ey = xs[j] - xs[a], ys[j] - ys[a]
            side_b = ex * (ys[b] - ys[a]) - ey * (xs[b] - xs[a])
            side_o = ex * (0.0 - ys[a]) - ey * (0.0 - xs[a])
            if side_b * side_o >= 0.0 and bins_of[j] - bins_of[a] <= max_gap:
                stack.pop()
            else:
                break
        stack.append(j)
    hull = np.asarray(stack)
    hb = idx[hull]  # the hull's bins, increasing
    out[hb] = r_out[hb]
    if hull.size >= 2:  # every bin from the first vertex on, with the chord it lies on
        bins = np.arange(hb[0], hb[-1] + 1)
        seg = np.minimum(np.searchsorted(hb, bins, side="right") - 1, hull.size - 2)
        va, vb = hull[seg], hull[seg + 1]  # the chord's two vertices, per bin
        drawn = hb[seg + 1] - hb[seg] <= max_gap
        t = (bins + 0.5) * (2 * np.pi / nb)
        dx, dy = px[vb] - px[va], py[vb] - py[va]
        num = px[va] * dy - py[va] * dx
        den = np.cos(t) * dy - np.sin(t) * dx
        val = np.where(np.abs(den) > 1e-6, num / np.where(den == 0, 1.0, den), r_out[bins])
        out[bins[drawn]] = val[drawn]
    out[hb[-1]] = r_out[hb[-1]]
    return out


def _wall(r_rib: np.ndarray, lo: np.ndarray, window: int) -> np.ndarray:
    """Per slice and angle bin: the innermost rib beyond the air outline within ``window`` slices."""
    wall = r_rib.copy()
    n_z = r_rib.shape[0]
    for d in range(1, window + 1):
        for src, dst in ((slice(d, n_z), slice(0, n_z - d)), (slice(0, n_z - d), slice(d, n_z))):
            cand = r_rib[src]
            ok = cand > lo[dst] + 1.0
            wall[dst] = np.where(ok & (cand < wall[dst]), cand, wall[dst])
    return wall


def _gap(rib: np.ndarray, r_out: np.ndarray, valid: np.ndarray, touch_mm: float,
         stat: Callable[[np.ndarray], float]) -> float:
    """Typical distance from the air outline to a rib where the air touches the wall."""
    ok = valid & np.isfinite(rib)
    depth = rib[ok] - r_out[ok]
    depth = depth[depth <= touch_mm]
    return float(stat(depth)) if depth.size else 0.0


def _reach(r_out: np.ndarray, valid: np.ndarray, r_rib: np.ndarray, wall_rib: np.ndarray, touch_mm: float,
           max_gap: int, max_depth_mm: float, one_side: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per slice and angle bin: the radius to fill the ray to across dents, and out to the ribs.

    ``-inf`` where nothing is filled.
    """
    gap = _gap(r_rib, r_out, valid, touch_mm, np.median)
    hi = np.full(r_out.shape, -np.inf, np.float32)
    for k in np.nonzero(valid.sum(axis=1) >= 2)[0]:
        hull = _envelope(r_out[k], valid[k], max_gap)
        wall = r_rib[k] - gap
        ribs = np.isfinite(wall) & (wall > hull - 3.0) & (wall < hull + 12.0)
        reach = np.where(ribs, np.maximum(hull, wall), hull)
        dent = hull - np.where(valid[k], r_out[k], np.inf)
        hi[k] = np.where(dent > 1.5, reach, -np.inf)
    # a crescent of dense lung along the wall shrinks the air outline without a dent: where the
    # air stops short of the ribs (of this or nearby slices), the lung reaches out to them
    # (a layer thinner than the opening above is kept: stray rays are removed along the angle)
    wall_gap = _gap(wall_rib, r_out, valid, touch_mm, lambda d: np.percentile(d, 25))
    logger.debug("air-to-rib gap %.1f mm in the slice, %.1f mm to the nearest rib", gap, wall_gap)
    wall = wall_rib - wall_gap
    short = valid & np.isfinite(wall_rib) & (wall - r_out > 3.0) & (wall_rib - r_out < max_depth_mm)
    near = valid & np.isfinite(wall_rib) & (wall - r_out <= 1.5)
    short = morph.opening(short, np.ones((1, 5), dtype=bool))
    short = _bridged(short, near, reach=6, one_side=one_side)
    return hi, np.where(short, wall, -np.inf)


def _bridged(short: np.ndarray, near: np.ndarray, reach: int, one_side: np.ndarray) -> np.ndarray:
    """Runs of ``short`` bins (per slice) with air against the wall within ``reach`` bins on both sides.

    Dense lung along the wall lies between places where the air lung touches
    it; where the outline leaves the wall for good (the apex inside the first
    ribs, the mediastinum) nothing is bridged.  In the bins flagged
    ``one_side`` (the back, where dependent consolidation reaches the spine)
    air against the wall on one side suffices.
    """
    out = np.zeros_like(short)
    nb = short.shape[1]
    for k in np.nonzero(short.any(axis=1))[0]:
        lab, n = ndi.label(short[k])
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            a, b = sl[0].start, sl[0].stop
            before, after = near[k, max(0, a - reach):a].any(), near[k, b:min(nb, b + reach)].any()
            if (before and after) or ((before or after) and one_side[a:b].mean() > 0.5):
                out[k, a:b] = lab[a:b] == i
    return out


def close_radially(parts: list[np.ndarray], allowed: np.ndarray, ribs: np.ndarray,
                   spacing: tuple[float, float, float], *, window_deg: float = 40.0, window_mm: float = 25.0,
                   max_fill_mm: float = 40.0, medial_sector_deg: float = 65.0, ball_mm: float = 40.0,
                   rib_window_mm: float = 14.0, bins: int = 180) -> list[np.ndarray]:
    """Each lung grown out to the grey closing of its outline over angle and height.

    Per slice, the lung's outline is its largest radius per angle bin, seen from
    the lung's own centre (smoothed along z).  Over (slice, angle) that radius is
    a surface; dense lung along the wall makes a dent in it.  A grey closing of
    the surface with a ball of radius ``ball_mm`` (a paraboloid over arc length
    at the lung's typical radius and height) in a window of ``window_deg`` by
    ``window_mm`` fills dents narrower than the window in angle or in height
    (a wide consolidation that spans few slices, a tall one that spans a small
    angle) but not the gentle curvature of the lung itself; dents larger in
    both (the heart against the left lung) stay.  Rays
    are only grown outwards, by at most ``max_fill_mm``, up to the first voxel
    not ``allowed`` (bone, airways, outside the body) and not beyond the first
    of the ``ribs`` of the slices within ``rib_window_mm`` (a ray through an
    intercostal space stops where the ribs above and below run), and a ray on which the
    lung has no voxel is not grown, nor is one within ``medial_sector_deg`` of
    the direction to the body's middle (the hilum, where vessels and bronchi
    dent the outline, and the mediastinum).
    """
    sz, sy, sx = spacing
    n_z = parts[0].shape[0]
    grid = np.indices(parts[0].shape[1:], dtype=np.float32)
    gy: np.ndarray = grid[0]
    gx: np.ndarray = grid[1]
    cols = np.nonzero(allowed.any(axis=(0, 1)))[0]
    mid_x = (cols[0] + cols[-1]) / 2.0 if cols.size else parts[0].shape[2] / 2.0
    centres = (np.arange(bins) + 0.5) * (2 * np.pi / bins) - np.pi
    bz = max(1, int(round(window_mm / sz)) | 1)
    bt = max(3, int(round(window_deg / (360.0 / bins))) | 1)
    wz = int(rib_window_mm // sz)
    ribs_near = ndi.maximum_filter1d(ribs.view(np.uint8), size=2 * wz + 1, axis=0).view(bool)
    out = []
    for i, part in enumerate(parts):
        zs = np.nonzero(part.any(axis=(1, 2)))[0]
        if zs.size < 2:
            out.append(part)
            continue
        # per slice the mean row and column of the lung's pixels (sums of integers: exact)
        per_row = part.sum(axis=2, dtype=np.int64)
        per_col = part.sum(axis=1, dtype=np.int64)
        count = per_row.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN where the slice has no lung
            cy: np.ndarray = ((per_row @ np.arange(per_row.shape[1])) / count).astype(np.float32)
            cx: np.ndarray = ((per_col @ np.arange(per_col.shape[1])) / count).astype(np.float32)
        span = slice(int(zs[0]), int(zs[-1]) + 1)
        for c in (cy, cx):  # centres move smoothly with height; gaps take their neighbours' value
            seg = c[span]
            ok = np.isfinite(seg)
            seg[~ok] = np.interp(np.nonzero(~ok)[0], np.nonzero(ok)[0], seg[ok])
            c[span] = ndi.uniform_filter1d(seg, size=bz, mode="nearest")
        pz, py, px = np.nonzero(part)
        dy, dx = (py - cy[pz]) * sy, (px - cx[pz]) * sx
        tb = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * bins).astype(np.int32) % bins
        r_out = np.zeros(n_z * bins, np.float32)
        np.maximum.at(r_out, pz * bins + tb, np.hypot(dy, dx))
        r_out = r_out.reshape(n_z, bins)
        valid = r_out > 0
        medial = np.pi if float(np.nanmean(cx[span])) > mid_x else 0.0  # angle of the direction to the middle
        away = np.abs(np.angle(np.exp(1j * (centres - medial)))) >= np.deg2rad(medial_sector_deg)
        sub = r_out[span]
        padded = np.concatenate([sub[:, -bt:], sub, sub[:, :bt]], axis=1)
        arc = float(np.median(sub[sub > 0])) * (2 * np.pi / bins)  # mm per bin at the typical radius
        dz = (np.arange(bz) - bz // 2) * sz
        da = (np.arange(bt) - bt // 2) * arc
        ball = -(dz[:, None] ** 2 + da[None, :] ** 2) / (2.0 * ball_mm)
        # beyond the lung's first and last slice the radius is 0: the dome of the apex and the base
        # are not dents and are not filled
        closed = ndi.grey_closing(padded, structure=ball, mode="constant", cval=0.0)[:, bt:-bt]
        grow = np.zeros_like(r_out)
        dent = closed - sub
        grow[span] = np.where(valid[span] & away & (dent > 1.0) & (dent <= max_fill_mm), closed, 0.0)
        others = np.logical_or.reduce([p for j, p in enumerate(parts) if j != i]) if len(parts) > 1 else None
        grown = part.copy()
        h, w = part.shape[1:]
        for k in np.nonzero(grow.any(axis=1))[0]:
            # rays reach at most max_fill_mm beyond the outline: the grid around the centre out to
            # the longest grown ray (no pixel outside it can be added or stop a ray)
            reach = float(grow[k].max())
            y0, y1 = max(0, int(cy[k] - reach / sy) - 1), min(h, int(cy[k] + reach / sy) + 2)
            x0, x1 = max(0, int(cx[k] - reach / sx) - 1), min(w, int(cx[k] + reach / sx) + 2)
            win = (slice(y0, y1), slice(x0, x1))
            ry, rx = (gy[win] - cy[k]) * sy, (gx[win] - cx[k]) * sx
            rad = np.hypot(ry, rx)
            b = ((np.arctan2(ry, rx) + np.pi) / (2 * np.pi) * bins).astype(np.int32) % bins
            ok = allowed[k][win]
            # a ray stops at the first rib (of this or a nearby slice) or the body's edge
            beyond = (~ok | ribs_near[k][win]) & (rad > r_out[k][b])
            stop = np.full(bins, np.inf, np.float32)
            np.minimum.at(stop, b[beyond], rad[beyond])
            add = (rad > r_out[k][b]) & (rad <= np.minimum(grow[k], stop)[b]) & ok
            if others is not None:
                add &= ~others[k][win]
            grown[k][win] |= add
        out.append(grown)
    return out

