"""The real-peer harness (tests/peers.py, tests/dcmtk.py) and the deployed Orthanc routing.

Real Orthanc 1.10.1 and DCMTK processes on 127.0.0.1, free ports, folders under
tmp_path; every process is started in a ``with`` block so it is stopped when a
test fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from tests.conftest import B40F, B70F
from tests.peers import (
    Orthanc,
    OrthancError,
    PeerError,
    StoreSCP,
    echoscu,
    free_port,
    read_orthanc_json,
    storescu,
    wait_for,
)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "orthanc"
LUA = DEPLOY / "route-to-lungnode.lua"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def _uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def _series_uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)


STUDY_UID = str(pydicom.dcmread(next(B40F.iterdir()), stop_before_pixels=True).StudyInstanceUID)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def _shared_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as o:
        yield o


@pytest.fixture
def orthanc(_shared_orthanc: Orthanc) -> Orthanc:
    """One Orthanc for the harness tests (stopping one takes about 3 s), emptied for each."""
    for study in _shared_orthanc.studies():
        _shared_orthanc.delete(f"/studies/{study}")
    for modality in _shared_orthanc.get("/modalities"):
        _shared_orthanc.delete(f"/modalities/{modality}")
    return _shared_orthanc


# -- harness ----------------------------------------------------------------------------------------

def test_orthanc_runs_with_its_own_configuration(orthanc: Orthanc) -> None:
    system = orthanc.get("/system")
    assert (system["DicomAet"], system["DicomPort"]) == (orthanc.aet, orthanc.dicom_port)
    assert orthanc.dicom_port != orthanc.http_port
    written = read_orthanc_json(orthanc.config_path)
    assert written["StorageDirectory"].startswith(str(orthanc.workdir))
    assert written["IndexDirectory"].startswith(str(orthanc.workdir))
    assert written["RemoteAccessAllowed"] is False and written["Plugins"] == []
    assert orthanc.pid is not None
    environ = Path(f"/proc/{orthanc.pid}/environ").read_bytes().split(b"\0")
    assert b"TCP_NODELAY=1" in environ
    assert orthanc.studies() == [] and orthanc.count_instances() == 0


def test_storescu_stores_a_real_series_into_orthanc(orthanc: Orthanc) -> None:
    files = sorted(B40F.iterdir())
    res = storescu([B40F], "127.0.0.1", orthanc.dicom_port, orthanc.aet)
    assert res.returncode == 0
    assert orthanc.count_instances() == 30
    oid = orthanc.find_study(STUDY_UID)
    assert oid is not None and orthanc.studies() == [oid]
    instances = orthanc.study_instances(oid)
    assert {i["SOPInstanceUID"] for i in instances} == _uids(files)
    assert {(i["SOPClassUID"], i["Modality"], i["SeriesInstanceUID"]) for i in instances} == {
        (CT_IMAGE, "CT", _series_uid(B40F))}
    first = next(i for i in instances if i["SOPInstanceUID"] == pydicom.dcmread(files[0]).SOPInstanceUID)
    assert orthanc.instance_dataset(first["ID"]).PixelData == pydicom.dcmread(files[0]).PixelData
    assert orthanc.find_study("1.2.3.4.5.6.7.8.9") is None


def test_orthanc_forwards_a_study_into_storescp(orthanc: Orthanc, tmp_path: Path) -> None:
    storescu([B40F], "127.0.0.1", orthanc.dicom_port, orthanc.aet)
    oid = orthanc.find_study(STUDY_UID)
    assert oid is not None
    with StoreSCP(tmp_path / "received", aet="RECEIVER") as scp:
        orthanc.add_modality("receiver", "RECEIVER", "127.0.0.1", scp.port)
        assert orthanc.echo("receiver")
        orthanc.store_to_modality("receiver", [oid])  # synchronous: all acknowledged on return
        assert _uids(scp.files()) == _uids(sorted(B40F.iterdir()))
    orthanc.add_modality("nobody", "NOBODY", "127.0.0.1", free_port())
    assert not orthanc.echo("nobody")
    with pytest.raises(OrthancError) as err:
        orthanc.store_to_modality("nobody", [oid])
    assert err.value.status >= 400


def test_echoscu_against_orthanc_and_against_nothing(orthanc: Orthanc) -> None:
    assert echoscu("127.0.0.1", orthanc.dicom_port, orthanc.aet).returncode == 0
    port = free_port()
    with pytest.raises(PeerError, match=f"127.0.0.1:{port}"):
        echoscu("127.0.0.1", port, "NOBODY")
    assert echoscu("127.0.0.1", port, "NOBODY", check=False).returncode != 0


def test_refusing_storescp_refuses(tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "received", aet="RECEIVER", refuse=True) as scp:
        res = echoscu("127.0.0.1", scp.port, "RECEIVER", check=False)
        assert res.returncode != 0 and "Rejected" in res.stdout + res.stderr
        with pytest.raises(PeerError, match="storescu to RECEIVER"):
            storescu([B40F], "127.0.0.1", scp.port, "RECEIVER")
        assert scp.files() == []


def test_processes_are_stopped_when_the_block_fails(tmp_path: Path) -> None:
    pids: list[int] = []
    with pytest.raises(KeyError, match="test failure"):
        with Orthanc(tmp_path / "orthanc") as o, StoreSCP(tmp_path / "received") as scp:
            assert o.pid is not None and scp.pid is not None
            pids += [o.pid, scp.pid]
            raise KeyError("test failure")
    assert len(pids) == 2 and not any(_alive(p) for p in pids)


def test_peers_take_other_ports_when_theirs_were_taken(tmp_path: Path) -> None:
    orthanc, scp = Orthanc(tmp_path / "orthanc"), StoreSCP(tmp_path / "received")
    taken = (orthanc.dicom_port, scp.port)
    with socket.socket() as a, socket.socket() as b:  # another test run got there first
        a.bind(("127.0.0.1", taken[0]))
        b.bind(("127.0.0.1", taken[1]))
        a.listen()
        b.listen()
        with orthanc, scp:
            assert orthanc.dicom_port != taken[0] and scp.port != taken[1]
            assert echoscu("127.0.0.1", orthanc.dicom_port, orthanc.aet).returncode == 0
            assert echoscu("127.0.0.1", scp.port, scp.aet).returncode == 0


def test_orthanc_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    with pytest.raises(PeerError, match="Orthanc exited") as err:
        with Orthanc(tmp_path / "orthanc", lua_scripts=[tmp_path / "missing.lua"]):
            pass
    assert "missing.lua" in str(err.value)


def test_storescu_proposes_the_files_compressed_syntax(tmp_path: Path) -> None:
    src = sorted(B40F.iterdir())[:2]
    jls, mixed = tmp_path / "jls", tmp_path / "mixed"
    jls.mkdir()
    mixed.mkdir()
    for i, f in enumerate(src):
        subprocess.run(["dcmcjpls", str(f), str(jls / f"{i}.dcm")], check=True)
    shutil.copy(jls / "0.dcm", mixed / "jls.dcm")
    subprocess.run(["dcmcrle", str(src[1]), str(mixed / "rle.dcm")], check=True)
    with StoreSCP(tmp_path / "received") as scp:
        with pytest.raises(PeerError):  # only uncompressed syntaxes proposed
            storescu([jls], "127.0.0.1", scp.port, scp.aet, propose=None)
        storescu([jls], "127.0.0.1", scp.port, scp.aet)
        received = scp.files()
        assert _uids(received) == _uids(src)
        assert {pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in received} == {JPEGLSLossless}
        with pytest.raises(ValueError, match="2 compressed transfer syntaxes"):
            storescu([mixed], "127.0.0.1", scp.port, scp.aet)


def test_read_orthanc_json_strips_comments_only(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text('{\n  // a comment\n  "Url" : "http://host/a//b", /* block\n */\n'
                   '  "Quote" : "say \\"//\\""\n}')
    assert read_orthanc_json(cfg) == {"Url": "http://host/a//b", "Quote": 'say "//"'}


# -- deploy/orthanc: the configuration and the routing script ---------------------------------------

def test_deployed_orthanc_configuration() -> None:
    config = read_orthanc_json(DEPLOY / "orthanc.json")
    assert config["DicomModalities"]["lungnode"] == ["LUNGNODE", "127.0.0.1", 11112]
    assert [Path(p).name for p in config["LuaScripts"]] == [LUA.name]
    assert 0 < config["StableAge"] <= 60
    assert config["RemoteAccessAllowed"] is False


def _dataset(study_uid: str, sop_class: str, modality: str, manufacturer: str,
             description: str) -> Dataset:
    """A new instance in a new series: an image built on a real CT slice, or a text SR."""
    ct = pydicom.dcmread(next(B40F.iterdir()))
    if sop_class == BASIC_TEXT_SR:
        ds = Dataset()
        ds.ValueType, ds.ContentSequence = "CONTAINER", []
        if study_uid == ct.StudyInstanceUID:  # Orthanc keys a study on patient and study
            ds.PatientID, ds.PatientName = ct.PatientID, ct.PatientName
        else:
            ds.PatientID = "LUNGNODE-TEST"
    else:
        ds = ct
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.Manufacturer, ds.SeriesDescription = modality, manufacturer, description
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _write(folder: Path, datasets: list[Dataset]) -> Path:
    folder.mkdir(parents=True)
    for k, ds in enumerate(datasets):
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
    return folder


def _routing(orthanc: Orthanc, study_uid: str, count: int) -> str:
    """The ``count``-th line the routing script logged for this study, once it is there."""
    def lines() -> list[str]:
        tag = f"lungnode routing: study {study_uid}:"
        return [line.split("Lua says: ", 1)[-1] for line in orthanc.log_text().splitlines() if tag in line]

    found = wait_for(lambda: lines() if len(lines()) >= count else [], 60, 0.2,
                     f"routing decision {count} for study {study_uid}")
    return found[count - 1]


@pytest.fixture
def routing(tmp_path: Path) -> Iterator[tuple[Orthanc, int]]:
    """An Orthanc with deploy/orthanc's configuration and script, StableAge 1 s, whose
    modality "lungnode" points at a port where nothing listens yet."""
    port = free_port()
    with Orthanc(tmp_path / "orthanc", base_config=read_orthanc_json(DEPLOY / "orthanc.json"),
                 modalities={"lungnode": ("LUNGNODE", "127.0.0.1", port)}, lua_scripts=[LUA],
                 stable_age=1) as o:
        yield o, port


def test_routing_sends_new_ct_series_and_not_the_results(routing: tuple[Orthanc, int],
                                                         tmp_path: Path) -> None:
    orthanc, port = routing
    with StoreSCP(tmp_path / "received", port=port, aet="LUNGNODE") as node:
        storescu([B40F], "127.0.0.1", orthanc.dicom_port, orthanc.aet)
        assert "sending 1 CT series" in _routing(orthanc, STUDY_UID, 1)
        assert _uids(node.wait_for_files(30)) == _uids(sorted(B40F.iterdir()))

        # lungnode's results come back into the study: it becomes stable again
        results = _write(tmp_path / "results", [
            _dataset(STUDY_UID, BASIC_TEXT_SR, "SR", "lungnode", "lungnode lung report"),
            _dataset(STUDY_UID, SECONDARY_CAPTURE, "CT", "LungNode", "summary"),
            _dataset(STUDY_UID, SECONDARY_CAPTURE, "CT", "SIEMENS", "lungnode summary"),
        ])
        storescu([results], "127.0.0.1", orthanc.dicom_port, orthanc.aet)
        decision = _routing(orthanc, STUDY_UID, 2)
        assert "no new CT series (1 already sent); not sent" in decision
        assert len(node.files()) == 30

        # a CT series added later to the same study is sent, on its own
        storescu([B70F], "127.0.0.1", orthanc.dicom_port, orthanc.aet)
        decision = _routing(orthanc, STUDY_UID, 3)
        assert "sending 1 CT series" in decision and _series_uid(B70F) in decision
        assert _series_uid(B40F) not in decision
        assert _uids(node.wait_for_files(60)) == _uids(sorted(B40F.iterdir()) + sorted(B70F.iterdir()))


def test_routing_sends_a_synthetic_study(routing: tuple[Orthanc, int], tmp_path: Path) -> None:
    """`lungnode synth` studies are CT to analyse, not results of the node."""
    from training import SynthSpec, write_study

    orthanc, port = routing
    study = write_study(tmp_path / "synth", SynthSpec(seed=3, involvement=0.2, rows=64, slices=20))
    with StoreSCP(tmp_path / "received", port=port, aet="LUNGNODE") as node:
        storescu([study.dicom_dir], "127.0.0.1", orthanc.dicom_port, orthanc.aet)
        assert "sending 1 CT series" in _routing(orthanc, study.study_instance_uid, 1)
        assert _uids(node.wait_for_files(20)) == _uids(sorted(study.paths))


def test_routing_does_not_send_a_study_without_ct(routing: tuple[Orthanc, int], tmp_path: Path) -> None:
    orthanc, port = routing
    study_uid = generate_uid()
    sr_only = _write(tmp_path / "sr", [_dataset(study_uid, BASIC_TEXT_SR, "SR", "OTHER", "report")])
    with StoreSCP(tmp_path / "received", port=port, aet="LUNGNODE") as node:
        storescu([sr_only], "127.0.0.1", orthanc.dicom_port, orthanc.aet)
        assert "no new CT series (0 already sent); not sent" in _routing(orthanc, study_uid, 1)
        assert node.files() == []
        assert orthanc.get("/jobs") == []


def test_routing_sends_again_after_a_failed_send(routing: tuple[Orthanc, int], tmp_path: Path) -> None:
    orthanc, port = routing
    storescu([B40F], "127.0.0.1", orthanc.dicom_port, orthanc.aet)  # lungnode is down
    job = _routing(orthanc, STUDY_UID, 1).rsplit(" in job ", 1)[1].split(":", 1)[0]
    wait_for(lambda: orthanc.get(f"/jobs/{job}")["State"] == "Failure", 30, 0.2, f"job {job} to fail")
    with StoreSCP(tmp_path / "received", port=port, aet="LUNGNODE") as node:
        # anything new in the study makes it stable again; the failed series goes out now
        results = _write(tmp_path / "results", [_dataset(STUDY_UID, BASIC_TEXT_SR, "SR", "lungnode", "")])
        storescu([results], "127.0.0.1", orthanc.dicom_port, orthanc.aet)
        assert f"previous send (job {job}) failed" in _routing(orthanc, STUDY_UID, 2)
        assert _uids(node.wait_for_files(30)) == _uids(sorted(B40F.iterdir()))


def test_routing_sends_a_series_again_when_it_gained_instances(routing: tuple[Orthanc, int],
                                                              tmp_path: Path) -> None:
    orthanc, port = routing
    files = sorted(B40F.iterdir())
    first, rest = tmp_path / "first", tmp_path / "rest"
    for folder, part in ((first, files[:20]), (rest, files[20:])):
        folder.mkdir()
        for f in part:
            shutil.copy(f, folder / f.name)
    with StoreSCP(tmp_path / "received", port=port, aet="LUNGNODE") as node:
        storescu([first], "127.0.0.1", orthanc.dicom_port, orthanc.aet)
        assert "(new)" in _routing(orthanc, STUDY_UID, 1)
        assert _uids(node.wait_for_files(20)) == _uids(files[:20])
        storescu([rest], "127.0.0.1", orthanc.dicom_port, orthanc.aet)  # late slices
        assert "(gained instances)" in _routing(orthanc, STUDY_UID, 2)
        def whole_series() -> bool:
            try:
                return _uids(node.files()) == _uids(files)
            except pydicom.errors.InvalidDicomError:
                # Orthanc sends the whole series again: storescp rewrites a file it already
                # received (and marked) under the same name, so a read can catch it half-written
                return False

        wait_for(whole_series, 60, 0.2, "the whole series")
