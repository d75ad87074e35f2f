"""Image analysis of chest CT, free of network and database code.

DICOM series to HU volume (:mod:`model.volume`), lung segmentation
(:mod:`model.lungs`), quantification (:mod:`model.quantify`) and the
severity network's output type (:mod:`model.prediction`).

The exceptions load with the package; the rest loads on first use (PEP 562),
so that importing :mod:`model.errors` (the node's error types do) does not pull
in scipy and the segmentation: a CLI command that analyses nothing starts
faster.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from model.errors import AnalysisError, ModelError, SegmentationError, VolumeError

if TYPE_CHECKING:
    from model.lungs import LungMasks, LungParams, segment_lungs
    from model.prediction import CLASS_NAMES, Prediction
    from model.quantify import LungMeasurement, OpacityThresholds, Quantification, category_for, quantify
    from model.volume import CTVolume, load_series, load_series_with_headers

_LAZY = {
    "LungMasks": "model.lungs", "LungParams": "model.lungs", "segment_lungs": "model.lungs",
    "CLASS_NAMES": "model.prediction", "Prediction": "model.prediction",
    "LungMeasurement": "model.quantify", "OpacityThresholds": "model.quantify",
    "Quantification": "model.quantify", "category_for": "model.quantify", "quantify": "model.quantify",
    "CTVolume": "model.volume", "load_series": "model.volume", "load_series_with_headers": "model.volume",
}

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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
