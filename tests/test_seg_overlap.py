"""node.stages.reports.seg: the SEG read back with highdicom says whether its segments overlap; the
analysis holds its segments in one stack that the SEG is built from without a copy."""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from model.lungs import LungMasks
from node.pipeline import analyse
from node.records import SelectedSeries
from node.settings import AnalysisSettings
from node.stages.reports.seg import _segment_stack, build_segmentation, share_segment_stack
from node.stages.reports.source import clean_headers
from tests.conftest import B40F

pytestmark = pytest.mark.filterwarnings(
    # the test study's Patient's Name has one component; highdicom warns about the source's data
    "ignore:The string .* is unlikely to represent the intended person name:UserWarning")


@pytest.mark.parametrize("overlap", [False, True], ids=["apart", "opacity-in-lung"])
def test_seg_read_back_has_the_right_overlap_and_masks(overlap: bool, tmp_path: Path) -> None:
    paths = sorted(B40F.glob("*.dcm"))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    headers.sort(key=lambda h: float(h.ImagePositionPatient[2]))
    shape = (len(headers), int(headers[0].Rows), int(headers[0].Columns))
    left = np.zeros(shape, dtype=bool)
    right = np.zeros(shape, dtype=bool)
    opacity = np.zeros(shape, dtype=bool)
    left[2:6, 100:200, 60:200] = True
    right[2:6, 100:200, 300:450] = True
    if overlap:
        opacity[3:5, 120:150, 80:120] = True  # ground glass inside the left lung
    else:
        opacity[3:5, 300:330, 80:120] = True  # outside both lungs
    seg = build_segmentation(clean_headers(headers), LungMasks(left=left, right=right), opacity,
                             algorithm_name="lungnode", algorithm_version="0.1.0",
                             series_number=99, manufacturer="lungnode")
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)

    back = hd.seg.segread(path)
    assert back.SegmentsOverlap == ("YES" if overlap else "NO")
    assert back.SegmentationType == "BINARY"
    assert [int(n) for n in back.segment_numbers] == [1, 2, 3]
    uids = [h.SOPInstanceUID for h in headers]
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=uids[2:6], segment_numbers=[1, 2, 3],
        ignore_spatial_locations=True)
    expected = np.stack([left[2:6], right[2:6], opacity[2:6]], axis=-1)
    assert np.array_equal(pixels.astype(bool), expected)


def _lobe_study() -> tuple[list[pydicom.Dataset], LungMasks, np.ndarray]:
    """B40F's headers; lungs of three lobes (left upper, right upper, right lower), opacity in two."""
    paths = sorted(B40F.glob("*.dcm"))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    headers.sort(key=lambda h: float(h.ImagePositionPatient[2]))
    shape = (len(headers), int(headers[0].Rows), int(headers[0].Columns))
    lobes = np.zeros(shape, dtype=np.uint8)
    lobes[1:7, 100:200, 60:200] = 1
    lobes[2:5, 100:200, 300:450] = 3
    lobes[5:8, 100:200, 300:450] = 5  # no lobe 2 or 4: segments 4, 5, 6 are lobes 1, 3, 5
    opacity = np.zeros(shape, dtype=bool)
    opacity[3:5, 120:150, 80:120] = True
    opacity[6, 150:190, 320:400] = True
    masks = LungMasks(left=np.isin(lobes, (1, 2)), right=np.isin(lobes, (3, 4, 5)), lobes=lobes)
    return headers, masks, opacity


def _frames(seg: hd.seg.Segmentation) -> list[tuple[object, ...]]:
    """Per frame: segment number, dimension index values, position and source image."""
    return [(int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber),
             tuple(f.FrameContentSequence[0].DimensionIndexValues),
             tuple(float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient),
             f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for f in seg.PerFrameFunctionalGroupsSequence]


def test_seg_from_the_shared_stack_equals_the_seg_from_separate_masks() -> None:
    headers, masks, opacity = _lobe_study()
    sources = clean_headers(headers)
    kwargs = dict(algorithm_name="lungnode", algorithm_version="0.1.0", series_number=99,
                  manufacturer="lungnode")
    separate = build_segmentation(sources, masks, opacity, **kwargs)  # type: ignore[arg-type]
    shared_masks, shared_opacity = share_segment_stack(masks, opacity)
    shared = build_segmentation(sources, shared_masks, shared_opacity, **kwargs)  # type: ignore[arg-type]

    assert [s.SegmentLabel for s in shared.SegmentSequence] == [
        "Left lung", "Right lung", "Lung opacity", "Left upper lobe", "Right upper lobe",
        "Right lower lobe"]
    assert [s.SegmentLabel for s in shared.SegmentSequence] == [
        s.SegmentLabel for s in separate.SegmentSequence]
    assert [s.TrackingID for s in shared.SegmentSequence] == [
        s.TrackingID for s in separate.SegmentSequence]
    assert shared.SegmentsOverlap == separate.SegmentsOverlap == "YES"
    assert int(shared.NumberOfFrames) == int(separate.NumberOfFrames)
    assert _frames(shared) == _frames(separate)
    assert shared.PixelData == separate.PixelData  # frame by frame, segment by segment
    # and what it holds: each segment's frames are its mask on the source images
    uids = [h.SOPInstanceUID for h in headers]
    lobe_masks = [masks.lobes == label for label in (1, 3, 5)]  # type: ignore[operator]
    expected = np.stack([masks.left, masks.right, opacity, *lobe_masks], axis=-1)
    pixels = shared.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1, 2, 3, 4, 5, 6],
        ignore_spatial_locations=True)
    assert np.array_equal(pixels.astype(bool), expected)


