"""Exceptions raised by the image-analysis stages.

Every message names the series and says what a person can do about it; the
node's orchestrator records the message on the study.
"""

from __future__ import annotations

__all__ = ["AnalysisError", "VolumeError", "SegmentationError", "ModelError"]


class AnalysisError(Exception):
    """Base class of every error raised by :mod:`model`."""


class VolumeError(AnalysisError):
    """The DICOM series cannot be turned into a consistent HU volume."""


class SegmentationError(AnalysisError):
    """No plausible lungs were found in the volume."""


class ModelError(AnalysisError):
    """A network, its weights or its model card cannot be used."""
