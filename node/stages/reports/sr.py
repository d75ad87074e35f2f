"""The measurement report: Comprehensive 3D SR, TID 1500, built with highdicom.

Content of the Imaging Measurement Report (TID 1500):

- procedure reported: LOINC 24627-2 *CT Chest*; observer: the lungnode device;
- image library (TID 1600): every analysed CT image;
- one volumetric measurement group (TID 1411) per lung, tracking identifiers
  ``left lung`` and ``right lung``, finding site SCT Lung with laterality,
  referencing the lung's segment of the SEG (and through it the source
  series), with Volume (SCT 118565006, ml), percentage of opacity (PO, %) and
  of high opacity (PHO, %);
- one whole-lung group (TID 1501, ``both lungs``, finding site Lung without
  laterality) with the same three measurements, the MosMedData severity
  category and the scope of measurement (whole lung and per lung, no lobes;
  or, when a lobe model made the masks, whole lung, per lung and per lobe,
  with the CT severity score CTSS 0-25 as a NUM ``99LUNGNODE CTSS``);
- with lobes, one volumetric group (TID 1411) per lobe after the lungs,
  tracking identifier the lobe's name (``left upper lobe`` ...), finding site
  the lobe's SNOMED CT concept with its laterality
  (:data:`node.stages.reports.codes.LOBE_SITES`), referencing the lobe's
  segment of the SEG, with Volume, PO, PHO and the lobe's CTSS score 0-5
  (``99LUNGNODE CTSSLOBE``, :func:`model.quantify.ctss_score`); a lobe the
  model did not find has a plain group (TID 1501) with its zeros and no
  segment;
- in each of these three groups every quality flag twice: coded
  (``QUALITY``) and in words (``QUALITYTEXT``), so no number travels without
  its caveats; the algorithm identification ``<name> quantitative HU
  threshold`` with its version and HU ranges;
- when the CNN ran, a group (TID 1501, ``CNN severity``) with the predicted
  class, each class probability and P(COVID) = 1 - P(non-COVID), whose
  algorithm identification names the model, its version, ``sha256=`` and the
  ``device=`` it ran on, and the model card's validity statement (what the
  model was trained on, whether it was validated on patients) as a TEXT item
  DCM 121106 *Comment* after the class (:data:`VALIDITY`).

A re-analysis references the SR it replaces in Predecessor Documents Sequence.
The document is COMPLETE, PRELIMINARY and UNVERIFIED: nobody has signed it.
Private codes are listed in :mod:`node.stages.reports.codes`.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom.sr.templates import Template
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from model.prediction import Prediction
from model.quantify import LobeMeasurement, LungMeasurement, Quantification
from node.errors import ReportError
from node.stages.reports import codes as lc

__all__ = ["CHEST_CT", "GROUP_IDS", "VALIDITY", "build_sr"]

CHEST_CT = hd.sr.CodedConcept("24627-2", "LN", "CT Chest")
GROUP_IDS = {"left": "left lung", "right": "right lung", "both": "both lungs", "cnn": "CNN severity"}
"""Tracking identifiers of the measurement groups."""

_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
_SOURCE = hd.sr.CodedConcept("260753009", "SCT", "Source")
VALIDITY = hd.sr.CodedConcept.from_code(codes.DCM.Comment)
"""Concept name of the CNN group's TEXT item that holds the model card's validity statement."""


def _measurements(m: LungMeasurement) -> list[hd.sr.Measurement]:
    """Volume, PO and PHO (the group's algorithm identification applies to each)."""
    return [
        hd.sr.Measurement(name=codes.SCT.Volume, value=round(m.volume_ml, 1), unit=lc.ML),
        hd.sr.Measurement(name=lc.PO, value=round(m.percent_opacity, 2), unit=lc.PERCENT),
        hd.sr.Measurement(name=lc.PHO, value=round(m.percent_high_opacity, 2), unit=lc.PERCENT),
    ]


_Group = (hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
          | hd.sr.MeasurementsAndQualitativeEvaluations)


def _lobe_group(lobe: LobeMeasurement, seg: hd.seg.Segmentation,
                source_series: hd.sr.SourceSeriesForSegmentation,
                algorithm: hd.sr.AlgorithmIdentification) -> _Group:
    """One lobe's group: volume, PO, PHO and CTSS score, at the lobe's coded site, on its segment."""
    concept, side = lc.LOBE_SITES[lobe.label]
    measurements = [*_measurements(lobe.measurement),
                    hd.sr.Measurement(name=lc.CTSS_LOBE, value=lobe.score, unit=lc.UNITY)]
    tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=lobe.name)
    site = hd.sr.FindingSite(anatomic_location=concept, laterality=lc.LATERALITY[side])
    number = next((int(item.SegmentNumber) for item in seg.SegmentSequence
                   if str(item.get("TrackingID", "")) == lobe.name), None)
    if number is None:  # the model found no voxel of this lobe: no segment to point at
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, finding_type=concept, algorithm_id=algorithm,
            finding_sites=[site], measurements=measurements)
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
            segment_number=number, source_series=source_series),
        finding_type=concept, algorithm_id=algorithm, finding_sites=[site],
        measurements=measurements)


