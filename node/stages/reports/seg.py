"""The DICOM Segmentation: left lung, right lung and opacity on the source grid.

A binary Segmentation (highdicom) on the CT's frame of reference, one frame per
source slice and segment, referencing every analysed image.  Frames without
any segmented pixel are left out, so a 300-slice study carries only the
slices through the lungs.  Segments:

1. *Left lung*: SCT Lung 39607008 with the modifier SCT Left 7771000,
   category SCT Anatomical Structure 91723000, shown green;
2. *Right lung*: SCT Lung with the modifier SCT Right 24028007, shown blue;
3. *Lung opacity*: ``99LUNGNODE OPACITY`` (ground glass and consolidation,
   see :mod:`node.stages.reports.codes`), category SCT Morphologically Abnormal
   Structure 49755003, anatomic region SCT Lung, shown red.

When a lobe model made the masks (:attr:`model.lungs.LungMasks.lobes`), one
segment per lobe found follows, numbered from 4 in label order (left upper,
left lower, right upper, right middle, right lower; a lobe without voxels has
none): label e.g. *Left upper lobe*, category SCT Anatomical Structure,
property type and anatomic region the lobe's SNOMED CT concept with its side
as modifier (:data:`node.stages.reports.codes.LOBE_SITES`), tracking id the
lobe's name (``left upper lobe``), colours :data:`LOBE_COLOURS`.

The colours are those of the summary image.  The opacity lies inside the
lungs, so the segments overlap: the object is BINARY (a LABELMAP cannot hold
overlapping segments), and highdicom itself decides Segments Overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from model.lungs import LungMasks
from model.quantify import LOBES
from node.errors import ReportError
from node.stages.reports import codes as lc

__all__ = ["LOBE_COLOURS", "SEGMENT_COLOURS", "SEGMENT_LABELS", "build_segmentation", "lobe_labels",
           "share_segment_stack"]

SEGMENT_LABELS = ("Left lung", "Right lung", "Lung opacity")
"""Segment labels in segment-number order (1, 2, 3)."""

SEGMENT_COLOURS: tuple[tuple[int, int, int], ...] = ((40, 220, 40), (60, 140, 255), (255, 60, 60))
"""RGB display colours of the segments, in segment-number order."""

LOBE_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (120, 255, 120), 2: (20, 140, 20), 3: (140, 200, 255), 4: (200, 120, 255), 5: (30, 70, 200)}
"""RGB display colours of the lobe segments by lobe label (greens left, blues and violet right)."""


def lobe_labels(lobes: np.ndarray | None) -> list[int]:
    """The lobe labels (1-5) that have voxels, in label order: the lobe segments 4, 5, ..."""
    if lobes is None:
        return []
    counts = np.bincount(lobes.ravel(), minlength=6)
    return [label for label in range(1, 6) if counts[label] > 0]


def _lobe_segment(number: int, label: int, algorithm: hd.AlgorithmIdentificationSequence
                  ) -> hd.seg.SegmentDescription:
    concept, side = lc.LOBE_SITES[label]
    name = LOBES[label]
    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=name[0].upper() + name[1:],
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=hd.sr.CodedConcept(concept.value, concept.scheme_designator,
                                                   concept.meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_uid=hd.UID(), tracking_id=name,
        anatomic_regions=[hd.sr.CodedConcept(concept.value, concept.scheme_designator, concept.meaning)],
        display_color=hd.color.CIELabColor.from_rgb(*LOBE_COLOURS[label]))
    # the side, as for the lungs: a modifier nested in the property type and in the region
    for seq, attr in (("SegmentedPropertyTypeCodeSequence", "SegmentedPropertyTypeModifierCodeSequence"),
                      ("AnatomicRegionSequence", "AnatomicRegionModifierSequence")):
        modifier = Dataset()
        modifier.CodeValue = lc.LATERALITY[side].value
        modifier.CodingSchemeDesignator = lc.LATERALITY[side].scheme_designator
        modifier.CodeMeaning = lc.LATERALITY[side].meaning
        setattr(getattr(description, seq)[0], attr, DicomSequence([modifier]))
    return description


def _lung_segment(number: int, side: str, algorithm: hd.AlgorithmIdentificationSequence
                  ) -> hd.seg.SegmentDescription:
    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=SEGMENT_LABELS[number - 1],
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=hd.sr.CodedConcept.from_code(codes.SCT.Lung),  # fresh: modified below
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_uid=hd.UID(), tracking_id=f"{side} lung",
        display_color=hd.color.CIELabColor.from_rgb(*SEGMENT_COLOURS[number - 1]))
    # Laterality as PS3.3 C.8.20.2 expresses it: a modifier nested in the property type
    modifier = Dataset()
    modifier.CodeValue = lc.LATERALITY[side].value
    modifier.CodingSchemeDesignator = lc.LATERALITY[side].scheme_designator
    modifier.CodeMeaning = lc.LATERALITY[side].meaning
    property_type = description.SegmentedPropertyTypeCodeSequence[0]
    property_type.SegmentedPropertyTypeModifierCodeSequence = DicomSequence([modifier])
    return description


def _new_stack(masks: LungMasks, opacity: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """A new segment-major ``(segment, z, y, x)`` array of the SEG's segments (one volume each)."""
    stack = np.empty((3 + len(labels), *masks.left.shape), dtype=bool)
    stack[0] = masks.left
    stack[1] = masks.right
    stack[2] = opacity
    if masks.lobes is not None:
        for i, label in enumerate(labels):
            np.equal(masks.lobes, label, out=stack[3 + i])
    return stack


