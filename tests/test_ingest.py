"""The DICOM listener against real senders: DCMTK storescu and pynetdicom.

Every refusal must come back as a DICOM status (or an association rejection)
and be recorded; nothing refused is written; everything acknowledged is on
disk and in the database.  Runs against SQLite and PostgreSQL.
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from model.volume import load_series
from node.db import AuditEntry, Instance, Study, make_engine, make_session_factory
from node.dicom.catalog import Catalog
from node.dicom.scp import StoreSCP
from node.dicom.storage import InstanceStore
from node.migrate import upgrade
from node.settings import Settings
from tests.conftest import B40F
from tests.dcmtk import wait_for
from tests.peers import c_store_all, free_port, storescu


@dataclass
class Listener:
    settings: Settings
    scp: StoreSCP
    sessions: sessionmaker[Session]
    port: int

    def count(self, model: type = Instance) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)

    def audit(self, action: str) -> list[AuditEntry]:
        with self.sessions() as s:
            return list(s.scalars(select(AuditEntry).where(AuditEntry.action == action)))


@pytest.fixture
def listener(db_url: str, make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Listener]]:
    started: list[Listener] = []

    def start(**sections: dict) -> Listener:
        port = free_port()
        peers = [{"name": "ct", "ae_title": "STORESCU", "host": "127.0.0.1", "port": 104},
                 {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
                 {"name": "remote", "ae_title": "REMOTE", "host": "192.0.2.7", "port": 104}]
        s = make_settings(db_url, port=port, peers=peers, **sections)
        upgrade(s.database.url)
        sessions = make_session_factory(make_engine(s.database.url))
        store = InstanceStore(s.storage.root, min_free_mb=s.storage.min_free_mb, fsync=False,
                              overwrite=s.storage.overwrite, max_inflated_mb=s.storage.max_inflated_mb)
        scp = StoreSCP(s.dicom, s.peers, store, Catalog(sessions))
        scp.start()
        lst = Listener(s, scp, sessions, port)
        started.append(lst)
        return lst

    yield start
    for lst in started:
        lst.scp.stop()


def _scu_send(port: int, datasets: list[pydicom.Dataset], calling: str = "PACS",
              contexts: tuple[tuple[str, str], ...] = ()) -> list[int | None]:
    statuses = c_store_all(port, datasets, calling,
                           contexts or ((CTImageStorage, pydicom.uid.ExplicitVRLittleEndian),))
    return [int(status.Status) if "Status" in status else None for status in statuses]


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_storescu_series_is_stored_once_and_counted_once(listener: Callable[..., Listener]) -> None:
    lst = listener()
    storescu([B40F], "127.0.0.1", lst.port, "LUNGNODE")
    assert lst.count() == 30
    with lst.sessions() as s:
        study = s.scalars(select(Study)).one()
        assert study.instance_count == 30
        paths = [lst.settings.storage.root / p for p in s.scalars(select(Instance.path))]
    assert all(p.is_file() for p in paths)
    # the stored file carries the same data set as the source
    src = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in sorted(B40F.iterdir())}
    for p in paths[:3]:
        got = pydicom.dcmread(p)
        assert got.PixelData == src[got.SOPInstanceUID].PixelData
        assert got.PatientID == src[got.SOPInstanceUID].PatientID
    # a second C-STORE of the same instances is acknowledged, not double counted
    storescu([B40F], "127.0.0.1", lst.port, "LUNGNODE")
    assert lst.count() == 30
    with lst.sessions() as s:
        assert s.scalars(select(Study)).one().instance_count == 30
    assert not [p for p in _files_under(lst.settings.storage.root) if p.name.startswith(".tmp")]


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless, RLELossless, "jpeg-lossless"])
def test_compressed_transfer_syntaxes_are_stored_and_decode_to_the_same_hu(
        listener: Callable[..., Listener], tmp_path: Path, syntax: str) -> None:
    lst = listener()
    src = sorted(B40F.iterdir())[:20]
    out = tmp_path / "compressed"
    out.mkdir()
    for f in src:
        if syntax == "jpeg-lossless":  # DCMTK encodes JPEG lossless SV1 (process 14)
            subprocess.run(["dcmcjpeg", "--encode-lossless-sv1", str(f), str(out / f.name)],
                           check=True)
        else:
            ds = pydicom.dcmread(f)
            ds.compress(syntax)
            ds.save_as(out / f.name, enforce_file_format=True)
    ts = str(pydicom.dcmread(out / src[0].name).file_meta.TransferSyntaxUID)
    codes = _scu_send(lst.port, [pydicom.dcmread(out / f.name) for f in src],
                      contexts=((CTImageStorage, ts),))
    assert codes == [0] * len(src)
    with lst.sessions() as s:
        rows = list(s.scalars(select(Instance)))
    assert {r.transfer_syntax_uid for r in rows} == {ts}
    stored = load_series([lst.settings.storage.root / r.path for r in rows])
    original = load_series(src)
    np.testing.assert_array_equal(stored.hu, original.hu)


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless, "jpeg-lossless"])
def test_truncated_codestream_is_refused_at_c_store(listener: Callable[..., Listener], tmp_path: Path,
                                                    syntax: str) -> None:
    """A compressed image cut short (a well-formed data set whose codestream lacks its end marker)
    is refused when it arrives, named and recorded on the study; the intact ones are stored."""
    lst = listener()
    src = sorted(B40F.iterdir())[:3]
    out = tmp_path / "cut"
    out.mkdir()
    for i, f in enumerate(src):
        if syntax == "jpeg-lossless":
            subprocess.run(["dcmcjpeg", "--encode-lossless-sv1", str(f), str(out / f.name)], check=True)
            ds = pydicom.dcmread(out / f.name)
        else:
            ds = pydicom.dcmread(f)
            ds.compress(syntax)
        if i == 1:
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
            ds.PixelData = encapsulate([frame[: len(frame) * 2 // 3]])
            cut = ds.SOPInstanceUID
        ds.save_as(out / f.name, enforce_file_format=True)
    files = [pydicom.dcmread(out / f.name) for f in src]
    ts = str(files[0].file_meta.TransferSyntaxUID)
    assert _scu_send(lst.port, files, contexts=((CTImageStorage, ts),)) == [0, 0xC000, 0]
    assert lst.count() == 2
    detail = lst.audit("instance-refused")[0].detail or ""
    assert f"SOP {cut}" in detail and "end marker" in detail and "send the instance again" in detail
    with lst.sessions() as s:
        study = s.scalars(select(Study)).one()
        assert "end marker" in (study.reason or "")
        assert cut not in set(s.scalars(select(Instance.sop_instance_uid)))


def test_non_ct_sop_class_is_rejected_at_negotiation(listener: Callable[..., Listener]) -> None:
    lst = listener()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", lst.port, ae_title="LUNGNODE")
    assert assoc.is_established
    accepted = {c.abstract_syntax for c in assoc.accepted_contexts}
    assoc.release()
    assert accepted == {CTImageStorage}


def test_instance_without_pixel_data_is_refused_and_recorded(listener: Callable[..., Listener]) -> None:
    lst = listener()
    ds = pydicom.dcmread(sorted(B40F.iterdir())[0])
    del ds.PixelData
    assert _scu_send(lst.port, [ds]) == [0xA900]
    assert lst.count() == 0
    refusals = lst.audit("instance-refused")
    assert len(refusals) == 1 and "no pixel data" in (refusals[0].detail or "")
    with lst.sessions() as s:
        study = s.scalars(select(Study)).one()
        assert study.study_instance_uid == ds.StudyInstanceUID
        assert "no pixel data" in (study.reason or "")
        assert study.instance_count == 0


@pytest.mark.parametrize("attr", ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"])
def test_uid_with_path_characters_is_refused_and_nothing_is_written(
        listener: Callable[..., Listener], tmp_path: Path, attr: str) -> None:
    lst = listener()
    ds = pydicom.dcmread(sorted(B40F.iterdir())[0])
    setattr(ds, attr, "../../../../etc/passwd")
    if attr == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    before = set(_files_under(tmp_path))
    assert _scu_send(lst.port, [ds]) == [0xC000]
    assert lst.count() == 0
    written = set(_files_under(tmp_path)) - before
    assert not [p for p in written if p.suffix == ".dcm"]
    assert not Path("/etc/passwd.dcm").exists()
    detail = lst.audit("instance-refused")[0].detail or ""
    assert "not a valid UID" in detail


def test_unknown_calling_ae_title_is_rejected_and_recorded(listener: Callable[..., Listener]) -> None:
    lst = listener()
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", lst.port, ae_title="LUNGNODE")
    assert assoc.is_rejected
    refusals = lst.audit("association-refused")
    assert refusals and "INTRUDER" in (refusals[0].detail or "")
    # storescu with an unknown AE title fails too
    res = storescu([B40F], "127.0.0.1", lst.port, "LUNGNODE", calling_aet="NOBODY", check=False)
    assert res.returncode != 0
    assert lst.count() == 0


def test_peer_host_check_rejects_a_known_title_from_another_host(
        listener: Callable[..., Listener]) -> None:
    lst = listener(dicom={"check_peer_host": True})
    ae = AE(ae_title="REMOTE")  # configured at 192.0.2.7, connecting from 127.0.0.1
    ae.add_requested_context(CTImageStorage)
    assert ae.associate("127.0.0.1", lst.port, ae_title="LUNGNODE").is_rejected
    assert "not its configured host" in (lst.audit("association-refused")[0].detail or "")
    ae2 = AE(ae_title="PACS")  # configured at 127.0.0.1
    ae2.add_requested_context(CTImageStorage)
    assoc = ae2.associate("127.0.0.1", lst.port, ae_title="LUNGNODE")
    assert assoc.is_established
    assoc.release()


def test_wrong_called_ae_title_is_rejected(listener: Callable[..., Listener]) -> None:
    lst = listener()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", lst.port, ae_title="SOMEONEELSE")
    assert assoc.is_rejected


def test_full_disk_answers_out_of_resources(listener: Callable[..., Listener]) -> None:
    lst = listener(storage={"min_free_mb": 1024 * 1024 * 1024})  # a petabyte: never available
    ds = pydicom.dcmread(sorted(B40F.iterdir())[0])
    assert _scu_send(lst.port, [ds]) == [0xA700]
    assert lst.count() == 0
    assert "out of disk space" in (lst.audit("instance-refused")[0].detail or "")


def test_echo_from_dcmtk(listener: Callable[..., Listener]) -> None:
    from tests.peers import echoscu

    lst = listener()
    res = echoscu("127.0.0.1", lst.port, "LUNGNODE", calling_aet="STORESCU")
    assert res.returncode == 0


def test_several_senders_at_once_all_recorded(listener: Callable[..., Listener]) -> None:
    """Concurrent associations on one listener: every row once, counters exact."""
    import threading

    lst = listener()
    files = sorted(B40F.iterdir())
    datasets = [pydicom.dcmread(f) for f in files]
    codes: list[list[int | None]] = [[] for _ in range(3)]

    def send(i: int) -> None:
        codes[i] = _scu_send(lst.port, datasets[i::3])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [c for part in codes for c in part] == [0] * 30
    assert lst.count() == 30
    with lst.sessions() as s:
        assert s.scalars(select(Study)).one().instance_count == 30
        received = list(s.scalars(select(Instance.received_at)))
    assert all(r.tzinfo is not None for r in received)


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def test_a_header_declaring_a_4_gib_pdu_allocates_nothing_and_the_listener_serves_on(
        listener: Callable[..., Listener]) -> None:
    """Six bytes from anyone (an A-ASSOCIATE-RQ header declaring a 4 GiB PDU), on two connections
    kept open, before any AE title is checked: the listener's memory stays flat and it still
    serves a real sender."""
    import socket

    lst = listener()
    before = _rss()
    conns = [socket.create_connection(("127.0.0.1", lst.port)) for _ in range(2)]
    try:
        for c in conns:
            c.sendall(b"\x01\x00\xff\xff\xff\xff")
        wait_for(lambda: lst.scp.active_associations >= 2, 60, 0.05, "both connections to be served")
        src = [pydicom.dcmread(f) for f in sorted(B40F.iterdir())[:2]]
        assert _scu_send(lst.port, src) == [0, 0]
        assert _rss() - before < 200 * 2**20
    finally:
        for c in conns:
            c.close()
    assert lst.count() == 2


def _nested_content_sequence(depth: int) -> bytes:
    """Content Sequence (0040,A730) nested ``depth`` + 1 deep, explicit VR little endian, by hand.

    Defined lengths, as pydicom writes them (so a reader can skip the value unparsed);
    the innermost item holds Code Value "1".  pydicom's own writer recurses and takes
    about 30 s for 3000 levels.
    """
    value = b"\x08\x00\x00\x01SH\x02\x001 "
    for _ in range(depth + 1):
        item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(value)) + value
        value = b"\x40\x00\x30\xa7SQ\x00\x00" + struct.pack("<I", len(item)) + item
    return value


def test_deeply_nested_sequences_get_a_status_and_no_traceback(
        listener: Callable[..., Listener], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A data set whose sequences nest 3000 deep (bytes made beforehand, sent as a file without
    re-encoding): the handler reads only the top-level identifiers (pydicom parses sequences
    when they are used), so it is stored as received, with no traceback in the log, and the
    next instance too."""
    import logging

    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import encode

    lst = listener()
    files = sorted(B40F.iterdir())[:2]
    bad = pydicom.dcmread(files[0])
    before = pydicom.Dataset({tag: bad[tag] for tag in bad.keys() if tag < 0x0040A730})
    after = pydicom.Dataset({tag: bad[tag] for tag in bad.keys() if tag > 0x0040A730})
    head, tail = encode(before, False, True), encode(after, False, True)
    assert head is not None and tail is not None
    body = head + _nested_content_sequence(3000) + tail
    path = tmp_path / "nested.dcm"
    with path.open("wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(f, bad.file_meta)
        f.write(body)
    caplog.set_level(logging.WARNING)
    status, good = c_store_all(lst.port, [path, pydicom.dcmread(files[1])], "PACS",
                               ((CTImageStorage, str(bad.file_meta.TransferSyntaxUID)),))
    assert int(status.Status) == 0 and int(good.Status) == 0
    assert lst.count() == 2
    with lst.sessions() as s:
        row = s.scalars(select(Instance).where(Instance.sop_instance_uid == bad.SOPInstanceUID)).one()
    assert (lst.settings.storage.root / row.path).read_bytes().endswith(body)
    assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text


def test_durable_write_flushes_the_data_before_the_rename_and_the_folder_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``[storage] fsync``: contents flushed, then renamed into place, then the folder flushed
    (the new name survives a power loss too)."""
    import os

    from node.dicom.storage import atomic_write

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: Path) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "study" / "f.dcm"
    assert atomic_write(target, [b"DICM", b"data"], fsync=True) == 8
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(str(target.parent / ".tmp-"))
    assert events[2][1] == str(target.parent)
    assert target.read_bytes() == b"DICMdata"
    events.clear()
    atomic_write(target, b"x", fsync=False)
    assert [e[0] for e in events] == ["replace"]
