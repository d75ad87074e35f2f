"""The listener and the analysis against hostile or broken input.

Each test sends what a probe of the node found acknowledged or crashing: connections
that stall before their association request, a resend that overwrote a stored image,
uncompressed pixel data shorter than its image, a Study Instance UID repeated after
the pixel data, a deflated bomb, a 65535 x 65535 series, a corrupt JPEG-LS frame.
Data sets that pynetdicom and DCMTK would re-encode are sent verbatim with
:mod:`tests.raw_dul`.  Most tests run on SQLite only (the database plays no part in
what they check); the resend tests run on both databases.
"""

from __future__ import annotations

import resource
import socket
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import psutil
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
)
from pynetdicom import AE
from pynetdicom.dsutils import encode
from sqlalchemy import select

from model.errors import VolumeError
from model.volume import load_series
from node.db import Instance, Study
from node.errors import SelectionError
from node.pipeline import selection_rules
from node.settings import SelectionSettings
from node.stages.selection import SelectionRules, select_series
from tests.conftest import B40F
from tests.dcmtk import storescu, wait_for
from tests.raw_dul import RawAssociation, c_store_raw
from tests.test_ingest import Listener, _files_under, _scu_send, listener  # noqa: F401
from tests.test_selection import study_of

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
FILES = sorted(B40F.iterdir())