def test_the_seg_builder_passes_the_shared_stack_without_a_copy() -> None:
    _, masks, opacity = _lobe_study()
    shared_masks, shared_opacity = share_segment_stack(masks, opacity)
    stack = shared_masks.segments
    assert stack is not None and stack.shape == (6, *masks.left.shape) and stack.dtype == np.bool_
    for layer, original in ((shared_masks.left, masks.left), (shared_masks.right, masks.right),
                            (shared_opacity, opacity)):
        assert np.shares_memory(layer, stack) and np.array_equal(layer, original)
    passed = _segment_stack(shared_masks, shared_opacity)
    assert passed.shape == (*masks.left.shape, 6)
    assert np.shares_memory(passed, stack)
    for i, layer in enumerate((shared_masks.left, shared_masks.right, shared_opacity)):
        assert np.shares_memory(passed[..., i], layer)
    # separate masks, or masks replaced after the stack was made: a new array, from the masks given
    assert not np.shares_memory(_segment_stack(masks, opacity), masks.left)
    changed = replace(shared_masks, left=shared_masks.left.copy())
    changed.left[4, 10:20, 10:20] = True
    fresh = _segment_stack(changed, shared_opacity)
    assert not np.shares_memory(fresh, stack)
    assert np.array_equal(fresh[..., 0], changed.left)
    assert not np.shares_memory(_segment_stack(shared_masks, opacity), stack)


def test_sharing_the_stack_keeps_no_reference_to_the_separate_arrays() -> None:
    _, masks, opacity = _lobe_study()
    originals = [weakref.ref(a) for a in (masks.left, masks.right, opacity)]
    masks, opacity = share_segment_stack(masks, opacity)
    gc.collect()
    assert all(ref() is None for ref in originals)


def test_analyse_holds_the_masks_and_the_opacity_in_one_stack() -> None:
    paths = tuple(sorted(B40F.glob("*.dcm")))
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    selected = SelectedSeries(str(first.StudyInstanceUID), str(first.SeriesInstanceUID), paths, "test")
    analysis = analyse(selected, AnalysisSettings())
    masks, opacity = analysis.masks, analysis.quantification.opacity_mask
    assert masks.segments is not None and masks.segments.shape == (3, *analysis.volume.shape)
    for i, layer in enumerate((masks.left, masks.right, opacity)):
        assert np.shares_memory(layer, masks.segments[i]) and layer.flags.c_contiguous
    assert masks.left.any() and masks.right.any()
    assert np.shares_memory(_segment_stack(masks, opacity), masks.segments)


def _flat(ds: pydicom.Dataset, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for el in ds:
        if el.VR == "SQ":
            for i, item in enumerate(el.value):
                out.update(_flat(item, f"{prefix}{el.keyword}[{i}]."))
        else:
            out[prefix + el.keyword] = el.value
    return out


def test_the_seg_of_the_filled_slices_equals_the_seg_of_all_slices() -> None:
    """Only the slices from the first to the last with a segment go to highdicom, at their positions:
    the object is the one highdicom makes from the pixels of every source image."""
    headers, masks, opacity = _lobe_study()
    sources = clean_headers(headers)
    masks, opacity = share_segment_stack(masks, opacity)
    built = build_segmentation(sources, masks, opacity, algorithm_name="lungnode",
                               algorithm_version="0.1.0", series_number=99, manufacturer="lungnode")
    pixels = _segment_stack(masks, opacity)
    assert pixels[0].sum() == 0 and pixels[8:].sum() == 0 and pixels[1].any()  # cropped: 1 to 8
    every = hd.seg.Segmentation(
        source_images=list(sources), pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription.from_dataset(d) for d in built.SegmentSequence],
        series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="lungnode", manufacturer_model_name=built.ManufacturerModelName,
        software_versions=built.SoftwareVersions, device_serial_number="1",
        series_description=built.SeriesDescription, content_label=built.ContentLabel,
        content_description=built.ContentDescription, omit_empty_frames=True,
        transfer_syntax_uid=built.file_meta.TransferSyntaxUID)
    # frames: left 6, right 6, opacity 3, lobes 6 + 3 + 3
    assert int(built.NumberOfFrames) == int(every.NumberOfFrames) == 27
    a, b = _flat(built), _flat(every)
    random = ("SOPInstanceUID", "SeriesInstanceUID", "DimensionOrganizationUID", "ContentTime",
              "InstanceCreationTime", "ContributionDateTime", "ContentDate", "InstanceCreationDate")
    differ = sorted(k for k in set(a) | set(b)
                    if a.get(k) != b.get(k) and k.split(".")[-1] not in random)
    assert differ == []
    assert _frames(built) == _frames(every)