def _is_shared_stack(masks: LungMasks, opacity: np.ndarray, labels: Sequence[int]) -> bool:
    """Whether ``masks.segments`` is the stack whose layers these masks are (:func:`share_segment_stack`)."""
    stack = masks.segments
    if stack is None or stack.dtype != np.bool_ or stack.shape != (3 + len(labels), *masks.left.shape):
        return False
    return all(layer.shape == stack[i].shape and layer.strides == stack[i].strides
               and np.shares_memory(layer, stack[i])
               for i, layer in enumerate((masks.left, masks.right, opacity)))


def share_segment_stack(masks: LungMasks, opacity: np.ndarray) -> tuple[LungMasks, np.ndarray]:
    """The masks and the opacity mask as layers of one segment-major stack, the SEG's segments.

    Copies ``masks.left``, ``masks.right``, ``opacity`` and each lobe with voxels
    (:func:`lobe_labels`) into one new ``(3 + lobes, z, y, x)`` bool array and
    returns new masks whose ``left``, ``right`` are views of its layers 0 and 1
    (``segments`` the stack) and the view of layer 2 for the opacity mask.
    Once the caller drops the old masks and opacity mask, their arrays are
    freed, and :func:`build_segmentation` passes the stack to highdicom without
    another full-size copy.
    """
    stack = _new_stack(masks, opacity, lobe_labels(masks.lobes))
    return replace(masks, left=stack[0], right=stack[1], segments=stack), stack[2]


def _segment_stack(masks: LungMasks, opacity: np.ndarray) -> np.ndarray:
    """``(z, y, x, segment)`` view over a segment-major array (one contiguous volume a segment).

    The masks' own stack when they are its layers (:func:`share_segment_stack`), else a new one.
    """
    labels = lobe_labels(masks.lobes)
    stack = masks.segments if _is_shared_stack(masks, opacity, labels) else None
    if stack is None:
        stack = _new_stack(masks, opacity, labels)
    return np.moveaxis(stack, 0, -1)


def _filled_z_range(pixels: np.ndarray) -> tuple[int, int]:
    """The first and one past the last slice of a ``(z, y, x, segment)`` array with a segmented pixel."""
    filled = np.flatnonzero(pixels.any(axis=(1, 2, 3)))
    return (int(filled[0]), int(filled[-1]) + 1) if filled.size else (0, pixels.shape[0])


def build_segmentation(sources: Sequence[Dataset], masks: LungMasks, opacity: np.ndarray, *,
                       algorithm_name: str, algorithm_version: str, series_number: int,
                       manufacturer: str, institution_name: str | None = None
                       ) -> hd.seg.Segmentation:
    """A binary SEG with the left lung, the right lung and the opacity.

    Parameters
    ----------
    sources:
        Cleaned headers of the analysed images (:func:`node.stages.reports.source.clean_headers`)
        in the masks' z order.
    masks, opacity:
        Boolean ``(z, y, x)`` masks on the source grid.  When they are the layers of
        ``masks.segments`` (:func:`share_segment_stack`, as the analysis holds them), that
        stack goes to highdicom as it is; otherwise the segments are copied into a new one.
    algorithm_name, algorithm_version:
        The segmentation algorithm's identity (Algorithm Identification).
    series_number, manufacturer, institution_name:
        Series and equipment attributes of the new object.

    Raises
    ------
    ReportError
        The masks do not match the source images in number or size.
    """
    expected = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    for name, mask in (("left lung", masks.left), ("right lung", masks.right),
                       ("opacity", opacity)):
        if mask.shape != expected:
            raise ReportError(
                f"{name} mask has shape {mask.shape} but series {sources[0].SeriesInstanceUID} "
                f"has {expected[0]} images of {expected[1]}x{expected[2]}; masks must be on the "
                "grid of the analysed images")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"{algorithm_name} lung segmentation", version=algorithm_version,
        family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        _lung_segment(1, "left", algorithm),
        _lung_segment(2, "right", algorithm),
        hd.seg.SegmentDescription(
            segment_number=3, segment_label=SEGMENT_LABELS[2],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=lc.OPACITY,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=hd.UID(),
            tracking_id="lung opacity", anatomic_regions=[lc.LUNG],
            display_color=hd.color.CIELabColor.from_rgb(*SEGMENT_COLOURS[2])),
        *(_lobe_segment(4 + i, label, algorithm) for i, label in enumerate(lobe_labels(masks.lobes))),
    ]
    pixels = _segment_stack(masks, opacity)
    # only the slices from the first to the last with a segmented pixel, at their source positions:
    # the empty frames outside are left out anyway (omit_empty_frames), and highdicom's checks
    # (among them an int64 sum over the segments of every pixel) then cover fewer slices
    z0, z1 = _filled_z_range(pixels)
    plane_positions = None
    if (z0, z1) != (0, len(sources)):
        pixels = pixels[z0:z1]
        plane_positions = hd.utils.get_plane_positions_of_series(sources)[z0:z1]
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=pixels,
        plane_positions=plane_positions,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        device_serial_number="1",
        series_description=f"{algorithm_name} lung segmentation",
        content_label="LUNGS",
        content_description=("Left lung, right lung, lung opacity and lobes (automatic)"
                             if masks.lobes is not None else
                             "Left lung, right lung and lung opacity (automatic)"),
        omit_empty_frames=True,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    if institution_name:
        seg.InstitutionName = institution_name
    return seg
