"""Exceptions of the node, each with a message a person can act on.

Stages raise these (or :mod:`model.errors` exceptions); only the orchestrator
(:mod:`node.pipeline`) catches them and records the message on the study.
"""

from __future__ import annotations

from model.errors import AnalysisError

__all__ = [
    "AnalysisError",
    "ConfigError",
    "DatasetError",
    "DeliveryError",
    "IllegalTransition",
    "LabelError",
    "LungnodeError",
    "ReportError",
    "SelectionError",
    "AnonymizationError",
    "BurnedInAnnotationError",
    "StorageError",
    "TrainingError",
]


class LungnodeError(Exception):
    """Base class of the node's own errors."""


class ConfigError(LungnodeError):
    """The configuration file or an environment override is invalid."""


class StorageError(LungnodeError):
    """An instance cannot be stored (bad UID, full disk, unreadable data)."""


class SelectionError(LungnodeError):
    """The study has no series that can be analysed; the message says why."""


class AnonymizationError(LungnodeError):
    """The de-identified archive copy cannot be written."""


class BurnedInAnnotationError(AnonymizationError):
    """The series may show patient identity in its pixels: it is not archived for training."""


class ReportError(LungnodeError):
    """A result object (SR, SEG, summary image) cannot be built."""


class DeliveryError(LungnodeError):
    """A destination did not accept a result object."""


class IllegalTransition(LungnodeError):
    """A study state change that the state table does not allow."""


class LabelError(LungnodeError):
    """A label cannot be recorded (unknown study, not archived, unknown value)."""


class DatasetError(LungnodeError):
    """A dataset cannot be frozen, locked, imported or compared."""


class TrainingError(LungnodeError):
    """A training run cannot be started, resumed or recorded."""
