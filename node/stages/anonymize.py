"""The de-identified archive: a PS3.15 Basic Profile copy of a selected series.

Library choice
--------------
The copy is made with **dicognito** (0.19.0) plus the steps of the DICOM PS3.15
Basic Application Level Confidentiality Profile that dicognito leaves out.

- *dicognito* walks every element, nested sequences included, and replaces
  each Person Name with a fake name, the usual identifiers (Patient ID,
  Accession Number, Study ID, order numbers) with fake IDs, and shifts every
  date and date-time (and the time paired with a date) by one offset, all
  derived from a seed, so the same input always gives the same output.  It is
  maintained, typed and small.  It does not implement the profile's table: it
  keeps private attributes (except one Mitra tag), free-text descriptions and
  comments, Original Attributes Sequence, device serial numbers, station names,
  overlays, Referenced Study/Patient sequences and patient characteristics; it
  sets Patient Identity Removed only when Burned In Annotation is NO, writes no
  De-identification Method Code Sequence, and its replacement UIDs (``2.`` and a
  39-digit number) use an unregistered root.
- *deid* (pydicom/deid, not installed; judged from its documentation and
  recipes) applies recipes of REMOVE/BLANK/REPLACE/JITTER actions and can clean
  pixel regions by header filters.  Its stock recipe is one site's filter list,
  not the profile's table, and it removes UIDs unless a custom function is
  written, so it would need the same table written here and a UID scheme as well.

So this module uses dicognito for what it does well (names, IDs, consistent
date shifting) and adds, ahead of dicognito's handlers:

- :data:`PROFILE_ACTIONS`: the Basic Profile table entries (PS3.15 Table E.1-1)
  that are not names, UIDs or dates: X (remove) or Z (empty) for descriptions,
  comments, addresses, institution and device identity, request and procedure
  step attributes, Referenced Study/Patient/Performed Procedure Step sequences,
  Original/Modified Attributes sequences, digital signatures and the like;
- every private attribute removed (the Retain Safe Private Option is not
  applied), overlay (60xx) and curve (50xx) groups removed;
- UIDs: every UID except standard ones (SOP classes, transfer syntaxes and any
  ``1.2.840.10008`` UID) is replaced by a UUID-derived UID ``2.25.<n>`` (PS3.5
  B.2) whose 122 bits come from HMAC-SHA256(salt, original).  The same original
  always gives the same new UID for one salt, and a given ``uid_map`` (what the
  database recorded for the study) wins, so every series of a study shares one
  new Study Instance UID and Frame of Reference UID;
- dates shifted back by 62 to 730 whole days, one offset per patient
  (HMAC of the salt and Patient ID), so intervals within and between a
  patient's studies and times of day are kept: the Retain Longitudinal Temporal
  Information with Modified Dates Option (DCM 113107); Patient's Birth Date is
  emptied;
- Patient's Age, Sex, Size and Weight kept (Retain Patient Characteristics
  Option, DCM 113108) unless ``retain_patient_characteristics=False``; an age
  over 89 years (``091Y``, ``1200M``, ``5000W``, ``40000D`` ...) becomes ``090Y``,
  the one "90 or older" category of HIPAA Safe Harbor (45 CFR 164.514(b)(2)(i)(C)),
  and an age that is not a valid Age String is removed;
- Patient Identity Removed YES, De-identification Method and its Code Sequence
  (DCM 113100 and the options applied; "Clean" codes of an earlier
  de-identification are kept, its "Retain" codes dropped),
  Longitudinal Temporal Information Modified MODIFIED;
- a series that may show identity in its pixels is refused
  (:class:`~node.errors.BurnedInAnnotationError`): the pixel data are copied
  unchanged (byte for byte), so no pixel cleaning is claimed.  Refused: Burned
  In Annotation ``YES`` in any modality, and Burned In Annotation absent, empty
  or any value but ``NO`` in a modality whose images usually carry burned-in
  text (:data:`BURNS_IN_TEXT`: SC, OT, US, XA, RF, DX, CR, MG, IO, PX, ES, XC,
  GM; screenshots, scanned documents, ultrasound and fluoroscopy screens,
  radiographs with name plates, photographs) or a Secondary Capture SOP class.
  CT is not such a modality: a CT slice without the attribute is archived;
- a check of each result: no Person Name, patient or institution identifier of
  the source remains in any text element, and no replaced UID remains.

Files go to ``archive_root/<new study UID>/<new series UID>/<new SOP UID>.dcm``,
each written to a temporary name in that folder and renamed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pydicom
from dicognito import __version__ as dicognito_version
from dicognito.anonymizer import Anonymizer
from dicognito.datetimeanonymizer import DateTimeAnonymizer
from dicognito.element_anonymizer import ElementAnonymizer
from pydicom import DataElement
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from node.errors import AnonymizationError, BurnedInAnnotationError
from node.records import ArchivedSeries, SelectedSeries

__all__ = ["BURNS_IN_TEXT", "PROFILE_ACTIONS", "PROFILE_NAME", "anonymize", "burned_in_reason",
           "safe_harbor_age"]

logger = logging.getLogger(__name__)

PROFILE_NAME = "DICOM PS3.15 Basic Application Level Confidentiality Profile"

_REMOVED = """
AcquisitionComments AcquisitionContextSequence AcquisitionDeviceProcessingDescription
AcquisitionProtocolDescription ActualHumanPerformersSequence AdditionalPatientHistory AdmissionID
AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription Allergies Arbitrary AuthorObserverSequence
BranchOfService CassetteID ClinicalTrialSubjectID ClinicalTrialSubjectReadingID ClinicalTrialTimePointID
ClinicalTrialTimePointDescription ClinicalTrialCoordinatingCenterName ClinicalTrialSiteID
ClinicalTrialSiteName CommentsOnThePerformedProcedureStep CommentsOnRadiationDose
ConfidentialityConstraintOnPatientDataDescription ConsultingPhysicianName ContentSequence
ContentCreatorIdentificationCodeSequence ContributionDescription CountryOfResidence CurrentPatientLocation
CustodialOrganizationSequence DataSetTrailingPadding DerivationDescription DetectorID DeviceSerialNumber
DigitalSignaturesSequence DischargeDiagnosisDescription DistributionAddress DistributionName EthnicGroup
FrameComments GantryID GeneratorID HumanPerformerName HumanPerformerOrganization IconImageSequence
IdentifyingComments ImageComments ImagePresentationComments ImagingServiceRequestComments Impressions
InstitutionAddress InstitutionCodeSequence InstitutionName InstitutionalDepartmentName
InstitutionalDepartmentTypeCodeSequence InsurancePlanIdentification
IntendedRecipientsOfResultsIdentificationSequence InterpretationApproverSequence InterpretationAuthor
InterpretationDiagnosisDescription InterpretationIDIssuer InterpretationRecorder InterpretationText
InterpretationTranscriber IssuerOfAdmissionIDSequence IssuerOfPatientID IssuerOfPatientIDQualifiersSequence
IssuerOfServiceEpisodeIDSequence LastMenstrualDate MAC MedicalAlerts MedicalRecordLocator MilitaryRank
ModifiedAttributesSequence ModifiedImageDescription ModifyingDeviceID ModifyingDeviceManufacturer
NameOfPhysiciansReadingStudy NamesOfIntendedRecipientsOfResults Occupation OperatorIdentificationSequence
OrderCallbackPhoneNumber OrderCallbackTelecomInformation OrderEnteredBy OrderEntererLocation
OriginalAttributesSequence OtherPatientIDs OtherPatientIDsSequence OtherPatientNames ParticipantSequence
PatientAddress PatientBirthName PatientBirthTime PatientComments PatientInstitutionResidence
PatientInsurancePlanCodeSequence PatientMotherBirthName PatientPrimaryLanguageCodeSequence
PatientPrimaryLanguageModifierCodeSequence PatientReligiousPreference PatientSexNeutered PatientState
PatientTelecomInformation PatientTelephoneNumbers PatientTransportArrangements PerformedLocation
PerformedProcedureStepDescription PerformedProcedureStepID PerformedStationAETitle
PerformedStationGeographicLocationCodeSequence PerformedStationName PerformedStationNameCodeSequence
PerformingPhysicianIdentificationSequence PerformingPhysicianName PersonAddress PersonTelecomInformation
PersonTelephoneNumbers PhysicianApprovingInterpretation PhysiciansOfRecord
PhysiciansOfRecordIdentificationSequence PhysiciansReadingStudyIdentificationSequence PlateID PreMedication
PregnancyStatus ProtocolName ReasonForStudy ReasonForTheImagingServiceRequest
ReferencedDigitalSignatureSequence ReferencedPatientAliasSequence ReferencedPatientPhotoSequence
ReferencedPatientSequence ReferencedPerformedProcedureStepSequence ReferencedSOPInstanceMACSequence
ReferencedStudySequence ReferringPhysicianAddress ReferringPhysicianIdentificationSequence
ReferringPhysicianTelephoneNumbers RegionOfResidence RequestAttributesSequence RequestedContrastAgent
RequestedProcedureComments RequestedProcedureDescription RequestedProcedureID RequestedProcedureLocation
RequestingPhysician RequestingPhysicianIdentificationSequence RequestingService ResponsibleOrganization
ResponsiblePerson ResultsComments ResultsDistributionListSequence ResultsIDIssuer ReviewerName
ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence
ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName
ScheduledProcedureStepDescription ScheduledProcedureStepID ScheduledProcedureStepLocation
ScheduledStationAETitle ScheduledStationGeographicLocationCodeSequence ScheduledStationName
ScheduledStationNameCodeSequence ScheduledStudyLocation ScheduledStudyLocationAETitle SeriesDescription
ServiceEpisodeDescription ServiceEpisodeID SmokingStatus SourceApplicationEntityTitle SpecialNeeds
StationName StudyComments StudyDescription StudyIDIssuer TextComments TextString TimezoneOffsetFromUTC
TopicAuthor TopicKeywords TopicSubject TopicTitle VerifyingOrganization VisitComments
"""
_EMPTIED = "PatientBirthDate ContrastBolusAgent"
_CHARACTERISTICS = {"PatientAge": "X", "PatientSize": "X", "PatientWeight": "X", "PatientSex": "Z"}

PROFILE_ACTIONS: Mapping[str, str] = {
    **{k: "X" for k in _REMOVED.split()},
    **{k: "Z" for k in _EMPTIED.split()},
}
"""Basic Profile actions applied before dicognito, by keyword: X remove, Z empty.

