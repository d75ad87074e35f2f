"""Exceptions raised by the image-analysis stages.

Every message names the series and says what a person can do about it; the
node's orchestrator records the message on the study.
"""

from __future__ import annotations

__all__ = ["AnalysisError", "VolumeError", "SegmentationError", "NoLungsError", "ModelError"]


class AnalysisError(Exception):
    """Base class of every error raised by :mod:`model`."""


class VolumeError(AnalysisError):
    """The DICOM series cannot be turned into a consistent HU volume."""


class SegmentationError(AnalysisError):
    """No plausible lungs were found in the volume."""


class NoLungsError(SegmentationError):
    """The series holds no lungs to measure: too little lung, or one side only.

    An abdominal CT routed by mistake (routing rules that match on modality
    alone), a scan of one lung or of the lung bases: the node rejects the
    study with this reason instead of reporting a severity (it would read
    ``CT-0``).
    """


class ModelError(AnalysisError):
    """A network, its weights or its model card cannot be used."""
