"""The DICOM Segmentation: left lung, right lung and opacity, on the source grid."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from model.lungs import LungMasks
from node.reports.codes import LEFT_LUNG, OPACITY, RIGHT_LUNG

__all__ = ["SEGMENT_LABELS", "build_segmentation"]

SEGMENT_LABELS = ("Left lung", "Right lung", "Lung opacity")


def _algorithm(name: str, version: str) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=name, family=codes.cid7162.ArtificialIntelligence, version=version)


def build_segmentation(sources: Sequence[Dataset], masks: LungMasks, opacity: np.ndarray, *,
                       algorithm_name: str, algorithm_version: str, series_number: int,
                       manufacturer: str) -> hd.seg.Segmentation:
    """A binary SEG with three segments referencing ``sources`` (z order, cleaned headers)."""
    algorithm = _algorithm(f"{algorithm_name} lung segmentation", algorithm_version)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=1, segment_label=SEGMENT_LABELS[0],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=LEFT_LUNG,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=hd.UID(),
            tracking_id="left lung"),
        hd.seg.SegmentDescription(
            segment_number=2, segment_label=SEGMENT_LABELS[1],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=RIGHT_LUNG,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=hd.UID(),
            tracking_id="right lung"),
        hd.seg.SegmentDescription(
            segment_number=3, segment_label=SEGMENT_LABELS[2],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=OPACITY,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=hd.UID(),
            tracking_id="lung opacity", anatomic_regions=[codes.SCT.Lung]),
    ]
    pixel_array = np.stack([masks.left, masks.right, opacity], axis=-1)
    return hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=pixel_array,
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
        series_description="lungnode lung segmentation",
        omit_empty_frames=True,
    )
