"""node.stages.reports.seg: the SEG's cheaper Segments Overlap check gives highdicom's answer."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest

from model.lungs import LungMasks
from node.stages.reports import seg as seg_module


@pytest.mark.parametrize("overlap", [False, True])
def test_seg_overlap_check_agrees_with_highdicom(overlap: bool) -> None:
    rng = np.random.default_rng(5)
    left = rng.random((6, 32, 32)) < 0.3
    right = ~left & (rng.random((6, 32, 32)) < 0.3)
    opacity = left & (rng.random((6, 32, 32)) < 0.5) if overlap else ~(left | right) & (
        rng.random((6, 32, 32)) < 0.2)
    stack = seg_module._segment_stack(LungMasks(left=left, right=right), opacity)
    numbers = np.array([1, 2, 3])
    binary = hd.seg.SegmentationTypeValues.BINARY
    ours = seg_module._Segmentation._check_and_cast_pixel_array(stack, numbers, binary, np.uint8)
    theirs = hd.seg.Segmentation._check_and_cast_pixel_array(stack, numbers, binary, np.uint8)
    assert ours[1] == theirs[1] == (hd.seg.SegmentsOverlapValues.YES if overlap
                                    else hd.seg.SegmentsOverlapValues.NO)
    assert ours[0] is stack
