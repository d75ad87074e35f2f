"""Series selection: choose the axial CT series of a study to analyse.

Every series of the study is judged against :class:`SelectionRules` and
recorded as a :class:`~node.records.SeriesCandidate` with its reason in words.
A series is eligible when it is

- single-frame CT (CT Image Storage).  Enhanced CT multi-frame objects are
  judged *not eligible* with a reason: :func:`model.volume.load_series` reads
  one slice per file, so the analysis could not load them;
- an original acquisition: Image Type ``ORIGINAL\\PRIMARY``, not DERIVED or
  SECONDARY, and not a localizer (Image Type LOCALIZER, or a description such
  as "Topogram", "Scout", "Surview");
- axial: the slice normal within 10 degrees of the patient's z axis;
- at least ``min_slices`` slices forming one regular stack (one orientation,
  size and pixel spacing, no duplicate positions, regular spacing; checked by
  :func:`model.volume.sort_headers`);
- no thicker than ``max_slice_thickness_mm``;
- of a plausible size: at most ``max_matrix`` rows and columns per slice and
  ``max_voxels`` voxels in all (slices x frames x rows x columns), so that a
  header declaring 65535 x 65535 pixels is refused with its reason instead of
  failing on memory when the volume is allocated.

Among eligible series the thinnest slices win (within 0.5 mm), then the kernel
that suits HU-threshold measurement: a smooth/standard kernel rather than a
sharp lung kernel, because a sharp kernel's noise pushes voxels of normal lung
over an opacity threshold (QIBA CT lung density profile), reversed for
``kernel_preference = "sharp"`` and ignored for ``"any"``; then more slices,
then the lower series number.  Kernels are classified with
:data:`KERNEL_TABLE`; where the kernel is missing or not in the table the image
noise of one middle slice is measured (:func:`measure_noise_hu`) and compared
with ``sharp_noise_hu``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, CTImageStorage, EnhancedCTImageStorage
from scipy import ndimage

from model.errors import VolumeError
from model.volume import slice_header, sort_headers
from node.errors import SelectionError
from node.records import SelectedSeries, SeriesCandidate, StoredInstance, StoredStudy

__all__ = [
    "KERNEL_TABLE",
    "KernelClass",
    "SelectionRules",
    "classify_kernel",
    "measure_noise_hu",
    "select_series",
]

logger = logging.getLogger(__name__)

KernelClass = Literal["smooth", "sharp", "unknown"]
KernelPreference = Literal["smooth", "sharp", "any"]

_LOCALIZER_WORDS = ("topogram", "scout", "localizer", "localiser", "surview", "scanogram", "scanoscope")
_DERIVED_WORDS = ("DERIVED", "SECONDARY")
_TISSUE_HU = (0.0, 100.0)
_NOISE_WINDOW_MM = 5.0
_MIN_TISSUE_PIXELS = 1000


@dataclass(frozen=True)
class SelectionRules:
    """What makes a series eligible and which eligible series wins.

    The orchestrator maps :class:`node.settings.SelectionSettings` onto this.
    """

    min_slices: int = 20
    max_slice_thickness_mm: float = 10.0
    kernel_preference: KernelPreference = "smooth"
    sharp_noise_hu: float = 40.0
    """Measured noise (HU) above which an unknown kernel counts as sharp."""
    thickness_tolerance_mm: float = 0.5
    """Slices this much thicker than the thinnest still count as equally thin."""
    axial_tolerance_deg: float = 10.0
    """Largest angle between the slice normal and the patient's z axis."""
    max_matrix: int = 2048
    """Most rows, and most columns, of a slice that is analysed."""
    max_voxels: int = 1 << 29
    """Most voxels (slices x frames x rows x columns) of a series that is analysed."""

    def __post_init__(self) -> None:
        if self.kernel_preference not in ("smooth", "sharp", "any"):
            raise ValueError(
                f"kernel_preference must be smooth, sharp or any, not {self.kernel_preference!r}")
        if self.min_slices < 1 or self.max_slice_thickness_mm <= 0 or self.sharp_noise_hu <= 0:
            raise ValueError("min_slices, max_slice_thickness_mm and sharp_noise_hu must be positive")
        if self.max_matrix < 1 or self.max_voxels < 1:
            raise ValueError("max_matrix and max_voxels must be positive")


