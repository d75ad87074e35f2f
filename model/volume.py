"""DICOM CT series to a Hounsfield-unit volume with its geometry.

The volume is indexed ``(z, y, x)``: slices sorted along the slice normal
(increasing position), rows, columns.  Geometry follows DICOM patient
coordinates (LPS, millimetres).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from model.errors import VolumeError

__all__ = ["CTVolume", "SliceHeader", "load_series", "read_headers", "sort_headers"]

logger = logging.getLogger(__name__)

_ORIENTATION_TOLERANCE = 1e-3
_SPACING_TOLERANCE = 0.05  # fraction of the median spacing


@dataclass(frozen=True)
class SliceHeader:
    """What series selection and volume loading need from one file's header."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slice_thickness: float | None


@dataclass(frozen=True, eq=False)
class CTVolume:
    """A CT series as a HU array with the geometry to map voxels to patient space.

    Attributes
    ----------
    hu:
        ``int16`` or ``float32`` array ``(z, y, x)`` of Hounsfield units.
    spacing:
        Voxel size in mm as ``(z, y, x)``: slice interval, row spacing, column spacing.
    origin:
        Patient position (x, y, z in mm) of the first voxel of the first slice.
    direction:
        3x3 matrix whose columns are the unit vectors of the column (x index),
        row (y index) and slice (z index) directions in patient space.
    series_instance_uid:
        The source series.
    sop_instance_uids:
        Source instances in z order, one per slice.
    slice_thickness:
        Nominal reconstructed slice thickness in mm (DICOM Slice Thickness),
        falling back to the slice interval.
    kernel:
        Convolution kernel as written by the scanner, ``None`` when absent.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    slice_thickness: float
    kernel: str | None = None
    paths: tuple[Path, ...] = field(default=())

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.hu.shape
        return int(z), int(y), int(x)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.spacing)) / 1000.0


def _header(path: Path, ds: Dataset) -> SliceHeader:
    try:
        pos = tuple(float(v) for v in ds.ImagePositionPatient)
        ori = tuple(float(v) for v in ds.ImageOrientationPatient)
        spacing = tuple(float(v) for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError) as exc:
        raise VolumeError(
            f"{path.name} (SOP {ds.get('SOPInstanceUID', '?')}) lacks usable "
            f"Image Position/Orientation (Patient) or Pixel Spacing: {exc}"
        ) from exc
    if len(pos) != 3 or len(ori) != 6 or len(spacing) != 2:
        raise VolumeError(f"{path.name}: malformed geometry attributes")
    thickness = ds.get("SliceThickness")
    return SliceHeader(
        path=path,
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        position=pos,  # type: ignore[arg-type]
        orientation=ori,  # type: ignore[arg-type]
        pixel_spacing=spacing,  # type: ignore[arg-type]
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
    )


def read_headers(paths: Sequence[Path]) -> list[SliceHeader]:
    """Read the geometry of each file without decoding pixel data."""
    headers = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        headers.append(_header(Path(path), ds))
    return headers


def sort_headers(headers: Sequence[SliceHeader]) -> tuple[list[SliceHeader], np.ndarray, float]:
    """Check that slices form one regular stack and sort them along the normal.

    Returns
    -------
    sorted headers, the 3x3 direction matrix (columns: x, y, z index
    directions), and the slice interval in mm.

    Raises
    ------
    VolumeError
        Mixed orientations or sizes, duplicate positions, or irregular spacing.
    """
    if not headers:
        raise VolumeError("the series has no slices")
    uid = headers[0].series_instance_uid
    ori0 = np.asarray(headers[0].orientation)
    for h in headers:
        if not np.allclose(h.orientation, ori0, atol=_ORIENTATION_TOLERANCE):
            raise VolumeError(
                f"series {uid} mixes image orientations ({headers[0].orientation} and "
                f"{h.orientation}); send a series with one orientation"
            )
        if (h.rows, h.columns) != (headers[0].rows, headers[0].columns):
            raise VolumeError(f"series {uid} mixes image sizes; send a regular stack")
    row_dir, col_dir = ori0[:3], ori0[3:]
    normal = np.cross(row_dir, col_dir)
    along = np.array([float(np.dot(normal, h.position)) for h in headers])
    order = np.argsort(along, kind="stable")
    ordered = [headers[i] for i in order]
    steps = np.diff(along[order])
    if len(ordered) > 1:
        if np.any(steps < 1e-3):
            raise VolumeError(
                f"series {uid} has two slices at the same position; remove duplicates"
            )
        interval = float(np.median(steps))
        if np.any(np.abs(steps - interval) > _SPACING_TOLERANCE * interval + 0.01):
            raise VolumeError(
                f"series {uid} has irregular slice spacing (from {steps.min():.2f} to "
                f"{steps.max():.2f} mm); a gap or overlap means slices are missing"
            )
    else:
        interval = headers[0].slice_thickness or 1.0
    direction = np.stack([row_dir, col_dir, normal], axis=1)
    return ordered, direction, interval


def load_series(paths: Sequence[Path]) -> CTVolume:
    """Decode a CT series into a :class:`CTVolume` in Hounsfield units.

    Parameters
    ----------
    paths:
        The series' files, in any order.

    Raises
    ------
    VolumeError
        Inconsistent geometry, missing pixel data, or pixel data that cannot be
        decoded (the message names the file).
    """
    headers = read_headers([Path(p) for p in paths])
    ordered, direction, interval = sort_headers(headers)
    first = ordered[0]
    hu = np.empty((len(ordered), first.rows, first.columns), dtype=np.int16)
    kernel: str | None = None
    for i, h in enumerate(ordered):
        ds = pydicom.dcmread(h.path)
        if "PixelData" not in ds:
            raise VolumeError(f"{h.path.name} (SOP {h.sop_instance_uid}) has no pixel data")
        try:
            raw = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - decoders raise many types; re-raised typed
            raise VolumeError(
                f"cannot decode pixel data of SOP {h.sop_instance_uid} "
                f"(transfer syntax {ds.file_meta.get('TransferSyntaxUID', '?')}): {exc}"
            ) from exc
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope == 1.0 and float(intercept).is_integer():
            hu[i] = np.clip(raw.astype(np.int32) + int(intercept), -32768, 32767)
        else:
            hu[i] = np.clip(np.rint(raw * slope + intercept), -32768, 32767)
        if kernel is None and ds.get("ConvolutionKernel"):
            k = ds.ConvolutionKernel
            kernel = "\\".join(k) if isinstance(k, list | pydicom.multival.MultiValue) else str(k)
    origin = first.position
    logger.info("loaded series %s: %d slices, interval %.2f mm", first.series_instance_uid,
                len(ordered), interval)
    return CTVolume(
        hu=hu,
        spacing=(interval, first.pixel_spacing[0], first.pixel_spacing[1]),
        origin=origin,
        direction=direction,
        series_instance_uid=first.series_instance_uid,
        sop_instance_uids=tuple(h.sop_instance_uid for h in ordered),
        slice_thickness=first.slice_thickness or interval,
        kernel=kernel,
        paths=tuple(h.path for h in ordered),
    )
