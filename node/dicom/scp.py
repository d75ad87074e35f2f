"""The DICOM listener: C-ECHO and C-STORE of CT images.

The C-STORE handler stays tiny: check space and UIDs, write the encoded
dataset to disk atomically, insert the instance row, answer.  No pixel data is
decoded here; analysis happens in the worker.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from typing import NamedTuple, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from model.volume import MARKER_ENDED_SYNTAXES, has_end_marker
from node.dicom.catalog import Catalog, InstanceRecord
from node.dicom.netio import tune_connection
from node.dicom.storage import InstanceStore, validate_uid
from node.errors import StorageError
from node.settings import DicomSettings, Peer

__all__ = [
    "ACCEPTED_SOP_CLASSES",
    "ACCEPTED_TRANSFER_SYNTAXES",
    "LONG_VRS",
    "StoreSCP",
    "Scan",
    "codestream_cut_short",
    "scan_dataset",
]

logger = logging.getLogger(__name__)

ACCEPTED_SOP_CLASSES: tuple[str, ...] = (CTImageStorage, EnhancedCTImageStorage)
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEG2000Lossless,
    JPEG2000,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


def _element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 2, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value


def _text(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta_bytes(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group for one instance.

    Equivalent to pydicom's ``write_file_meta_info`` for these six elements, at a
    small fraction of its cost (it runs once per received instance).
    """
    body = b"".join((
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", _text(sop_class, b"\x00")),
        _element(0x0003, b"UI", _text(sop_instance, b"\x00")),
        _element(0x0010, b"UI", _text(transfer_syntax, b"\x00")),
        _element(0x0012, b"UI", _text(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
        _element(0x0013, b"SH", _text(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        _element(0x0016, b"AE", _text(source_ae, b" ")),
    ))
    return b"\x00" * 128 + b"DICM" + _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


_UNDEFINED = 0xFFFFFFFF
LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR",
                      b"UT", b"SV", b"UV"))
"""Explicit VRs whose element header has two reserved bytes and a 4-byte length (PS3.5 7.1.2)."""
_WANTED = {
    0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID", 0x00080060: "Modality",
    0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID",
}
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_TAG_LEN = struct.Struct("<HHI")
_TAG_VR_LEN = struct.Struct("<HH2sH")


class _Malformed(Exception):
    """The quick scan met something it does not follow; pydicom decodes instead."""


def _walk(buf: memoryview, pos: int, implicit: bool, found: dict[str, str] | None,
          in_item: bool) -> tuple[int, bool]:
    """Walk little-endian data elements from ``pos``; fill ``found`` (top level only).

    Returns the position after the data set (or item) and whether pixel data was met
    (the walk stops there: nothing after it is needed).
    """
    end = len(buf)
    while pos < end:
        if pos + 8 > end:
            raise _Malformed
        group, elem, length = _TAG_LEN.unpack_from(buf, pos)
        tag = group << 16 | elem
        if implicit or group == 0xFFFE:
            pos += 8
            is_sq = length == _UNDEFINED
        else:
            _, _, vr, short = _TAG_VR_LEN.unpack_from(buf, pos)
            if vr in LONG_VRS:
                if pos + 12 > end:
                    raise _Malformed
                length = _TAG_LEN.unpack_from(buf, pos + 4)[2]
                pos += 12
            else:
                length = short
                pos += 8
            is_sq = vr == b"SQ" or length == _UNDEFINED
        if tag == _ITEM_END and in_item:
            return pos, False
        if found is not None and tag in _PIXEL_TAGS:
            return pos, True
        if length == _UNDEFINED:
            if not is_sq:
                raise _Malformed
            pos = _skip_sequence(buf, pos, implicit)
            continue
        if pos + length > end:
            raise _Malformed
        if found is not None:
            name = _WANTED.get(tag)
            if name is not None:
                found[name] = bytes(buf[pos:pos + length]).decode("latin-1").rstrip("\x00 ").strip()
        pos += length
    if in_item:
        raise _Malformed
    return pos, False


def _skip_sequence(buf: memoryview, pos: int, implicit: bool) -> int:
    """Skip the items of a sequence of undefined length; the position after its end."""
    while True:
        if pos + 8 > len(buf):
            raise _Malformed
        group, elem, length = _TAG_LEN.unpack_from(buf, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _Malformed
        if length == _UNDEFINED:
            pos, _ = _walk(buf, pos, implicit, None, True)
        else:
            pos += length


class Scan(NamedTuple):
    """What :func:`scan_dataset` read."""

    found: dict[str, str]
    has_pixels: bool
    pixel_at: int
    """Where the pixel data element's value starts (meaningful when ``has_pixels``)."""


def scan_dataset(data: memoryview, transfer_syntax: UID) -> Scan | None:
    """The UIDs and modality of an encoded data set, and whether (and where) it has pixel data.

    Reads element headers only (a few microseconds per element, where decoding the
    data set with pydicom costs about half a millisecond per CT image).  ``None``
    for what it does not follow (big endian, deflate, malformed lengths): the caller
    then decodes with pydicom.
    """
    if transfer_syntax.is_deflated or not transfer_syntax.is_little_endian:
        return None
    found: dict[str, str] = {}
    try:
        pos, has_pixels = _walk(data, 0, transfer_syntax.is_implicit_VR, found, False)
    except (_Malformed, struct.error):
        return None
    return Scan(found, has_pixels, pos)


def codestream_cut_short(data: memoryview, scan: Scan, transfer_syntax: UID) -> bool:
    """Whether encapsulated JPEG, JPEG-LS or JPEG 2000 pixel data lacks its end (the data set was
    cut short in transfer or on the sender's disk).

    ``scan`` is :func:`scan_dataset`'s result for ``data``.  Checks that the
    fragments run to the sequence delimiter and that the last one ends with the
    end marker (what :func:`model.volume.load_series` checks per frame).
    ``False`` for other transfer syntaxes and without pixel data.
    """
    if transfer_syntax not in MARKER_ENDED_SYNTAXES or not scan.has_pixels:
        return False
    pos, end = scan.pixel_at, len(data)
    last: tuple[int, int] | None = None
    fragments = 0
    while True:
        if pos + 8 > end:
            return True  # no sequence delimiter: the data stops inside the pixel data
        group, elem, length = _TAG_LEN.unpack_from(data, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQ_END:
            break
        if tag != _ITEM or length == _UNDEFINED or pos + length > end:
            return True
        if fragments and length:  # the first item is the Basic Offset Table
            last = (pos, length)
        fragments += 1
        pos += length
    return last is None or not has_end_marker(data[last[0]:last[0] + last[1]])


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


@dataclass(frozen=True)
class _Refusal:
    code: int
    message: str


class StoreSCP:
    """C-ECHO and C-STORE service; :meth:`start` listens, :meth:`stop` closes.

    Parameters
    ----------
    settings:
        ``[dicom]`` section: AE title, address, limits and timeouts.
    peers:
        Known peers; with ``require_known_peers`` only their AE titles (and,
        with ``check_peer_host``, their hosts) may associate.
    store, catalog:
        Where files and rows go.
    """

    def __init__(self, settings: DicomSettings, peers: Iterable[Peer], store: InstanceStore,
                 catalog: Catalog) -> None:
        self.settings = settings
        self._listening = False
        self.peers = list(peers)
        self.store = store
        self.catalog = catalog
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()

    # -- association control -------------------------------------------------
    def _on_requested(self, event: Event) -> None:
        assoc = event.assoc
        # requestor.ae_title is only filled in after EVT_REQUESTED; read the A-ASSOCIATE-RQ
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip() if primitive is not None else ""
        address = assoc.requestor.address
        if not self.settings.require_known_peers:
            return
        matches = [p for p in self.peers if p.ae_title == calling]
        reason = None
        if not matches:
            reason = f"calling AE title {calling!r} from {address} is not a configured peer"
            diagnostic = 0x03
        elif self.settings.check_peer_host and not any(
            _same_host(p.host, address) for p in matches
        ):
            reason = f"calling AE title {calling!r} connected from {address}, not its configured host"
            diagnostic = 0x03
        if reason:
            self.catalog.record_refusal(None, "association-refused",
                                        reason + "; add it to [[peers]] to accept it")
            assoc.acse.send_reject(0x01, 0x01, diagnostic)
            assoc.kill()  # as pynetdicom does itself: lets the DUL send the A-ASSOCIATE-RJ first

    # -- C-STORE -----------------------------------------------------------
    def _on_store(self, event: Event) -> int | Dataset:
        refusal = self._check_and_store(event)
        if refusal is None:
            return STATUS_SUCCESS
        return _status(refusal.code, refusal.message)

    def _check_and_store(self, event: Event) -> _Refusal | None:
        calling = event.assoc.requestor.ae_title.strip()
        if not self.store.has_space():
            free_mb = self.store.free_bytes() // (1024 * 1024)
            msg = (f"out of disk space: {free_mb} MB free, "
                   f"{self.store.min_free_bytes // (1024 * 1024)} MB required")
            self.catalog.record_refusal(None, "instance-refused", msg)
            return _Refusal(STATUS_OUT_OF_RESOURCES, msg)
        request = cast(C_STORE, event.request)
        raw = cast(BytesIO, request.DataSet)
        transfer_syntax = UID(event.context.transfer_syntax)
        scanned = scan_dataset(raw.getbuffer(), transfer_syntax)
        if scanned is None:
            decoded = event.dataset
            ds: dict[str, object] = {k: decoded.get(k) for k in _WANTED.values()}
            has_pixels = "PixelData" in decoded or "FloatPixelData" in decoded
        else:
            ds, has_pixels = dict(scanned.found), scanned.has_pixels
        study_raw = ds.get("StudyInstanceUID")
        try:
            study_uid = validate_uid(study_raw, "Study Instance UID")
            series_uid = validate_uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
            sop_uid = validate_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
        except StorageError as exc:
            detail = f"from {calling}: {exc}; nothing was stored"
            study_known = None
            try:
                study_known = validate_uid(study_raw, "Study Instance UID")
            except StorageError:
                pass
            self.catalog.record_refusal(study_known, "instance-refused", detail)
            return _Refusal(STATUS_CANNOT_UNDERSTAND, str(exc))
        sop_class = str(ds.get("SOPClassUID") or "")
        context_class = event.context.abstract_syntax
        problem = None
        if sop_class != context_class:
            problem = (f"SOP Class UID {sop_class or '(none)'} of SOP {sop_uid} does not match "
                       f"the presentation context {context_class}")
        elif not has_pixels:
            problem = f"SOP {sop_uid} has no pixel data; a CT image needs it"
        elif scanned is not None and codestream_cut_short(raw.getbuffer(), scanned, transfer_syntax):
            problem = (f"SOP {sop_uid}: the compressed pixel data ({transfer_syntax.name}) ends "
                       "without its end marker: the image was cut short or is corrupt; nothing was "
                       "stored: send the instance again")
            self.catalog.record_refusal(study_uid, "instance-refused", f"from {calling}: {problem}")
            return _Refusal(STATUS_CANNOT_UNDERSTAND, problem)
        if problem:
            self.catalog.record_refusal(study_uid, "instance-refused", problem)
            return _Refusal(STATUS_DATASET_MISMATCH, problem)
        meta = file_meta_bytes(sop_class, sop_uid, str(transfer_syntax), calling)
        stored = self.store.write(study_uid, series_uid, sop_uid, (meta, raw.getbuffer()))
        fresh = self.catalog.record_instance(InstanceRecord(
            study_instance_uid=study_uid, series_instance_uid=series_uid,
            sop_instance_uid=sop_uid, sop_class_uid=sop_class,
            transfer_syntax_uid=str(transfer_syntax),
            modality=str(ds.get("Modality") or "") or None,
            relative_path=stored.relative_path, size_bytes=stored.size_bytes,
            calling_ae=calling,
        ))
        if not fresh:
            # a repeat: acknowledged, not counted again; the file was replaced by the
            # same instance unless the repeat came under other study/series UIDs
            known = self.catalog.instance_path(sop_uid)
            if known is not None and known != stored.relative_path:
                (self.store.root / stored.relative_path).unlink(missing_ok=True)
            logger.info("SOP %s received again; already stored as %s", sop_uid, known)
        return None

    # -- lifecycle -------------------------------------------------------------
    def make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.maximum_pdu_size = s.max_pdu
        ae.require_called_aet = True
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        return ae

    def start(self, *, listen: bool = True) -> None:
        """Listen on ``[dicom] host:port`` in background threads.

        ``listen=False``: no socket of its own; connections accepted elsewhere
        (a receiver process's share of the node's listening socket, see
        :mod:`node.dicom.receivers`) are handed in with :meth:`serve_connection`.
        """
        handlers: list = [
            (evt.EVT_CONN_OPEN, tune_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
        ]
        ae = self.make_ae()
        server = ae.make_server((self.settings.host, self.settings.port), evt_handlers=handlers,
                                server_class=ThreadedAssociationServer if listen else _HandedServer)
        ae._servers.append(server)  # as start_server does: server.shutdown() removes it
        self._server = cast(ThreadedAssociationServer, server)
        self._listening = listen
        if listen:
            threading.Thread(target=server.serve_forever, name="scp-accept", daemon=True).start()
            logger.info("listening as %s on %s:%d", self.settings.ae_title, self.settings.host,
                        self.settings.port)

    def serve_connection(self, conn: socket.socket, address: tuple[str, int]) -> None:
        """Run an association on an accepted connection (in a new thread)."""
        assert self._server is not None
        self._server.process_request(conn, address)

    @property
    def active_associations(self) -> int:
        return len(self._server.active_associations) if self._server is not None else 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            if self._listening:
                self._server.shutdown()
            else:  # serve_forever never ran: shutdown() would wait for it
                self._server.server_close()
                self._server.ae._servers.remove(self._server)
            self._server = None
        self.catalog.close()


class _HandedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server without a listening socket of its own: its
    connections come from :meth:`StoreSCP.serve_connection`."""

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass


def _same_host(configured: str, address: str) -> bool:
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(configured, None)}
    except socket.gaierror:
        resolved = {configured}
    return address in resolved