# --------------------------------------------------------------------------- kernels

KERNEL_TABLE: tuple[tuple[str, str, KernelClass], ...] = (
    # Siemens: letter (B body, H head, I/J/Q iterative, ...), optional second letter
    # (r regular, l lung, v vascular, f ...), a two-digit sharpness, optional suffix
    # (f fast, s, d, h) and an optional strength (``I70f\3``).  Lung kernels (second
    # letter l) are sharp; otherwise below 50 smooth, 60 and above sharp, 50-59 medium.
    ("Siemens", r"^[A-Z]l\d{2}[a-z]?$", "sharp"),               # Bl57d, Bl64
    ("Siemens", r"^[A-Z][a-z]?[0-4]\d[a-z]?$", "smooth"),       # B40f, B30s, Br40d, I40f, Qr40
    ("Siemens", r"^[A-Z][a-z]?[6-9]\d[a-z]?$", "sharp"),        # B70f, B60f, Hr64h, I70f
    # GE: named kernels.
    ("GE", r"^(STANDARD|STND|SOFT|DETAIL)$", "smooth"),
    ("GE", r"^(LUNG|BONE|BONEPLUS|BONE PLUS|EDGE|ULTRA)$", "sharp"),
    # Philips: letters; A, B, C body (smooth to standard), D, E, L, Y* sharp.
    ("Philips", r"^[ABC]$", "smooth"),
    ("Philips", r"^(D|E|L|YA|YB|YC|YD|YE|YF)$", "sharp"),
    # Canon/Toshiba: FC01-FC18 body (smooth), FC50 and above lung/bone (sharp,
    # FC8x the high-resolution lung kernels); FC19-FC49 (head, bone) stay unknown.
    ("Canon/Toshiba", r"^FC(0\d|1[0-8])$", "smooth"),
    ("Canon/Toshiba", r"^FC[5-9]\d$", "sharp"),
)
"""Common vendors' reconstruction kernels: ``(vendor, pattern, class)``.

Patterns match the upper-cased first value of Convolution Kernel (0018,1210)
for GE, Philips and Canon, and the value as written for Siemens (whose letter
case carries meaning).  Sources: vendors' CT reference manuals and the kernel
comparisons of the QIBA CT lung density profile work (smooth body kernels such
as Siemens B30f-B45f, GE STANDARD, Philips B, Canon FC12-FC18 versus lung/bone
kernels such as B70f, GE LUNG/BONE, Philips L/YB, Canon FC51-FC86).  Siemens
kernels numbered 50-59 (medium) and names not listed are ``unknown``: their
noise is measured instead.  Names containing LUNG, BONE or SHARP, or SOFT,
SMOOTH or STANDARD (other vendors, e.g. United Imaging ``B_SOFT_B``) fall back
to those words.
"""

_COMPILED = tuple((vendor, re.compile(p), cls) for vendor, p, cls in KERNEL_TABLE)


def classify_kernel(kernel: str | None) -> KernelClass:
    """Class of a reconstruction kernel name from :data:`KERNEL_TABLE`.

    Parameters
    ----------
    kernel:
        Convolution Kernel as written by the scanner; a multi-valued kernel
        (``I70f\\3``) is judged by its first value.

    Returns
    -------
    ``"smooth"``, ``"sharp"``, or ``"unknown"`` when the name is missing or not
    in the table.
    """
    if not kernel:
        return "unknown"
    first = kernel.split("\\")[0].strip()
    for vendor, pattern, cls in _COMPILED:
        name = first if vendor == "Siemens" else first.upper()
        if pattern.match(name):
            return cls
    upper = first.upper()
    if any(word in upper for word in ("LUNG", "BONE", "SHARP")):
        return "sharp"
    if any(word in upper for word in ("SOFT", "SMOOTH", "STANDARD")):
        return "smooth"
    return "unknown"


