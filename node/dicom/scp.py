"""The DICOM listener: C-ECHO and C-STORE of CT images, on pynetdicom's public API.

The C-STORE handler stays tiny: check space, decode the identifiers with pydicom,
validate the UIDs, write ``event.encoded_dataset()`` (file meta and data set) to disk
atomically, insert the instance row, answer.  No pixel data is decoded here; analysis
happens in the worker.

Hostile input is met before anything is written: a connection has ``request_timeout``
seconds for its association request and only admitted associations count against
``max_associations`` (:mod:`node.dicom.admission`); each data set is inflated with a
bound, walked for repeated or out-of-order tags and elements longer than the data set,
and its uncompressed pixel data checked against the image it describes
(:mod:`node.dicom.received`).  A SOP Instance UID received again with other content
follows ``[storage] overwrite`` and is audited (``instance-resend-differs``).

Structured reports (Comprehensive, Enhanced, Comprehensive 3D SR) are accepted
from known peers only, as a radiologist's severity label
(:mod:`node.learn.sr_labels`): the file goes to ``<storage root>/labels/`` and the
label into the label history (:class:`node.learn.labels.LabelRecorder`); it is
never an instance of the CT study, so it queues no analysis.  An SR without a
label, or for a study the node has not archived, is refused with a status and
recorded.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
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
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from model.volume import MARKER_ENDED_SYNTAXES, has_end_marker
from node.dicom.admission import NO_PYNETDICOM_LIMIT, Admission
from node.dicom.catalog import Catalog, InstanceRecord, KnownInstance
from node.dicom.receipts import ReceiptLog
from node.dicom.received import Received, ReceivedError, native_pixel_problem, read_received
from node.dicom.sockets import no_delay
from node.dicom.storage import InstanceStore, atomic_write, validate_uid
from node.dicom.tls import complete_handshake, server_context
from node.errors import LabelError, StorageError
from node.learn.labels import LabelRecorder
from node.learn.sr_labels import LABEL_SR_SOP_CLASSES, parse_label_sr
from node.settings import DicomSettings, Peer

__all__ = [
    "ACCEPTED_SOP_CLASSES",
    "ACCEPTED_TRANSFER_SYNTAXES",
    "LABEL_SR_TRANSFER_SYNTAXES",
    "StoreSCP",
    "codestream_cut_short",
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

LABEL_SR_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_LABEL_NOT_RECORDED = 0xC001
"""A labelling SR that names no archived study, or comes from an unknown peer."""


def codestream_cut_short(pixel_data: bytes, transfer_syntax: UID) -> bool:
    """Whether encapsulated JPEG, JPEG-LS or JPEG 2000 pixel data lacks its end (the data set
    was cut short in transfer or on the sender's disk).

    The fragments must parse (pydicom's :func:`~pydicom.encaps.generate_fragments`) and the
    last non-empty one must end with the end marker (what :func:`model.volume.load_series`
    checks per frame).  ``False`` for other transfer syntaxes.
    """
    if transfer_syntax not in MARKER_ENDED_SYNTAXES:
        return False
    try:
        fragments = list(generate_fragments(pixel_data))
    except (ValueError, EOFError):
        return True
    last = next((f for f in reversed(fragments[1:] if len(fragments) > 1 else fragments) if f),
                None)
    return last is None or not has_end_marker(last)


def _shown_uid(value: object) -> str:
    """A UID from a request for a log or audit line: as is when it looks like one, else escaped."""
    text = str(value or "").strip().rstrip("\x00")
    if text and len(text) <= 64 and all(c.isdigit() or c == "." for c in text):
        return text
    return repr(text[:64]) if text else "(not given)"


def _short_text(exc: BaseException) -> str:
    """An exception's message on one line, at most 200 characters (for an audit row)."""
    return " ".join(str(exc).split())[:200]


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


@dataclass(frozen=True)
class _Refusal:
    code: int
    message: str


@dataclass(frozen=True)
class _Identifiers:
    study: object
    series: object
    sop: object
    sop_class: str
    modality: str | None
    pixel_data: bytes | None


def _identifiers(ds: Dataset) -> _Identifiers:
    """The UIDs, modality and pixel data (still encoded) of the received data set."""
    pixels = None
    if "PixelData" in ds:
        pixels = ds["PixelData"].value
    elif "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        pixels = b""
    return _Identifiers(
        study=ds.get("StudyInstanceUID"), series=ds.get("SeriesInstanceUID"),
        sop=ds.get("SOPInstanceUID"), sop_class=str(ds.get("SOPClassUID") or ""),
        modality=str(ds.get("Modality") or "") or None,
        pixel_data=pixels if pixels is None else bytes(pixels),
    )


class StoreSCP:
    """C-ECHO and C-STORE service; :meth:`start` listens, :meth:`stop` closes.

    Parameters
    ----------
    settings:
        ``[dicom]`` section: AE title, address, limits and timeouts.
    peers:
        Known peers; with ``require_known_peers`` only their AE titles (pynetdicom's
        ``require_calling_aet``) and, with ``check_peer_host``, their hosts may associate.
    store, catalog:
        Where files and rows go.
    labels:
        Records labelling SRs; by default on the catalog's database with the archive at
        ``<storage root>/archive`` (:attr:`node.settings.Settings.archive_root`).
    """

    def __init__(self, settings: DicomSettings, peers: Iterable[Peer], store: InstanceStore,
                 catalog: Catalog, labels: LabelRecorder | None = None) -> None:
        self.settings = settings
        self.peers = list(peers)
        self.store = store
        self.catalog = catalog
        self.labels = labels or LabelRecorder(catalog.sessions, store.root, store.root / "archive")
        self._ae: AE | None = None
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: ThreadedAssociationServer | None = None  # [dicom] tls_port
        self._admission = Admission(  # request deadline; max_associations counts admitted ones
            settings, lambda action, detail: self.catalog.record_refusal(None, action, detail))

    # -- association control -------------------------------------------------
    def _on_connection(self, event: Event) -> None:
        """``EVT_CONN_OPEN``: the connection has ``request_timeout`` seconds for its request
        (:class:`node.dicom.admission.Admission`)."""
        self._admission.on_connection(event)

    def _on_requested(self, event: Event) -> None:
        """Admit or reject an association request.

        Records a refused association; rejects one from a known title on the wrong host, and
        one beyond ``max_associations`` admitted associations ("local limit exceeded").  An
        unknown calling AE title is rejected by pynetdicom itself (``require_calling_aet``)
        right after this handler; it is recorded here.
        """
        assoc = event.assoc
        self._admission.requested(assoc)
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip() if primitive is not None else ""
        address = assoc.requestor.address
        if self.settings.require_known_peers:
            matches = [p for p in self.peers if p.ae_title == calling]
            if not matches:
                self.catalog.record_refusal(
                    None, "association-refused",
                    f"calling AE title {calling!r} from {address} is not a configured peer; "
                    "add it to [[peers]] to accept it")
                return
            if self.settings.check_peer_host and not any(_same_host(p.host, address)
                                                         for p in matches):
                self.catalog.record_refusal(
                    None, "association-refused",
                    f"calling AE title {calling!r} connected from {address}, not its configured "
                    "host; add it to [[peers]] to accept it")
                assoc.acse.send_reject(0x01, 0x01, 0x03)
                assoc.kill()  # pynetdicom then skips its own negotiation (the request was rejected)
                return
        self._admission.admit(assoc, calling, address)

    # -- C-STORE -----------------------------------------------------------
    def _on_store(self, event: Event) -> int | Dataset:
        refusal = self._check_and_store(event)
        if refusal is None:
            return STATUS_SUCCESS
        return _status(refusal.code, refusal.message)

    def _refuse(self, study_uid: str | None, code: int, detail: str, comment: str) -> _Refusal:
        self.catalog.record_refusal(study_uid, "instance-refused", detail)
        return _Refusal(code, comment)

    def _check_and_store(self, event: Event) -> _Refusal | None:
        calling = event.assoc.requestor.ae_title.strip()
        if not self.store.has_space():
            free_mb = self.store.free_bytes() // (1024 * 1024)
            msg = (f"out of disk space: {free_mb} MB free, "
                   f"{self.store.min_free_bytes // (1024 * 1024)} MB required")
            return self._refuse(None, STATUS_OUT_OF_RESOURCES, msg, msg)
        announced = _shown_uid(getattr(event.request, "AffectedSOPInstanceUID", None))
        try:
            received = read_received(event, self.store.max_inflated_bytes)
            ids = _identifiers(received.dataset)
        except RecursionError:
            msg = "the data set nests sequences too deeply to be read; nothing was stored"
            return self._refuse(None, STATUS_CANNOT_UNDERSTAND,
                                f"SOP {announced} from {calling}: {msg}", msg)
        except ReceivedError as exc:
            code = STATUS_OUT_OF_RESOURCES if exc.too_large else STATUS_CANNOT_UNDERSTAND
            msg = f"{exc}; nothing was stored"
            return self._refuse(None, code, f"SOP {announced} from {calling}: {msg}", msg)
        except (ValueError, TypeError, EOFError, KeyError, OSError, NotImplementedError,
                struct.error) as exc:
            # (pydicom raises NotImplementedError for a value representation it does not know)
            msg = f"the data set cannot be decoded ({type(exc).__name__}); nothing was stored"
            return self._refuse(None, STATUS_CANNOT_UNDERSTAND,
                                f"SOP {announced} from {calling}: {msg}: {_short_text(exc)}", msg)
        try:
            study_uid = validate_uid(ids.study, "Study Instance UID")
            series_uid = validate_uid(ids.series, "Series Instance UID")
            sop_uid = validate_uid(ids.sop, "SOP Instance UID")
        except StorageError as exc:
            study_known = None
            try:
                study_known = validate_uid(ids.study, "Study Instance UID")
            except StorageError:
                pass
            return self._refuse(study_known, STATUS_CANNOT_UNDERSTAND,
                                f"from {calling}: {exc}; nothing was stored", str(exc))
        transfer_syntax = UID(event.context.transfer_syntax)
        context_class = event.context.abstract_syntax
        if ids.sop_class != context_class:
            problem = (f"SOP Class UID {ids.sop_class or '(none)'} of SOP {sop_uid} does not match "
                       f"the presentation context {context_class}")
            return self._refuse(study_uid, STATUS_DATASET_MISMATCH, problem, problem)
        if ids.sop_class in LABEL_SR_SOP_CLASSES:
            return self._receive_label(received, calling, sop_uid)
        if ids.pixel_data is None:
            problem = f"SOP {sop_uid} has no pixel data; a CT image needs it"
            return self._refuse(study_uid, STATUS_DATASET_MISMATCH, problem, problem)
        if not transfer_syntax.is_compressed:
            mismatch = native_pixel_problem(received.dataset, received.pixel_data_length)
            if mismatch is not None:
                problem = f"SOP {sop_uid}: {mismatch}; nothing was stored"
                return self._refuse(study_uid, STATUS_DATASET_MISMATCH,
                                    f"from {calling}: {problem}", problem)
        if codestream_cut_short(ids.pixel_data, transfer_syntax):
            problem = (f"SOP {sop_uid}: the compressed pixel data ({transfer_syntax.name}) ends "
                       "without its end marker: the image was cut short or is corrupt; nothing was "
                       "stored: send the instance again")
            return self._refuse(study_uid, STATUS_CANNOT_UNDERSTAND, f"from {calling}: {problem}",
                                problem)
        record = InstanceRecord(
            study_instance_uid=study_uid, series_instance_uid=series_uid,
            sop_instance_uid=sop_uid, sop_class_uid=ids.sop_class,
            transfer_syntax_uid=str(transfer_syntax), modality=ids.modality,
            relative_path=self.store.relative_path(study_uid, series_uid, sop_uid),
            size_bytes=received.size, calling_ae=calling,
        )
        try:
            with self.store.lock_for(sop_uid):
                known = self.catalog.known_instance(sop_uid)
                if known is not None:
                    return self._received_again(known, record, received)
                self.store.write(study_uid, series_uid, sop_uid, received.parts)
                if not self.catalog.record_instance(record):
                    logger.info("SOP %s was recorded meanwhile by another process", sop_uid)
        except SQLAlchemyError as exc:
            # not recorded, so not acknowledged; the file stays (an earlier copy of the same
            # instance may be recorded under this name) and a repeat C-STORE replaces it
            logger.error("SOP %s of study %s not recorded, answered 0xA700: database unavailable (%s)",
                         sop_uid, study_uid, type(exc).__name__)
            return _Refusal(STATUS_OUT_OF_RESOURCES, "database unavailable: not stored; send again")
        return None

    def _received_again(self, known: KnownInstance, record: InstanceRecord,
                        received: Received) -> _Refusal | None:
        """A C-STORE of a SOP Instance UID already recorded (its receipt lock held).

        An identical resend is acknowledged and changes nothing.  Other content is audited
        (``instance-resend-differs``) and, by ``[storage] overwrite``, kept out (``keep-first``,
        acknowledged as Orthanc does) or written over the stored file with its row updated
        (``replace``); a resend naming another study or series never moves the instance.
        """
        sop = record.sop_instance_uid
        if self.store.same_content(known.relative_path, received.parts):
            logger.info("SOP %s received again, identical; already stored", sop)
            return None
        moved = (record.study_instance_uid, record.series_instance_uid) != (
            known.study_instance_uid, known.series_instance_uid)
        if not moved and not (self.store.root / known.relative_path).exists():
            # the recorded file is gone (removed by hand, a disk fault): the resend restores it
            self.store.write(record.study_instance_uid, record.series_instance_uid, sop,
                             received.parts)
            self.catalog.replace_instance(
                known, record, f"SOP {sop} from {record.calling_ae}: its stored file was missing; "
                f"restored from the resend ({record.size_bytes} bytes)", action="instance-restored")
            return None
        detail = (f"SOP {sop} from {record.calling_ae}: received again with other content "
                  f"({record.size_bytes} bytes, {UID(record.transfer_syntax_uid).name}); stored: "
                  f"{known.size_bytes} bytes, {UID(known.transfer_syntax_uid).name}")
        if moved:
            detail += (f"; the resend names study {record.study_instance_uid} series "
                       f"{record.series_instance_uid}, the instance is filed under study "
                       f"{known.study_instance_uid} series {known.series_instance_uid}")
        if self.store.overwrite == "replace" and not moved:
            self.store.write(record.study_instance_uid, record.series_instance_uid, sop,
                             received.parts)
            self.catalog.replace_instance(known, record, detail + "; replaced the stored file "
                                          "([storage] overwrite = replace)")
            return None
        if self.store.overwrite == "replace":
            self.catalog.record_event(known.study_id, "instance-refused",
                                      detail + "; not moved to another study or series")
            return _Refusal(STATUS_DATASET_MISMATCH, "SOP already stored in another study/series")
        kept = self.store.keep_resend(known.relative_path, received.parts)
        self.catalog.record_event(known.study_id, "instance-resend-differs",
                                  detail + "; kept the first ([storage] overwrite = keep-first), "
                                  f"the resend is kept as {kept}")
        return None

    def _receive_label(self, received: Received, calling: str, sop_uid: str) -> _Refusal | None:
        """A radiologist's labelling SR: parse, keep the file, record the label (or refuse)."""
        if not any(p.ae_title == calling for p in self.peers):
            msg = f"SR {sop_uid} from {calling!r}: labels are accepted from configured peers only"
            self.catalog.record_refusal(None, "label-refused", f"{msg}; add it to [[peers]]")
            return _Refusal(STATUS_LABEL_NOT_RECORDED, "labels only from configured peers")
        try:
            label = parse_label_sr(received.dataset)
        except LabelError as exc:
            self.catalog.record_refusal(None, "label-refused", f"from {calling}: {exc}")
            return _Refusal(STATUS_CANNOT_UNDERSTAND, "SR carries no lungnode severity label")
        except (ValueError, TypeError, KeyError, AttributeError, EOFError, NotImplementedError,
                RecursionError) as exc:  # its content tree cannot be read (pydicom reads it here)
            self.catalog.record_refusal(
                None, "label-refused",
                f"SR {sop_uid} from {calling}: its content cannot be read ({type(exc).__name__}: "
                f"{_short_text(exc)})")
            return _Refusal(STATUS_CANNOT_UNDERSTAND, "SR content cannot be read")
        path = self.store.root / "labels" / f"{sop_uid}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists()
        atomic_write(path, received.parts, fsync=self.store.fsync)
        try:
            added = self.labels.record(label, calling)
        except LabelError as exc:
            if fresh:
                path.unlink(missing_ok=True)
            self.catalog.record_refusal(None, "label-refused", f"from {calling}: {exc}")
            return _Refusal(STATUS_LABEL_NOT_RECORDED, "study unknown or not archived")
        logger.info("label SR %s from %s: %s", sop_uid, calling,
                    f"{label.value.value} recorded" if added else "already known")
        return None

    # -- lifecycle -------------------------------------------------------------
    def make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        # [dicom] max_associations is enforced on requests only (_on_requested), so that
        # connections that never send one do not keep known peers out; pynetdicom's own limit
        # would count those too
        ae.maximum_associations = NO_PYNETDICOM_LIMIT
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.maximum_pdu_size = s.max_pdu
        ae.require_called_aet = True
        if s.require_known_peers:
            # an empty list would accept every title: with no peers, a title nobody can have
            ae.require_calling_aet = sorted({p.ae_title for p in self.peers}) or ["-"]
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        for sop_class in LABEL_SR_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(LABEL_SR_TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        return ae

    def start(self) -> None:
        """Listen on ``[dicom] host:port`` and/or, with DICOM TLS, on ``tls_port``, in background
        threads.

        Both listeners belong to one AE and share its handlers, peer checks, storage and
        catalog; a TLS connection first completes its handshake (:meth:`_on_tls_connection`).
        When the second listener cannot start, the first is stopped again (``OSError``).
        """
        handlers: list = [
            (evt.EVT_CONN_OPEN, no_delay),
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            *ReceiptLog(self.catalog.engine).handlers(),  # who sent what: audit rows per association
        ]
        s = self.settings
        ae = self.make_ae()
        try:
            if s.plain:
                self._server = cast(ThreadedAssociationServer, ae.start_server(
                    (s.host, s.port), block=False, evt_handlers=handlers))
            if s.tls_port is not None:
                # bound after the handlers above: the handshake runs after them, and under the
                # socket timeout they set (else under acse_timeout)
                tls_handlers = [*handlers, (evt.EVT_CONN_OPEN, self._on_tls_connection)]
                self._tls_server = cast(ThreadedAssociationServer, ae.start_server(
                    (s.host, s.tls_port), block=False, evt_handlers=tls_handlers,
                    ssl_context=server_context(s)))
        except OSError:
            ae.shutdown()
            self._server = self._tls_server = None
            raise
        self._ae = ae
        ports = ([f"{s.host}:{self.port}"] if self._server is not None else []) + (
            [f"{s.host}:{self.tls_port} (DICOM TLS)"] if self._tls_server is not None else [])
        logger.info("listening as %s on %s", s.ae_title, " and ".join(ports))

    def _on_tls_connection(self, event: Event) -> None:
        """``EVT_CONN_OPEN`` on the TLS listener: complete the TLS handshake in this connection's
        thread (:func:`node.dicom.tls.complete_handshake`); on failure record why and close."""
        assoc = event.assoc
        sock = assoc.dul.socket
        problem = complete_handshake(sock.socket if sock is not None else None,
                                     self.settings.acse_timeout)
        if problem is None:
            return
        self.catalog.record_refusal(
            None, "association-refused",
            f"TLS connection from {assoc.requestor.address} to port {self.tls_port}: {problem}")
        if sock is not None:
            sock.close()  # the association then ends before any request is read

    @property
    def active_associations(self) -> int:
        """Associations open on both listeners."""
        return sum(len(server.active_associations) for server in (self._server, self._tls_server)
                   if server is not None)

    @property
    def port(self) -> int:
        """The plain listener's port (the one bound when ``[dicom] port`` is 0)."""
        if self._server is None:
            raise RuntimeError("no plain DICOM listener is running ([dicom] plain = false, or "
                               "not started)")
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The DICOM TLS listener's port; ``None`` when there is none."""
        return int(self._tls_server.server_address[1]) if self._tls_server is not None else None

    def stop(self) -> None:
        """Stop both listeners and their associations."""
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None
            self._server = None
            self._tls_server = None



def _same_host(configured: str, address: str) -> bool:
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(configured, None)}
    except socket.gaierror:
        resolved = {configured}
    return address in resolved
