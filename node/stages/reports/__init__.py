"""Result objects sent back into the patient's study: SR, SEG and summary image.

:func:`build_reports` is the stage: from the analysis of one series to three
DICOM datasets, each in a new series of the ORIGINAL study (patient and study
attributes copied from cleaned copies of the source headers, see
:mod:`node.stages.reports.source`):

- :mod:`node.stages.reports.sr`: Comprehensive 3D SR, TID 1500 measurement report;
- :mod:`node.stages.reports.seg`: binary Segmentation (left lung, right lung, opacity);
- :mod:`node.stages.reports.summary`: RGB Secondary Capture with burned-in numbers.

Codes, including the private ``99LUNGNODE`` scheme, are in :mod:`node.stages.reports.codes`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from model.lungs import LungMasks
from model.prediction import Prediction
from model.quantify import Quantification
from model.volume import CTVolume
from node.errors import ReportError
from node.stages.reports.seg import build_segmentation
from node.stages.reports.source import PERSON_NAMES, clean_headers
from node.stages.reports.sr import build_sr
from node.stages.reports.summary import build_summary

__all__ = ["MANUFACTURER", "ReportContext", "ResultObjects", "build_reports"]

logger = logging.getLogger(__name__)

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
    """SR, SEG and summary get this, +1 and +2, each plus 10 per version after the first."""
    version: int = 1
    """Result version for the study (1: first analysis, 2: after more instances ...)."""
    predecessor_sr: Dataset | None = None
    """The SR of the previous version (its header suffices), referenced as predecessor."""
    manufacturer: str = MANUFACTURER
    institution_name: str | None = None


@dataclass(frozen=True, eq=False)
class ResultObjects:
    """The three result objects of one analysis."""

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
        Headers of the analysed images (no pixel data needed) in the volume's z order.

    Returns
    -------
    ResultObjects
        New SOP and Series Instance UIDs each, in the source's study; the SEG on
        the source's frame of reference.

    Raises
    ------
    ReportError
        The headers do not match the volume, lack what a derived object needs,
        or the analysis holds values the report cannot express.
    """
    uid = ctx.volume.series_instance_uid
    if ctx.version < 1:
        raise ReportError(f"series {uid}: result version {ctx.version}; versions start at 1")
    if len(source_headers) != ctx.volume.shape[0]:
        raise ReportError(f"series {uid}: {len(source_headers)} source headers for a volume of "
                          f"{ctx.volume.shape[0]} slices; give the headers of the analysed images")
    uids = tuple(str(h.get("SOPInstanceUID", "")) for h in source_headers)
    if ctx.volume.sop_instance_uids and uids != ctx.volume.sop_instance_uids:
        raise ReportError(f"series {uid}: source headers are not the volume's images in its slice "
                          "order; pass them in the order of CTVolume.sop_instance_uids")
    if ctx.version > 1 and ctx.predecessor_sr is None:
        logger.warning("series %s: result version %d without the previous SR; no predecessor "
                       "is referenced", uid, ctx.version)
    started = time.perf_counter()
    sources = clean_headers(source_headers)
    base = ctx.series_number_base + 10 * (ctx.version - 1)
    algorithm = f"{ctx.algorithm_name} {ctx.algorithm_version}\nlungs: {ctx.masks.method.describe()}"
    seg = build_segmentation(sources, ctx.masks, ctx.quantification.opacity_mask,
                             algorithm_name=ctx.algorithm_name,
                             algorithm_version=ctx.algorithm_version, series_number=base + 1,
                             manufacturer=ctx.manufacturer, institution_name=ctx.institution_name)
    sr = build_sr(sources, seg, ctx.quantification, ctx.prediction,
                  algorithm_name=ctx.algorithm_name, algorithm_version=ctx.algorithm_version,
                  series_number=base, manufacturer=ctx.manufacturer,
                  institution_name=ctx.institution_name, predecessor=ctx.predecessor_sr,
                  segmentation=ctx.masks.method.parameters())
    summary = build_summary(sources[len(sources) // 2], ctx.volume, ctx.masks, ctx.quantification,
                            ctx.prediction, algorithm=algorithm, series_number=base + 2,
                            manufacturer=ctx.manufacturer, institution_name=ctx.institution_name)
    for ds in (sr, seg, summary):  # the names exactly as the study has them (see clean_headers)
        for keyword in PERSON_NAMES:
            if source_headers[0].get(keyword):
                setattr(ds, keyword, source_headers[0].get(keyword))
    logger.info("series %s: SR %s, SEG %s (%d frames), summary %s built in %.1f s (version %d)",
                uid, sr.SOPInstanceUID, seg.SOPInstanceUID, int(seg.NumberOfFrames),
                summary.SOPInstanceUID, time.perf_counter() - started, ctx.version)
    return ResultObjects(sr=sr, seg=seg, summary=summary)