def measure_noise_hu(path: Path) -> float | None:
    """Image noise of one CT slice in HU, the mode of the local standard deviation.

    The local standard deviation is computed in windows of about 5 mm; the mode
    of its histogram over soft tissue (window mean 0-100 HU) is the noise of the
    homogeneous tissue, structure edges falling in the tail (the "global noise
    index" of Christianson et al., Radiology 2015).  Sharp kernels raise it several
    fold over smooth ones at the same dose and thickness.

    Returns
    -------
    The noise in HU, or ``None`` when the slice has too little soft tissue
    (fewer than 1000 pixels) or its pixel data cannot be decoded.
    """
    try:
        ds = pydicom.dcmread(path)
        raw = ds.pixel_array
    except (InvalidDicomError, OSError, AttributeError, ValueError, RuntimeError) as exc:
        logger.warning("cannot decode %s to measure noise: %s", Path(path).name, exc)
        return None
    if raw.ndim != 2:
        return None
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    hu = raw.astype(np.float64) * slope + intercept
    spacing = float(ds.PixelSpacing[0]) if ds.get("PixelSpacing") else 0.7
    size = max(3, int(round(_NOISE_WINDOW_MM / spacing)) | 1)
    mean = ndimage.uniform_filter(hu, size)
    sd = np.sqrt(np.clip(ndimage.uniform_filter(hu * hu, size) - mean * mean, 0.0, None))
    tissue = sd[(mean > _TISSUE_HU[0]) & (mean < _TISSUE_HU[1])]
    if tissue.size < _MIN_TISSUE_PIXELS:
        return None
    hist, edges = np.histogram(tissue, bins=np.arange(0.0, 501.0, 1.0))
    peak = int(np.argmax(hist))
    return float(edges[peak] + 0.5)


# --------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class _Judged:
    candidate: SeriesCandidate
    ordered: tuple[Path, ...] = ()


def _kernel_text(ds: Dataset) -> str | None:
    value = ds.get("ConvolutionKernel")
    if value in (None, ""):
        return None
    if isinstance(value, str):
        return value
    return "\\".join(str(v) for v in value)


def _series_number(ds: Dataset | None) -> int | None:
    if ds is None:
        return None
    value = ds.get("SeriesNumber")
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _label(c: SeriesCandidate) -> str:
    number = f"number {c.series_number}" if c.series_number is not None else "no number"
    desc = f", {c.description!r}" if c.description else ""
    return f"series {c.series_instance_uid} ({number}{desc})"


def _short(c: SeriesCandidate) -> str:
    return f"series {c.series_number}" if c.series_number is not None else f"series {c.series_instance_uid}"


def _refused(uid: str, instances: Sequence[StoredInstance], ds: Dataset | None, reason: str,
             kernel: str | None = None, thickness: float | None = None) -> _Judged:
    return _Judged(SeriesCandidate(
        series_instance_uid=uid, series_number=_series_number(ds),
        description=str(ds.get("SeriesDescription", "") or "") if ds is not None else "",
        slices=len(instances), slice_thickness_mm=thickness, kernel=kernel,
        kernel_class=classify_kernel(kernel), noise_hu=None, eligible=False, reason=reason,
    ))


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


def _image_type_reasons(datasets: Sequence[Dataset]) -> list[str]:
    reasons: list[str] = []
    values = {tuple(str(v).upper() for v in (ds.get("ImageType") or ())) for ds in datasets}
    if any(not v for v in values):
        reasons.append("has slices without Image Type, so original images cannot be told from derived ones")
    shown = sorted("\\".join(v) for v in values if v)
    if any(v[:1] and v[0] in _DERIVED_WORDS or v[1:2] and v[1] in _DERIVED_WORDS for v in values):
        reasons.append(f"is derived, not an original acquisition (Image Type {', '.join(shown)})")
    elif any(v and v[:2] != ("ORIGINAL", "PRIMARY") for v in values):
        reasons.append(f"is not ORIGINAL\\PRIMARY (Image Type {', '.join(shown)})")
    if any("LOCALIZER" in v for v in values):
        reasons.append(f"is a localizer (Image Type {', '.join(shown)})")
    return reasons


