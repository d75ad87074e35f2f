"""The node's C-STORE SCU: files sent as stored, over one association.

:func:`send_files` (the outbox's deliveries and ``lungnode send``) reads each
file's meta information with pydicom, proposes one presentation context per
SOP class and stored transfer syntax, and sends each file with pynetdicom's
``send_c_store`` from its path.  With pynetdicom's public configuration
``STORE_SEND_CHUNKED_DATASET`` the data set is streamed from the file in
chunks as encoded, never decoded or re-encoded.  The socket sends without Nagle's
algorithm and acknowledges at once (``EVT_CONN_OPEN`` and ``EVT_PDU_SENT``
handlers), so neither end waits for a delayed acknowledgement.
To a peer with ``tls = true`` the association goes over DICOM TLS
(:func:`node.dicom.tls.client_context`, pynetdicom's ``tls_args``).

pynetdicom 3.0.4 (and its main branch) has a race between the association's
reactor thread and ``send_c_store``: when the reactor thread is descheduled
between leaving its pause and reading its message queue, it takes the peer's
C-STORE response for itself ("Received unexpected C-STORE service message"),
``send_c_store`` waits out the DIMSE timeout and aborts the association.  On a
loaded machine this happened once in a few thousand sends.  The node does not
touch the reactor; it records every C-STORE response as it is decoded
(``EVT_DIMSE_RECV``), so a file whose response was taken keeps the status the
peer gave it, and it opens a new association for the files that remain.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventHandlerType

from node.dicom.sockets import no_delay, quick_ack
from node.dicom.tls import client_context
from node.errors import ConfigError, DeliveryError
from node.settings import DicomSettings, Peer

__all__ = ["REASSOCIATIONS", "StoredFile", "read_stored_file", "send_files"]

logger = logging.getLogger(__name__)

#: New associations one :func:`send_files` call opens after responses pynetdicom lost.
REASSOCIATIONS = 3

_C_STORE_RSP = 0x8001  # Command Field of a C-STORE response (PS3.7 E.1)


@dataclass(frozen=True)
class StoredFile:
    """A DICOM file as it will be sent: its path and the UIDs of its meta information."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def read_stored_file(path: Path) -> StoredFile:
    """Read the File Meta Information of a DICOM file (Part 10 format).

    Raises
    ------
    pydicom.errors.InvalidDicomError
        Not a Part 10 file, or one without Media Storage SOP Class UID, Media
        Storage SOP Instance UID or Transfer Syntax UID.
    OSError
        The file cannot be read.
    """
    path = Path(path)
    meta = read_file_meta_info(path)
    uids = [str(meta.get(k, "") or "").strip() for k in
            ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")]
    if not all(uids):
        raise InvalidDicomError(
            f"{path}: the file meta information lacks a SOP class, SOP instance or transfer syntax UID")
    return StoredFile(path, uids[0], uids[1], uids[2])


def _store(assoc: object, path: Path, message_id: int,
           seen: dict[int, tuple[int, str]]) -> tuple[int | None, str]:
    """pynetdicom's C-STORE of one file from its path; ``(status, error comment)``.

    ``seen`` holds the responses recorded as they were decoded (see the module
    docstring): a response pynetdicom's reactor took is read from there.
    """
    seen.pop(message_id, None)  # message IDs wrap after 65535 files
    try:
        status = assoc.send_c_store(path, msg_id=message_id)  # type: ignore[attr-defined]
    except (ValueError, AttributeError, OSError) as exc:
        return None, str(exc)
    if status and "Status" in status:
        return int(status.Status), str(status.get("ErrorComment", ""))
    if message_id in seen:
        logger.warning("pynetdicom lost the response to C-STORE %d (%s) after it arrived; the "
                       "status the peer sent is used", message_id, path.name)
        return seen[message_id]
    return None, "no response from peer (timeout or abort)"


def _record_responses(seen: dict[int, tuple[int, str]]) -> Callable[[Event], None]:
    """An ``EVT_DIMSE_RECV`` handler that records each C-STORE response's status by message ID."""

    def handler(event: Event) -> None:
        command = event.message.command_set  # type: ignore[attr-defined]
        if command.get("CommandField") == _C_STORE_RSP and "Status" in command:
            seen[int(command.MessageIDBeingRespondedTo)] = (
                int(command.Status), str(command.get("ErrorComment", "")))

    return handler


def send_files(paths: list[Path], peer: Peer, dicom: DicomSettings,
               progress: Callable[[], object] | None = None) -> list[tuple[Path, int | None, str]]:
    """C-STORE ``paths`` to ``peer`` over one association.

    Each file is sent as stored, in its own transfer syntax (one presentation
    context per SOP class and transfer syntax), streamed from disk.  When
    pynetdicom loses a response that did arrive (module docstring), the file
    keeps the peer's status and the rest go over a new association, at most
    :data:`REASSOCIATIONS` times per call.

    Returns ``(path, status, message)`` per file, in order; ``status`` is
    ``None`` when the file was not sent (unreadable, its presentation context
    refused, no response, association lost).  Raises :class:`DeliveryError`
    when the first association cannot be established.
    """
    _config.STORE_SEND_CHUNKED_DATASET = True  # pynetdicom's public option: files sent as encoded
    paths = [Path(p) for p in paths]
    files: list[StoredFile | str] = []
    for path in paths:
        try:
            files.append(read_stored_file(path))
        except (InvalidDicomError, OSError) as exc:
            files.append(f"not a readable DICOM file: {exc}")
    combos = {(f.sop_class_uid, f.transfer_syntax_uid) for f in files if isinstance(f, StoredFile)}
    if len(combos) > 128:
        raise DeliveryError("more than 128 SOP class / transfer syntax combinations in one send")
    results: list[tuple[Path, int | None, str]] = []
    if not combos:
        for path, f in zip(paths, files, strict=True):
            results.append((path, None, str(f)))
            if progress is not None:
                progress()
        return results
    ae = AE(ae_title=dicom.ae_title)
    ae.acse_timeout = dicom.acse_timeout
    ae.dimse_timeout = dicom.dimse_timeout
    ae.network_timeout = dicom.network_timeout
    ae.maximum_pdu_size = dicom.max_pdu
    for sop_class, syntax in sorted(combos):
        # one context per stored transfer syntax: files are sent as they are, not re-encoded
        ae.add_requested_context(sop_class, [syntax])
    seen: dict[int, tuple[int, str]] = {}
    handlers: list[EventHandlerType] = [(evt.EVT_CONN_OPEN, no_delay), (evt.EVT_PDU_SENT, quick_ack),
                (evt.EVT_DIMSE_RECV, _record_responses(seen))]

    tls_args: tuple[ssl.SSLContext, str] | None = None
    if peer.tls:  # DICOM TLS: the peer's certificate checked against tls_ca_file and its host
        try:
            tls_args = (client_context(dicom), peer.host)
        except ConfigError as exc:
            raise DeliveryError(f"peer {peer.name} has tls = true, but {exc}") from exc

    def associate() -> Association:
        seen.clear()
        return ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=handlers,
                            tls_args=tls_args)

    assoc = associate()
    if not assoc.is_established:
        # pynetdicom reports a refused TCP connection as an abort too
        why = ("rejected the association" if assoc.is_rejected
               else "could not be reached or aborted the association")
        raise DeliveryError(
            f"peer {peer.name} ({peer.ae_title}@{peer.host}:{peer.port}) {why}; check that it "
            f"runs and knows this node's AE title {dicom.ae_title}"
            + (" and, for DICOM TLS, that its certificate is signed by a CA in [dicom] tls_ca_file "
               f"and names {peer.host}, and that it trusts the node's certificate"
               if peer.tls else "")
        )
    accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts if cx.transfer_syntax}
    reassociations = 0
    lost_response = False
    t0 = time.perf_counter()
    try:
        for i, (path, f) in enumerate(zip(paths, files, strict=True)):
            if (isinstance(f, StoredFile) and not assoc.is_established and lost_response
                    and reassociations < REASSOCIATIONS):
                reassociations += 1
                lost_response = False
                assoc = associate()
                accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                            for cx in assoc.accepted_contexts if cx.transfer_syntax}
            if isinstance(f, str):
                results.append((path, None, f))
            elif not assoc.is_established:
                results.append((path, None, "association ended before this file"))
            elif (f.sop_class_uid, f.transfer_syntax_uid) not in accepted:
                results.append((path, None, f"{peer.name} did not accept SOP class "
                                f"{f.sop_class_uid} in transfer syntax {f.transfer_syntax_uid}"))
            else:
                message_id = i % 0xFFFF + 1
                results.append((path, *_store(assoc, path, message_id, seen)))
                lost_response = results[-1][1] is not None and not assoc.is_established
            if progress is not None:
                progress()
    finally:
        if assoc.is_established:
            assoc.release()
    logger.debug("C-STORE of %d files to %s in %.2f s (%d new associations after a lost "
                 "response)", len(paths), peer.name, time.perf_counter() - t0, reassociations)
    return results