def _body(ds: pydicom.Dataset) -> bytes:
    """The data set encoded explicit VR little endian (what a C-STORE carries)."""
    out = encode(ds, False, True)
    assert out is not None
    return out


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element with a 2-byte length (UI, CS, ...)."""
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + struct.pack("<H", len(value)) + value


def _row(lst: Listener, sop: str) -> Instance:
    with lst.sessions() as s:
        return s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Wait (at most ``timeout``) for the node to close the connection."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return False
    return True


# -------------------------------------------------------------- stalled connections


@SQLITE
def test_stalled_connections_are_closed_and_known_peers_keep_their_slots(
        listener: Callable[..., Listener]) -> None:  # noqa: F811
    """Thirty connections that send nothing, one byte, or a PDU header and stall, and one
    that dribbles a byte every 0.2 s, on a listener with two association slots: a real
    storescu from a known AE title is served at once, and the node closes every stalled
    connection (``request_timeout``), the dribbling one too."""
    lst = listener(dicom={"request_timeout": 5.0, "max_associations": 2})
    stalled = []
    for i in range(30):
        s = socket.create_connection(("127.0.0.1", lst.port))
        s.sendall([b"", b"\x01", b"\x01\x00\x00\x00\x10\x00"][i % 3])
        stalled.append(s)
    loris = socket.create_connection(("127.0.0.1", lst.port))
    loris.sendall(b"\x01\x00\x00\x00\x10\x00")
    stop = threading.Event()

    def dribble() -> None:
        while not stop.wait(0.2):
            try:
                loris.sendall(b"\x00")
            except OSError:
                return

    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    try:
        # (the server accepts one connection per turn of its loop: most, not all, are up at once)
        wait_for(lambda: lst.scp.active_associations >= 20, 60, 0.02, "the connections to be served")
        storescu(FILES[:2], "127.0.0.1", lst.port, "LUNGNODE", calling_aet="STORESCU")
        assert lst.count() == 2
        assert all(_closed_by_peer(s, 60) for s in [*stalled, loris])
        wait_for(lambda: lst.scp.active_associations == 0, 60, 0.1, "the stalled associations to end")
    finally:
        stop.set()
        thread.join(10)
        for s in [*stalled, loris]:
            s.close()


@SQLITE
def test_a_peer_stalling_inside_a_pdu_is_dropped_after_network_timeout(
        listener: Callable[..., Listener]) -> None:  # noqa: F811
    """An admitted association whose peer sends a P-DATA-TF header declaring 1000 bytes and
    stops: pynetdicom's reader blocks inside the PDU (its idle timer cannot fire); the socket
    timeout set at admission ends it."""
    lst = listener(dicom={"network_timeout": 2.0, "request_timeout": 120.0})
    assoc = RawAssociation.open(lst.port, "PACS", [(1, CTImageStorage, [ExplicitVRLittleEndian])])
    try:
        assoc.sock.sendall(b"\x04\x00\x00\x00\x03\xe8" + bytes(10))
        assert _closed_by_peer(assoc.sock, 60)
    finally:
        assoc.sock.close()
    wait_for(lambda: lst.scp.active_associations == 0, 60, 0.1, "the association to end")


@SQLITE
def test_max_associations_counts_admitted_associations(listener: Callable[..., Listener]) -> None:  # noqa: F811
    """Two associations held open fill two slots: a third is rejected (local limit exceeded,
    recorded), and once one is released a new one gets in."""
    lst = listener(dicom={"max_associations": 2})
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    held = [ae.associate("127.0.0.1", lst.port, ae_title="LUNGNODE") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = ae.associate("127.0.0.1", lst.port, ae_title="LUNGNODE")
        assert third.is_rejected
        refused = wait_for(lambda: lst.audit("association-refused"), 60, 0.1, "the refusal's audit row")
        assert "max_associations is 2" in (refused[0].detail or "")
        held[0].release()
        wait_for(lambda: lst.scp.active_associations <= 1, 30, 0.05, "the release")
        again = ae.associate("127.0.0.1", lst.port, ae_title="LUNGNODE")
        assert again.is_established
        again.release()
    finally:
        for a in held:
            if a.is_established:
                a.release()


# -------------------------------------------------------------- resends


def test_a_differing_resend_keeps_the_first_file_and_is_audited(
        listener: Callable[..., Listener]) -> None:  # noqa: F811
    lst = listener()
    first = pydicom.dcmread(FILES[0])
    assert _scu_send(lst.port, [first]) == [0]
    row = _row(lst, first.SOPInstanceUID)
    path = lst.settings.storage.root / row.path
    original = path.read_bytes()
    second = pydicom.dcmread(FILES[0])
    second.ImageComments = "a second version of the same SOP Instance UID"
    assert _scu_send(lst.port, [second]) == [0]  # acknowledged, as Orthanc does
    assert path.read_bytes() == original
    assert _row(lst, first.SOPInstanceUID).size_bytes == len(original)
    entries = lst.audit("instance-resend-differs")
    assert len(entries) == 1
    detail = entries[0].detail or ""
    assert first.SOPInstanceUID in detail and "from PACS" in detail and "kept the first" in detail
    assert f"stored: {len(original)} bytes" in detail
    assert entries[0].study_id == row.study_id
    # acknowledged, so not lost: the differing copy is kept beside the first, named in the audit
    kept = list(path.parent.glob(path.name + ".resend-*"))
    assert len(kept) == 1 and kept[0].name in detail
    assert pydicom.dcmread(kept[0]).ImageComments == second.ImageComments
    assert _scu_send(lst.port, [first]) == [0]  # identical: nothing to audit
    assert len(lst.audit("instance-resend-differs")) == 1
    assert lst.count() == 1
    path.unlink()  # a recorded file gone: the next resend restores it, audited
    assert _scu_send(lst.port, [first]) == [0]
    assert path.read_bytes() == original
    assert len(lst.audit("instance-restored")) == 1
    with lst.sessions() as s:
        assert s.scalars(select(Study)).one().instance_count == 1


def test_replace_policy_replaces_the_file_and_updates_its_row(
        listener: Callable[..., Listener]) -> None:  # noqa: F811
    lst = listener(storage={"overwrite": "replace"})
    first = pydicom.dcmread(FILES[0])
    assert _scu_send(lst.port, [first]) == [0]
    second = pydicom.dcmread(FILES[0])
    second.ImageComments = "corrected"
    assert _scu_send(lst.port, [second], contexts=((CTImageStorage, ImplicitVRLittleEndian),)) == [0]
    row = _row(lst, first.SOPInstanceUID)
    path = lst.settings.storage.root / row.path
    assert row.size_bytes == path.stat().st_size
    assert row.transfer_syntax_uid == ImplicitVRLittleEndian
    assert pydicom.dcmread(path).ImageComments == "corrected"
    entries = lst.audit("instance-resend-differs")
    assert len(entries) == 1 and "replaced the stored file" in (entries[0].detail or "")
    # a resend under another study is not moved there
    third = pydicom.dcmread(FILES[0])
    third.StudyInstanceUID = "1.2.3.4.5.6"
    assert _scu_send(lst.port, [third]) == [0xA900]
    assert pydicom.dcmread(path).StudyInstanceUID == first.StudyInstanceUID
    with lst.sessions() as s:
        assert [st.study_instance_uid for st in s.scalars(select(Study))] == [first.StudyInstanceUID]
    assert lst.count() == 1


# -------------------------------------------------------------- data sets


@SQLITE
@pytest.mark.parametrize("case", ["cut-short", "declared-0xFFFFFFF0", "frames-1e9", "header-cut"])
def test_native_pixel_data_that_does_not_fit_its_image_is_refused(
        listener: Callable[..., Listener], case: str) -> None:  # noqa: F811
    lst = listener()
    ds = pydicom.dcmread(FILES[0])
    if case == "cut-short":
        ds.PixelData = ds.PixelData[:-4096]
        assert _scu_send(lst.port, [ds]) == [0xA900]
        expected = "the image is cut short"
    elif case == "frames-1e9":
        ds.NumberOfFrames = 10**9
        assert _scu_send(lst.port, [ds]) == [0xA900]
        expected = "needs 524288000000000"
    elif case == "header-cut":  # inside Pixel Data's 4-byte length (found by bench_fuzz)
        body = _body(ds)
        at = body.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")
        assert c_store_raw(lst.port, CTImageStorage, ExplicitVRLittleEndian, ds.SOPInstanceUID,
                           body[:at + 10]) == 0xC000
        expected = "ends inside an element header"
    else:
        body = _body(ds)
        at = body.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")
        body = body[:at + 8] + struct.pack("<I", 0xFFFFFFF0) + body[at + 12:]
        assert c_store_raw(lst.port, CTImageStorage, ExplicitVRLittleEndian, ds.SOPInstanceUID,
                           body) == 0xC000
        expected = "declares 4294967280 bytes"
    assert lst.count() == 0
    assert not [p for p in _files_under(lst.settings.storage.root) if p.suffix == ".dcm"]
    detail = lst.audit("instance-refused")[0].detail or ""
    assert expected in detail and ds.SOPInstanceUID in detail


@SQLITE
@pytest.mark.parametrize("where", ["after-pixel-data", "twice"])
def test_a_repeated_study_uid_is_refused(listener: Callable[..., Listener], where: str) -> None:  # noqa: F811
    """A Study Instance UID repeated (after the pixel data, or right after itself): pydicom keeps
    the last, a reader stopping before the pixel data sees the first; refused, nothing stored."""
    lst = listener()
    ds = pydicom.dcmread(FILES[0])
    body = _body(ds)
    other = _element(0x0020000D, b"UI", b"1.2.3.4.5.6\x00")
    if where == "after-pixel-data":
        body += other
        expected = "(0020,000D) comes after (7FE0,0010)"
    else:
        uid = ds.StudyInstanceUID.encode()
        uid += b"\x00" * (len(uid) % 2)
        own = _element(0x0020000D, b"UI", uid)
        at = body.index(own) + len(own)
        body = body[:at] + other + body[at:]
        expected = "(0020,000D) repeats"
    assert c_store_raw(lst.port, CTImageStorage, ExplicitVRLittleEndian, ds.SOPInstanceUID,
                       body) == 0xC000
    assert lst.count() == 0
    assert expected in (lst.audit("instance-refused")[0].detail or "")


@SQLITE
def test_an_unknown_value_representation_gets_a_status_and_a_reason(
        listener: Callable[..., Listener]) -> None:  # noqa: F811
    """SOP Instance UID with the VR "Uc" (pydicom raises NotImplementedError when it reads it;
    found by tests/test_fuzz.py): refused with 0xC000 and recorded, not 0xC211."""
    lst = listener()
    ds = pydicom.dcmread(FILES[0])
    body = _body(ds)
    at = body.index(b"\x08\x00\x18\x00UI")
    body = body[:at + 4] + b"Uc" + body[at + 6:]
    assert c_store_raw(lst.port, CTImageStorage, ExplicitVRLittleEndian, ds.SOPInstanceUID,
                       body) == 0xC000
    detail = lst.audit("instance-refused")[0].detail or ""
    assert "cannot be decoded (NotImplementedError)" in detail and "'Uc'" in detail
    assert lst.count() == 0


def _deflate(chunks: list[bytes], repeat_last: int = 1) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [comp.compress(c) for c in chunks[:-1]]
    out += [comp.compress(chunks[-1]) for _ in range(repeat_last)]
    return b"".join(out) + comp.flush()


@SQLITE
def test_a_deflated_bomb_is_refused_and_memory_stays_bounded(
        listener: Callable[..., Listener]) -> None:  # noqa: F811
    """1 MB of deflate that inflates to 1 GiB: refused (0xA700) at the bound, having held no
    more than it; a real deflated instance is stored as sent and reads back."""
    lst = listener(storage={"max_inflated_mb": 64})
    ds = pydicom.dcmread(FILES[0])
    good = _deflate([_body(ds)])
    assert c_store_raw(lst.port, CTImageStorage, DeflatedExplicitVRLittleEndian, ds.SOPInstanceUID,
                       good) == 0
    stored = pydicom.dcmread(lst.settings.storage.root / _row(lst, ds.SOPInstanceUID).path)
    assert stored.PixelData == ds.PixelData

    bomb_ds = pydicom.dcmread(FILES[1])
    head = _body(pydicom.Dataset({t: bomb_ds[t] for t in bomb_ds.keys() if t < 0x7FE00010}))
    pixel_header = b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", 1 << 30)
    bomb = _deflate([head + pixel_header, bytes(1 << 20)], repeat_last=1024)
    assert len(bomb) < 2 * 2**20
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        status = c_store_raw(lst.port, CTImageStorage, DeflatedExplicitVRLittleEndian,
                             bomb_ds.SOPInstanceUID, bomb)
    finally:
        done.set()
        sampler.join(10)
    assert status == 0xA700
    assert peak[0] - baseline < 600 * 2**20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - max(peak_before, baseline) \
        < 600 * 2**20
    assert "inflates to more than 64 MB" in (lst.audit("instance-refused")[0].detail or "")
    assert lst.count() == 1


# -------------------------------------------------------------- analysis


def test_a_65535_square_series_is_not_eligible_with_its_reason(tmp_path: Path) -> None:
    """Rows = Columns = 65535 (a header; the pixels would take 240 GiB as a volume): the series
    is refused at selection with the sizes in words, not a MemoryError later."""
    folder = tmp_path / "huge"
    folder.mkdir()
    for f in FILES[:20]:
        ds = pydicom.dcmread(f)
        ds.Rows = ds.Columns = 65535
        ds.save_as(folder / f.name)
    with pytest.raises(SelectionError) as info:
        select_series(study_of(folder), selection_rules(SelectionSettings()))
    assert "has 65535x65535 pixels per slice; at most 2048x2048 are analysed" in str(info.value)


def test_the_voxel_bound_refuses_a_series_with_too_many_voxels() -> None:
    rules = SelectionRules(max_voxels=30 * 512 * 512 - 1)
    with pytest.raises(SelectionError, match="has 7,864,320 voxels"):
        select_series(study_of(B40F), rules)
    assert select_series(study_of(B40F), SelectionRules(max_voxels=30 * 512 * 512)).paths


def test_a_corrupt_jpeg_ls_frame_fails_the_volume_with_its_reason(tmp_path: Path) -> None:
    """64 bytes in the middle of a JPEG-LS frame overwritten, end marker intact: pydicom's plugin
    chain falls back to a decoder that returns garbage without an error; the volume loader
    refuses the slice, naming it."""
    paths = []
    for i, f in enumerate(FILES[:3]):
        ds = pydicom.dcmread(f)
        ds.compress(JPEGLSLossless)
        if i == 1:
            frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
            mid = len(frame) // 2
            frame[mid:mid + 64] = b"\x55" * 64
            ds.PixelData = encapsulate([bytes(frame)])
            bad = ds.SOPInstanceUID
        ds.save_as(tmp_path / f.name, enforce_file_format=True)
        paths.append(tmp_path / f.name)
    assert pydicom.dcmread(paths[1]).pixel_array.shape == (512, 512)  # garbage, no error
    with pytest.raises(VolumeError) as info:
        load_series(paths)
    message = str(info.value)
    assert f"SOP {bad}" in message and "corrupt" in message and "send the instance again" in message
