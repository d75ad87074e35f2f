"""Source image headers made fit to derive objects from.

highdicom copies every Patient- and Study-level attribute of the first source
image into a derived object, conformant or not.  Real studies carry
non-conformant attributes: a Referenced Study Sequence item without
Referenced SOP Class UID (seen in studies from several archives), code items
without a meaning, empty items.  Copied into an SR, SEG or Secondary Capture,
they make ``dciodvfy`` report errors and some archives refuse the object.

:func:`clean_headers` returns repaired copies (the caller's datasets are never
changed):

- pixel data and private attributes are left out (nothing derived needs them);
- every sequence is checked item by item, nested sequences first: an item is
  dropped when it is empty, when it holds only one of Referenced SOP Class UID
  and Referenced SOP Instance UID (both are Type 1 in every reference macro),
  or when it is a code item without a code value, a coding scheme or a meaning;
  a sequence left without items is dropped (the sequences concerned are Type 3
  at Patient and Study level);
- the Type 2 patient and study identifiers are added empty where absent, so a
  derived object never lacks them;
- a single-component person name (``Lung_Dx-A0002``, no ``^``) gets a trailing
  caret (``Lung_Dx-A0002^``): the same name (PS3.5 6.2.1: trailing empty
  components may be left out), but highdicom no longer warns that it "is
  unlikely to represent the intended person name", a warning that quotes the
  patient's name into the log.  :func:`node.stages.reports.build_reports`
  puts the source's exact value back into the finished objects;
- Patient's Birth Date, Study Date, Study Time and Patient's Sex that are not
  valid DA, TM or M/F/O values (``1961-03-14``, ``Male``) are left empty in the
  copies: highdicom would refuse them with an error that quotes the value (a
  failed analysis with the birth date in its reason and the log), and a result
  object should not carry an invalid value.  The values are checked from their
  raw bytes, so pydicom's own validation (which warns with the value) never
  sees them.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from datetime import datetime

from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag

from node.errors import ReportError

__all__ = ["PERSON_NAMES", "STUDY_IDENTIFIERS", "clean_headers", "unambiguous_name"]

logger = logging.getLogger(__name__)

STUDY_IDENTIFIERS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "AccessionNumber", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
)
"""Attributes that put a result into the patient's original study; results copy them."""

_TYPE2_IDENTIFIERS = tuple(k for k in STUDY_IDENTIFIERS if k != "StudyInstanceUID")
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
             "FrameOfReferenceUID", "Rows", "Columns")
_SAME_FOR_ALL = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # (Float/Double Float) Pixel Data
_REFERENCE_PAIR = ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID")
_CODE_VALUES = ("CodeValue", "LongCodeValue", "URNCodeValue")
_CODE_KEYWORDS = (*_CODE_VALUES, "CodingSchemeDesignator", "CodeMeaning")
PERSON_NAMES = ("PatientName", "ReferringPhysicianName")
"""The person names highdicom checks when it derives an object from a source image."""


_TM = re.compile(r"^([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?$")


def _valid_da(text: str) -> bool:
    try:
        return len(text) == 8 and text.isdigit() and bool(datetime.strptime(text, "%Y%m%d"))
    except ValueError:
        return False


_CHECKED = {"PatientBirthDate": _valid_da, "StudyDate": _valid_da,
            "StudyTime": lambda text: _TM.match(text) is not None,
            "PatientSex": lambda text: text in ("M", "F", "O")}
"""Values highdicom converts or checks itself; an invalid one makes it raise, quoting the value."""


