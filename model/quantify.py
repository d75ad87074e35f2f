"""Lung volumes, percentage of opacity and the MosMedData category.

Implementation owned by the analysis work; the dataclasses below are the
contract used by the reports and the node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LungMeasurement", "OpacityThresholds", "Quantification", "category_for", "quantify"]


@dataclass(frozen=True)
class OpacityThresholds:
    """HU ranges: opacity (ground glass) and high opacity (consolidation)."""

    opacity_low: float = -700.0
    opacity_high: float = -300.0
    high_opacity_high: float = 100.0


@dataclass(frozen=True)
class LungMeasurement:
    """Measurements of one lung or both lungs together."""

    volume_ml: float
    percent_opacity: float
    """Percentage of the lung volume between ``opacity_low`` and ``high_opacity_high``
    HU (ground glass and consolidation together, as MosMedData counts involvement)."""
    percent_high_opacity: float
    """Percentage of the lung volume above ``opacity_high`` up to ``high_opacity_high`` HU."""


@dataclass(frozen=True, eq=False)
class Quantification:
    """Result of :func:`quantify` for one series."""

    left: LungMeasurement
    right: LungMeasurement
    total: LungMeasurement
    severity_category: str
    """MosMedData CT-0..CT-4 from ``total.percent_opacity``."""
    thresholds: OpacityThresholds
    opacity_mask: np.ndarray
    """Boolean ``(z, y, x)`` mask of opacity voxels inside the lungs (for the SEG)."""
    quality_flags: tuple[str, ...] = ()
    """Human-readable caveats (partial coverage, thick slices, ...)."""


def category_for(percent_opacity: float, normal_below: float = 1.0) -> str:
    """MosMedData category from the percentage of lung involved.

    CT-0 no opacity, CT-1 under 25 %, CT-2 25-50 %, CT-3 50-75 %, CT-4 over 75 %.
    A measured percentage under ``normal_below`` counts as no opacity: partial
    volume at vessel walls and the pleura always leaves a little.
    """
    if percent_opacity < normal_below:
        return "CT-0"
    if percent_opacity < 25.0:
        return "CT-1"
    if percent_opacity < 50.0:
        return "CT-2"
    if percent_opacity < 75.0:
        return "CT-3"
    return "CT-4"


def quantify(volume, masks, thresholds=OpacityThresholds()):  # type: ignore[no-untyped-def]
    raise NotImplementedError
