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
from pydicom.encaps import generate_frames
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from model.errors import VolumeError

__all__ = [
    "MARKER_ENDED_SYNTAXES",
    "CTVolume",
    "SliceHeader",
    "has_end_marker",
    "load_series",
    "load_series_with_headers",
    "read_headers",
    "slice_header",
    "sort_headers",
]

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


def _values(ds: Dataset, tag: int) -> list[str] | None:
    """The values of a text element (DS, IS, UI, CS) as strings; ``None`` when absent or empty.

    An element pydicom has not converted yet is read from its bytes (the values
    are plain ASCII): converting the dozen elements every slice needs through
    pydicom costs 0.12 ms per slice, reading their bytes 0.015 ms, next to
    about 0.65 ms for reading and decoding the whole slice.
    """
    elem = ds.get_item(tag)
    if elem is None or elem.value is None:
        return None
    value = elem.value
    if isinstance(value, bytes | bytearray):
        text = value.decode("ascii", "replace").strip(" \0")
        return [v.strip() for v in text.split("\\")] if text else None
    if isinstance(value, str | int | float):
        return [str(value)] if str(value) != "" else None
    return [str(v) for v in value] or None


def _number(ds: Dataset, tag: int, default: float | None = None) -> float | None:
    """A single-valued DS or IS element as a float (``default`` when absent or empty)."""
    values = _values(ds, tag)
    return float(values[0]) if values else default


def _unsigned(ds: Dataset, tag: int) -> int | None:
    """A US element's value; ``None`` when absent or empty."""
    elem = ds.get_item(tag)
    if elem is None or elem.value is None:
        return None
    value = elem.value
    if isinstance(value, bytes | bytearray):
        if not value:
            return None
        if len(value) != 2:
            return int(ds[tag].value)  # unusual (a multi-valued or damaged element): pydicom decides
        encoding = ds.original_encoding
        return int.from_bytes(value, "big" if encoding[1] is False else "little")
    return int(value)


_POSITION, _ORIENTATION, _PIXEL_SPACING, _THICKNESS = 0x00200032, 0x00200037, 0x00280030, 0x00180050
_SOP_UID, _SERIES_UID, _ROWS, _COLUMNS = 0x00080018, 0x0020000E, 0x00280010, 0x00280011
_BITS_ALLOCATED, _BITS_STORED, _PIXEL_REPRESENTATION = 0x00280100, 0x00280101, 0x00280103
_SAMPLES, _FRAMES, _INTERCEPT, _SLOPE = 0x00280002, 0x00280008, 0x00281052, 0x00281053


def _header(path: Path, ds: Dataset) -> SliceHeader:
    try:
        pos = tuple(float(v) for v in _values(ds, _POSITION) or ())
        ori = tuple(float(v) for v in _values(ds, _ORIENTATION) or ())
        spacing = tuple(float(v) for v in _values(ds, _PIXEL_SPACING) or ())
    except ValueError as exc:
        raise VolumeError(
            f"{path.name} (SOP {ds.get('SOPInstanceUID', '?')}) lacks usable "
            f"Image Position/Orientation (Patient) or Pixel Spacing: {exc}"
        ) from exc
    if not (pos and ori and spacing):
        missing = [name for name, v in (("ImagePositionPatient", pos), ("ImageOrientationPatient", ori),
                                        ("PixelSpacing", spacing)) if not v]
        raise VolumeError(
            f"{path.name} (SOP {ds.get('SOPInstanceUID', '?')}) lacks usable "
            f"Image Position/Orientation (Patient) or Pixel Spacing: no {', '.join(missing)}")
    if len(pos) != 3 or len(ori) != 6 or len(spacing) != 2:
        raise VolumeError(f"{path.name}: malformed geometry attributes")
    sop, series = _values(ds, _SOP_UID), _values(ds, _SERIES_UID)
    rows, columns = _unsigned(ds, _ROWS), _unsigned(ds, _COLUMNS)
    if not sop or not series or rows is None or columns is None:
        raise VolumeError(f"{path.name} lacks SOP Instance UID, Series Instance UID, Rows or Columns")
    try:
        thickness = _number(ds, _THICKNESS)
    except ValueError:
        thickness = None
    return SliceHeader(
        path=path,
        sop_instance_uid=sop[0],
        series_instance_uid=series[0],
        position=pos,  # type: ignore[arg-type]
        orientation=ori,  # type: ignore[arg-type]
        pixel_spacing=spacing,  # type: ignore[arg-type]
        rows=rows,
        columns=columns,
        slice_thickness=thickness,
    )


