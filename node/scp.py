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
from typing import cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
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

from node.catalog import Catalog, InstanceRecord
from node.errors import StorageError
from node.settings import DicomSettings, Peer
from node.storage import InstanceStore, validate_uid

__all__ = [
    "ACCEPTED_SOP_CLASSES",
    "ACCEPTED_TRANSFER_SYNTAXES",
    "StoreSCP",
    "tune_connection",
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


DUL_POLL_SECONDS = 0.0002
"""pynetdicom's DUL thread sleeps this long when idle (its default, 1 ms, costs
about a third of the throughput of a 512x512 CT stream; see
benchmarks/RESULTS.md).  Associations are short-lived, so the extra wake-ups
while one is idle cost little."""


def tune_connection(event: Event) -> None:
    """EVT_CONN_OPEN handler for the SCP and the SCU: no waiting on the network.

    - ``TCP_NODELAY``: our PDUs go out at once (Nagle's algorithm off);
    - ``TCP_QUICKACK`` before every read (Linux resets it after each ACK): the
      node acknowledges at once, so a peer that keeps Nagle on (DCMTK and
      Orthanc without ``TCP_NODELAY=1``) does not wait ~40 ms for a delayed ACK
      before sending the rest of each instance;
    - a shorter idle poll of pynetdicom's DUL thread (:data:`DUL_POLL_SECONDS`).
    """
    assoc_socket = event.assoc.dul.socket
    raw = getattr(assoc_socket, "socket", None)
    if assoc_socket is None or raw is None:
        return
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    event.assoc.dul._run_loop_delay = DUL_POLL_SECONDS
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is not None:
        recv = assoc_socket.recv

        def recv_quickack(nr_bytes: int) -> bytearray:
            raw.setsockopt(socket.IPPROTO_TCP, quickack, 1)
            return recv(nr_bytes)

        assoc_socket.recv = recv_quickack  # type: ignore[method-assign]


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
        ds = event.dataset
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
        sop_class = str(ds.get("SOPClassUID", ""))
        context_class = event.context.abstract_syntax
        problem = None
        if sop_class != context_class:
            problem = (f"SOP Class UID {sop_class or '(none)'} of SOP {sop_uid} does not match "
                       f"the presentation context {context_class}")
        elif "PixelData" not in ds and "FloatPixelData" not in ds:
            problem = f"SOP {sop_uid} has no pixel data; a CT image needs it"
        if problem:
            self.catalog.record_refusal(study_uid, "instance-refused", problem)
            return _Refusal(STATUS_DATASET_MISMATCH, problem)
        meta = file_meta_bytes(sop_class, sop_uid, str(event.context.transfer_syntax), calling)
        request = cast(C_STORE, event.request)
        raw = cast(BytesIO, request.DataSet)
        stored = self.store.write(study_uid, series_uid, sop_uid, (meta, raw.getbuffer()))
        fresh = self.catalog.record_instance(InstanceRecord(
            study_instance_uid=study_uid, series_instance_uid=series_uid,
            sop_instance_uid=sop_uid, sop_class_uid=sop_class,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            modality=str(ds.get("Modality", "")) or None,
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
        data = file_meta_bytes(sop_class, sop_uid, str(event.context.transfer_syntax), calling) \
            + event.request.DataSet.getvalue()
        stored = self.store.write(study_uid, series_uid, sop_uid, data)
        self.catalog.record_instance(InstanceRecord(
            study_instance_uid=study_uid, series_instance_uid=series_uid,
            sop_instance_uid=sop_uid, sop_class_uid=sop_class,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            modality=str(ds.get("Modality", "")) or None,
            relative_path=stored.relative_path, size_bytes=stored.size_bytes,
            calling_ae=calling,
        ))
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

    def start(self) -> None:
        """Listen on ``[dicom] host:port`` in background threads."""
        handlers: list = [
            (evt.EVT_CONN_OPEN, tune_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
        ]
        ae = self.make_ae()
        self._server = ae.start_server((self.settings.host, self.settings.port), block=False,
                                       evt_handlers=handlers)
        logger.info("listening as %s on %s:%d", self.settings.ae_title, self.settings.host,
                    self.settings.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def _same_host(configured: str, address: str) -> bool:
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(configured, None)}
    except socket.gaierror:
        resolved = {configured}
    return address in resolved
