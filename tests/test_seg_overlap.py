"""node.stages.reports.seg: the SEG read back with highdicom says whether its segments overlap."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from model.lungs import LungMasks
from node.stages.reports.seg import build_segmentation
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