def slice_header(path: Path, ds: Dataset) -> SliceHeader:
    """The :class:`SliceHeader` of a dataset already read from ``path``.

    Raises
    ------
    VolumeError
        The dataset lacks usable geometry attributes.
    """
    return _header(Path(path), ds)


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
    return load_series_with_headers(paths)[0]


_NATIVE_LITTLE_ENDIAN = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})
_PIXEL_DATA_TAG = 0x7FE00010


def _native_pixels(ds: Dataset, rows: int, columns: int) -> tuple[np.ndarray, int] | None:
    """The stored words of an uncompressed little-endian single-frame image (no copy) and Bits Stored.

    ``None`` when the image is anything else (compressed, big endian, colour,
    multi-frame, unusual bit depth, short data): :attr:`Dataset.pixel_array`
    decodes those, or says why it cannot.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in _NATIVE_LITTLE_ENDIAN:
        return None
    try:
        allocated = _unsigned(ds, _BITS_ALLOCATED)
        representation = _unsigned(ds, _PIXEL_REPRESENTATION)
        if allocated is None or representation is None:
            return None
        stored = _unsigned(ds, _BITS_STORED) or allocated
        signed = representation == 1
        samples = _unsigned(ds, _SAMPLES) or 1
        frames = int(_number(ds, _FRAMES) or 1)
    except (TypeError, ValueError):
        return None
    if samples != 1 or frames != 1 or allocated not in (8, 16, 32) or not 0 < stored <= allocated:
        return None
    data = ds.PixelData
    size = allocated // 8
    if not isinstance(data, bytes | bytearray) or len(data) < rows * columns * size:
        return None
    raw = np.frombuffer(data, dtype=np.dtype(f"<{'i' if signed else 'u'}{size}"),
                        count=rows * columns)
    return raw.reshape(rows, columns), stored


_JPEG_LS = frozenset(JPEGLSTransferSyntaxes)

MARKER_ENDED_SYNTAXES = frozenset(JPEGTransferSyntaxes) | frozenset(JPEGLSTransferSyntaxes) | frozenset(
    JPEG2000TransferSyntaxes)
"""Transfer syntaxes whose codestreams end with the FFD9 marker (JPEG and JPEG-LS end of image,
JPEG 2000 end of codestream)."""


def has_end_marker(frame: bytes | memoryview) -> bool:
    """Whether a JPEG, JPEG-LS or JPEG 2000 frame ends with its end marker (after any zero padding).

    A codestream cut short in transfer lacks it; a lenient decoder (pylibjpeg's libjpeg,
    pydicom's fallback) would still decode one, filling the rest of the image with
    whatever it has.
    """
    return bytes(frame).rstrip(b"\x00").endswith(b"\xff\xd9")


def _check_codestreams(ds: Dataset, h: SliceHeader) -> None:
    """Refuse JPEG, JPEG-LS and JPEG 2000 frames that do not end with their end marker.

    A truncated codestream can decode without an error (a lenient decoder fills the
    rest of the image with whatever it has): without this check a slice cut short in
    transfer would be analysed as garbage pixels.  Damage inside a JPEG-LS frame is left
    to CharLS, which :func:`_decode` selects for JPEG-LS.
    """
    syntax = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) else None
    if syntax not in MARKER_ENDED_SYNTAXES:
        return
    try:
        frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
    except Exception as exc:  # noqa: BLE001 - pydicom raises several types for broken encapsulation
        raise VolumeError(f"cannot decode pixel data of SOP {h.sop_instance_uid} "
                          f"(transfer syntax {syntax}): the encapsulated frames are broken: {exc}") from exc
    for i, frame in enumerate(frames, start=1):
        if not has_end_marker(frame):
            raise VolumeError(
                f"cannot decode pixel data of SOP {h.sop_instance_uid} (transfer syntax {syntax}): "
                f"frame {i} ends without its end marker (FFD9); the compressed image is truncated "
                "or corrupt: send the instance again")


def _decode(ds: Dataset, h: SliceHeader) -> tuple[np.ndarray, int]:
    """Pixel words of one slice and their Bits Stored (unused high bits not yet cleared)."""
    if "PixelData" not in ds:
        raise VolumeError(f"{h.path.name} (SOP {h.sop_instance_uid}) has no pixel data")
    native = _native_pixels(ds, h.rows, h.columns)
    if native is not None:
        return native
    _check_codestreams(ds, h)
    syntax = ds.file_meta.get("TransferSyntaxUID", "?")
    if syntax in _JPEG_LS:
        # CharLS (pyjpegls) checks the bit stream; pydicom would fall back to the next plugin
        # when it refuses one, and pylibjpeg's libjpeg decodes a damaged frame into garbage
        ds.pixel_array_options(decoding_plugin="pyjpegls")
    try:
        raw = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many types; re-raised typed
        if syntax in _JPEG_LS:
            raise VolumeError(
                f"cannot decode pixel data of SOP {h.sop_instance_uid} (transfer syntax {syntax}): "
                f"the JPEG-LS frame is corrupt (CharLS: {str(exc).splitlines()[-1].strip()}); it "
                "was damaged in transfer or storage: send the instance again") from exc
        raise VolumeError(
            f"cannot decode pixel data of SOP {h.sop_instance_uid} "
            f"(transfer syntax {syntax}): {exc}"
        ) from exc
    return raw, raw.dtype.itemsize * 8  # pydicom has cleared the unused bits


def _stored_values(raw: np.ndarray, stored: int) -> np.ndarray:
    """The values of ``stored``-bit words as pydicom gives them: high bits masked or sign-extended."""
    bits = raw.dtype.itemsize * 8
    if raw.dtype.kind not in "ui" or stored >= bits:
        return raw
    if raw.dtype.kind == "i":
        return (raw << (bits - stored)) >> (bits - stored)
    return raw & raw.dtype.type((1 << stored) - 1)


def _to_hu(raw: np.ndarray, stored: int, ds: Dataset, out: np.ndarray,
           scratch: np.ndarray) -> None:
    """Stored values to HU (Rescale Slope/Intercept), rounded and clipped to ``int16``, in ``out``."""
    if raw.shape != out.shape:
        raise ValueError(f"pixel data has shape {raw.shape}, expected {out.shape}")
    slope = _number(ds, _SLOPE) or 1.0
    intercept = _number(ds, _INTERCEPT) or 0.0
    if not (slope == 1.0 and intercept.is_integer()):
        out[...] = np.clip(np.rint(_stored_values(raw, stored) * slope + intercept), -32768, 32767)
        return
    offset = int(intercept)
    if raw.dtype.kind in "ui" and raw.dtype.itemsize <= 2:
        bits = min(stored, raw.dtype.itemsize * 8)
        low, high = ((-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if raw.dtype.kind == "i"
                     else (0, (1 << bits) - 1))
        if high <= 32767 and -32768 <= low + offset and high + offset <= 32767:
            # every value and every result fits int16: in place, no temporaries
            if raw.dtype.kind == "u" and bits < raw.dtype.itemsize * 8:
                np.bitwise_and(raw, (1 << bits) - 1, out=out, casting="unsafe")
            elif raw.dtype.kind == "i" and bits < raw.dtype.itemsize * 8:
                np.left_shift(raw, 16 - bits, out=out, dtype=np.int16, casting="unsafe")
                np.right_shift(out, 16 - bits, out=out)
            else:
                out[...] = raw
            if offset:
                np.add(out, offset, out=out, casting="unsafe")
            return
        np.add(_stored_values(raw, stored), offset, out=scratch, dtype=np.int32, casting="unsafe")
        np.clip(scratch, -32768, 32767, out=scratch)
        out[...] = scratch
        return
    out[...] = np.clip(_stored_values(raw, stored).astype(np.int64) + offset, -32768, 32767)


def _permute_slices(hu: np.ndarray, order: np.ndarray) -> None:
    """Reorder ``hu`` in place so that ``hu_new[i] = hu_old[order[i]]`` (one spare slice)."""
    done = np.zeros(len(order), dtype=bool)
    spare = np.empty_like(hu[0])
    for start in range(len(order)):
        if done[start] or order[start] == start:
            done[start] = True
            continue
        spare[...] = hu[start]
        j = start
        while True:
            done[j] = True
            k = int(order[j])
            if k == start:
                hu[j] = spare
                break
            hu[j] = hu[k]
            j = k


def _kernel_text(ds: Dataset) -> str | None:
    k = ds.get("ConvolutionKernel")
    if not k:
        return None
    return "\\".join(k) if isinstance(k, list | pydicom.multival.MultiValue) else str(k)


def load_series_with_headers(paths: Sequence[Path]) -> tuple[CTVolume, tuple[Dataset, ...]]:
    """:func:`load_series`, also returning each slice's header dataset.

    Each file is read once: its header gives the geometry and its pixel data
    goes straight into the volume (uncompressed little-endian data without a
    decoder, anything else through pydicom's ``pixel_array``).

    Parameters
    ----------
    paths:
        The series' files, in any order.

    Returns
    -------
    The volume, and the files' datasets without pixel data, in the volume's z
    order (what :func:`node.stages.reports.build_reports` takes as source headers).

    Raises
    ------
    VolumeError
        As :func:`load_series`; geometry is checked before pixel data, and a
        pixel data error names the first slice (in z order) that has one.
    """
    files = [Path(p) for p in paths]
    if not files:
        raise VolumeError("the series has no slices")
    return _load(files)


def _load(files: list[Path]) -> tuple[CTVolume, tuple[Dataset, ...]]:
    datasets: list[Dataset] = []
    headers: list[SliceHeader] = []
    errors: dict[int, VolumeError] = {}
    hu = scratch = np.empty((0, 0, 0), dtype=np.int16)
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        h = _header(path, ds)
        if i == 0:
            hu = np.empty((len(files), h.rows, h.columns), dtype=np.int16)
            scratch = np.empty((h.rows, h.columns), dtype=np.int32)
        datasets.append(ds)
        headers.append(h)
        if hu.shape[1:] == (h.rows, h.columns):  # otherwise sort_headers refuses the series
            try:
                raw, stored = _decode(ds, h)
                _to_hu(raw, stored, ds, hu[i], scratch)
            except VolumeError as exc:
                errors[i] = exc
            except ValueError as exc:
                errors[i] = VolumeError(
                    f"cannot decode pixel data of SOP {h.sop_instance_uid} "
                    f"(transfer syntax {ds.file_meta.get('TransferSyntaxUID', '?')}): {exc}")
        del ds[_PIXEL_DATA_TAG:]  # the header stays (for the reports); the pixel bytes go
    ordered, direction, interval = sort_headers(headers)
    index = {id(h): i for i, h in enumerate(headers)}
    order = np.array([index[id(h)] for h in ordered])
    for i in order:
        if int(i) in errors:
            raise errors[int(i)]
    _permute_slices(hu, order)
    sorted_datasets = tuple(datasets[int(i)] for i in order)
    kernel = next((k for k in map(_kernel_text, sorted_datasets) if k), None)
    first = ordered[0]
    logger.info("loaded series %s: %d slices, interval %.2f mm", first.series_instance_uid,
                len(ordered), interval)
    volume = CTVolume(
        hu=hu,
        spacing=(interval, first.pixel_spacing[0], first.pixel_spacing[1]),
        origin=first.position,
        direction=direction,
        series_instance_uid=first.series_instance_uid,
        sop_instance_uids=tuple(h.sop_instance_uid for h in ordered),
        slice_thickness=first.slice_thickness or interval,
        kernel=kernel,
        paths=tuple(h.path for h in ordered),
    )
    return volume, sorted_datasets