def _flag_codes(flags: Sequence[str]) -> list[hd.sr.QualitativeEvaluation]:
    return [hd.sr.QualitativeEvaluation(name=lc.QUALITY, value=lc.flag_code(f)) for f in flags]


def _add_flag_texts(group: Template, flags: Sequence[str]) -> None:
    """Append the flags in words (TEXT items) to a group's container."""
    container = group[0]
    for flag in flags:
        container.ContentSequence.append(
            hd.sr.TextContentItem(name=lc.QUALITY_TEXT, value=flag, relationship_type=_CONTAINS))


def _prediction_group(p: Prediction) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    unknown = sorted(set(p.probabilities) - set(lc.CLASS_CODES))
    if unknown or p.predicted_class not in lc.CLASS_CODES:
        raise ReportError(
            f"model {p.model_name} {p.model_version} reported classes {unknown or p.predicted_class} "
            f"that the report does not know (known: {', '.join(lc.CLASS_CODES)}); use a model "
            "trained on the Cov3d classes")
    if "non-COVID" not in p.probabilities:
        raise ReportError(f"model {p.model_name} {p.model_version} gave no non-COVID probability; "
                          "P(COVID) cannot be reported")
    algorithm = hd.sr.AlgorithmIdentification(
        name=p.model_name, version=p.model_version,
        parameters=[f"sha256={p.model_sha256}", f"device={p.device}"])
    measurements = [hd.sr.Measurement(name=lc.probability_name(name), value=round(prob, 4),
                                      unit=lc.UNITY) for name, prob in p.probabilities.items()]
    measurements.append(hd.sr.Measurement(name=lc.P_COVID, value=round(p.p_covid, 4), unit=lc.UNITY))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=GROUP_IDS["cnn"]),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=lc.LUNG)],
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=lc.CNN_CLASS, value=lc.CLASS_CODES[p.predicted_class])],
    )
    # what the model was trained on and whether it was validated on patients, beside its class
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=VALIDITY, value=p.model_validity, relationship_type=_CONTAINS))
    return group


def _image_library(images: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """Image Library (TID 1600) of one series: one group, shared descriptors, one entry per image.

    highdicom's own library repeats a dozen descriptors under every image,
    which takes seconds and hundreds of kilobytes for a 300-slice series; the
    descriptors the images share (modality, frame of reference, size, pixel
    spacing, slice thickness, orientation) belong to the group (TID 1600 row 3).
    """
    per_image = {"110901", "110902", "110903"}  # Image Position (Patient) X, Y, Z
    shared = [item for item in hd.sr.ImageLibraryEntryDescriptors(images[0])
              if item.ConceptNameCodeSequence[0].CodeValue not in per_image]
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup,
                                       relationship_type=_CONTAINS)
    group.ContentSequence = hd.sr.ContentSequence(shared)
    for ds in images:
        group.ContentSequence.append(hd.sr.ImageContentItem(
            name=_SOURCE, referenced_sop_class_uid=ds.SOPClassUID,
            referenced_sop_instance_uid=ds.SOPInstanceUID, relationship_type=_CONTAINS))
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=_CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _insert_library(report: hd.sr.MeasurementReport, library: hd.sr.ContainerContentItem) -> None:
    """Put the library where TID 1500 has it: before the Imaging Measurements container."""
    content = report[0].ContentSequence
    index = next(i for i, item in enumerate(content)
                 if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurements.value)
    content.insert(index, library)


def _check_predecessor(predecessor: Dataset, study_uid: str) -> None:
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
               if not predecessor.get(k)]
    if missing:
        raise ReportError(f"the previous SR lacks {', '.join(missing)}; it cannot be referenced "
                          "as predecessor. Give the SR as it was sent, or none")
    if predecessor.StudyInstanceUID != study_uid:
        raise ReportError(
            f"the previous SR {predecessor.SOPInstanceUID} belongs to study "
            f"{predecessor.StudyInstanceUID}, not to the analysed study {study_uid}; give the SR "
            "of this study")


