"""DICOM output of the synthetic phantom: fake identity, seeded UIDs, CT Image Storage files.

Private to :mod:`training.synth`.  Files are Explicit (or Implicit) VR Little
Endian part-10 CT Image Storage instances with the attributes a scanner writes,
including identifying ones (institution, physicians, operator, station) that an
anonymiser has to remove.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, generate_uid

if TYPE_CHECKING:
    from training.synth import Phantom, SynthSpec

__all__ = ["MANUFACTURER", "Identity", "WrittenSeries", "make_identity", "write_slices"]

MANUFACTURER = "LUNGNODE SYNTHETIC PHANTOM"
"""The phantom's Manufacturer: not the node's own ``lungnode``, which marks its results (the
Orthanc routing script in ``deploy/orthanc`` never sends those to the node), so a synthetic
study is routed and analysed like a scanner's."""

_FAMILY = ["MILLER", "NOVAK", "GARCIA", "OKAFOR", "JENSEN", "ROSSI", "TANAKA", "DUBOIS", "KOWALSKI",
           "HANSEN", "SILVA", "MURPHY", "PETROV", "LINDQVIST", "ABARA", "MORENO", "FISCHER", "NGUYEN"]
_GIVEN = {"F": ["ANNA", "MARIA", "LENA", "SOFIA", "HANNA", "IRIS", "NORA", "ELENA", "JUNE"],
          "M": ["JONAS", "PAUL", "MATEO", "ERIK", "AMIR", "LUCAS", "TOMAS", "OMAR", "KARL"]}
_DOCTORS = ["WEBER^KLAUS^^DR", "OKONKWO^ADA^^DR", "BERG^INGRID^^DR", "SATO^KEN^^DR"]
_OPERATORS = ["HOLM^PER", "CRUZ^ANA", "LEE^MIN", "FORD^JO"]


@dataclass(frozen=True)
class Identity:
    """Fake patient and visit details (all seeded, some overridable by the spec)."""

    name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str
    accession: str
    study_date: str
    study_time: str
    referring_physician: str
    operator: str


def make_identity(spec: SynthSpec) -> Identity:
    """Seeded fake identity; the spec's patient fields override the drawn values."""
    rng = np.random.default_rng([spec.seed, 5])
    sex = "F" if rng.random() < 0.5 else "M"
    name = f"{_FAMILY[rng.integers(len(_FAMILY))]}^{_GIVEN[sex][rng.integers(len(_GIVEN[sex]))]}"
    birth = date(1935, 1, 1) + timedelta(days=int(rng.integers(0, 60 * 365)))
    study = date(2020, 3, 1) + timedelta(days=int(rng.integers(0, 3 * 365)))
    seconds = int(rng.integers(7 * 3600, 20 * 3600))
    patient_id = f"SYN{int(rng.integers(10**6, 10**7))}"
    accession = f"{int(rng.integers(10**8, 10**9))}"
    doctor = _DOCTORS[rng.integers(len(_DOCTORS))]
    operator = _OPERATORS[rng.integers(len(_OPERATORS))]
    birth_str = spec.patient_birth_date or birth.strftime("%Y%m%d")
    try:
        born = date(int(birth_str[:4]), int(birth_str[4:6]), int(birth_str[6:8]))
        years = study.year - born.year - ((study.month, study.day) < (born.month, born.day))
        age = f"{max(0, min(years, 999)):03d}Y"
    except ValueError:
        age = ""
    return Identity(
        name=spec.patient_name or name, patient_id=spec.patient_id or patient_id, birth_date=birth_str,
        sex=sex, age=age, accession=spec.accession_number or accession,
        study_date=study.strftime("%Y%m%d"),
        study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
        referring_physician=doctor, operator=operator)


@dataclass(frozen=True)
class WrittenSeries:
    """Paths (IM0001 first) and UIDs of a written series."""

    paths: list[Path]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_uids: list[str]


