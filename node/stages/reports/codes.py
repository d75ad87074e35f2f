"""Coded concepts used in lungnode's results.

Standard codes come from pydicom's code dictionary (SNOMED CT ``SCT``, ``DCM``,
UCUM): Lung 39607008 with laterality Left 7771000 / Right 24028007, Volume
118565006, Anatomical Structure 91723000, Morphologically Abnormal Structure
49755003, and the UCUM units ``ml``, ``%`` and ``1``.

Lobes (:data:`LOBE_SITES`) are coded as DICOM codes them (CID 7151 and the
anatomic-region CIDs): the SNOMED CT lobe concept with the side as laterality,
Upper lobe of lung 45653009 and Lower lobe of lung 90572001 with Left or
Right, and Middle lobe of right lung 72481006 with Right.  The pre-coordinated
sided concepts (upper lobe of left lung 44714003, of right lung 78883009,
lower lobe of left lung 41224006, of right lung 266005) are not in DICOM's
context groups, except 44714003, so the form with laterality is used for all
five, as for the lungs.

No standard codes exist for the percentage of opacity, the MosMedData
categories, the CNN's classes or the quality flags, so lungnode uses its private
coding scheme ``99LUNGNODE`` (designators beginning with ``99`` are reserved for
local use by PS3.16 8.2):

================================  =============================================================
code (scheme ``99LUNGNODE``)      meaning
================================  =============================================================
``PO``                            Percentage of lung volume with opacity (NUM, unit ``%``):
                                  voxels from -700 to 100 HU (ground glass and consolidation)
``PHO``                           Percentage of lung volume with high opacity (NUM, unit ``%``):
                                  voxels from -300 to 100 HU (consolidation)
``SEVCAT``                        Severity category (MosMedData), quantitative; values
                                  ``CT-0`` .. ``CT-4``
``CT-0`` .. ``CT-4``              CT-0 no opacity, CT-1 under 25 %, CT-2 25-50 %, CT-3 50-75 %,
                                  CT-4 over 75 % of lung involved
``SCOPE``                         Scope of measurement; value ``WHOLEPERLUNG``
``WHOLEPERLUNG``                  Whole lung and per lung, no lobes
``WHOLEPERLOBE``                  Whole lung, per lung and per lobe (a lobe model ran)
``CTSS``                          CT severity score 0-25 (Pan et al., Radiology 2020): the sum
                                  of the five lobes' scores (NUM, unit ``1``)
``CTSSLOBE``                      CT severity score of one lobe, 0-5 (NUM, unit ``1``): 0 PO 0
                                  or under the normal threshold, 1 under 5 %, 2 5-25 %,
                                  3 over 25-50 %, 4 over 50-75 %, 5 over 75 %
``QUALITY``                       Quality flag (CODE); values ``PARTCOV``, ``THICK``,
                                  ``VOLRANGE``, ``NOISE``, ``EXTENSIVE``, ``OTHER``
``QUALITYTEXT``                   Quality flag text (TEXT): the flag in words, with its numbers
``PARTCOV``                       Lungs not fully covered by the scan
``THICK``                         Slice thickness over 5 mm
``VOLRANGE``                      Lung volume outside the plausible adult range
``NOISE``                         Heavy image noise
``EXTENSIVE``                     Extensive opacity: opacity percentages may read low
``OTHER``                         Other quality flag (see the QUALITYTEXT item)
``CNNCLASS``                      Severity class predicted by CNN; values ``NONCOVID``,
                                  ``MILD``, ``MODERATE``, ``SEVERE``, ``CRITICAL``
``P-NONCOVID`` .. ``P-CRITICAL``  Probability of one CNN class (NUM, unit ``1``)
``PCOVID``                        Probability of COVID-19 = 1 - P(non-COVID) (NUM, unit ``1``)
``OPACITY``                       Lung opacity: the SEG segment of ground glass and
                                  consolidation together
================================  =============================================================

Why the opacity segment has a private code: SNOMED CT 1217294009 *Ground
glass lung opacity* (a finding) names ground glass only, while the segment
also holds consolidation; 50196008, sometimes quoted for ground glass, is
listed elsewhere as *Perialveolar fibrosis of lung*, so it is not used.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

__all__ = [
    "CATEGORY_MEANINGS",
    "CLASS_CODES",
    "CNN_CLASS",
    "CTSS",
    "CTSS_LOBE",
    "LATERALITY",
    "LOBE_SITES",
    "LUNG",
    "ML",
    "OPACITY",
    "P_COVID",
    "PERCENT",
    "PHO",
    "PO",
    "QUALITY",
    "QUALITY_TEXT",
    "SCHEME",
    "SCOPE",
    "SEVERITY_CATEGORY",
    "UNITY",
    "WHOLE_AND_PER_LOBE",
    "WHOLE_AND_PER_LUNG",
    "category_code",
    "flag_code",
    "private",
    "probability_name",
]

SCHEME = "99LUNGNODE"


def private(value: str, meaning: str) -> CodedConcept:
    """A concept of lungnode's private coding scheme ``99LUNGNODE``."""
    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


