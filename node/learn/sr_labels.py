"""Severity labels carried by a radiologist's structured report (SR) sent to the node.

A viewer or PACS template labels a study by sending a Comprehensive SR (or an
Enhanced or Comprehensive 3D SR) with one content item of value type CODE whose
concept name is lungnode's private ``SEVERITY-LABEL`` and whose value is one of
the ``LABEL-*`` codes below (coding scheme designator ``99LUNGNODE``, the
node's private scheme, see :mod:`node.stages.reports.codes`):

=========================  ==========================================  ==============
code (scheme 99LUNGNODE)   code meaning                                label
=========================  ==========================================  ==============
``SEVERITY-LABEL``         Severity label (radiologist)                (concept name)
``LABEL-NONCOVID``         Non-COVID                                   ``non-covid``
``LABEL-MILD``             Mild                                        ``mild``
``LABEL-MODERATE``         Moderate                                    ``moderate``
``LABEL-SEVERE``           Severe                                      ``severe``
``LABEL-CRITICAL``         Critical                                    ``critical``
``LABEL-COVID-UNKNOWN``    COVID-19, severity unknown                  ``covid-unknown``
=========================  ==========================================  ==============

The person who labelled is taken from the SR's observer context (TID 1002,
``(121008, DCM, "Person Observer Name")``), else from the Verifying Observer
Sequence.  The study is the SR's Study Instance UID, or the study of an SOP
instance it references (the node's own SR, for instance).

:func:`parse_label_sr` is a pure function of the data set: no database, no files;
:mod:`node.learn.labels` records what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

from node.db import LabelValue
from node.errors import LabelError
from node.stages.reports.codes import SCHEME, private

__all__ = [
    "LABEL_CODES",
    "LABEL_SR_SOP_CLASSES",
    "SEVERITY_LABEL",
    "SrLabel",
    "label_code",
    "parse_label_sr",
]

LABEL_SR_SOP_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
)
"""SR storage classes the node accepts as labels (from known peers only)."""

SEVERITY_LABEL = private("SEVERITY-LABEL", "Severity label (radiologist)")
"""Concept name of the CODE content item that carries the label."""

LABEL_CODES: dict[LabelValue, CodedConcept] = {
    LabelValue.NON_COVID: private("LABEL-NONCOVID", "Non-COVID"),
    LabelValue.MILD: private("LABEL-MILD", "Mild"),
    LabelValue.MODERATE: private("LABEL-MODERATE", "Moderate"),
    LabelValue.SEVERE: private("LABEL-SEVERE", "Severe"),
    LabelValue.CRITICAL: private("LABEL-CRITICAL", "Critical"),
    LabelValue.COVID_UNKNOWN: private("LABEL-COVID-UNKNOWN", "COVID-19, severity unknown"),
}
"""The label values as codes of the scheme ``99LUNGNODE``."""

_VALUE_BY_CODE = {code.value: value for value, code in LABEL_CODES.items()}
_PERSON_OBSERVER_NAME = ("121008", "DCM")
_REFERENCED_SOP_INSTANCE_UID = 0x00081155


def label_code(value: LabelValue) -> CodedConcept:
    """The code a template emits for ``value`` (the value of a ``SEVERITY-LABEL`` item)."""
    return LABEL_CODES[value]


@dataclass(frozen=True)
class SrLabel:
    """What a labelling SR says: the value, who said it and about which study."""

    value: LabelValue
    observer: str | None
    """The person observer's name, ``None`` when the SR names none."""
    study_instance_uid: str
    sop_instance_uid: str
    referenced_sop_uids: tuple[str, ...]
    """Every Referenced SOP Instance UID in the SR (evidence and content), in order, once each."""


def _code(item: Dataset, keyword: str) -> tuple[str, str] | None:
    seq = item.get(keyword)
    if not seq:
        return None
    code = seq[0]
    value = str(code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue") or "")
    return value.strip(), str(code.get("CodingSchemeDesignator") or "").strip()


def _items(ds: Dataset) -> list[Dataset]:
    """Every content item of the SR tree, depth first."""
    out: list[Dataset] = []
    stack = list(reversed(list(ds.get("ContentSequence") or [])))
    while stack:
        item = stack.pop()
        out.append(item)
        stack.extend(reversed(list(item.get("ContentSequence") or [])))
    return out


def _observer(ds: Dataset, items: list[Dataset]) -> str | None:
    for item in items:
        if (str(item.get("ValueType") or "") == "PNAME"
                and _code(item, "ConceptNameCodeSequence") == _PERSON_OBSERVER_NAME):
            name = str(item.get("PersonName") or "").strip()
            if name:
                return name
    for verifier in ds.get("VerifyingObserverSequence") or []:
        name = str(verifier.get("VerifyingObserverName") or "").strip()
        if name:
            return name
    return None


def parse_label_sr(ds: Dataset) -> SrLabel:
    """The label an SR carries; :class:`LabelError` saying what is missing when it carries none.

    Exactly one value is accepted: several ``SEVERITY-LABEL`` items with different values are
    an error (nothing is guessed); repeats of the same value are fine.
    """
    sop_uid = str(ds.get("SOPInstanceUID") or "").strip()
    study_uid = str(ds.get("StudyInstanceUID") or "").strip()
    if not sop_uid or not study_uid:
        raise LabelError("the SR has no SOP Instance UID or no Study Instance UID")
    items = _items(ds)
    found: list[tuple[str, str]] = []
    for item in items:
        if str(item.get("ValueType") or "") != "CODE":
            continue
        if _code(item, "ConceptNameCodeSequence") != (SEVERITY_LABEL.value, SCHEME):
            continue
        code = _code(item, "ConceptCodeSequence")
        if code is None:
            raise LabelError("the SR's SEVERITY-LABEL item has no code value")
        found.append(code)
    allowed = ", ".join(c.value for c in LABEL_CODES.values())
    if not found:
        raise LabelError(f"SR {sop_uid} carries no severity label: it needs a CODE item "
                         f"(SEVERITY-LABEL, {SCHEME}) with one of {allowed}")
    values: set[LabelValue] = set()
    for value, scheme in found:
        if scheme != SCHEME or value not in _VALUE_BY_CODE:
            raise LabelError(f"SR {sop_uid}: severity label code ({value}, {scheme}) is not one "
                             f"of {allowed} (scheme {SCHEME})")
        values.add(_VALUE_BY_CODE[value])
    if len(values) > 1:
        shown = ", ".join(sorted(v.value for v in values))
        raise LabelError(f"SR {sop_uid} carries conflicting severity labels ({shown}); "
                         "send one value per SR")
    refs: list[str] = []
    for elem in ds.iterall():
        if elem.tag == _REFERENCED_SOP_INSTANCE_UID and elem.value:
            uid = str(elem.value).strip()
            if uid and uid not in refs:
                refs.append(uid)
    return SrLabel(value=values.pop(), observer=_observer(ds, items), study_instance_uid=study_uid,
                   sop_instance_uid=sop_uid, referenced_sop_uids=tuple(refs))
