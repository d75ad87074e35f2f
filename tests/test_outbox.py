"""The outbox against real receivers: down, refusing, then back; the C-STORE SCU itself."""

from __future__ import annotations

import shutil
import subprocess
import threading
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.db import (
    AuditEntry,
    Delivery,
    DeliveryState,
    ResultObject,
    Study,
    make_engine,
    make_session_factory,
    utcnow,
)
from node.dicom.scu import read_stored_file, send_files
from node.errors import DeliveryError, IllegalTransition
from node.migrate import upgrade
from node.settings import DeliverySettings, DicomSettings, Peer
from node.work.outbox import backoff, deliver_due, retry_delivery
from node.work.state import DELIVERY_TRANSITIONS, transition_delivery
from tests.conftest import B40F
from tests.peers import Orthanc, StoreSCP, free_port


@pytest.fixture
def outbox(db_url: str, tmp_path: Path) -> tuple[sessionmaker[Session], Path, list[int]]:
    """Three result objects (real DICOM files) with one pending delivery each."""
    upgrade(db_url)
    sessions = make_session_factory(make_engine(db_url))
    root = tmp_path / "storage"
    ids = []
    with sessions() as s:
        study = Study(study_instance_uid="1.2.3.4")
        s.add(study)
        s.flush()
        for i, f in enumerate(sorted(B40F.iterdir())[:3]):
            rel = f"results/1.2.3.4/v1/{i}.dcm"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / rel)
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            obj = ResultObject(study_id=study.id, version=1, kind=f"k{i}", sop_class_uid=ds.SOPClassUID,
                               sop_instance_uid=ds.SOPInstanceUID,
                               series_instance_uid=ds.SeriesInstanceUID, path=rel)
            s.add(obj)
            s.flush()
            d = Delivery(result_object_id=obj.id, destination="pacs")
            s.add(d)
            s.flush()
            ids.append(d.id)
        s.commit()
    return sessions, root, ids


def _states(sessions: sessionmaker[Session]) -> list[DeliveryState]:
    with sessions() as s:
        return [d.state for d in s.scalars(select(Delivery).order_by(Delivery.id))]


def test_backoff_doubles_and_is_capped() -> None:
    s = DeliverySettings(backoff_seconds=5, backoff_max_seconds=60)
    assert [backoff(n, s) for n in (1, 2, 3, 4, 5, 6)] == [5, 10, 20, 40, 60, 60]


