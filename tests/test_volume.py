"""model.volume: one read per file, the same HU as pydicom's decoder, the same refusals."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from model.errors import VolumeError
from model.volume import load_series, load_series_with_headers, read_headers, sort_headers
from tests.conftest import B40F

COUNT = 12


def _reference_hu(paths: list[Path]) -> np.ndarray:
    """HU the straightforward way: sorted headers, pydicom's pixel_array, slope and intercept."""
    ordered, _, _ = sort_headers(read_headers(paths))
    slices = []
    for h in ordered:
        ds = pydicom.dcmread(h.path)
        raw = ds.pixel_array.astype(np.float64)
        hu = raw * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        slices.append(np.clip(np.rint(hu), -32768, 32767).astype(np.int16))
    return np.stack(slices)


def _series(tmp_path: Path, name: str, edit=None, count: int = COUNT) -> list[Path]:  # type: ignore[no-untyped-def]
    out = tmp_path / name
    out.mkdir()
    series = generate_uid()
    paths = []
    for i, f in enumerate(sorted(B40F.glob("*.dcm"))[:count]):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series
        if edit is not None:
            edit(i, ds)
        path = out / f.name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    random.Random(3).shuffle(paths)  # files in no particular order
    return paths


def test_native_series_matches_pydicom_and_returns_headers(tmp_path: Path) -> None:
    paths = _series(tmp_path, "native")
    volume, headers = load_series_with_headers(paths)
    assert volume.hu.dtype == np.int16
    assert np.array_equal(volume.hu, _reference_hu(paths))
    assert tuple(h.SOPInstanceUID for h in headers) == volume.sop_instance_uids
    for h, path in zip(headers, volume.paths, strict=True):
        assert "PixelData" not in h
        plain = pydicom.dcmread(path, stop_before_pixels=True)
        assert set(h.keys()) == set(plain.keys())
    assert np.array_equal(load_series(paths).hu, volume.hu)


def _signed_12_bit_with_junk(i: int, ds: pydicom.Dataset) -> None:
    """Signed 12-bit words whose unused high bits hold junk (pydicom sign-extends)."""
    stored = _stored(ds)
    words = np.clip(stored.astype(np.int32) - 1024, -2048, 2047).astype(np.int16)
    words = (words.view(np.uint16) & 0x0FFF) | (0x5000 if i % 2 else 0)  # junk above bit 11
    ds.PixelRepresentation = 1
    ds.BitsStored, ds.HighBit = 12, 11
    ds.RescaleIntercept = 0
    ds.PixelData = words.astype("<u2").tobytes()


def _stored(ds: pydicom.Dataset) -> np.ndarray:
    return np.asarray(ds.pixel_array)


def _unsigned_with_junk(i: int, ds: pydicom.Dataset) -> None:
    words = _stored(ds).astype(np.uint16) | np.uint16(0xA000)  # above Bits Stored 12
    ds.PixelData = words.astype("<u2").tobytes()


def _fractional_rescale(i: int, ds: pydicom.Dataset) -> None:
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1000.25"


def _implicit(i: int, ds: pydicom.Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


def _rle(i: int, ds: pydicom.Dataset) -> None:
    ds.compress(RLELossless)


@pytest.mark.parametrize("edit", [_signed_12_bit_with_junk, _unsigned_with_junk,
                                  _fractional_rescale, _implicit, _rle])
def test_pixel_encodings_give_pydicoms_values(tmp_path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    paths = _series(tmp_path, edit.__name__.strip("_"), edit)
    volume = load_series(paths)
    assert np.array_equal(volume.hu, _reference_hu(paths))


def test_missing_pixel_data_names_the_first_slice_in_z_order(tmp_path: Path) -> None:
    def drop(i: int, ds: pydicom.Dataset) -> None:
        if i in (4, 7):
            del ds.PixelData

    paths = _series(tmp_path, "nopixels", drop)
    ordered, _, _ = sort_headers(read_headers(paths))
    names = {p.name for p in sorted(B40F.glob("*.dcm"))[:COUNT][4:8:3]}
    first = next(h for h in ordered if h.path.name in names)
    with pytest.raises(VolumeError, match=f"{first.path.name} .*has no pixel data"):
        load_series(paths)


def test_geometry_is_refused_before_pixel_data(tmp_path: Path) -> None:
    def edit(i: int, ds: pydicom.Dataset) -> None:
        if i == 2:
            del ds.PixelData
        if i == 5:
            ds.ImagePositionPatient = list(pydicom.dcmread(sorted(B40F.glob("*.dcm"))[4])
                                           .ImagePositionPatient)

    with pytest.raises(VolumeError, match="same position"):
        load_series(_series(tmp_path, "dup", edit))


def test_undecodable_pixel_data_names_the_sop(tmp_path: Path) -> None:
    bad: list[str] = []

    def edit(i: int, ds: pydicom.Dataset) -> None:
        ds.compress(RLELossless)
        if i == 3:
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
            ds.PixelData = encapsulate([frame[:200]])  # the RLE segments are cut short
            bad.append(ds.SOPInstanceUID)

    paths = _series(tmp_path, "broken", edit)
    with pytest.raises(VolumeError, match=f"cannot decode pixel data of SOP {bad[0]}"):
        load_series(paths)


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless])
def test_truncated_codestream_is_refused_not_analysed(tmp_path: Path, syntax: str) -> None:
    """A JPEG-LS frame cut short decodes without an error in pyjpegls (garbage pixels); the
    loader checks the end marker and names the slice instead."""
    bad: list[str] = []

    def edit(i: int, ds: pydicom.Dataset) -> None:
        ds.compress(syntax)
        if i == 2:
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
            ds.PixelData = encapsulate([frame[: len(frame) * 2 // 3]])
            bad.append(ds.SOPInstanceUID)

    paths = _series(tmp_path, f"cut-{syntax}", edit)
    with pytest.raises(VolumeError, match=f"SOP {bad[0]} .*truncated or corrupt"):
        load_series(paths)


def test_intact_compressed_series_passes_the_end_marker_check(tmp_path: Path) -> None:
    paths = _series(tmp_path, "jls", lambda i, ds: ds.compress(JPEGLSLossless))
    np.testing.assert_array_equal(load_series(paths).hu, _reference_hu(paths))


def test_header_values_read_from_bytes_match_pydicoms(tmp_path: Path) -> None:
    """The loader reads geometry from the elements' bytes; pydicom's converted values agree."""
    from model.volume import slice_header

    paths = _series(tmp_path, "raw", edit=lambda i, ds: setattr(ds, "SliceThickness", ""), count=2)
    raw = slice_header(paths[0], pydicom.dcmread(paths[0]))
    converted_ds = pydicom.dcmread(paths[0])
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
                    "SOPInstanceUID", "SeriesInstanceUID", "SliceThickness"):
        getattr(converted_ds, keyword)  # converts the element
    converted = slice_header(paths[0], converted_ds)
    assert raw == replace(converted, path=raw.path) and raw.slice_thickness is None
    assert raw.position == tuple(float(v) for v in converted_ds.ImagePositionPatient)
    assert (raw.rows, raw.columns) == (converted_ds.Rows, converted_ds.Columns)


def test_missing_geometry_names_the_attribute(tmp_path: Path) -> None:
    paths = _series(tmp_path, "nogeo", edit=lambda i, ds: delattr(ds, "PixelSpacing"), count=2)
    with pytest.raises(VolumeError, match="PixelSpacing"):
        load_series(paths)