def _axial_angle(ds: Dataset) -> float | None:
    try:
        ori = [float(v) for v in ds.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(ori) != 6:
        return None
    normal = np.cross(ori[:3], ori[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return None
    return math.degrees(math.acos(min(1.0, abs(float(normal[2])) / norm)))


def _whole(value: object) -> int | None:
    """An integer attribute value (US, IS), ``None`` when absent or not a number."""
    try:
        return int(str(value)) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _size_reasons(uid: str, datasets: Sequence[Dataset], rules: SelectionRules) -> list[str]:
    """Why a series is too large to analyse: its slice matrix or its voxel count."""
    reasons: list[str] = []
    shapes = {(_whole(ds.get("Rows")), _whole(ds.get("Columns"))) for ds in datasets}
    largest = max(((r or 0, c or 0) for r, c in shapes), key=lambda rc: rc[0] * rc[1])
    if max(max(r or 0, c or 0) for r, c in shapes) > rules.max_matrix:
        reasons.append(f"has {largest[0]}x{largest[1]} pixels per slice; at most "
                       f"{rules.max_matrix}x{rules.max_matrix} are analysed")
    voxels = sum(max(_whole(ds.get("NumberOfFrames")) or 1, 1) * (_whole(ds.get("Rows")) or 0)
                 * (_whole(ds.get("Columns")) or 0) for ds in datasets)
    if voxels > rules.max_voxels:
        reasons.append(f"has {voxels:,} voxels ({len(datasets)} images of up to "
                       f"{largest[0]}x{largest[1]}); at most {rules.max_voxels:,} are analysed")
    if reasons:
        logger.warning("series %s: %s", uid, "; ".join(reasons))
    return reasons


def _judge(uid: str, instances: Sequence[StoredInstance], rules: SelectionRules) -> _Judged:
    """One series' candidate record: eligible, or refused with reasons."""
    classes = {i.sop_class_uid for i in instances}
    if classes != {CTImageStorage}:
        first = _read_one(instances[0].path)
        if classes == {EnhancedCTImageStorage}:
            return _refused(uid, instances, first, (
                "is Enhanced CT (multi-frame), which this node does not analyse; send the series "
                "as single-frame CT Image Storage (scanners and PACS can export it so)"))
        if CTImageStorage in classes or EnhancedCTImageStorage in classes:
            names = ", ".join(sorted(_sop_class_name(c) for c in classes))
            return _refused(uid, instances, first, f"mixes SOP classes ({names}); send CT images only")
        modality = str(first.get("Modality", "?")) if first is not None else "?"
        names = ", ".join(sorted(_sop_class_name(c) for c in classes))
        return _refused(uid, instances, first, f"is not CT ({names}, modality {modality})")

    datasets: list[Dataset] = []
    for inst in instances:
        try:
            datasets.append(_read_header(inst.path))
        except (InvalidDicomError, OSError) as exc:
            return _refused(uid, instances, datasets[0] if datasets else None,
                            f"has an unreadable file {inst.path.name} (SOP {inst.sop_instance_uid}): {exc}")
    first = datasets[0]
    kernel = _kernel_text(first)
    reasons: list[str] = _size_reasons(uid, datasets, rules)
    modalities = sorted({str(ds.get("Modality", "")) for ds in datasets})
    if modalities != ["CT"]:
        reasons.append(f"has modality {'/'.join(m or 'missing' for m in modalities)}, not CT")
    reasons += _image_type_reasons(datasets)
    description = str(first.get("SeriesDescription", "") or "")
    if not any("localizer" in r for r in reasons) and any(w in description.lower() for w in _LOCALIZER_WORDS):
        reasons.append(f"is a localizer (description {description!r})")
    angle = _axial_angle(first)
    if angle is None:
        reasons.append("has no usable Image Orientation (Patient)")
    elif angle > rules.axial_tolerance_deg:
        reasons.append(f"is not axial (slice normal {angle:.0f} degrees from the patient's z axis; "
                       f"at most {rules.axial_tolerance_deg:g} accepted)")
    if len(instances) < rules.min_slices:
        reasons.append(f"has {len(instances)} slice{'s' if len(instances) != 1 else ''}; "
                       f"at least {rules.min_slices} are needed")
    thickness: float | None = None
    thickness_values = [float(ds.SliceThickness) for ds in datasets
                        if ds.get("SliceThickness") not in (None, "")]
    if thickness_values:
        thickness = float(np.median(thickness_values))
        if thickness > rules.max_slice_thickness_mm:
            reasons.append(f"has {thickness:.1f} mm slices; at most {rules.max_slice_thickness_mm:g} mm "
                           "are accepted")
    if reasons:
        return _refused(uid, instances, first, "; ".join(reasons), kernel, thickness)

    try:
        headers = [slice_header(i.path, ds) for i, ds in zip(instances, datasets, strict=True)]
        ordered, _direction, interval = sort_headers(headers)
    except VolumeError as exc:
        reason = str(exc).removeprefix(f"series {uid} ")
        return _refused(uid, instances, first, reason, kernel, thickness)
    spacings = {h.pixel_spacing for h in headers}
    if max(abs(a[0] - b[0]) + abs(a[1] - b[1]) for a in spacings for b in spacings) > 1e-3:
        return _refused(uid, instances, first, "mixes pixel spacings; send a regular stack",
                        kernel, thickness)
    note = ""
    if thickness is None:
        thickness = interval
        note = " (no Slice Thickness recorded; slice interval used)"
        if thickness > rules.max_slice_thickness_mm:
            return _refused(uid, instances, first, f"has {thickness:.1f} mm slice interval; at most "
                            f"{rules.max_slice_thickness_mm:g} mm are accepted", kernel, thickness)
    paths = tuple(h.path for h in ordered)
    kernel_class = classify_kernel(kernel)
    noise: float | None = None
    if kernel_class == "unknown":
        noise = measure_noise_hu(paths[len(paths) // 2])
        if noise is not None:
            kernel_class = "sharp" if noise > rules.sharp_noise_hu else "smooth"
    assert thickness is not None
    how = "from the kernel table" if noise is None else f"measured noise {noise:.1f} HU"
    if kernel_class == "unknown":
        how = "kernel not in the table and noise not measurable"
    reason = (f"eligible: {len(paths)} axial slices of {thickness:.1f} mm{note}, kernel "
              f"{kernel or 'not recorded'} ({kernel_class}, {how})")
    candidate = SeriesCandidate(
        series_instance_uid=uid, series_number=_series_number(first), description=description,
        slices=len(paths), slice_thickness_mm=thickness, kernel=kernel, kernel_class=kernel_class,
        noise_hu=noise, eligible=True, reason=reason,
    )
    return _Judged(candidate, paths)


def _read_header(path: Path) -> Dataset:
    """The data set up to the pixel data; :class:`OSError` when the file ends before them (a CT
    image has pixel data: the stored file was cut short after it was received)."""
    with path.open("rb") as f:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if f.tell() >= os.fstat(f.fileno()).st_size:
            raise OSError(f"it ends after {f.tell()} bytes, before its pixel data (cut short on disk "
                          "after it was received); send the instance again")
    return ds


def _read_one(path: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError):
        return None


# --------------------------------------------------------------------------- choosing


def _kernel_rank(c: SeriesCandidate, preference: KernelPreference) -> int:
    if preference == "any":
        return 0
    order: dict[str, int] = {"smooth": 0, "unknown": 1, "sharp": 2}
    rank = order[c.kernel_class]
    return rank if preference == "smooth" else 2 - rank


def _kernel_words(c: SeriesCandidate) -> str:
    if c.kernel:
        return f"{c.kernel_class} {c.kernel}" if c.kernel_class != "unknown" else f"unknown kernel {c.kernel}"
    if c.noise_hu is not None:
        return f"{_short(c)} ({c.kernel_class} by measured noise {c.noise_hu:.1f} HU)"
    return f"{_short(c)} (kernel unknown)"


def _choose(eligible: list[SeriesCandidate], rules: SelectionRules) -> tuple[SeriesCandidate, list[str]]:
    """The winning candidate and the criteria, in words, that made it win."""
    if len(eligible) == 1:
        return eligible[0], ["the only eligible series"]
    why: list[str] = []
    thinnest = min(c.slice_thickness_mm or 0.0 for c in eligible)
    group = [c for c in eligible if (c.slice_thickness_mm or 0.0) <= thinnest + rules.thickness_tolerance_mm]
    thicker = sorted({c.slice_thickness_mm or 0.0 for c in eligible if c not in group})
    why.append("thinnest eligible slices" + (
        f" ({thinnest:.1f} mm; others {', '.join(f'{t:.1f}' for t in thicker)} mm)" if thicker else ""))

    if len(group) > 1 and rules.kernel_preference != "any":
        best = min(_kernel_rank(c, rules.kernel_preference) for c in group)
        losers = [c for c in group if _kernel_rank(c, rules.kernel_preference) > best]
        group = [c for c in group if _kernel_rank(c, rules.kernel_preference) == best]
        if losers:
            winner_words = f"{group[0].kernel_class} kernel"
            if len(group) == 1:
                winner_words += f" {group[0].kernel}" if group[0].kernel else (
                    f" (measured noise {group[0].noise_hu:.1f} HU)" if group[0].noise_hu is not None else "")
            loser_words = ", ".join(dict.fromkeys(_kernel_words(c) for c in losers))
            if rules.kernel_preference == "smooth":
                why.append(f"{winner_words} preferred over {loser_words} for HU-threshold "
                           "measurement (QIBA lung density profile: sharp kernels add noise that a "
                           "threshold counts as opacity)")
            else:
                why.append(f"{winner_words} preferred over {loser_words} as configured "
                           "(kernel_preference = sharp)")
        noises = [c.noise_hu for c in group]
        if len(group) > 1 and all(n is not None for n in noises):
            pick = min if rules.kernel_preference == "smooth" else max
            target = pick(n for n in noises if n is not None)
            others = sorted(n for n in noises if n is not None and n != target)
            group = [c for c in group if c.noise_hu == target]
            if others:
                adjective = "lower" if rules.kernel_preference == "smooth" else "higher"
                why.append(f"{adjective} measured noise ({target:.1f} HU vs "
                           f"{', '.join(f'{n:.1f}' for n in others)} HU)")

    if len(group) > 1:
        most = max(c.slices for c in group)
        fewer = sorted({c.slices for c in group if c.slices < most})
        group = [c for c in group if c.slices == most]
        if fewer:
            why.append(f"more slices ({most} vs {', '.join(map(str, fewer))})")
    if len(group) > 1:
        group.sort(key=lambda c: (c.series_number is None, c.series_number or 0, c.series_instance_uid))
        why.append("lowest series number among equals")
    return group[0], why


def _describe(c: SeriesCandidate) -> str:
    kernel = c.kernel or ("no kernel recorded" + (f", noise {c.noise_hu:.1f} HU" if c.noise_hu is not None
                                                  else ""))
    return f"{kernel}, {c.slice_thickness_mm or 0.0:.1f} mm, {c.slices} slices"


def select_series(study: StoredStudy, rules: SelectionRules) -> SelectedSeries:
    """Choose the series of ``study`` to analyse.

    Parameters
    ----------
    study:
        Every stored instance of the study.
    rules:
        Eligibility and preference rules.

    Returns
    -------
    SelectedSeries
        The chosen series with its files in z order (increasing position along
        the slice normal), a sentence saying why, and every series as a
        candidate with its reason.

    Raises
    ------
    SelectionError
        The study has no CT images, or no series is eligible; the message has one
        line per series saying why it was refused.
    """
    if not study.instances:
        raise SelectionError(f"study {study.study_instance_uid} has no stored instances")
    by_series: dict[str, list[StoredInstance]] = {}
    for inst in study.instances:
        by_series.setdefault(inst.series_instance_uid, []).append(inst)
    judged = {uid: _judge(uid, insts, rules) for uid, insts in by_series.items()}
    candidates = tuple(sorted((j.candidate for j in judged.values()),
                              key=lambda c: (c.series_number is None, c.series_number or 0,
                                             c.series_instance_uid)))
    lines = "\n".join(f"  {_label(c)} {c.reason}" for c in candidates)
    if not any(i.sop_class_uid in (CTImageStorage, EnhancedCTImageStorage) for i in study.instances):
        raise SelectionError(
            f"study {study.study_instance_uid} has no CT images; send the chest CT series:\n{lines}")
    eligible = [c for c in candidates if c.eligible]
    if not eligible:
        raise SelectionError(
            f"study {study.study_instance_uid} has no series that can be analysed:\n{lines}")
    chosen, why = _choose(eligible, rules)
    reason = f"{_short(chosen)} ({_describe(chosen)}) chosen: {'; '.join(why)}"
    refused = len(candidates) - len(eligible)
    if refused:
        reason += f" ({refused} other series not eligible)"
    logger.info("study %s: %s", study.study_instance_uid, reason)
    return SelectedSeries(
        study_instance_uid=study.study_instance_uid,
        series_instance_uid=chosen.series_instance_uid,
        paths=judged[chosen.series_instance_uid].ordered,
        reason=reason,
        candidates=candidates,
    )
