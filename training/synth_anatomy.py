"""Anatomy of the synthetic chest phantom: seeded shape parameters and per-slice rendering.

Private to :mod:`training.synth` (which documents what varies); kept apart so
each module stays small.  Coordinates are millimetres in a body-centred frame
with the DICOM patient axes (LPS): ``x`` towards the patient's left, ``y``
towards the back, ``z`` towards the head, ``z = 0`` near the lowest point of the
lungs.  Every function that takes a :class:`Plane` and ``z`` broadcasts, so the
same code renders a slice and tests scattered points (vessel tree growth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "AIR", "AIRWAY_LUMEN", "AIRWAY_WALL", "BONE_TUBE", "MEDIASTINAL", "OESOPHAGUS", "VESSEL", "Anatomy",
    "Enhancement", "Fields", "Plane", "SliceGrid", "Tube", "diaphragm", "draw_anatomy", "draw_enhancement",
    "draw_tubes", "lung_extent", "lungs", "rasterize", "render_slice",
]

AIR = -1000.0
_HARMONICS = (2, 3, 4, 5)
# Tube labels; a higher label wins where tubes overlap.
VESSEL, OESOPHAGUS, MEDIASTINAL, BONE_TUBE, AIRWAY_WALL, AIRWAY_LUMEN = 1, 2, 3, 4, 5, 6
_FIELD_STEP = 3.0  # mm, grid of the smooth random fields


@dataclass(frozen=True)
class Anatomy:
    """Seeded shape and tissue parameters of one phantom patient (mm, HU)."""

    body_a: float      # body half-width
    body_ba: float     # body anterior half-depth
    body_bp: float     # body posterior half-depth
    fat: float         # subcutaneous fat thickness
    cav_a: float       # thoracic cavity half-width
    cav_ba: float      # cavity anterior half-depth
    cav_bp: float      # cavity posterior half-depth
    cone: float        # narrowing of the upper thorax
    pert: tuple[tuple[float, float, float, float, float], ...]  # (a, b, wavelength, phase, psi) per harmonic
    height: float      # right lung apex
    apex_left: float   # left lung apex
    apex_r0: float     # apex dome radius scale
    dome_r: float      # top of the right hemidiaphragm
    dome_l: float
    dome_depth: float
    x_mid: float       # mediastinal shift
    hw_ant: float      # mediastinum half-width, anterior
    hw_mid: float      # mediastinum half-width, middle/posterior
    heart: tuple[float, float, float, float, float, float]  # centre x, y, z, radii x, y, z
    r_vb: float        # vertebral body radius
    y_vb: float
    vert_period: float
    vert_phase: float
    cage_top: float
    rib_spacing: float
    rib_drop: float
    carina: float
    gas_bubble: bool
    lung_hu: float
    lung_gradient: float
    fat_hu: float
    muscle_hu: float
    cortical_hu: float
    marrow_hu: float
    noise_sd: float    # smooth-kernel image noise
    disease_weights: tuple[float, float, float, float]  # peripheral, posterior, basal, left-right bias


def draw_anatomy(seed: int) -> Anatomy:
    """Draw the anatomy of the phantom patient ``seed`` (depends on the seed only)."""
    rng = np.random.default_rng([seed, 1])
    u = rng.uniform
    a = u(140.0, 180.0)
    ba = a * u(0.60, 0.72)
    bp = ba * u(0.98, 1.08)
    fat = u(5.0, 24.0)
    cav_a = a - fat - u(12.0, 18.0)
    cav_ba = ba - fat - u(10.0, 16.0)
    cav_bp = bp - fat - u(17.0, 24.0)
    height = u(230.0, 285.0) * (a / 160.0) ** 0.3
    dome_depth = u(42.0, 58.0)
    dome_r = dome_depth * u(1.15, 1.35)
    r_vb = u(15.0, 19.0)
    y_vb = cav_bp - r_vb - u(8.0, 14.0)
    pert = tuple((u(-0.03, 0.03) / math.sqrt(k), u(-0.02, 0.02), u(80.0, 200.0), u(0, 2 * math.pi),
                  u(0, 2 * math.pi)) for k in _HARMONICS)
    x_mid = u(-2.0, 6.0)
    carina = height - u(95.0, 115.0)
    # Heart: from the diaphragm saddle to below the carina, its back just in front of the oesophagus.
    rx, ry = cav_a * u(0.45, 0.52), cav_ba * u(0.50, 0.58)
    h_top, h_bottom = carina - u(18.0, 30.0), dome_r - 0.3 * dome_depth - 20.0
    back = math.hypot(rx * 0.57, ry * 0.82)
    hy = max(y_vb - r_vb - 9.0 - 8.0 - back, -0.5 * cav_ba)
    heart = (x_mid + cav_a * u(0.15, 0.24), hy, (h_top + h_bottom) / 2, rx, ry, (h_top - h_bottom) / 2)
    return Anatomy(
        body_a=a, body_ba=ba, body_bp=bp, fat=fat, cav_a=cav_a, cav_ba=cav_ba, cav_bp=cav_bp,
        cone=u(0.10, 0.22), pert=pert, height=height, apex_left=height - u(0.0, 8.0),
        apex_r0=cav_a * u(0.50, 0.60), dome_r=dome_r, dome_l=dome_r - u(5.0, 15.0),
        dome_depth=dome_depth, x_mid=x_mid, hw_ant=u(5.0, 10.0), hw_mid=u(18.0, 26.0), heart=heart,
        r_vb=r_vb, y_vb=y_vb, vert_period=u(23.0, 28.0),
        vert_phase=u(0.0, 28.0), cage_top=height - u(12.0, 28.0), rib_spacing=u(22.0, 27.0),
        rib_drop=u(70.0, 105.0), carina=carina, gas_bubble=bool(rng.random() < 0.6),
        lung_hu=u(-880.0, -825.0), lung_gradient=u(15.0, 45.0), fat_hu=u(-110.0, -85.0),
        muscle_hu=u(38.0, 55.0), cortical_hu=u(700.0, 1000.0), marrow_hu=u(160.0, 280.0),
        noise_sd=u(10.0, 30.0),
        disease_weights=(u(1.0, 1.6), u(0.4, 0.8), u(0.2, 0.6), u(-0.25, 0.25)),
    )


@dataclass(frozen=True)
class Enhancement:
    """HU of the tissues that take up intravenous iodinated contrast (a venous-to-arterial phase)."""

    blood: float       # heart chambers, aorta, vena cava, pulmonary arteries and veins
    myocardium: float  # the heart's wall
    liver: float
    abdomen: float     # spleen, stomach wall and the rest under the left dome
    muscle: float      # added to skeletal muscle
    consolidation: float  # added to consolidated lung (it enhances; ground glass barely does)


def draw_enhancement(seed: int) -> Enhancement:
    """The contrast enhancement of the phantom patient ``seed`` (depends on the seed only)."""
    u = np.random.default_rng([seed, 8]).uniform
    return Enhancement(blood=u(150.0, 320.0), myocardium=u(90.0, 130.0), liver=u(95.0, 135.0),
                       abdomen=u(90.0, 130.0), muscle=u(5.0, 15.0), consolidation=u(15.0, 40.0))


class Plane:
    """Points in the body frame, with the angular terms the shape functions reuse."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x = x.astype(np.float32)
        self.y = y.astype(np.float32)
        theta = np.arctan2(self.y, self.x)
        self.cos = [np.cos(k * theta) for k in _HARMONICS]
        self.sin = [np.sin(k * theta) for k in _HARMONICS]
        self.r = np.hypot(self.x, self.y)
        self.ypos = self.y > 0
        # 1 at the front of the chest, 0 at the back: ribs descend towards the front.
        self.front = np.clip((1.0 - self.y / np.maximum(self.r, 1e-3)) / 2.0, 0.0, 1.0)


