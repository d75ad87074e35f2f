"""Image analysis of chest CT, free of network and database code.

DICOM series to HU volume (:mod:`model.volume`), lung segmentation
(:mod:`model.lungs`), quantification (:mod:`model.quantify`) and the
severity network's output type (:mod:`model.prediction`).
"""

from model.errors import AnalysisError, ModelError, SegmentationError, VolumeError
from model.lungs import LungMasks, LungParams, segment_lungs
from model.prediction import CLASS_NAMES, Prediction
from model.quantify import (
    LungMeasurement,
    OpacityThresholds,
    Quantification,
    category_for,
    quantify,
)
from model.volume import CTVolume, load_series, load_series_with_headers

__all__ = [
    "CLASS_NAMES",
    "AnalysisError",
    "CTVolume",
    "LungMasks",
    "LungMeasurement",
    "LungParams",
    "ModelError",
    "OpacityThresholds",
    "Prediction",
    "Quantification",
    "SegmentationError",
    "VolumeError",
    "category_for",
    "load_series",
    "load_series_with_headers",
    "quantify",
    "segment_lungs",
]