def _raw_text(ds: Dataset, keyword: str) -> str:
    """The element's value as text, from its raw bytes when not decoded yet (no validation)."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return ""
    value = ds.get_item(tag).value
    if isinstance(value, bytes):
        return value.decode("latin-1").strip(" \x00")
    return "" if value is None else str(value).strip()


def unambiguous_name(value: object) -> str:
    """``value`` with a trailing caret on each component group that has none (see the module)."""
    text = str(value or "")
    if not text or "^" in text:
        return text
    return "=".join(group + "^" if group else group for group in text.split("="))


def _item_defect(item: Dataset) -> str | None:
    """Why a sequence item is not conformant, or ``None`` when nothing is seen wrong."""
    if len(item) == 0:
        return "empty item"
    present = [k for k in _REFERENCE_PAIR if item.get(k)]
    if len(present) == 1:
        missing = next(k for k in _REFERENCE_PAIR if k not in present)
        return f"item without {missing}"
    if any(k in item for k in _CODE_KEYWORDS):
        if not any(item.get(k) for k in _CODE_VALUES):
            return "code item without a code value"
        if not item.get("CodeMeaning"):
            return "code item without Code Meaning"
        if not item.get("URNCodeValue") and not item.get("CodingSchemeDesignator"):
            return "code item without Coding Scheme Designator"
    return None


def _is_sequence(tag: BaseTag, elem: DataElement | RawDataElement) -> bool:
    if elem.VR is not None:
        return elem.VR == "SQ"
    return dictionary_has_tag(tag) and dictionary_VR(tag) == "SQ"


def _copy_element(elem: DataElement | RawDataElement) -> DataElement | RawDataElement:
    if isinstance(elem, RawDataElement):
        return elem  # immutable; decoded on first access in the copy
    return copy.copy(elem)  # a new element; its value object is shared and never changed here


def _clean_items(items: Sequence[Dataset], path: str, dropped: list[str]) -> list[Dataset] | None:
    """Cleaned items of one sequence, or ``None`` when the sequence needs no change."""
    changed = False
    kept: list[Dataset] = []
    for index, item in enumerate(items, start=1):
        cleaned = _clean_dataset(item, f"{path}[{index}]", dropped, root=False)
        defect = _item_defect(cleaned)
        if defect is not None:
            dropped.append(f"{path}[{index}] ({defect})")
            changed = True
            continue
        changed = changed or cleaned is not item
        kept.append(cleaned)
    return kept if changed else None


def _clean_dataset(ds: Dataset, path: str, dropped: list[str], *, root: bool) -> Dataset:
    """``ds`` itself when nothing needs repair (nested levels), else a repaired copy."""
    replaced: dict[BaseTag, list[Dataset] | None] = {}
    for tag, elem in ds.items():
        if not tag.is_private and _is_sequence(tag, elem):
            name = keyword_for_tag(tag) or str(tag)
            items = _clean_items(ds[tag].value, f"{path}/{name}" if path else name, dropped)
            if items is not None:
                replaced[tag] = items or None
    if not root and not replaced:
        return ds
    out = Dataset()
    for tag, elem in ds.items():
        if root and (tag.is_private or tag in _PIXEL_TAGS):
            continue
        if tag in replaced:
            items = replaced[tag]
            if items is not None:
                out[tag] = DataElement(tag, "SQ", DicomSequence(items))
            continue
        out[tag] = _copy_element(elem)
    return out


def clean_headers(headers: Sequence[Dataset]) -> list[Dataset]:
    """Repaired copies of the source image headers of one series.

    Parameters
    ----------
    headers:
        The source images' datasets (pixel data not needed), in any order.

    Returns
    -------
    list of Dataset
        Copies in the same order, without pixel data and private attributes,
        with non-conformant sequence items dropped and absent Type 2 patient
        and study identifiers added empty.

    Raises
    ------
    ReportError
        No headers, a header lacking an attribute a derived object needs, or
        headers from more than one study, series or frame of reference.
    """
    if not headers:
        raise ReportError("no source image headers were given; a report needs the analysed images")
    first = headers[0]
    for ds in headers:
        missing = [k for k in _REQUIRED if not ds.get(k)]
        if missing:
            raise ReportError(
                f"source image {ds.get('SOPInstanceUID', '(no SOP Instance UID)')} lacks "
                f"{', '.join(missing)}; results cannot reference it. Re-send the series from "
                "the scanner or choose another series")
        for keyword in _SAME_FOR_ALL:
            if ds.get(keyword) != first.get(keyword):
                raise ReportError(
                    f"source images {first.SOPInstanceUID} and {ds.SOPInstanceUID} differ in "
                    f"{keyword} ({first.get(keyword)} and {ds.get(keyword)}); the results of one "
                    "analysis must derive from one series")
    cleaned: list[Dataset] = []
    dropped: list[str] = []
    emptied: set[str] = set()
    for ds in headers:
        out = _clean_dataset(ds, "", dropped, root=True)
        if hasattr(ds, "file_meta"):
            out.file_meta = ds.file_meta
        for keyword in _TYPE2_IDENTIFIERS:
            if keyword not in out:
                setattr(out, keyword, "")
        for keyword, valid in _CHECKED.items():
            text = _raw_text(out, keyword)
            if text and not valid(text):
                setattr(out, keyword, "")
                emptied.add(keyword)
        for keyword in PERSON_NAMES:
            if out.get(keyword):
                setattr(out, keyword, unambiguous_name(out.get(keyword)))
        cleaned.append(out)
    if dropped:
        distinct = sorted(set(dropped))
        logger.info("series %s: %d non-conformant sequence items left out of the derived "
                    "objects' copies, e.g. %s", first.SeriesInstanceUID, len(dropped),
                    "; ".join(distinct[:3]))
    if emptied:
        logger.warning("series %s: %s not valid (value not logged); left empty in the results",
                       first.SeriesInstanceUID, ", ".join(sorted(emptied)))
    return cleaned