def build_sr(evidence: Sequence[Dataset], seg: hd.seg.Segmentation, quantification: Quantification,
             prediction: Prediction | None, *, algorithm_name: str, algorithm_version: str,
             series_number: int, manufacturer: str, institution_name: str | None = None,
             predecessor: Dataset | None = None,
             segmentation: Sequence[str] = ()) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 measurement report of one analysis.

    Parameters
    ----------
    evidence:
        Cleaned headers of the analysed images, in z order.
    seg:
        The Segmentation whose segments 1 and 2 are the left and right lung (and, with lobes,
        whose lobe segments carry the lobe's name as tracking ID).
    quantification, prediction:
        The numbers to report; ``prediction`` is ``None`` when no model ran.
    algorithm_name, algorithm_version:
        Identity of the quantitative algorithm.
    series_number, manufacturer, institution_name:
        Series and equipment attributes of the new object.
    predecessor:
        The SR this one replaces (its header suffices), or ``None``.
    segmentation:
        Parameters naming the lung segmenter, its model and weights' sha256
        (:meth:`model.lungs.SegmentationMethod.parameters`), added to the
        quantitative algorithm's identification.

    Raises
    ------
    ReportError
        Unknown category or CNN classes, or a predecessor that cannot be referenced.
    """
    q = quantification
    study_uid = str(evidence[0].StudyInstanceUID)
    if predecessor is not None:
        _check_predecessor(predecessor, study_uid)
    try:
        category = lc.category_code(q.severity_category)
    except ValueError as exc:
        raise ReportError(f"series {evidence[0].SeriesInstanceUID}: {exc}") from exc
    quant_algorithm = hd.sr.AlgorithmIdentification(
        name=f"{algorithm_name} quantitative HU threshold", version=algorithm_version,
        parameters=[f"opacity {q.thresholds.opacity_low:g}..{q.thresholds.high_opacity_high:g} HU",
                    f"high opacity {q.thresholds.opacity_high:g}..{q.thresholds.high_opacity_high:g} HU",
                    *segmentation])
    # the source series, not every source image: those are in the image library once
    source_series = hd.sr.SourceSeriesForSegmentation(str(evidence[0].SeriesInstanceUID))
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
                 | hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for number, side, m in ((1, "left", q.left), (2, "right", q.right)):
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=GROUP_IDS[side]),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=number, source_series=source_series),
            finding_type=lc.LUNG,
            algorithm_id=quant_algorithm,
            finding_sites=[hd.sr.FindingSite(anatomic_location=lc.LUNG,
                                             laterality=lc.LATERALITY[side])],
            measurements=_measurements(m),
            qualitative_evaluations=_flag_codes(q.quality_flags) or None,
        )
        _add_flag_texts(group, q.quality_flags)
        groups.append(group)
    groups.extend(_lobe_group(lobe, seg, source_series, quant_algorithm) for lobe in q.lobes)
    ctss = ([hd.sr.Measurement(name=lc.CTSS, value=q.ctss, unit=lc.UNITY)]
            if q.ctss is not None else [])
    whole = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=GROUP_IDS["both"]),
        finding_type=lc.LUNG,
        algorithm_id=quant_algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=lc.LUNG)],
        measurements=[*_measurements(q.total), *ctss],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=lc.SEVERITY_CATEGORY, value=category),
            hd.sr.QualitativeEvaluation(
                name=lc.SCOPE, value=lc.WHOLE_AND_PER_LOBE if q.lobes else lc.WHOLE_AND_PER_LUNG),
            *_flag_codes(q.quality_flags),
        ],
    )
    _add_flag_texts(whole, q.quality_flags)
    groups.append(whole)
    if prediction is not None:
        groups.append(_prediction_group(prediction))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[manufacturer, algorithm_name]),  # stable per device
            name=algorithm_name, manufacturer_name=manufacturer, model_name=algorithm_name,
            physical_location=institution_name))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CHEST_CT,
        imaging_measurements=groups,
    )
    _insert_library(report, _image_library(evidence))
    return hd.sr.Comprehensive3DSR(
        evidence=[*evidence, seg],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        institution_name=institution_name,
        is_complete=True,
        previous_versions=[predecessor] if predecessor is not None else None,
        series_description=f"{algorithm_name} lung report",
    )