Names (PN), UIDs and dates are handled for every attribute by VR (fake name,
mapped UID, shifted date); these are the table's other entries.  Patient's Age,
Sex, Size and Weight follow the Retain Patient Characteristics Option when it
is applied, and X/Z otherwise.
"""

BURNS_IN_TEXT = frozenset({"SC", "OT", "US", "XA", "RF", "DX", "CR", "MG", "IO", "PX", "ES", "XC",
                           "GM"})
"""Modalities whose images usually carry burned-in text or show the person: without Burned In
Annotation ``NO`` their series are not archived.  CT is not one of them."""

_SECONDARY_CAPTURE_ROOT = "1.2.840.10008.5.1.4.1.1.7"  # SC and the multi-frame SC classes
_OLDEST_AGE_YEARS = 90
_AGE = re.compile(r"^(\d{3,})([DWMY])$")
_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}

_STANDARD_UID_ROOT = "1.2.840.10008."
_KEPT_UID_KEYWORDS = {"TransferSyntaxUID", "CodingSchemeUID", "ContextUID", "MappingResourceUID"}
_SECRET_KEYWORDS = (
    "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "AccessionNumber", "PatientAddress",
    "PatientTelephoneNumbers", "InstitutionName", "InstitutionAddress", "MedicalRecordLocator",
    "RequestedProcedureID", "PerformedProcedureStepID", "ScheduledProcedureStepID", "AdmissionID",
    "ServiceEpisodeID", "ClinicalTrialSubjectID", "ReferringPhysicianAddress", "PersonAddress",
)
"""Besides every Person Name: the source's values that must not appear in any text of the copy."""
_PLACEHOLDERS = {"ANONYMOUS", "ANONYMIZED", "UNKNOWN", "NONE", "NULL", "TEST"}
_CHECKED_VRS = {"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
_MIN_SECRET_LENGTH = 4
_SHIFT_DAYS = (62, 730)

_CODE_MEANINGS = {
    "113100": "Basic Application Confidentiality Profile",
    "113101": "Clean Pixel Data Option",
    "113102": "Clean Recognizable Visual Features Option",
    "113103": "Clean Graphics Option",
    "113104": "Clean Structured Content Option",
    "113105": "Clean Descriptors Option",
    "113107": "Retain Longitudinal Temporal Information Modified Dates Option",
    "113108": "Retain Patient Characteristics Option",
}
_STILL_TRUE_CODES = {"113100", "113101", "113102", "113103", "113104", "113105"}


def _tags(keywords: Mapping[str, str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for keyword, action in keywords.items():
        tag = tag_for_keyword(keyword)
        if tag is not None:
            out[tag] = action
    return out


class _ProfileActions(ElementAnonymizer):
    """Remove (X) or empty (Z) the Basic Profile attributes dicognito keeps."""

    def __init__(self, actions: Mapping[str, str]) -> None:
        self._actions = _tags(actions)

    def __call__(self, dataset: Dataset, data_element: DataElement) -> bool:
        action = self._actions.get(int(data_element.tag))
        if action is None:
            # An empty value identifies no one: keep it empty rather than let
            # dicognito invent a fake ID for it.
            return data_element.VR != "SQ" and data_element.value in (None, "", b"")
        if action == "X":
            del dataset[data_element.tag]
        elif data_element.VR == "SQ":
            data_element.value = DicomSequence()
        else:
            data_element.value = None
        return True

    def describe_actions(self) -> Iterator[str]:
        for tag, action in sorted(self._actions.items()):
            yield f"{'Remove' if action == 'X' else 'Empty'} {keyword_for_tag(tag)}"


class _UidMapper(ElementAnonymizer):
    """Replace instance UIDs consistently, recording each replacement."""

    def __init__(self, key: bytes, known: Mapping[str, str]) -> None:
        self._key = key
        self._known = known
        self.replaced: dict[str, str] = {}

    def new_uid(self, original: str) -> str:
        if original in self.replaced:
            return self.replaced[original]
        new = self._known.get(original)
        if new is None:
            digest = hmac.new(self._key, original.encode("ascii", "replace"), hashlib.sha256).digest()
            new = f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"
        self.replaced[original] = new
        return new

    def _replace(self, value: object) -> object:
        text = str(value).strip()
        if not text or text.startswith(_STANDARD_UID_ROOT):
            return value
        return self.new_uid(text)

    def __call__(self, dataset: Dataset, data_element: DataElement) -> bool:
        if data_element.VR != "UI":
            return False
        keyword = keyword_for_tag(data_element.tag)
        if keyword.endswith("ClassUID") or keyword in _KEPT_UID_KEYWORDS or not data_element.value:
            return True  # handled: kept as it is (dicognito would otherwise replace some)
        if isinstance(data_element.value, MultiValue | list):
            data_element.value = [self._replace(v) for v in data_element.value]
        else:
            data_element.value = self._replace(data_element.value)
        return True

    def describe_actions(self) -> Iterator[str]:
        yield "Replace every instance UID with 2.25.<HMAC-SHA256(salt, UID)> (standard UIDs kept)"


def _hmac_int(key: bytes, message: str) -> int:
    return int.from_bytes(hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()[:8], "big")


def _patient_key(ds: Dataset) -> str:
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if patient_id:
        return f"patient:{patient_id}/{ds.get('IssuerOfPatientID', '') or ''}"
    return f"study:{ds.get('StudyInstanceUID', '')}"


def _make_anonymizer(key: bytes, salt: str, patient_key: str, mapper: _UidMapper,
                     actions: Mapping[str, str]) -> Anonymizer:
    low, high = _SHIFT_DAYS
    days = low + _hmac_int(key, "date-offset:" + patient_key) % (high - low + 1)
    anonymizer = Anonymizer(seed=salt)
    # add_element_handler puts each handler first: the profile actions run before
    # the UID mapper, which runs before the date shift, which runs before dicognito's own.
    anonymizer.add_element_handler(DateTimeAnonymizer(-24 * days))
    anonymizer.add_element_handler(mapper)
    anonymizer.add_element_handler(_ProfileActions(actions))
    return anonymizer


def _walk_values(ds: Dataset) -> Iterator[tuple[str, str, str]]:
    """(keyword, VR, text) for every text value in ``ds`` and its sequences."""
    for elem in ds.iterall():
        if elem.VR not in _CHECKED_VRS and elem.VR != "UI":
            continue
        values = elem.value if isinstance(elem.value, MultiValue | list) else [elem.value]
        for v in values:
            if v not in (None, ""):
                yield elem.keyword or str(elem.tag), str(elem.VR), str(v)


def _secrets(ds: Dataset) -> set[str]:
    """Identifying values of the source that must not survive."""
    found: set[str] = set()
    for keyword, vr, text in _walk_values(ds):
        if vr == "PN" or keyword in _SECRET_KEYWORDS:
            text = text.strip().rstrip("^").strip()
            if len(text) >= _MIN_SECRET_LENGTH and text.upper() not in _PLACEHOLDERS:
                found.add(text.upper())
    return found


def _secret_pattern(secrets: set[str]) -> re.Pattern[str] | None:
    """One pattern that finds any secret standing as a whole token (no letter or digit beside it).

    Whole tokens, not substrings: dicognito's invented names are drawn from long lists, so an
    operator ``FORD^JO`` may be renamed ``BRADFORD^JOHN^...``; that holds the characters of the
    source but not its identity, and refusing it failed the archive of about one study in a few
    hundred at random. A source value copied anywhere into text (``seen by FORD^JO``) is still
    caught.
    """
    if not secrets:
        return None
    alternatives = "|".join(re.escape(s) for s in sorted(secrets, key=len, reverse=True))
    return re.compile(f"(?<![^\\W_])(?:{alternatives})(?![^\\W_])")


def _check_clean(ds: Dataset, secrets: set[str], replaced: Mapping[str, str], sop: str) -> None:
    originals = set(replaced) - set(replaced.values())
    pattern = _secret_pattern(secrets)
    for keyword, vr, text in _walk_values(ds):
        if vr == "UI":
            if text in originals:
                raise AnonymizationError(f"SOP {sop}: original UID left in {keyword} after de-identification")
            continue
        if pattern is not None and pattern.search(text.upper()):
            raise AnonymizationError(
                f"SOP {sop}: an identifying value of the source remains in {keyword} after "
                "de-identification; the archive copy was not written")


def _strip_groups(ds: Dataset) -> None:
    """Remove private attributes, overlays, curves and group lengths, recursively."""
    def callback(dataset: Dataset, elem: DataElement) -> None:
        group = elem.tag.group
        if (elem.tag.is_private or elem.tag.element == 0 or 0x5000 <= group <= 0x50FF
                or 0x6000 <= group <= 0x60FF):
            del dataset[elem.tag]

    ds.walk(callback)


def _code_item(value: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = _CODE_MEANINGS[value]
    return item


def _set_deidentification(ds: Dataset, codes: Sequence[str], method: Sequence[str]) -> None:
    kept = [item for item in ds.get("DeidentificationMethodCodeSequence", [])
            if item.get("CodingSchemeDesignator") == "DCM" and item.get("CodeValue") in _STILL_TRUE_CODES]
    seen = {str(item.CodeValue) for item in kept}
    ds.DeidentificationMethodCodeSequence = DicomSequence(
        kept + [_code_item(c) for c in codes if c not in seen])
    previous = ds.get("DeidentificationMethod")
    values = [] if previous in (None, "") else (
        [str(v) for v in previous] if isinstance(previous, MultiValue | list) else [str(previous)])
    values = [v for v in values if v != "DICOGNITO"]
    ds.DeidentificationMethod = values + [m for m in method if m not in values]
    ds.PatientIdentityRemoved = "YES"
    ds.LongitudinalTemporalInformationModified = "MODIFIED"


def safe_harbor_age(value: object) -> str | None:
    """Patient's Age for the archive: ``090Y`` for 90 years or more, ``None`` if not an Age String.

    An Age String is three digits and a unit (D days, W weeks, M months, Y years);
    more digits are accepted as well (``40000D``) and judged by their value.  Ages
    over 89 years become ``090Y`` (HIPAA Safe Harbor's "90 or older"); other valid
    ages are kept as they are.
    """
    text = str(value or "").strip().upper()
    if not text:
        return None
    match = _AGE.match(text)
    if match is None:
        return None
    years = int(match.group(1)) * _UNIT_YEARS[match.group(2)]
    return f"{_OLDEST_AGE_YEARS:03d}Y" if years >= _OLDEST_AGE_YEARS else text


def burned_in_reason(ds: Dataset) -> str | None:
    """Why the image may show identity in its pixels, or ``None`` when it is fit to archive.

    Burned In Annotation ``YES`` always; absent, empty or any other value but
    ``NO`` when the modality is in :data:`BURNS_IN_TEXT` or the SOP class is a
    Secondary Capture one.
    """
    value = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if value == "YES":
        return "declares burned-in annotation (Burned In Annotation YES)"
    if value == "NO":
        return None
    modality = str(ds.get("Modality", "") or "").strip().upper()
    secondary = str(ds.get("SOPClassUID", "")).startswith(_SECONDARY_CAPTURE_ROOT)
    if modality in BURNS_IN_TEXT or secondary:
        kind = f"modality {modality}" if modality in BURNS_IN_TEXT else "a Secondary Capture"
        said = f"Burned In Annotation {value}" if value else "no Burned In Annotation"
        return (f"is {kind}, whose images usually carry burned-in text, and has {said}; only "
                "Burned In Annotation NO is accepted for it")
    return None


def _write_atomic(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def anonymize(series: SelectedSeries, archive_root: Path, uid_map: Mapping[str, str], *, salt: str,
              retain_patient_characteristics: bool = True) -> ArchivedSeries:
    """Write a de-identified copy of ``series`` to the archive.

    Parameters
    ----------
    series:
        The selected series; its files are read, never changed.
    archive_root:
        Folder of the archive; files go to
        ``<new study UID>/<new series UID>/<new SOP instance UID>.dcm`` under it.
    uid_map:
        Original to new UIDs already recorded for the study (empty the first
        time); these are reused so that every series of a study gets the same
        new Study Instance UID.
    salt:
        The installation's secret: the same salt and UID always give the same
        new UID, fake name, fake ID and date offset.
    retain_patient_characteristics:
        Keep Patient's Age, Sex, Size and Weight (DCM 113108).

    Returns
    -------
    ArchivedSeries
        The folder, the files in the order of ``series.paths``, the full UID map
        (``uid_map`` plus every UID replaced in this series) and the profile
        with its options.

    Raises
    ------
    AnonymizationError
        A file cannot be read, declares burned-in annotation, belongs to another
        series or patient, has a value that cannot be de-identified, or cannot
        be written; the message names the SOP instance.
    """
    if not salt:
        raise AnonymizationError("an empty salt would make the UID map guessable; configure a secret salt")
    if not series.paths:
        raise AnonymizationError(f"series {series.series_instance_uid} has no files to archive")
    key = salt.encode("utf-8")
    mapper = _UidMapper(key, uid_map)
    actions: dict[str, str] = dict(PROFILE_ACTIONS)
    codes = ["113100", "113107"]
    method = ["lungnode: PS3.15 Basic Application Confidentiality Profile",
              f"dicognito {dicognito_version} names, IDs, dates; private removed"[:64],
              "dates shifted per patient; UIDs 2.25 from salted HMAC"]
    if retain_patient_characteristics:
        codes.append("113108")
    else:
        actions.update(_CHARACTERISTICS)
    anonymizer: Anonymizer | None = None
    patient: str | None = None
    out_paths: list[Path] = []
    directory: Path | None = None
    for path in series.paths:
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError) as exc:
            raise AnonymizationError(
                f"cannot read {Path(path).name} of series {series.series_instance_uid}: {exc}") from exc
        sop = str(ds.get("SOPInstanceUID", "?"))
        if str(ds.get("SeriesInstanceUID", "")) != series.series_instance_uid:
            raise AnonymizationError(f"SOP {sop} does not belong to series {series.series_instance_uid}")
        burned = burned_in_reason(ds)
        if burned is not None:
            raise BurnedInAnnotationError(
                f"SOP {sop} of series {series.series_instance_uid} {burned}; the archive copies "
                "pixel data unchanged, so the series is not archived for training")
        this_patient = _patient_key(ds)
        if anonymizer is None:
            patient = this_patient
            anonymizer = _make_anonymizer(key, salt, this_patient, mapper, actions)
        elif this_patient != patient:
            raise AnonymizationError(f"series {series.series_instance_uid} mixes patients (SOP {sop})")
        pixels = ds.get("PixelData")
        secrets = _secrets(ds)
        if retain_patient_characteristics and "PatientAge" in ds:
            ds.PatientAge = safe_harbor_age(ds.PatientAge)
        try:
            _strip_groups(ds)
            anonymizer.anonymize(ds)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # The message may quote the value (a date, a name): name only the attribute.
            where = re.search(r"With tag (\([0-9A-Fa-f]{4}, ?[0-9A-Fa-f]{4}\))", str(exc))
            raise AnonymizationError(
                f"SOP {sop} of series {series.series_instance_uid} cannot be de-identified: "
                f"{type(exc).__name__} at tag {where.group(1) if where else 'unknown'}; fix or remove "
                "that attribute at the source") from exc
        if ds.get("PixelData") != pixels:
            raise AnonymizationError(f"SOP {sop}: pixel data changed during de-identification")
        _set_deidentification(ds, codes, method)
        ds.preamble = b"\x00" * 128
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
        ds.file_meta = meta
        _check_clean(ds, secrets, mapper.replaced, sop)
        directory = Path(archive_root) / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
        target = directory / f"{ds.SOPInstanceUID}.dcm"
        try:
            _write_atomic(ds, target)
        except OSError as exc:
            raise AnonymizationError(
                f"cannot write the archive copy of SOP {sop} to {target}: {exc}") from exc
        out_paths.append(target)
    assert directory is not None
    options = ", ".join(_CODE_MEANINGS[c] for c in codes[1:])
    logger.info("archived series %s as %s (%d files)", series.series_instance_uid, directory, len(out_paths))
    return ArchivedSeries(
        directory=directory,
        paths=tuple(out_paths),
        uid_map={**dict(uid_map), **mapper.replaced},
        profile=f"{PROFILE_NAME} (DCM 113100) with {options}; private attributes removed",
    )


