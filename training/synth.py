"""Synthetic chest CT studies with known ground truth (lungs, ground glass, consolidation).

:func:`make_phantom` builds a HU volume with masks; :func:`write_study` writes it
as a CT Image Storage series (one part-10 file per slice) with ``truth.json`` and
``truth.npz`` beside it.  ``lungnode synth DIR --involvement F --seed N`` calls
:func:`write_study`.

What the phantom contains
-------------------------
Air outside the body (-1000 HU) and a curved patient table under it; an
elliptical body (flatter back) of subcutaneous fat (about -100 HU) around a
muscle wall (about 45 HU); ribs descending towards the front, sternum,
scapulae, clavicles and a segmented spine (cortical bone 700-1000 HU, marrow
160-280 HU, discs, canal); a mediastinum of fat (-90 HU) with the heart, aorta
(ascending, arch, descending), superior vena cava, oesophagus and pulmonary
arteries (about 40 HU); a trachea that splits at the carina into two main
bronchi (air with a soft-tissue wall) inside the mediastinum; two lungs of
parenchyma (about -850 HU, denser towards the back) with two branching,
tapering pulmonary vessel trees (tubes of about 40 HU grown from the hila,
2-4 % of the lung voxels: ``truth.json`` reports it as ``vessel_percent``);
two diaphragm domes (the right one higher) with liver, spleen/stomach and
sometimes a gastric air bubble below them.  Disease is ground glass (-690 to
-320 HU, mostly about -550) and consolidation (-90 to +55 HU) in smooth blobs:
a multi-scale smoothed random field, pushed towards the periphery, the back
and the bases as in COVID-19 pneumonia, thresholded at the quantile that makes
the diseased share of the lung voxels equal to ``involvement`` (exact up to one
voxel); consolidation is the ``consolidation_fraction`` of the diseased voxels
where a second field is highest.  The image is then blurred by a point spread
function and Gaussian noise is added: a smooth kernel (``B40f``, ``STANDARD``)
gives correlated noise of 10-30 HU SD; a sharp kernel (``B70f``, ``LUNG``) a
sharper image with edge overshoot and 2.5 times the noise.

``contrast=True`` gives the same patient scanned after intravenous contrast:
blood in the heart chambers, the great vessels and the pulmonary vessel trees
at 150-320 HU, the heart wall at 90-130, liver and spleen at 90-135, muscle
5-15 HU and consolidation 15-40 HU denser (levels seeded); the oesophagus,
fat, bone and aerated lung do not change, and neither do the masks.

What the seed varies
--------------------
Body size and shape, fat and muscle thickness, lung height, cavity outline
(low-order harmonic wobble), apex and diaphragm heights (left/right),
mediastinal width and shift, heart size and position (so the left lung is
smaller), spine and rib spacing, carina height, the vessel trees, tissue HU
levels (and, with contrast, the enhancement), parenchymal density and
gradient, noise level, the disease pattern and its weighting, which end
partial coverage cuts, the fake patient identity and dates, the field-of-view
placement and the table position.  Anatomy and disease
depend on the seed only (not on the grid), so studies of one seed at several
resolutions or kernels show the same patient, and a higher ``involvement``
grows the same lesions.  UIDs are derived from the whole specification, so the
same specification always gives the same UIDs; the patient identity and study
date depend on the seed only, the frame of reference on the seed and the study.

Scale and speed: 300 slices of 512 x 512 take about 15 s to generate and write
on two cores (600 slices about 25 s, 1.6 GB peak memory); 128 x 128 test
studies take well under a second.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from scipy import ndimage

from model.quantify import category_for
from training import synth_anatomy as anat
from training.synth_dicom import Identity, WrittenSeries, make_identity, write_slices

__all__ = ["Phantom", "SynthSpec", "SynthSpecError", "SynthStudy", "kernel_is_sharp", "make_phantom",
           "write_study"]

logger = logging.getLogger(__name__)

_UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
_SHARP_NAMES = {"LUNG", "BONE", "BONEPLUS", "SHARP", "DETAIL", "EDGE", "YC", "YD", "YE", "L"}
HU_MIN, HU_MAX = -1024, 3071


class SynthSpecError(ValueError):
    """A :class:`SynthSpec` field is out of range."""


@dataclass(frozen=True)
class SynthSpec:
    """What to generate.  See the module docstring for what the seed varies."""

    involvement: float = 0.2
    """Fraction 0..1 of the lung volume that is diseased (ground glass + consolidation)."""
    seed: int = 0
    slices: int | None = None
    """``None``: enough slices to cover the lungs plus a margin (or the cut, for partial coverage)."""
    slice_thickness_mm: float = 2.5
    """Also the slice interval."""
    rows: int = 512
    """The image is rows x rows."""
    pixel_spacing_mm: float | None = None
    """``None``: field of view = body width + a seeded margin."""
    kernel: str = "B40f"
    psf_mm: float | None = None
    """In-plane point spread of the reconstruction (Gaussian sigma, mm); ``None``: the kernel's
    (0.3 sharp, 0.6 smooth). Wider for a softer kernel (a Philips "B", a Siemens B30f)."""
    parenchyma_offset_hu: float = 0.0
    """Added to the drawn parenchyma density (about -880 to -825 HU): denser lungs, as in shallow
    inspiration or a heavy patient's dependent lung, where vessel halos reach the ground-glass range."""
    contrast: bool = False
    """Intravenous contrast: blood, heart wall, liver, spleen and consolidation enhance (seeded levels)."""
    consolidation_fraction: float = 0.3
    coverage: str = "full"
    """``"full"`` or ``"partial"`` (lung apex or base cut off, chosen by the seed)."""
    patient_name: str | None = None
    """``None`` for these four: seeded fake values."""
    patient_id: str | None = None
    patient_birth_date: str | None = None
    accession_number: str | None = None
    study_instance_uid: str | None = None
    """Given: the series joins that study (multi-series studies)."""
    series_number: int = 2
    transfer_syntax: str = str(ExplicitVRLittleEndian)

    def __post_init__(self) -> None:
        checks = [
            (0.0 <= self.involvement <= 1.0, f"involvement must be within 0..1, not {self.involvement}"),
            (0.0 <= self.consolidation_fraction <= 1.0,
             f"consolidation_fraction must be within 0..1, not {self.consolidation_fraction}"),
            (self.slices is None or 1 <= self.slices <= 4000, f"slices must be 1..4000, not {self.slices}"),
            (0.1 <= self.slice_thickness_mm <= 20.0,
             f"slice_thickness_mm must be 0.1..20, not {self.slice_thickness_mm}"),
            (32 <= self.rows <= 2048, f"rows must be 32..2048, not {self.rows}"),
            (self.pixel_spacing_mm is None or 0.05 <= self.pixel_spacing_mm <= 20.0,
             f"pixel_spacing_mm must be 0.05..20, not {self.pixel_spacing_mm}"),
            (self.coverage in ("full", "partial"),
             f"coverage must be 'full' or 'partial', not {self.coverage!r}"),
            (self.transfer_syntax in _UNCOMPRESSED,
             f"transfer syntax {self.transfer_syntax} is not uncompressed; write Explicit VR Little Endian "
             "and compress the files afterwards (DCMTK dcmcjpeg, dcmcrle, dcmcjpls)"),
            (1 <= self.series_number <= 99999, f"series_number must be 1..99999, not {self.series_number}"),
            (bool(self.kernel.strip()), "kernel must not be empty"),
            (self.psf_mm is None or 0.0 <= self.psf_mm <= 3.0, f"psf_mm must be 0..3, not {self.psf_mm}"),
            (-100.0 <= self.parenchyma_offset_hu <= 200.0,
             f"parenchyma_offset_hu must be -100..200, not {self.parenchyma_offset_hu}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SynthSpecError(message)


@dataclass(frozen=True, eq=False)
class Phantom:
    """In-memory phantom, arrays ``(z, y, x)`` with z increasing (inferior to superior)."""

    hu: np.ndarray
    """int16 Hounsfield units, clipped to -1024..3071."""
    left_lung: np.ndarray
    """Patient's left (larger patient x in LPS)."""
    right_lung: np.ndarray
    ground_glass: np.ndarray
    """Subset of the lungs."""
    consolidation: np.ndarray
    """Subset of the lungs, disjoint from ``ground_glass``."""
    spacing: tuple[float, float, float]
    """(z, y, x) in mm."""
    origin: tuple[float, float, float]
    """Patient (x, y, z) of the first voxel."""


@dataclass(frozen=True)
class SynthStudy:
    """What :func:`write_study` wrote."""

    directory: Path
    dicom_dir: Path
    paths: tuple[Path, ...]
    """IM0001.dcm first: the most superior slice (as scanners number a head-first chest)."""
    study_instance_uid: str
    series_instance_uid: str
    truth: dict[str, Any]
    """The content of ``truth.json``."""


def kernel_is_sharp(kernel: str) -> bool:
    """Whether a convolution kernel name denotes a sharp (lung/bone) reconstruction.

    Siemens-style names (``B70f``, ``Br64``, ``I70f``) count as sharp from 50 up;
    GE/Philips names ``LUNG``, ``BONE``, ``BONEPLUS``, ``DETAIL``, ``EDGE``, ``YC``... are sharp.
    """
    k = kernel.strip().upper()
    if k in _SHARP_NAMES:
        return True
    m = re.match(r"^[A-Z]{1,3}(\d{2})", k)
    return bool(m and int(m.group(1)) >= 50)


@dataclass(frozen=True)
class _Layout:
    z: np.ndarray         # body-frame z of slices, ascending
    y: np.ndarray
    x: np.ndarray
    origin: tuple[float, float, float]
    pixel_spacing: float
    cut: str | None       # "apex", "base" or None


def _layout(spec: SynthSpec, an: anat.Anatomy) -> _Layout:
    rng = np.random.default_rng([spec.seed, 4])
    z_lo, z_hi = anat.lung_extent(an)
    height = z_hi - z_lo
    below, above, cut_frac = rng.uniform(12.0, 30.0), rng.uniform(10.0, 25.0), rng.uniform(0.22, 0.38)
    cut_end = "apex" if rng.random() < 0.5 else "base"  # drawn always: the grid must not depend on coverage
    cut = cut_end if spec.coverage == "partial" else None
    thk = spec.slice_thickness_mm
    bottom, top = z_lo - below, z_hi + above
    if cut == "apex":
        top = z_hi - cut_frac * height
    elif cut == "base":
        bottom = z_lo + cut_frac * height
    if spec.slices is None:
        n = int(math.ceil((top - bottom) / thk)) + 1
    else:
        n = spec.slices
        if cut == "base":
            top = bottom + (n - 1) * thk
        elif cut == "apex":
            bottom = top - (n - 1) * thk
        else:
            bottom = (bottom + top) / 2 - (n - 1) * thk / 2
    z_patient0 = round(bottom - an.height - rng.uniform(20.0, 120.0), 1)
    z_pat = np.round(z_patient0 + np.arange(n) * thk, 4)
    z_offset = z_patient0 - bottom
    margin = rng.uniform(25.0, 60.0)
    ps = spec.pixel_spacing_mm or (2 * an.body_a + margin) / spec.rows
    ps = round(ps, 6)
    centre_y = rng.uniform(-30.0, 30.0)
    body_x, body_y = rng.uniform(-8.0, 8.0), centre_y + rng.uniform(-15.0, 5.0)
    ipp_x = round(-(spec.rows - 1) / 2 * ps, 4)
    ipp_y = round(centre_y - (spec.rows - 1) / 2 * ps, 4)
    idx = np.arange(spec.rows)
    return _Layout(z=z_pat - z_offset, y=ipp_y + idx * ps - body_y, x=ipp_x + idx * ps - body_x,
                   origin=(ipp_x, ipp_y, float(z_pat[0])), pixel_spacing=ps, cut=cut)


def _table(an: anat.Anatomy, y: np.ndarray, x: np.ndarray, seed: int) -> np.ndarray:
    """Constant slice of a curved carbon-fibre table top (air elsewhere)."""
    rng = np.random.default_rng([seed, 6])
    yy, xx = np.meshgrid(y, x, indexing="ij")
    top = an.body_bp + rng.uniform(1.0, 5.0) - 25.0 * (xx / 200.0) ** 2
    d = yy - top
    img = np.full(yy.shape, anat.AIR, np.float32)
    inside = np.abs(xx) < 230.0
    img[inside & (d > 0) & (d < 40)] = -900.0
    img[inside & (((d > 0) & (d < 4)) | ((d > 36) & (d < 40)))] = 250.0
    return img


def _crop(lay: _Layout, an: anat.Anatomy) -> tuple[slice, slice]:
    def span(c: np.ndarray, lo: float, hi: float) -> slice:
        i = np.nonzero((c >= lo) & (c <= hi))[0]
        return slice(int(i[0]), int(i[-1]) + 1) if len(i) else slice(0, 0)

    return (span(lay.y, -an.body_ba - 2.0, an.body_bp + 2.0), span(lay.x, -an.body_a - 2.0, an.body_a + 2.0))


@dataclass(frozen=True, eq=False)
class _Generated:
    phantom: Phantom
    layout: _Layout
    anatomy: anat.Anatomy
    vessel_voxels: dict[str, int]  # intrapulmonary vessel voxels per lung


def _generate(spec: SynthSpec) -> _Generated:
    an = anat.draw_anatomy(spec.seed)
    if spec.parenchyma_offset_hu:
        an = replace(an, lung_hu=an.lung_hu + spec.parenchyma_offset_hu)
    lay = _layout(spec, an)
    n, rows = len(lay.z), spec.rows
    grid = anat.SliceGrid(z=lay.z, y=lay.y, x=lay.x)
    labels = anat.rasterize(anat.draw_tubes(an, spec.seed, float(lay.z[-1])), grid)
    fields = anat.Fields(an, spec.seed)
    table = _table(an, lay.y, lay.x, spec.seed)
    cy, cx = _crop(lay, an)
    plane = anat.Plane(*np.meshgrid(lay.x[cx], lay.y[cy]))
    hu = np.empty((n, rows, rows), np.int16)
    right = np.zeros((n, rows, rows), bool)
    left = np.zeros((n, rows, rows), bool)
    disease, selector, texture = [], [], []
    w_per, w_post, w_low, bias = an.disease_weights
    vessels = {"left": 0, "right": 0}
    enh = anat.draw_enhancement(spec.seed) if spec.contrast else None
    for k, z in enumerate(lay.z):
        img = table.copy()
        if cy.stop > cy.start and cx.stop > cx.start:
            h, r, lft, (rho, yn) = anat.render_slice(an, plane, float(z), labels[k, cy, cx], enh)
            sub = img[cy, cx]
            img[cy, cx] = np.where(h != anat.AIR, h, sub)
            right[k, cy, cx], left[k, cy, cx] = r, lft
            is_vessel = labels[k, cy, cx] == anat.VESSEL
            vessels["left"] += int((is_vessel & lft).sum())
            vessels["right"] += int((is_vessel & r).sum())
            lung = r | lft
            if lung.any():
                rr, cc = np.nonzero(lung.any(1))[0], np.nonzero(lung.any(0))[0]
                bb = (slice(rr[0], rr[-1] + 1), slice(cc[0], cc[-1] + 1))
                f = fields.sample(float(z), lay.y[cy][bb[0]], lay.x[cx][bb[1]])
                m = lung[bb]
                side = np.where(lft[bb][m], 1.0, -1.0)
                score = (f[0][m] + w_per * rho[bb][m] ** 2 + w_post * yn[bb][m]
                         + w_low * (1.0 - float(z) / an.height) + bias * side)
                disease.append(score.astype(np.float32))
                selector.append((score + 0.9 * f[1][m]).astype(np.float32))
                texture.append(f[3][m].astype(np.float16))
                sl = img[cy, cx][bb]
                sl[m] += 10.0 * f[2][m]
                img[cy, cx][bb] = sl
        hu[k] = np.rint(img)
    ground_glass = np.zeros_like(right)
    consolidation = np.zeros_like(right)
    _add_disease(spec, hu, right | left, ground_glass, consolidation, disease, selector, texture,
                 enh.consolidation if enh else 0.0)
    _reconstruct(spec, an, lay, hu)
    phantom = Phantom(hu=hu, left_lung=left, right_lung=right, ground_glass=ground_glass,
                      consolidation=consolidation,
                      spacing=(spec.slice_thickness_mm, lay.pixel_spacing, lay.pixel_spacing),
                      origin=lay.origin)
    return _Generated(phantom, lay, an, vessels)


def _top(values: np.ndarray, count: int) -> float:
    """Threshold such that ``count`` of ``values`` are >= it (inf for none)."""
    if count <= 0:
        return math.inf
    if count >= len(values):
        return -math.inf
    return float(np.partition(values, len(values) - count)[len(values) - count])


def _add_disease(spec: SynthSpec, hu: np.ndarray, lungs: np.ndarray, ground_glass: np.ndarray,
                 consolidation: np.ndarray, disease: list[np.ndarray], selector: list[np.ndarray],
                 texture: list[np.ndarray], enhancement: float = 0.0) -> None:
    if not disease:
        return
    score = np.concatenate(disease)
    n_dis = int(round(spec.involvement * len(score)))
    t_dis = _top(score, n_dis)
    sel_all = np.concatenate(selector)
    n_cons = int(round(spec.consolidation_fraction * n_dis))
    t_cons = _top(sel_all[score >= t_dis], n_cons)
    i = 0
    for k in range(hu.shape[0]):
        m = lungs[k]
        if not m.any():
            continue
        s, g, tex = disease[i], selector[i], texture[i].astype(np.float32)
        i += 1
        dis = s >= t_dis
        cons = dis & (g >= t_cons)
        gg = dis & ~cons
        if not dis.any():
            continue
        vals = hu[k][m].astype(np.float32)
        vessel = vals > -300.0  # vessels stay (consolidation below replaces them)
        ggo = -640.0 + 190.0 * np.clip((s - t_dis) / 0.6, 0.0, 1.0) + 45.0 * tex
        con = -45.0 + 50.0 * np.clip((g - t_cons) / 0.6, 0.0, 1.0) + 25.0 * tex
        vals = np.where(gg & ~vessel, np.clip(ggo, -690.0, -320.0), vals)
        vals = np.where(cons, np.clip(con, -90.0, 55.0) + enhancement, vals)
        plane = hu[k]
        plane[m] = np.rint(vals)
        ground_glass[k][m] = gg
        consolidation[k][m] = cons


def _reconstruct(spec: SynthSpec, an: anat.Anatomy, lay: _Layout, hu: np.ndarray) -> None:
    """Point spread, kernel edge enhancement and noise, slice by slice, in place."""
    sharp = kernel_is_sharp(spec.kernel)
    ps = lay.pixel_spacing
    psf = (spec.psf_mm if spec.psf_mm is not None else 0.3 if sharp else 0.6) / ps
    corr = (0.45 if sharp else 0.9) / ps
    sd = _noise_sd(spec, an)
    rng = np.random.default_rng([spec.seed, 7, spec.series_number])
    for k in range(hu.shape[0]):
        img = hu[k].astype(np.float32)
        in_body = img > -950.0
        if psf > 0.25:
            img = ndimage.gaussian_filter(img, psf, truncate=3.0)
        if sharp:
            img += 0.8 * (img - ndimage.gaussian_filter(img, 1.2 / ps, truncate=3.0))
        noise = rng.standard_normal(img.shape, dtype=np.float32)
        if corr > 0.25:
            noise = ndimage.gaussian_filter(noise, corr, truncate=3.0)
        noise *= sd / max(float(noise.std()), 1e-6)
        img += np.where(in_body, noise, 0.35 * noise)
        hu[k] = np.clip(np.rint(img), HU_MIN, HU_MAX)


def make_phantom(spec: SynthSpec) -> Phantom:
    """Generate the phantom described by ``spec`` in memory.

    Parameters
    ----------
    spec:
        What to generate; the same spec always gives the same arrays.

    Returns
    -------
    Phantom
        HU volume (int16) and boolean masks on the same ``(z, y, x)`` grid, z increasing.
    """
    return _generate(spec).phantom


def _percent(part: np.ndarray, whole: np.ndarray) -> float:
    n = int(whole.sum())
    return round(100.0 * int((part & whole).sum()) / n, 4) if n else 0.0


def _noise_sd(spec: SynthSpec, an: anat.Anatomy) -> float:
    return an.noise_sd * (2.5 if kernel_is_sharp(spec.kernel) else 1.0)


def _truth(spec: SynthSpec, gen: _Generated, ident: Identity, written: WrittenSeries,
           files: list[str]) -> dict[str, Any]:
    ph = gen.phantom
    lungs = ph.left_lung | ph.right_lung
    disease = ph.ground_glass | ph.consolidation
    voxel_ml = float(np.prod(ph.spacing)) / 1000.0
    per = {"total": lungs, "left": ph.left_lung, "right": ph.right_lung}
    counts = {k: int(m.sum()) for k, m in per.items()}
    involvement = {k: _percent(disease, m) for k, m in per.items()}
    vessels = dict(gen.vessel_voxels, total=sum(gen.vessel_voxels.values()))
    return {
        "generator": "training.synth",
        "spec": asdict(spec),
        "involvement_percent": involvement,
        "ground_glass_percent": {k: _percent(ph.ground_glass, m) for k, m in per.items()},
        "consolidation_percent": {k: _percent(ph.consolidation, m) for k, m in per.items()},
        "lung_volume_ml": {k: round(c * voxel_ml, 3) for k, c in counts.items()},
        "vessel_percent": {k: round(100.0 * vessels[k] / counts[k], 4) if counts[k] else 0.0 for k in counts},
        "severity_category": category_for(involvement["total"]),
        "coverage": {"mode": spec.coverage, "cut": gen.layout.cut},
        "kernel": {"name": spec.kernel, "sharp": kernel_is_sharp(spec.kernel),
                   "noise_sd_hu": round(_noise_sd(spec, gen.anatomy), 2)},
        "patient": {"name": ident.name, "id": ident.patient_id, "birth_date": ident.birth_date,
                    "sex": ident.sex},
        "accession_number": ident.accession,
        "study_date": ident.study_date,
        "study_instance_uid": written.study_uid,
        "series_instance_uid": written.series_uid,
        "frame_of_reference_uid": written.frame_of_reference_uid,
        "geometry": {"rows": spec.rows, "columns": spec.rows, "slices": int(ph.hu.shape[0]),
                     "spacing_mm": list(ph.spacing), "origin": list(ph.origin)},
        "files": files,
        "sop_instance_uids": written.sop_uids,
        "masks": "truth.npz: left_lung, right_lung, ground_glass, consolidation; (z, y, x) with z in "
                 "increasing ImagePositionPatient z, so index 0 is the last file",
    }


def write_study(out_dir: Path, spec: SynthSpec) -> SynthStudy:
    """Write the phantom as a DICOM series with ``truth.json`` and ``truth.npz``.

    Re-running overwrites: previous ``dicom/IM*.dcm`` files in ``out_dir`` are removed first.

    Parameters
    ----------
    out_dir:
        Created if needed; receives ``dicom/IM0001.dcm ...`` (IM0001 the most superior
        slice), ``truth.json`` and ``truth.npz``.
    spec:
        What to generate.

    Returns
    -------
    SynthStudy
        Paths, UIDs and the truth dictionary.
    """
    out_dir = Path(out_dir)
    gen = _generate(spec)
    ident = make_identity(spec)
    dicom_dir = out_dir / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    for old in dicom_dir.glob("IM*.dcm"):
        old.unlink()
    written = write_slices(dicom_dir, spec, gen.phantom, ident)
    files = [p.relative_to(out_dir).as_posix() for p in written.paths]
    truth = _truth(spec, gen, ident, written, files)
    (out_dir / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    ph = gen.phantom
    np.savez_compressed(out_dir / "truth.npz", left_lung=ph.left_lung, right_lung=ph.right_lung,
                        ground_glass=ph.ground_glass, consolidation=ph.consolidation)
    logger.info("wrote synthetic series %s (%d slices, involvement %.1f %%)", written.series_uid,
                len(written.paths), truth["involvement_percent"]["total"])
    return SynthStudy(directory=out_dir, dicom_dir=dicom_dir, paths=tuple(written.paths),
                      study_instance_uid=written.study_uid, series_instance_uid=written.series_uid,
                      truth=truth)
