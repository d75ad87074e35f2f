"""The measurement report: Comprehensive 3D SR, TID 1500, built with highdicom.

Content: one volumetric measurement group (TID 1411) per lung referencing its
SEG segment, with volume, percentage of opacity (PO) and of high opacity
(PHO); one whole-lung group (TID 1501) with the same measurements, the
MosMedData category (quantitative algorithm), the scope of the measurement
(whole lung and per lung, no lobes) and the quality flags; and, when the CNN
ran, a group with its predicted class, every class probability and P(COVID),
whose algorithm identification carries the model name, version, sha256 and
the device it ran on.  Private codes are listed in :mod:`node.reports.codes`.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from model.prediction import Prediction
from model.quantify import LungMeasurement, Quantification
from node.reports import codes as lc

__all__ = ["build_sr"]

_CHEST_CT = hd.sr.CodedConcept("24627-2", "LN", "CT Chest")


def _measurements(m: LungMeasurement) -> list[hd.sr.Measurement]:
    """Volume, PO and PHO (the group's algorithm identification applies to each)."""
    return [
        hd.sr.Measurement(name=codes.SCT.Volume, value=round(m.volume_ml, 1), unit=lc.ML),
        hd.sr.Measurement(name=lc.PO, value=round(m.percent_opacity, 2), unit=lc.PERCENT),
        hd.sr.Measurement(name=lc.PHO, value=round(m.percent_high_opacity, 2), unit=lc.PERCENT),
    ]


def _prediction_group(p: Prediction) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    algorithm = hd.sr.AlgorithmIdentification(
        name=p.model_name, version=p.model_version,
        parameters=[f"sha256={p.model_sha256}", f"device={p.device}"])
    measurements = [hd.sr.Measurement(name=lc.probability_name(name), value=round(prob, 4),
                                      unit=lc.UNITY) for name, prob in p.probabilities.items()]
    measurements.append(hd.sr.Measurement(name=lc.P_COVID, value=round(p.p_covid, 4), unit=lc.UNITY))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="CNN severity"),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=lc.CNN_CLASS, value=lc.CLASS_CODES[p.predicted_class])],
    )


def build_sr(evidence: Sequence[Dataset], seg: hd.seg.Segmentation, quantification: Quantification,
             prediction: Prediction | None, *, algorithm_name: str, algorithm_version: str,
             series_number: int, manufacturer: str,
             predecessor: Dataset | None = None) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report for one analysis; ``evidence`` are the cleaned source headers."""
    q = quantification
    quant_algorithm = hd.sr.AlgorithmIdentification(
        name=f"{algorithm_name} quantitative HU threshold", version=algorithm_version,
        parameters=[f"opacity {q.thresholds.opacity_low:g}..{q.thresholds.high_opacity_high:g} HU",
                    f"high opacity {q.thresholds.opacity_high:g}..{q.thresholds.high_opacity_high:g} HU"])
    groups: list = []
    for number, (label, laterality, m) in enumerate(
            (("left lung", codes.SCT.Left, q.left), ("right lung", codes.SCT.Right, q.right)), start=1):
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=label),
            referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, number),
            finding_type=codes.SCT.Lung,
            algorithm_id=quant_algorithm,
            finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung, laterality=laterality)],
            measurements=_measurements(m),
        ))
    evaluations = [
        hd.sr.QualitativeEvaluation(name=lc.SEVERITY_CATEGORY,
                                    value=lc.category_code(q.severity_category)),
        hd.sr.QualitativeEvaluation(name=lc.SCOPE, value=lc.WHOLE_AND_PER_LUNG),
    ] + [hd.sr.QualitativeEvaluation(name=lc.QUALITY, value=lc.flag_code(f)) for f in q.quality_flags]
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="both lungs"),
        finding_type=codes.SCT.Lung,
        algorithm_id=quant_algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
        measurements=_measurements(q.total),
        qualitative_evaluations=evaluations,
    ))
    if prediction is not None:
        groups.append(_prediction_group(prediction))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=algorithm_name, manufacturer_name=manufacturer,
            model_name=algorithm_name))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_CHEST_CT,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*evidence, seg],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        previous_versions=[predecessor] if predecessor is not None else None,
        series_description="lungnode lung report",
    )
