"""deploy/orthanc/route-to-lungnode.lua in a real Orthanc: stable CT studies are
forwarded to the modality "lungnode", results coming back are not."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.conftest import B40F
from tests.peers import Orthanc, StoreSCP, free_port, storescu

LUA = Path(__file__).resolve().parent.parent / "deploy" / "orthanc" / "route-to-lungnode.lua"


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_stable_ct_study_is_routed_and_results_are_not(tmp_path: Path) -> None:
    received = tmp_path / "received"
    port = free_port()
    with StoreSCP(received, port=port, aet="LUNGNODE"), Orthanc(
            tmp_path / "orthanc", modalities={"lungnode": ("LUNGNODE", "127.0.0.1", port)},
            stable_age=1, lua_scripts=[LUA]) as orthanc:
        storescu([B40F], "127.0.0.1", orthanc.dicom_port, orthanc.aet)
        end = time.monotonic() + 60
        while len(_files(received)) < 30 and time.monotonic() < end:
            time.sleep(0.3)
        assert len(_files(received)) == 30
        # a lungnode result (here a Secondary Capture made by lungnode) in a new study
        sc = pydicom.dcmread(next(B40F.iterdir()))
        sc.StudyInstanceUID, sc.SeriesInstanceUID = generate_uid(), generate_uid()
        sc.SOPInstanceUID = generate_uid()
        sc.file_meta.MediaStorageSOPInstanceUID = sc.SOPInstanceUID
        sc.Manufacturer = "lungnode"
        result = tmp_path / "result"
        result.mkdir()
        sc.save_as(result / "r.dcm", enforce_file_format=True)
        orthanc.upload(result / "r.dcm")
        time.sleep(4)  # longer than StableAge: the script has run for that study
        assert len(_files(received)) == 30
        assert "not sent" in orthanc.log_tail(20000) or "no CT series" in orthanc.log_tail(20000)
