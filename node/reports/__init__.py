"""Result objects sent back into the patient's study: SR, SEG and summary image.

:func:`build_reports` is the stage: from the analysis of one series to three
DICOM datasets, each in a new series of the ORIGINAL study (patient and study
attributes copied from the source images).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from model.lungs import LungMasks
from model.prediction import Prediction
from model.quantify import Quantification
from model.volume import CTVolume
from node.errors import ReportError
from node.reports.seg import build_segmentation
from node.reports.source import clean_headers
from node.reports.sr import build_sr
from node.reports.summary import build_summary

__all__ = ["MANUFACTURER", "ReportContext", "ResultObjects", "build_reports"]

MANUFACTURER = "lungnode"


@dataclass(frozen=True, eq=False)
class ReportContext:
    """Everything the report writers need from one analysis."""

    volume: CTVolume
    masks: LungMasks
    quantification: Quantification
    prediction: Prediction | None
    algorithm_name: str
    algorithm_version: str
    series_number_base: int = 9100
    version: int = 1
    """Result version for the study (1: first analysis, 2: after more instances ...)."""
    predecessor_sr: Dataset | None = None


@dataclass(frozen=True, eq=False)
class ResultObjects:
    sr: Dataset
    seg: Dataset
    summary: Dataset


def build_reports(ctx: ReportContext, source_headers: Sequence[Dataset]) -> ResultObjects:
    """Build the SR, SEG and summary image of one analysis.

    Parameters
    ----------
    ctx:
        The analysis and the algorithm's identity.
    source_headers:
        Headers of the analysed images in the volume's z order.

    Raises
    ------
    ReportError
        The headers do not match the volume.
    """
    if len(source_headers) != ctx.volume.shape[0]:
        raise ReportError(f"{len(source_headers)} source headers for a volume of "
                          f"{ctx.volume.shape[0]} slices (series {ctx.volume.series_instance_uid})")
    uids = [str(h.SOPInstanceUID) for h in source_headers]
    if ctx.volume.sop_instance_uids and tuple(uids) != ctx.volume.sop_instance_uids:
        raise ReportError(f"source headers are not in the volume's slice order "
                          f"(series {ctx.volume.series_instance_uid})")
    sources = clean_headers(source_headers)
    base = ctx.series_number_base + 10 * (ctx.version - 1)
    algorithm = f"{ctx.algorithm_name} {ctx.algorithm_version}"
    seg = build_segmentation(sources, ctx.masks, ctx.quantification.opacity_mask,
                             algorithm_name=ctx.algorithm_name,
                             algorithm_version=ctx.algorithm_version, series_number=base + 1,
                             manufacturer=MANUFACTURER)
    sr = build_sr(sources, seg, ctx.quantification, ctx.prediction,
                  algorithm_name=ctx.algorithm_name, algorithm_version=ctx.algorithm_version,
                  series_number=base, manufacturer=MANUFACTURER, predecessor=ctx.predecessor_sr)
    summary = build_summary(sources[len(sources) // 2], ctx.volume, ctx.masks, ctx.quantification,
                            ctx.prediction, algorithm=algorithm, series_number=base + 2,
                            manufacturer=MANUFACTURER)
    return ResultObjects(sr=sr, seg=seg, summary=summary)