LUNG = CodedConcept.from_code(codes.SCT.Lung)
LATERALITY = {
    "left": CodedConcept.from_code(codes.SCT.Left),
    "right": CodedConcept.from_code(codes.SCT.Right),
}
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
QUALITY_TEXT = private("QUALITYTEXT", "Quality flag text")
SCOPE = private("SCOPE", "Scope of measurement")
WHOLE_AND_PER_LUNG = private("WHOLEPERLUNG", "Whole lung and per lung, no lobes")
WHOLE_AND_PER_LOBE = private("WHOLEPERLOBE", "Whole lung, per lung and per lobe")
CTSS = private("CTSS", "CT severity score (0-25)")
CTSS_LOBE = private("CTSSLOBE", "CT severity score of lobe (0-5)")

LOBE_SITES: dict[int, tuple[CodedConcept, str]] = {
    1: (CodedConcept.from_code(codes.SCT.UpperLobeOfLung), "left"),
    2: (CodedConcept.from_code(codes.SCT.LowerLobeOfLung), "left"),
    3: (CodedConcept.from_code(codes.SCT.UpperLobeOfLung), "right"),
    4: (CodedConcept.from_code(codes.SCT.MiddleLobeOfRightLung), "right"),
    5: (CodedConcept.from_code(codes.SCT.LowerLobeOfLung), "right"),
}
"""Per lobe label (:data:`model.quantify.LOBES`): its SNOMED CT concept and side (a key of
:data:`LATERALITY`)."""

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
    ("extensive opacity", "EXTENSIVE", "Extensive opacity: opacity percentages may read low"),
)


def flag_code(flag: str) -> CodedConcept:
    """The coded form of a quality flag of :class:`model.quantify.Quantification`.

    Parameters
    ----------
    flag:
        The flag as :func:`model.quantify.quantify` words it.

    Returns
    -------
    CodedConcept
        ``PARTCOV``, ``THICK``, ``VOLRANGE``, ``NOISE``, ``EXTENSIVE``, or ``OTHER`` for a flag
        this table does not know (its words go into the QUALITYTEXT item).
    """
    for prefix, value, meaning in _FLAGS:
        if flag.lower().startswith(prefix):
            return private(value, meaning)
    return private("OTHER", "Other quality flag")


def category_code(category: str) -> CodedConcept:
    """The coded MosMedData category ``CT-0`` .. ``CT-4``.

    Raises
    ------
    ValueError
        ``category`` is not one of the five categories.
    """
    if category not in CATEGORY_MEANINGS:
        raise ValueError(f"unknown severity category {category!r}; expected one of "
                         f"{', '.join(CATEGORY_MEANINGS)}")
    return private(category, CATEGORY_MEANINGS[category])


def probability_name(class_name: str) -> CodedConcept:
    """Concept name of the probability of one CNN class, e.g. ``P-MILD``.

    Raises
    ------
    KeyError
        ``class_name`` is not one of :data:`model.prediction.CLASS_NAMES`.
    """
    return private(f"P-{CLASS_CODES[class_name].value}", f"Probability of {class_name}")