def _ds(v: float) -> str:
    """Decimal string of at most 16 characters."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _later(hhmmss: str, seconds: int) -> str:
    t = int(hhmmss[:2]) * 3600 + int(hhmmss[2:4]) * 60 + int(hhmmss[4:6]) + seconds
    t %= 86400
    return f"{t // 3600:02d}{t // 60 % 60:02d}{t % 60:02d}"


def _series_header(spec: SynthSpec, ph: Phantom, ident: Identity, study_uid: str, series_uid: str,
                   for_uid: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    series_time = _later(ident.study_time, 60 * spec.series_number)
    acq_time = _later(ident.study_time, 90)
    for what in ("Study", "Series", "Acquisition", "Content"):
        setattr(ds, f"{what}Date", ident.study_date)
    ds.StudyTime, ds.SeriesTime = ident.study_time, series_time
    ds.AcquisitionTime, ds.ContentTime = acq_time, series_time
    ds.AccessionNumber = ident.accession
    ds.Modality = "CT"
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "SYNTHETIC GENERAL HOSPITAL"
    ds.InstitutionAddress = "1 PHANTOM ROAD, NOWHERE"
    ds.ReferringPhysicianName = ident.referring_physician
    ds.StationName = "SYNCT01"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = (f"Thorax {'C+ ' if spec.contrast else ''}{_ds(spec.slice_thickness_mm)} "
                            f"{spec.kernel} synthetic")
    ds.OperatorsName = ident.operator
    ds.ManufacturerModelName = "SYNTHETIC CHEST PHANTOM"
    ds.PatientName = ident.name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ident.birth_date
    ds.PatientSex = ident.sex
    ds.PatientAge = ident.age
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(spec.slice_thickness_mm)
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.DeviceSerialNumber = "SYN-0001"
    ds.SoftwareVersions = "lungnode synth 1"
    ds.ProtocolName = "CHEST ROUTINE"
    ds.ReconstructionDiameter = _ds(spec.rows * ph.spacing[1])
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "140"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "180"
    ds.Exposure = "90"
    ds.ConvolutionKernel = spec.kernel
    if spec.contrast:
        ds.ContrastBolusAgent = "IOHEXOL 350 MG I/ML"
        ds.ContrastBolusRoute = "IV"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = spec.series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = spec.rows
    ds.PixelSpacing = [_ds(ph.spacing[1]), _ds(ph.spacing[2])]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = ["40", "-600"]
    ds.WindowWidth = ["400", "1500"]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def write_slices(dicom_dir: Path, spec: SynthSpec, ph: Phantom, ident: Identity) -> WrittenSeries:
    """Write one file per slice, IM0001 the most superior; return paths and UIDs."""
    key = json.dumps(asdict(spec), sort_keys=True, default=str)
    study_uid = spec.study_instance_uid or str(generate_uid(entropy_srcs=["lungnode-synth", "study", key]))
    series_uid = str(generate_uid(entropy_srcs=["lungnode-synth", "series", key, study_uid]))
    for_uid = str(generate_uid(entropy_srcs=["lungnode-synth", "frame", str(spec.seed), study_uid]))
    header = _series_header(spec, ph, ident, study_uid, series_uid, for_uid)
    n = ph.hu.shape[0]
    x0, y0, _ = ph.origin
    z0 = ph.origin[2]
    paths, sops = [], []
    for i in range(1, n + 1):
        k = n - i  # file IM0001 is the top slice
        sop = str(generate_uid(entropy_srcs=[series_uid, str(i)]))
        ds = Dataset()
        ds.update(header)
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = i
        z = round(z0 + k * ph.spacing[0], 4)
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        ds.SliceLocation = _ds(z)
        ds.PixelData = (ph.hu[k].astype(np.int32) + 1024).astype("<u2").tobytes()
        ds["PixelData"].VR = "OW"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = UID(sop)
        meta.TransferSyntaxUID = UID(spec.transfer_syntax)
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "LUNGNODE_SYNTH"
        ds.file_meta = meta
        path = dicom_dir / f"IM{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        sops.append(sop)
    return WrittenSeries(paths=paths, study_uid=study_uid, series_uid=series_uid,
                         frame_of_reference_uid=for_uid, sop_uids=sops)