def _cavity(an: Anatomy, p: Plane, z: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Normalised cavity radius (< 1 inside) and the signed y (-1 front .. 1 back)."""
    c = np.clip((np.asarray(z) - 0.45 * an.height) / (0.6 * an.height), 0.0, 1.0) ** 1.5
    ax = an.cav_a * (1.0 - an.cone * c)
    yn = p.y / np.where(p.ypos, an.cav_bp * (1.0 - 0.3 * an.cone * c), an.cav_ba * (1.0 - 0.5 * an.cone * c))
    rho = np.sqrt((p.x / ax) ** 2 + yn**2)
    pert = 1.0
    for (a, b, lam, phase, psi), ck, sk in zip(an.pert, p.cos, p.sin, strict=True):
        amp = a + b * np.sin(2.0 * math.pi * np.asarray(z) / lam + phase)
        pert = pert + amp * (ck * math.cos(psi) + sk * math.sin(psi))
    return rho / pert, yn


def diaphragm(an: Anatomy, p: Plane) -> np.ndarray:
    """Height of the diaphragm surface (two domes, lower in the back)."""
    yy = ((p.y + 0.15 * an.cav_bp) / an.cav_bp) ** 2
    right = an.dome_r - an.dome_depth * (((p.x + 0.45 * an.cav_a) / an.cav_a) ** 2 + yy)
    left = an.dome_l - an.dome_depth * (((p.x - 0.45 * an.cav_a) / an.cav_a) ** 2 + yy)
    return np.maximum(right, left)


def _heart(an: Anatomy, p: Plane, z: np.ndarray | float, grow: float = 0.0) -> np.ndarray:
    """Ellipsoid whose long axis points to the front left (about 35 degrees)."""
    hx, hy, hz, rx, ry, rz = an.heart
    u = (p.x - hx) * 0.82 - (p.y - hy) * 0.57
    v = (p.x - hx) * 0.57 + (p.y - hy) * 0.82
    return ((u / (rx + grow)) ** 2 + (v / (ry + grow)) ** 2 + ((np.asarray(z) - hz) / (rz + grow)) ** 2) < 1.0


def _spine_keepout(an: Anatomy, p: Plane) -> np.ndarray:
    """Vertebral body and the paraspinal wedge behind it (not lung, not mediastinal fat)."""
    disk = (p.x**2 + (p.y - an.y_vb) ** 2) < (an.r_vb + 4.0) ** 2
    wedge = (p.y > an.y_vb) & (np.abs(p.x) < an.r_vb + 6.0 + 0.5 * (p.y - an.y_vb))
    return disk | wedge


def lungs(an: Anatomy, p: Plane, z: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Analytic right and left lung (before carving out airways and great vessels)."""
    rho, yn = _cavity(an, p, z)
    zz = np.asarray(z)
    hw = np.interp(yn, [-1.0, -0.6, -0.1, 0.4, 1.0],
                   [an.hw_ant, an.hw_ant * 1.4, an.hw_mid, an.hw_mid * 0.9, an.hw_mid * 0.9])
    dx = p.x - an.x_mid
    inside = ((rho < 1.0) & (np.abs(dx) > hw) & (zz > diaphragm(an, p))
              & ~_heart(an, p, z, grow=5.0) & ~_spine_keepout(an, p))
    out = []
    for side, apex in ((-1.0, an.height), (1.0, an.apex_left)):
        cap = ((p.x - side * 0.45 * an.cav_a) ** 2 + ((p.y - 0.15 * an.cav_bp) / 0.8) ** 2
               < an.apex_r0**2 * np.maximum(apex - zz, 0.0) / 90.0)
        out.append(inside & cap & (side * dx > 0))
    return out[0], out[1]


def lung_extent(an: Anatomy) -> tuple[float, float]:
    """Lowest and highest z of the lungs, from a 3 mm x 2 mm grid."""
    xs = np.arange(-an.cav_a, an.cav_a, 3.0)
    ys = np.arange(-an.cav_ba, an.cav_bp, 3.0)
    p = Plane(*np.meshgrid(xs, ys))
    zs = [z for z in np.arange(-120.0, an.height + 4.0, 2.0) if any(m.any() for m in lungs(an, p, z))]
    return float(min(zs)), float(max(zs))


@dataclass(frozen=True)
class Tube:
    """A capsule with linearly tapering radius from ``a`` to ``b`` (body frame, mm)."""

    a: tuple[float, float, float]
    b: tuple[float, float, float]
    r0: float
    r1: float
    label: int


def _airway(pts: list[tuple[float, float, float]], r: float, wall: float) -> list[Tube]:
    segs = list(zip(pts[:-1], pts[1:], strict=True))
    return ([Tube(a, b, r + wall, r + wall, AIRWAY_WALL) for a, b in segs]
            + [Tube(a, b, r, r, AIRWAY_LUMEN) for a, b in segs])


def draw_tubes(an: Anatomy, seed: int, z_top: float) -> list[Tube]:
    """Trachea and main bronchi, great vessels, clavicles and the two pulmonary vessel trees."""
    xm, c = an.x_mid, an.carina
    y_eso = an.y_vb - an.r_vb - 9.0
    xt, yt = xm - 2.0, y_eso - 26.0
    hx, hy, hz, _, hry, hrz = an.heart
    top = z_top + 20.0
    tubes = _airway([(xt, yt, top), (xt, yt, c)], 9.0, 2.0)
    tubes += _airway([(xt, yt, c), (xt - 22, yt + 4, c - 18), (xt - 38, yt + 8, c - 32)], 6.5, 1.5)
    tubes += _airway([(xt, yt, c), (xt + 28, yt + 6, c - 24), (xt + 46, yt + 10, c - 40)], 5.5, 1.5)
    y_desc = an.y_vb - an.r_vb + 2.0
    med = [  # ascending aorta, arch, descending aorta, SVC, pulmonary arteries
        ((xm + 4, hy + 0.3 * hry, hz + 0.6 * hrz), (xm + 2, -0.4 * an.cav_ba, c + 26), 15.0, 14.0),
        ((xm + 2, -0.4 * an.cav_ba, c + 26), (xm + 22, yt - 10, c + 36), 14.0, 13.0),
        ((xm + 22, yt - 10, c + 36), (xm + 24, y_desc - 4, c + 24), 13.0, 12.0),
        ((xm + 24, y_desc - 4, c + 24), (xm + 14, y_desc, -120.0), 12.0, 11.0),
        ((xm - 24, -0.2 * an.cav_ba, top), (xm - 20, -0.15 * an.cav_ba, hz + 0.7 * hrz), 10.0, 10.0),
        ((xm + 12, hy + 0.2 * hry, hz + 0.6 * hrz), (xm + 10, yt - 24, c - 16), 13.0, 12.0),
        ((xm + 10, yt - 24, c - 16), (xm + an.hw_mid + 16, yt - 6, c - 14), 10.0, 9.0),
        ((xm + 10, yt - 24, c - 16), (xm - an.hw_mid - 14, yt - 14, c - 26), 10.0, 9.0),
    ]
    tubes += [Tube(a, b, r0, r1, MEDIASTINAL) for a, b, r0, r1 in med]
    tubes.append(Tube((xm + 3, y_eso, top), (xm + 8, y_eso, -120.0), 7.0, 7.0, OESOPHAGUS))
    for s in (-1.0, 1.0):
        tubes.append(Tube((s * 14, -an.cav_ba - 8, an.cage_top - 4),
                          (s * 0.85 * an.body_a, -0.55 * an.body_ba, an.cage_top + 14), 7.0, 6.0, BONE_TUBE))
    rng = np.random.default_rng([seed, 2])
    tubes += _vessel_tree(an, rng, (xm - an.hw_mid - 14, yt - 14, c - 26), -1.0)
    tubes += _vessel_tree(an, rng, (xm + an.hw_mid + 16, yt - 6, c - 14), 1.0)
    return tubes


def _in_lung(an: Anatomy, pts: np.ndarray, side: float) -> np.ndarray:
    if len(pts) == 0:
        return np.zeros(0, bool)
    right, left = lungs(an, Plane(pts[:, 0], pts[:, 1]), pts[:, 2])
    return left if side > 0 else right


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def _spread_targets(an: Anatomy, rng: np.random.Generator, side: float, count: int) -> np.ndarray:
    """``count`` well-spread points inside one lung (farthest-point sampling)."""
    lo = np.array([0.0 if side > 0 else -an.cav_a, -an.cav_ba, 0.0])
    hi = np.array([an.cav_a if side > 0 else 0.0, an.cav_bp, an.height])
    pts = rng.uniform(lo, hi, (3000, 3))
    pts = pts[_in_lung(an, pts, side)]
    chosen = [int(rng.integers(len(pts)))]
    dist = np.linalg.norm(pts - pts[chosen[0]], axis=1)
    for _ in range(count - 1):
        chosen.append(int(np.argmax(dist)))
        dist = np.minimum(dist, np.linalg.norm(pts - pts[chosen[-1]], axis=1))
    return pts[chosen]


def _vessel_tree(an: Anatomy, rng: np.random.Generator, hilum: tuple[float, float, float],
                 side: float) -> list[Tube]:
    """Grow a branching, tapering tree from the hilum, generation by generation.

    Trunks head for well-spread points of the lung; each branch ends inside the
    lung (shortened, else dropped) and splits in two thinner children that lean
    away from the hilum.
    """
    h = np.asarray(hilum)
    targets = _spread_targets(an, rng, side, 12)
    pos = np.repeat(h[None], len(targets), 0)
    dirs = _unit(targets - pos)
    radius = rng.uniform(3.5, 5.0, len(targets))
    length = np.linalg.norm(targets - pos, axis=1) * rng.uniform(0.3, 0.5, len(targets))
    tubes: list[Tube] = []
    for gen in range(12):
        if len(pos) == 0:
            break
        if gen:
            length = radius * rng.uniform(4.0, 7.0, len(pos)) + 3.0
        end = pos + dirs * length[:, None]
        keep = _in_lung(an, end, side) | (gen == 0)
        for frac in (0.6, 0.35):
            if keep.all():
                break
            alt = pos + dirs * (frac * length[:, None])
            ok = ~keep & _in_lung(an, alt, side)
            end[ok] = alt[ok]
            keep |= ok
        r_end = radius * 0.92
        for a, b, r0, r1 in zip(pos[keep], end[keep], radius[keep], r_end[keep], strict=True):
            tubes.append(Tube(tuple(a), tuple(b), float(r0), float(r1), VESSEL))  # type: ignore[arg-type]
        grow = keep & (radius * 0.7 >= 0.55)
        pos, d, r = end[grow], dirs[grow], radius[grow]
        n = len(pos)
        perp = rng.normal(size=(n, 3))
        perp = _unit(perp - np.sum(perp * d, axis=1, keepdims=True) * d)
        out = _unit(pos - h)
        angle1, angle2 = rng.uniform(0.3, 0.6, n)[:, None], rng.uniform(0.5, 0.9, n)[:, None]
        d1 = _unit(np.cos(angle1) * d + np.sin(angle1) * perp + 0.2 * out)
        d2 = _unit(np.cos(angle2) * d - np.sin(angle2) * perp + 0.2 * out)
        pos = np.concatenate([pos, pos])
        dirs = np.concatenate([d1, d2])
        radius = np.concatenate([r * rng.uniform(0.75, 0.88, n), r * rng.uniform(0.6, 0.78, n)])
    return tubes


@dataclass(frozen=True)
class SliceGrid:
    """Voxel-centre coordinates of the output grid in the body frame (mm)."""

    z: np.ndarray  # ascending
    y: np.ndarray  # per row
    x: np.ndarray  # per column


def rasterize(tubes: list[Tube], grid: SliceGrid) -> np.ndarray:
    """Label volume (uint8, ``(z, y, x)``) of the tubes; a higher label wins."""
    lab = np.zeros((len(grid.z), len(grid.y), len(grid.x)), np.uint8)
    x0, dx = float(grid.x[0]), float(grid.x[1] - grid.x[0])
    y0, dy = float(grid.y[0]), float(grid.y[1] - grid.y[0])
    for t in tubes:
        a, b = np.asarray(t.a), np.asarray(t.b)
        rmax = max(t.r0, t.r1)
        lo, hi = np.minimum(a, b) - rmax, np.maximum(a, b) + rmax
        i0, i1 = max(0, math.ceil((lo[0] - x0) / dx)), min(len(grid.x), math.floor((hi[0] - x0) / dx) + 1)
        j0, j1 = max(0, math.ceil((lo[1] - y0) / dy)), min(len(grid.y), math.floor((hi[1] - y0) / dy) + 1)
        k0, k1 = int(np.searchsorted(grid.z, lo[2])), int(np.searchsorted(grid.z, hi[2], "right"))
        if i0 >= i1 or j0 >= j1 or k0 >= k1:
            continue
        seg = b - a
        length2 = max(float(seg @ seg), 1e-9)
        pz = (grid.z[k0:k1] - a[2]).astype(np.float32)[:, None, None]
        py = (grid.y[j0:j1] - a[1]).astype(np.float32)[None, :, None]
        px = (grid.x[i0:i1] - a[0]).astype(np.float32)[None, None, :]
        t_ = np.clip((pz * seg[2] + py * seg[1] + px * seg[0]) / length2, 0.0, 1.0)
        dist2 = (pz - t_ * seg[2]) ** 2 + (py - t_ * seg[1]) ** 2 + (px - t_ * seg[0]) ** 2
        rad = t.r0 + t_ * (t.r1 - t.r0)
        sub = lab[k0:k1, j0:j1, i0:i1]
        np.maximum(sub, (dist2 <= rad * rad).astype(np.uint8) * np.uint8(t.label), out=sub)
    return lab


class Fields:
    """Smooth random fields (unit SD) on a coarse grid, interpolated onto slices.

    Channels: 0 disease pattern, 1 consolidation selector, 2 parenchyma texture,
    3 lesion texture.  The grid covers the thoracic cavity over the height of the
    lungs and is fixed in the body frame, so the same seed gives the same pattern
    whatever the output grid.
    """

    def __init__(self, an: Anatomy, seed: int) -> None:
        rng = np.random.default_rng([seed, 3])
        z_lo, z_hi = lung_extent(an)
        self.x0, self.y0, self.z0 = -an.cav_a - 10.0, -an.cav_ba - 10.0, z_lo - 10.0
        shape = (int((z_hi - z_lo + 20.0) / _FIELD_STEP), int((an.cav_ba + an.cav_bp + 20) / _FIELD_STEP),
                 int((2 * an.cav_a + 20) / _FIELD_STEP))
        chans = []
        for sigmas in ((14.0, 6.0), (8.0,), (5.0,), (4.0,)):
            acc = np.zeros(shape, np.float32)
            for i, s in enumerate(sigmas):
                f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), s / _FIELD_STEP)
                acc += f / f.std() * (0.8 if i == 0 and len(sigmas) > 1 else 0.55 if i else 1.0)
            chans.append(acc / acc.std())
        self.data = np.stack(chans, axis=1)  # (z, channel, y, x)

    def _weights(self, coords: np.ndarray, origin: float, n: int) -> np.ndarray:
        pos = np.clip((coords - origin) / _FIELD_STEP, 0, n - 1.001)
        i = pos.astype(int)
        w = (pos - i).astype(np.float32)
        m = np.zeros((len(coords), n), np.float32)
        m[np.arange(len(coords)), i] = 1.0 - w
        m[np.arange(len(coords)), i + 1] = w
        return m

    def sample(self, z: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Fields ``(channel, len(ys), len(xs))`` at height ``z`` on the given rows and columns."""
        nz = self.data.shape[0]
        pos = min(max((z - self.z0) / _FIELD_STEP, 0.0), nz - 1.001)
        k = int(pos)
        plane = self.data[k] * (1 - (pos - k)) + self.data[k + 1] * (pos - k)
        wy = self._weights(ys, self.y0, plane.shape[1])
        wx = self._weights(xs, self.x0, plane.shape[2])
        return np.einsum("yi,cij,xj->cyx", wy, plane, wx, optimize=True)


def render_slice(an: Anatomy, p: Plane, z: float, lab: np.ndarray, enh: Enhancement | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """HU of the healthy anatomy on one slice, with lung masks and the normalised coordinates.

    ``enh``: the contrast enhancement of a contrast-enhanced scan (``None``: no contrast).

    Returns
    -------
    hu (float32), right lung, left lung, and the stacked ``(rho, yn)`` cavity coordinates
    that place disease (peripheral, posterior).
    """
    x, y = p.x, p.y

    def outline(shrink: float) -> np.ndarray:  # flatter at the back
        back = (np.abs(y) / (an.body_bp - shrink)) ** 2.6
        front = (y / (an.body_ba - shrink)) ** 2
        return ((x / (an.body_a - shrink)) ** 2 + np.where(p.ypos, back, front)) < 1.0

    body, inner = outline(0.0), outline(an.fat)
    hu = np.full(x.shape, AIR, np.float32)
    hu[body] = an.fat_hu
    muscle = an.muscle_hu + (enh.muscle if enh else 0.0)
    blood = enh.blood if enh else 40.0
    hu[inner] = muscle
    rho, yn = _cavity(an, p, z)
    cav = inner & (rho < 1.0)
    dia = diaphragm(an, p)
    below = cav & (z < dia)
    above = cav & ~below
    hu[above] = muscle
    # Mediastinal fat between the lungs (a rim of chest-wall muscle stays at the front and back).
    central = (np.abs(x - an.x_mid) < 0.45 * an.cav_a * np.sqrt(np.clip(1.0 - 0.5 * yn**2, 0.0, 1.0)))
    hu[above & ((central & (rho < 0.93)) | _heart(an, p, z, grow=12.0))] = -90.0
    liver = below & (x < an.x_mid + 15.0)
    hu[below] = enh.abdomen if enh else 42.0
    hu[liver] = enh.liver if enh else 58.0
    if an.gas_bubble:
        bub = ((x - 0.45 * an.cav_a) / 40.0) ** 2 + ((y + 0.1 * an.cav_ba) / 32.0) ** 2 + \
              ((z - an.dome_l + 28.0) / 20.0) ** 2 < 1.0
        hu[below & bub] = -995.0
    hu[above & _heart(an, p, z)] = enh.myocardium if enh else 40.0
    if enh:  # blood in the chambers, the wall (about 6 mm) enhances less
        hu[above & _heart(an, p, z, grow=-6.0)] = enh.blood
    keep = _spine_keepout(an, p)
    hu[cav & keep] = muscle
    hu[body & (lab == OESOPHAGUS)] = 40.0
    hu[body & (lab == MEDIASTINAL)] = blood  # the great vessels
    hu[body & (lab == BONE_TUBE)] = an.cortical_hu * 0.8
    hu[body & (lab == AIRWAY_WALL)] = 70.0
    hu[body & (lab == AIRWAY_LUMEN)] = -995.0
    right, left = lungs(an, p, z)
    carve = lab <= VESSEL
    right &= carve
    left &= carve
    lung = right | left
    hu[lung] = an.lung_hu + an.lung_gradient * 0.5 * np.clip(yn[lung], -1.0, 1.0)
    vessel = lab == VESSEL
    hu[vessel & lung] = blood
    hu[vessel & above & ~lung & ~keep] = blood
    _paint_bones(an, p, z, hu, rho, body)
    return hu, right, left, np.stack([rho, yn])


def _paint_bones(an: Anatomy, p: Plane, z: float, hu: np.ndarray, rho: np.ndarray, body: np.ndarray) -> None:
    x, y = p.x, p.y
    cort, marrow = an.cortical_hu, an.marrow_hu
    # Ribs: flat ovals just outside the cavity, descending towards the front.
    d_r = p.r * (1.0 - 1.0 / np.maximum(rho, 1e-3))
    u = (an.cage_top - an.rib_drop * p.front - z) / an.rib_spacing
    k = np.rint(u)
    dz = (u - k) * an.rib_spacing
    ell = ((d_r - 5.0) / 4.0) ** 2 + (dz / 5.0) ** 2
    rib = (ell < 1.0) & (k >= 0) & (k < 12) & ~((y < 0) & (np.abs(x) < 22.0)) & \
        ~((y > 0) & (np.abs(x) < an.r_vb + 6.0)) & body
    hu[rib] = np.where(ell[rib] > 0.35, cort, marrow)
    # Scapulae: thin plates behind the upper ribs.
    if 0.45 * an.height < z < an.cage_top + 10.0:
        scap = (d_r > 14.0) & (d_r < 18.0) & (y > 0.15 * an.cav_bp) & (np.abs(x) > 0.35 * an.cav_a) & body
        hu[scap] = cort * 0.75
    # Sternum.
    if an.dome_r - 20.0 < z < an.cage_top - 4.0:
        st = (x / 16.0) ** 2 + ((y + an.cav_ba + 7.0) / 7.0) ** 2
        hu[st < 1.0] = np.where(st[st < 1.0] > 0.45, cort, marrow)
    # Spine: vertebral body (or disc), canal, posterior arch, spinous and transverse processes.
    disc = ((z - an.vert_phase) % an.vert_period) < 6.0
    vb = (x**2 + (y - an.y_vb) ** 2) / an.r_vb**2
    if disc:
        hu[vb < 1.0] = 90.0
    else:
        hu[vb < 1.0] = np.where(vb[vb < 1.0] > 0.8, cort, marrow)
    yc = an.y_vb + an.r_vb + 9.0
    rc = np.sqrt(x**2 + (y - yc) ** 2)
    hu[(rc > 8.0) & (rc < 13.0) & (y > an.y_vb + an.r_vb - 2.0)] = cort * 0.8
    hu[rc <= 8.0] = 25.0
    hu[((x / 5.0) ** 2 + ((y - yc - 22.0) / 11.0) ** 2) < 1.0] = cort * 0.7
    hu[(((np.abs(x) - 22.0) / 13.0) ** 2 + ((y - yc + 2.0) / 4.5) ** 2) < 1.0] = cort * 0.7
