"""Coded concepts used in lungnode's results.

Standard codes come from pydicom's code dictionary (SNOMED CT, DCM, UCUM).
Where no standard code exists, lungnode uses its private coding scheme
``99LUNGNODE`` (designators beginning with ``99`` are reserved for local use):

==============  ============================================================
code            meaning
==============  ============================================================
PO              Percentage of lung volume with opacity (-700..100 HU)
PHO             Percentage of lung volume with high opacity (-300..100 HU)
OPACITY         Lung opacity (ground glass and consolidation), SEG segment
SEVCAT          Severity category (MosMedData CT-0..CT-4, quantitative)
CT-0..CT-4      the five MosMedData categories
CNNCLASS        Severity class predicted by the CNN
PCOVID          Probability of COVID-19 (1 - P(non-COVID))
P-<class>       Probability of one CNN class (non-COVID, mild, ...)
NONCOVID, MILD, MODERATE, SEVERE, CRITICAL   the CNN classes (Cov3d)
QUALITY         Quality flag (value: one of the flag codes below)
PARTCOV         Lungs not fully covered by the scan
THICK           Slice thickness over 5 mm
VOLRANGE        Lung volume outside the plausible adult range
NOISE           Heavy image noise
SCOPE           Scope of measurement: whole lung and per lung, no lobes
==============  ============================================================
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

__all__ = [
    "CATEGORY_MEANINGS",
    "CLASS_CODES",
    "LEFT_LUNG",
    "PERCENT",
    "RIGHT_LUNG",
    "SCHEME",
    "UNITY",
    "flag_code",
    "private",
]

SCHEME = "99LUNGNODE"


def private(value: str, meaning: str) -> CodedConcept:
    """A concept of lungnode's private coding scheme."""
    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


LEFT_LUNG = CodedConcept("44029006", "SCT", "Left lung")
RIGHT_LUNG = CodedConcept("3341006", "SCT", "Right lung")
LUNG = codes.SCT.Lung
PERCENT = CodedConcept("%", "UCUM", "percent")
UNITY = CodedConcept("1", "UCUM", "no units")
ML = CodedConcept("ml", "UCUM", "milliliter")

PO = private("PO", "Percentage of lung volume with opacity")
PHO = private("PHO", "Percentage of lung volume with high opacity")
OPACITY = private("OPACITY", "Lung opacity")
SEVERITY_CATEGORY = private("SEVCAT", "Severity category (MosMedData)")
CNN_CLASS = private("CNNCLASS", "Severity class predicted by CNN")
P_COVID = private("PCOVID", "Probability of COVID-19")
QUALITY = private("QUALITY", "Quality flag")
SCOPE = private("SCOPE", "Scope of measurement")
WHOLE_AND_PER_LUNG = private("WHOLEPERLUNG", "Whole lung and per lung, no lobes")

CATEGORY_MEANINGS = {
    "CT-0": "CT-0: no opacity",
    "CT-1": "CT-1: under 25 % of lung involved",
    "CT-2": "CT-2: 25-50 % of lung involved",
    "CT-3": "CT-3: 50-75 % of lung involved",
    "CT-4": "CT-4: over 75 % of lung involved",
}

CLASS_CODES = {
    "non-COVID": private("NONCOVID", "non-COVID"),
    "mild": private("MILD", "mild"),
    "moderate": private("MODERATE", "moderate"),
    "severe": private("SEVERE", "severe"),
    "critical": private("CRITICAL", "critical"),
}

_FLAGS = (
    ("lungs not fully covered", "PARTCOV", "Lungs not fully covered by the scan"),
    ("slice thickness", "THICK", "Slice thickness over 5 mm"),
    ("lung volume", "VOLRANGE", "Lung volume outside the plausible adult range"),
    ("heavy image noise", "NOISE", "Heavy image noise"),
)


def flag_code(flag: str) -> CodedConcept:
    """The coded form of a quality flag of :class:`model.quantify.Quantification`."""
    for prefix, value, meaning in _FLAGS:
        if flag.lower().startswith(prefix):
            return private(value, meaning)
    return private("OTHER", flag)


def category_code(category: str) -> CodedConcept:
    return private(category, CATEGORY_MEANINGS.get(category, category))


def probability_name(class_name: str) -> CodedConcept:
    return private(f"P-{CLASS_CODES[class_name].value}", f"Probability of {class_name}")
