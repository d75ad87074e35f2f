"""Source image headers made fit to derive objects from.

Real studies carry non-conformant attributes that highdicom copies into
derived objects (for example a Referenced Study Sequence item without
Referenced SOP Class UID, which makes ``dciodvfy`` report an error).  These
helpers return cleaned copies; the source files are never changed.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset

__all__ = ["clean_headers", "patient_study_attributes"]

_REFERENCE_SEQUENCES = ("ReferencedStudySequence", "ReferencedPatientSequence",
                        "ReferencedPerformedProcedureStepSequence")
_REQUIRED_IN_ITEM = ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID")

PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
    "ReferringPhysicianName", "StudyDescription",
)


def _clean(ds: Dataset) -> Dataset:
    out = Dataset()
    out.update(ds)  # shallow: element objects are shared, sequences are replaced below
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    for keyword in _REFERENCE_SEQUENCES:
        if keyword not in out:
            continue
        items = [item for item in out[keyword].value
                 if all(item.get(k) for k in _REQUIRED_IN_ITEM)]
        if items:
            setattr(out, keyword, items)
        else:
            delattr(out, keyword)
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in out:
            delattr(out, keyword)
    return out


def clean_headers(headers: Sequence[Dataset]) -> list[Dataset]:
    """Copies of the source headers without pixel data and with broken
    reference sequences dropped (items lacking their required UIDs)."""
    return [_clean(h) for h in headers]


def patient_study_attributes(ds: Dataset) -> Dataset:
    """The patient and study attributes a result must carry, copied from ``ds``."""
    out = Dataset()
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in ds:
            setattr(out, keyword, ds.data_element(keyword).value)  # type: ignore[union-attr]
    return out