def test_destination_down_then_back_gets_everything_once(outbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sessions, root, ids = outbox
    port = free_port()
    peers = {"pacs": Peer(name="pacs", ae_title="RECEIVER", host="127.0.0.1", port=port)}
    settings = DeliverySettings(destinations=["pacs"], backoff_seconds=30)
    dicom = DicomSettings(ae_title="LUNGNODE", network_timeout=5, acse_timeout=5)
    out = deliver_due(sessions, root, peers, dicom, settings, "me")
    assert (out.sent, out.failed) == (0, 3)
    assert _states(sessions) == [DeliveryState.PENDING] * 3
    with sessions() as s:
        d = s.get_one(Delivery, ids[0])
        assert d.attempts == 1 and "could not be reached" in (d.last_error or "")
        assert d.next_attempt_at > utcnow() + timedelta(seconds=20)
    # not due yet: nothing is attempted
    assert deliver_due(sessions, root, peers, dicom, settings, "me").failed == 0
    received = tmp_path / "received"
    received.mkdir()
    with StoreSCP(received, port=port, aet="RECEIVER"):
        later = utcnow() + timedelta(seconds=31)
        out = deliver_due(sessions, root, peers, dicom, settings, "me", now=later)
        assert out.sent == 3
        assert deliver_due(sessions, root, peers, dicom, settings, "me", now=later).sent == 0
    files = [p for p in received.rglob("*") if p.is_file()]
    assert len(files) == 3
    assert _states(sessions) == [DeliveryState.SENT] * 3


def test_refusing_destination_goes_dead_and_retry_requeues(outbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sessions, root, ids = outbox
    port = free_port()
    settings = DeliverySettings(destinations=["pacs"], backoff_seconds=0.01, horizon_hours=1)
    dicom = DicomSettings(ae_title="LUNGNODE", network_timeout=5, acse_timeout=5)
    received = tmp_path / "received"
    received.mkdir()
    peers = {"pacs": Peer(name="pacs", ae_title="RECEIVER", host="127.0.0.1", port=port)}
    with StoreSCP(received, port=port, aet="RECEIVER", refuse=True):  # up, but refuses
        # within the horizon a failure is retried, after it the delivery is dead
        for later in (timedelta(seconds=1), timedelta(hours=2)):
            deliver_due(sessions, root, peers, dicom, settings, "me", now=utcnow() + later)
            if later < timedelta(hours=1):
                assert _states(sessions) == [DeliveryState.PENDING] * 3
        assert _states(sessions) == [DeliveryState.DEAD] * 3
        with sessions() as s:
            d = s.get_one(Delivery, ids[0])
            # storescp sends A-ASSOCIATE-RJ and closes at once; pynetdicom sees either
            assert "the association" in (d.last_error or "") and "RECEIVER" in (d.last_error or "")
            assert s.scalars(select(AuditEntry).where(AuditEntry.action == "delivery-dead")).first()
            retry_delivery(s, ids[0], actor="test")
        assert _states(sessions)[0] == DeliveryState.PENDING
    # the destination is fixed: the re-queued delivery goes through, the others stay dead
    with StoreSCP(received, port=port, aet="RECEIVER"):
        assert deliver_due(sessions, root, peers, dicom, settings, "me").sent == 1
    assert _states(sessions) == [DeliveryState.SENT, DeliveryState.DEAD, DeliveryState.DEAD]
    with sessions() as s, pytest.raises(DeliveryError, match="already sent"):
        retry_delivery(s, ids[0], actor="test")


DELIVERY_LEGAL = {
    (DeliveryState.PENDING, DeliveryState.SENDING),
    (DeliveryState.PENDING, DeliveryState.PENDING),
    (DeliveryState.SENDING, DeliveryState.SENT),
    (DeliveryState.SENDING, DeliveryState.PENDING),
    (DeliveryState.SENDING, DeliveryState.DEAD),
    (DeliveryState.SENDING, DeliveryState.SENDING),
    (DeliveryState.DEAD, DeliveryState.PENDING),
}


@pytest.mark.parametrize("old", list(DeliveryState))
@pytest.mark.parametrize("new", list(DeliveryState))
def test_delivery_transition_table(old: DeliveryState, new: DeliveryState) -> None:
    """Only the changes the delivery table lists are made; every other one is refused unchanged."""
    assert ((old, new) in DELIVERY_LEGAL) == (new in DELIVERY_TRANSITIONS[old])
    d = Delivery(id=5, result_object_id=1, destination="pacs", state=old)
    if (old, new) in DELIVERY_LEGAL:
        transition_delivery(d, new)
        assert d.state == new
    else:
        with pytest.raises(IllegalTransition,
                           match=f"delivery 5 to pacs: {old.value} -> {new.value}"):
            transition_delivery(d, new)
        assert d.state == old


# -- the C-STORE SCU (send_files) ---------------------------------------------------------------

def _dataset_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file as stored: what a C-STORE carries."""
    _, offset = split_dataset(path)
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read()


def _sized_dataset(folder: Path, length: int) -> Path:
    """A small CT data set (no pixel data) whose encoded data set is ``length`` bytes."""
    ds = pydicom.dcmread(next(B40F.iterdir()), stop_before_pixels=True)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.add_new(0x00091010, "LO", "lungnode test")  # private creator
    out = folder / f"sized-{length}.dcm"
    ds.add_new(0x00091011, "OB", b"")
    ds.save_as(out, enforce_file_format=True)
    pad = length - len(_dataset_bytes(out))
    assert pad >= 0 and pad % 2 == 0, pad
    ds[0x00091011].value = b"\x00" * pad
    ds.save_as(out, enforce_file_format=True)
    assert len(_dataset_bytes(out)) == length
    return out


@pytest.fixture(scope="module")
def many_syntaxes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real CT in seven transfer syntaxes (DCMTK converts), and data sets of edge lengths."""
    folder = tmp_path_factory.mktemp("syntaxes")
    src = sorted(B40F.iterdir())
    files = [src[0], src[1]]  # explicit VR little endian, as stored
    for i, option in enumerate(["+ti", "+tb", "+td"], start=2):  # implicit, big endian, deflated
        out = folder / f"conv{i}.dcm"
        subprocess.run(["dcmconv", option, str(src[i]), str(out)], check=True)
        files.append(out)
    subprocess.run(["dcmcrle", str(src[5]), str(folder / "rle.dcm")], check=True)
    subprocess.run(["dcmcjpeg", "--encode-lossless-sv1", str(src[6]), str(folder / "jpll.dcm")],
                   check=True)
    files += [folder / "rle.dcm", folder / "jpll.dcm"]
    # 4096-byte PDUs carry 4090 bytes: one byte short, exactly one, two and a half fragments
    files += [_sized_dataset(folder, n) for n in (4088, 4090, 8180, 10226)]
    return files


def test_read_stored_file_agrees_with_pydicom(many_syntaxes: list[Path], tmp_path: Path) -> None:
    for path in many_syntaxes:
        f = read_stored_file(path)
        meta, _ = split_dataset(path)
        assert (f.sop_class_uid, f.sop_instance_uid, f.transfer_syntax_uid) == (
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID)
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("not DICOM" * 100)
    with pytest.raises(InvalidDicomError):
        read_stored_file(not_dicom)


@pytest.mark.parametrize("max_pdu", [4096, 131072])
def test_every_transfer_syntax_arrives_bit_for_bit(many_syntaxes: list[Path], tmp_path: Path,
                                                    max_pdu: int) -> None:
    """storescp in bit-preserving mode writes the data set exactly as it came off the wire."""
    received = tmp_path / "received"
    with StoreSCP(received, aet="RECEIVER", extra_args=("+B", "-pdu", str(max_pdu))) as scp:
        peer = Peer(name="pacs", ae_title="RECEIVER", host="127.0.0.1", port=scp.port)
        ticks: list[int] = []
        results = send_files(many_syntaxes, peer, DicomSettings(ae_title="LUNGNODE"),
                             lambda: ticks.append(1))
        assert [(p, status) for p, status, _ in results] == [(p, 0) for p in many_syntaxes]
        assert len(ticks) == len(many_syntaxes)
        files = scp.wait_for_files(len(many_syntaxes))
    by_uid = {read_stored_file(p).sop_instance_uid: p for p in files}
    for path in many_syntaxes:
        f = read_stored_file(path)
        got = by_uid[f.sop_instance_uid]
        assert read_stored_file(got).transfer_syntax_uid == f.transfer_syntax_uid
        assert _dataset_bytes(got) == _dataset_bytes(path), path.name


def test_a_response_pynetdicom_loses_keeps_its_status_and_the_rest_go_on_a_new_association(
        many_syntaxes: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's reactor can take a C-STORE response that arrived (scu module docstring).

    The fault is made on purpose here: the third send reaches the peer, which answers, but
    send_c_store reports no response and the association is aborted, as pynetdicom does.
    """
    real = Association.send_c_store
    calls: list[int] = []
    associations: set[int] = set()

    def loses_third_response(self: Association, *args: object, **kwargs: object) -> Dataset:
        calls.append(1)
        associations.add(id(self))
        status = real(self, *args, **kwargs)  # type: ignore[arg-type]
        if len(calls) == 3:
            assert status.Status == 0  # the peer did answer
            self.abort()
            return Dataset()
        return status

    monkeypatch.setattr(Association, "send_c_store", loses_third_response)
    paths = many_syntaxes[:6]
    with StoreSCP(tmp_path / "received", aet="RECEIVER") as scp:
        peer = Peer(name="pacs", ae_title="RECEIVER", host="127.0.0.1", port=scp.port)
        results = send_files(paths, peer, DicomSettings(ae_title="LUNGNODE"))
        received = scp.wait_for_files(len(paths))
    assert [(p, status) for p, status, _ in results] == [(p, 0) for p in paths]
    assert len(associations) == 2 and len(calls) == len(paths)
    assert {read_stored_file(p).sop_instance_uid for p in received} == {
        read_stored_file(p).sop_instance_uid for p in paths}


def test_a_peer_that_never_answers_ends_the_send_without_a_new_association(
        many_syntaxes: list[Path], tmp_path: Path) -> None:
    """No response at all (not a lost one): that file and the rest fail, and no new association
    is opened to wait out the timeout again."""
    answered: list[int] = []
    ready = threading.Event()

    def silent(event: evt.Event) -> int:
        answered.append(1)
        if len(answered) == 2:
            ready.wait(30)  # holds the response past the sender's DIMSE timeout
        return 0

    ae = AE(ae_title="RECEIVER")
    ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, silent)])
    try:
        peer = Peer(name="pacs", ae_title="RECEIVER", host="127.0.0.1", port=port)
        results = send_files(many_syntaxes[:4], peer,
                             DicomSettings(ae_title="LUNGNODE", dimse_timeout=2))
    finally:
        ready.set()
        server.shutdown()
    assert [r[1] for r in results] == [0, None, None, None]
    assert "no response" in results[1][2]
    assert all("association ended" in r[2] for r in results[2:])
    assert len(answered) == 2


def test_refused_syntax_and_unreadable_file_are_reported_per_file(many_syntaxes: list[Path],
                                                                  tmp_path: Path) -> None:
    """A receiver that takes implicit VR only: the other files fail, each with its reason."""
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 300)
    paths = [many_syntaxes[0], junk, many_syntaxes[2]]  # explicit, junk, implicit
    with StoreSCP(tmp_path / "received", aet="RECEIVER", extra_args=("+xi",)) as scp:
        peer = Peer(name="pacs", ae_title="RECEIVER", host="127.0.0.1", port=scp.port)
        results = send_files(paths, peer, DicomSettings(ae_title="LUNGNODE"))
        assert scp.wait_for_files(1)
    assert [r[1] for r in results] == [None, None, 0]
    assert "pacs did not accept SOP class 1.2.840.10008.5.1.4.1.1.2 in transfer syntax " \
        "1.2.840.10008.1.2.1" in results[0][2]
    assert "not a readable DICOM file" in results[1][2]


def test_nothing_readable_opens_no_association(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"DICM")
    peer = Peer(name="pacs", ae_title="RECEIVER", host="127.0.0.1", port=free_port())
    results = send_files([junk], peer, DicomSettings(ae_title="LUNGNODE"))
    assert results == [(junk, None, results[0][2])] and "not a readable" in results[0][2]


class _RecordingSCP:
    """A pynetdicom C-STORE SCP that records message IDs and data set bytes.

    With ``hold=True`` it answers no C-STORE until :attr:`release` is set (a
    peer slower than any DIMSE timeout), 60 s at most.
    """

    def __init__(self, max_pdu: int, hold: bool = False) -> None:
        self.message_ids: list[int] = []
        self.datasets: list[bytes] = []
        self.release = threading.Event()
        if not hold:
            self.release.set()
        ae = AE(ae_title="RECORDER")
        ae.maximum_pdu_size = max_pdu
        ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
        self.port = free_port()
        server = ae.start_server(("127.0.0.1", self.port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert server is not None
        self.server = server

    def _store(self, event: evt.Event) -> int:
        req = event.request
        assert isinstance(req, C_STORE) and req.DataSet is not None
        self.message_ids.append(int(req.MessageID or 0))
        self.datasets.append(req.DataSet.getvalue())
        self.release.wait(60)
        return 0x0000


def test_message_ids_count_up_and_an_unlimited_pdu_is_used() -> None:
    scp = _RecordingSCP(max_pdu=0)  # 0: the receiver takes PDUs of any length
    try:
        files = sorted(B40F.iterdir())[:4]
        peer = Peer(name="rec", ae_title="RECORDER", host="127.0.0.1", port=scp.port)
        results = send_files(files, peer, DicomSettings(ae_title="LUNGNODE"))
        assert [r[1] for r in results] == [0] * 4
        assert scp.message_ids == [1, 2, 3, 4]
        assert scp.datasets == [_dataset_bytes(f) for f in files]
    finally:
        scp.server.shutdown()


def test_no_response_aborts_and_the_rest_is_not_sent() -> None:
    scp = _RecordingSCP(max_pdu=16384, hold=True)
    try:
        files = sorted(B40F.iterdir())[:3]
        peer = Peer(name="rec", ae_title="RECORDER", host="127.0.0.1", port=scp.port)
        results = send_files(files, peer, DicomSettings(ae_title="LUNGNODE", dimse_timeout=1))
        assert [r[1] for r in results] == [None] * 3
        assert "no response" in results[0][2]
        assert [r[2] for r in results[1:]] == ["association ended before this file"] * 2
        assert len(scp.message_ids) == 1  # the first file arrived; the rest was never sent
    finally:
        scp.release.set()
        scp.server.shutdown()


def test_peer_down_is_an_actionable_delivery_error() -> None:
    port = free_port()
    peer = Peer(name="pacs", ae_title="RECEIVER", host="127.0.0.1", port=port)
    with pytest.raises(DeliveryError, match=rf"peer pacs \(RECEIVER@127.0.0.1:{port}\) could not "
                       r"be reached.*knows this node's AE title LUNGNODE"):
        send_files(sorted(B40F.iterdir())[:1], peer, DicomSettings(ae_title="LUNGNODE"))


def test_a_series_into_orthanc(tmp_path: Path) -> None:
    files = sorted(B40F.iterdir())
    with Orthanc(tmp_path / "orthanc") as orthanc:
        peer = Peer(name="orthanc", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
        results = send_files(files, peer, DicomSettings(ae_title="LUNGNODE"))
        assert [r[1] for r in results] == [0] * len(files)
        uids = {orthanc.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]
                for i in orthanc.get("/instances")}
    assert uids == {read_stored_file(f).sop_instance_uid for f in files}
