"""The lungnode service: DICOM listener, database, job queue, pipeline and delivery.

The modules are imported where they are used (``node.service.Node`` starts
the whole service; ``node.cli`` is the command line); this package re-exports
only the names other tools build on.
"""

from node.errors import (
    AnonymizationError,
    ConfigError,
    DeliveryError,
    IllegalTransition,
    LungnodeError,
    ReportError,
    SelectionError,
    StorageError,
)
from node.settings import Settings, load_settings

__all__ = [
    "AnonymizationError",
    "ConfigError",
    "DeliveryError",
    "IllegalTransition",
    "LungnodeError",
    "ReportError",
    "SelectionError",
    "Settings",
    "StorageError",
    "load_settings",
]
