"""The node's C-STORE SCU: files sent as stored, over one association.

:func:`send_files` (the outbox's deliveries and ``lungnode send``) reads each
file's meta by hand, writes the C-STORE command set and the PDUs straight to
the association's socket, and never decodes the data set; pynetdicom
negotiates, reads the responses and releases (:class:`_DirectStore`).  Where
the direct path does not apply (TLS, a peer's odd PDU limits), pynetdicom
sends the file itself.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pydicom.errors import InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset

from node.dicom.netio import tune_connection
from node.dicom.scp import LONG_VRS
from node.errors import DeliveryError
from node.settings import DicomSettings, Peer

__all__ = ["StoredFile", "c_store_command", "read_stored_file", "send_files"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredFile:
    """A DICOM file as it will be sent: its UIDs and where its data set lies.

    ``offset`` is the first byte after the File Meta Information, ``length``
    the number of bytes from there to the end of the file: the data set as
    encoded in ``transfer_syntax_uid``, which is what a C-STORE carries.
    """

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    offset: int
    length: int


_META_HEAD = 8192  # File Meta Information is a few hundred bytes; longer ones go to pydicom


def _parse_meta(head: bytes) -> tuple[dict[int, bytes], int] | None:
    """Group 0002 of a Part 10 file (explicit VR little endian) and where it ends.

    None when the bytes read are not enough or do not look like a plain meta
    group; the caller then asks pydicom.
    """
    if head[128:132] != b"DICM":
        return None
    pos, end, found = 132, None, {}
    while end is None or pos < end:
        if pos + 8 > len(head):
            return None
        group, elem, vr = struct.unpack_from("<HH2s", head, pos)
        if group != 2:
            if end is not None:  # the group length promised more
                return None
            break
        if vr in LONG_VRS:
            if pos + 12 > len(head):
                return None
            (length,) = struct.unpack_from("<I", head, pos + 8)
            at = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            at = pos + 8
        if at + length > len(head):
            return None
        found[elem] = head[at:at + length]
        pos = at + length
        if elem == 0 and length == 4 and len(found) == 1:  # (0002,0000) group length
            end = pos + struct.unpack("<I", found[0])[0]
    if end is not None and pos != end:
        return None
    return found, pos


def _uid_value(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii")


def read_stored_file(path: Path) -> StoredFile:
    """Read the File Meta Information of a DICOM file (Part 10 format).

    Only the meta group is read (a hand parser for the usual layout, pydicom
    for anything else), so this costs microseconds per file.

    Raises
    ------
    pydicom.errors.InvalidDicomError
        Not a Part 10 file, or one without Media Storage SOP Class UID, Media
        Storage SOP Instance UID or Transfer Syntax UID.
    OSError
        The file cannot be read.
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(_META_HEAD)
    parsed = _parse_meta(head)
    try:
        if parsed is not None:
            meta, offset = parsed
            uids = [_uid_value(meta[e]) for e in (0x0002, 0x0003, 0x0010)]
        else:
            file_meta, offset = split_dataset(path)
            uids = [str(file_meta[k].value) for k in
                    ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")]
    except (KeyError, UnicodeDecodeError) as exc:
        raise InvalidDicomError(
            f"{path}: the file meta information lacks a readable SOP class, SOP instance or "
            f"transfer syntax UID ({exc})") from exc
    if not all(uids):
        raise InvalidDicomError(f"{path}: the file meta information has an empty UID")
    if offset >= size:
        raise InvalidDicomError(f"{path}: the file holds no data set after its file meta information")
    return StoredFile(path, uids[0], uids[1], uids[2], offset, size - offset)


def _command_element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def _uid_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def c_store_command(sop_class_uid: str, sop_instance_uid: str, message_id: int,
                    priority: int = 2) -> bytes:
    """The C-STORE-RQ command set (implicit VR little endian, PS3.7 9.3.1.1).

    Byte for byte what pynetdicom encodes for a C-STORE request with a data set
    and no move originator.
    """
    body = b"".join((
        _command_element(0x0002, _uid_bytes(sop_class_uid)),
        _command_element(0x0100, struct.pack("<H", 0x0001)),  # C-STORE-RQ
        _command_element(0x0110, struct.pack("<H", message_id)),
        _command_element(0x0700, struct.pack("<H", priority)),
        _command_element(0x0800, struct.pack("<H", 0x0001)),  # a data set follows
        _command_element(0x1000, _uid_bytes(sop_instance_uid)),
    ))
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


_IOV_MAX = 512  # buffers per sendmsg() call (Linux allows 1024)
_SEND_BLOCK = 1 << 20  # bytes of a file read and sent per sendmsg() round


def _sendmsg_all(sock: socket.socket, buffers: list[memoryview]) -> None:
    """Send every byte of ``buffers`` (``sendmsg`` may send only part)."""
    i = 0
    while i < len(buffers):
        sent = sock.sendmsg(buffers[i:i + _IOV_MAX])
        while sent:
            n = buffers[i].nbytes
            if sent >= n:
                sent -= n
                i += 1
            else:
                buffers[i] = buffers[i][sent:]
                sent = 0


def _can_pause_reactor(assoc: Association) -> bool:
    """Whether the pynetdicom and threading internals :func:`_pause_reactor` uses are there."""
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    return (hasattr(assoc, "_is_paused")
            and isinstance(getattr(getattr(checkpoint, "_cond", None), "_waiters", None), deque))


def _pause_reactor(assoc: Association) -> None:
    """Keep the association's reactor thread from taking DIMSE messages off the queue, for certain.

    pynetdicom pauses it (``send_c_store``, ``release``) by clearing its checkpoint
    and waiting for its ``_is_paused`` flag; but the reactor sets that flag before
    it waits on the checkpoint and clears it only after the wait returns, so a
    reactor descheduled just after an earlier wait still reads as paused.  It then
    takes the C-STORE response off the queue ("Received unexpected C-STORE
    service message") and the sender waits for the DIMSE timeout.  Here the pause
    ends only once the reactor is blocked on the checkpoint (the only thread that
    waits on it), or has ended.  ``release`` and ``kill`` set the checkpoint again.
    """
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    waiters = checkpoint._cond._waiters  # type: ignore[attr-defined]
    while not waiters and assoc.is_alive():
        time.sleep(0.0001)


class _DirectStore:
    """C-STORE requests written straight to the association's socket.

    pynetdicom's ``send_c_store`` decodes each file and encodes it again, then
    passes every P-DATA PDU (16 KB with Orthanc or DCMTK) through its DUL
    thread's queue and state machine, one PDU per loop: about 4 ms of CPU per
    512x512 CT instance, on a 2-core machine where the receiver needs the CPU
    as well (benchmarks/RESULTS.md, "Node as sender").  Here the command set is
    built directly, the data set goes out as stored (no decoding, so also no
    conversion: the file's own transfer syntax must have been accepted), as
    P-DATA-TF PDUs of the peer's maximum length, in one ``sendmsg`` per
    megabyte.  Responses still pass through pynetdicom (DUL, DIMSE decoding,
    timeouts, aborts).

    While it is open the association's reactor is paused, as ``send_c_store``
    pauses it for each request, so that it does not take the responses off the
    DIMSE queue; nothing else may send on the association meanwhile.
    """

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc
        self.sock: socket.socket = assoc.dul.socket.socket  # type: ignore[union-attr,assignment]
        max_pdu = int(assoc.acceptor.maximum_length or 0)  # 0: the peer takes any length
        self.fragment = (max_pdu - 6) if max_pdu else _SEND_BLOCK
        self.block = max(1, _SEND_BLOCK // self.fragment) * self.fragment
        self._paused = False

    @staticmethod
    def usable(assoc: Association) -> bool:
        """A plain TCP socket (not TLS) and the pynetdicom internals this relies on."""
        wrapper = getattr(assoc.dul, "socket", None)
        raw = getattr(wrapper, "socket", None)
        return (isinstance(raw, socket.socket) and not isinstance(raw, ssl.SSLSocket)
                and _can_pause_reactor(assoc))

    def __enter__(self) -> _DirectStore:
        self._paused = True
        _pause_reactor(self.assoc)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._resume()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self.assoc._reactor_checkpoint.set()

    def _abort(self) -> None:
        self._resume()
        if self.assoc.is_established:
            self.assoc.abort()

    def _pdus(self, context_id: int, data: bytes | memoryview, more: int, last: int,
              final: bool) -> list[memoryview]:
        """P-DATA-TF PDUs of ``data``; the last one flagged ``last`` when ``final``."""
        out: list[memoryview] = []
        view = memoryview(data)
        n = self.fragment
        for start in range(0, len(view), n):
            frag = view[start:start + n]
            control = last if final and start + n >= len(view) else more
            out.append(memoryview(struct.pack(">BBIIBB", 0x04, 0x00, len(frag) + 6,
                                              len(frag) + 2, context_id, control)))
            out.append(frag)
        return out

    def _send_request(self, f: StoredFile, context_id: int, message_id: int) -> None:
        command = c_store_command(f.sop_class_uid, f.sop_instance_uid, message_id)
        buffers = self._pdus(context_id, command, 0x01, 0x03, True)
        with open(f.path, "rb") as fh:
            fh.seek(f.offset)
            left = f.length
            while left:
                data = fh.read(min(self.block, left))
                if not data:
                    raise OSError(f"{f.path} became shorter while it was being sent")
                left -= len(data)
                buffers += self._pdus(context_id, data, 0x00, 0x02, left == 0)
                _sendmsg_all(self.sock, buffers)
                buffers = []

    def store(self, f: StoredFile, context_id: int, message_id: int) -> tuple[int | None, str]:
        """Send one file and wait for its response: ``(status, error comment)``."""
        try:
            self._send_request(f, context_id, message_id)
        except OSError as exc:
            self._abort()
            return None, f"connection lost while sending ({exc})"
        _, rsp = self.assoc.dimse.get_msg(block=True)
        if rsp is None:
            self._abort()
            return None, "no response from peer (timeout or abort)"
        if not isinstance(rsp, C_STORE) or rsp.MessageIDBeingRespondedTo != message_id:
            self._abort()
            return None, (f"unexpected answer {type(rsp).__name__} (to message "
                          f"{getattr(rsp, 'MessageIDBeingRespondedTo', None)}) for C-STORE "
                          f"message {message_id}")
        if rsp.Status is None:
            return None, "C-STORE response without a status"
        return int(rsp.Status), str(rsp.ErrorComment or "")


def _pynetdicom_store(assoc: Association, path: Path, message_id: int) -> tuple[int | None, str]:
    """pynetdicom's own C-STORE of a file (decodes and re-encodes it).

    The reactor is paused first as :func:`_pause_reactor` does it (``send_c_store``'s
    own pause can leave it running); ``send_c_store`` lets it run again once the
    response is in.
    """
    if _can_pause_reactor(assoc):
        _pause_reactor(assoc)
    try:
        status = assoc.send_c_store(path, msg_id=message_id)
    except (ValueError, AttributeError) as exc:
        return None, str(exc)
    if not status or "Status" not in status:
        return None, "no response from peer (timeout or abort)"
    return int(status.Status), str(status.get("ErrorComment", ""))


def send_files(paths: list[Path], peer: Peer, dicom: DicomSettings,
               progress: Callable[[], object] | None = None) -> list[tuple[Path, int | None, str]]:
    """C-STORE ``paths`` to ``peer`` over one association.

    Each file is sent as stored, in its own transfer syntax (one presentation
    context per SOP class and transfer syntax), without decoding it; see
    :class:`_DirectStore`.

    Returns ``(path, status, message)`` per file, in order; ``status`` is
    ``None`` when the file was not sent (unreadable, its presentation context
    refused, no response, association lost).  Raises :class:`DeliveryError`
    when the association cannot be established.
    """
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
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, tune_connection)])
    if not assoc.is_established:
        # pynetdicom reports a refused TCP connection as an abort too
        why = ("rejected the association" if assoc.is_rejected
               else "could not be reached or aborted the association")
        raise DeliveryError(
            f"peer {peer.name} ({peer.ae_title}@{peer.host}:{peer.port}) {why}; check that it "
            f"runs and knows this node's AE title {dicom.ae_title}"
        )
    contexts = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id or 0)
                for cx in assoc.accepted_contexts if cx.transfer_syntax}
    direct = _DirectStore(assoc) if _DirectStore.usable(assoc) else None
    t0 = time.perf_counter()
    try:
        with direct if direct is not None else nullcontext():
            for i, (path, f) in enumerate(zip(paths, files, strict=True)):
                message_id = i % 0xFFFF + 1
                if isinstance(f, str):
                    results.append((path, None, f))
                elif not assoc.is_established:
                    results.append((path, None, "association ended before this file"))
                elif (f.sop_class_uid, f.transfer_syntax_uid) not in contexts:
                    results.append((path, None, f"{peer.name} did not accept SOP class "
                                    f"{f.sop_class_uid} in transfer syntax {f.transfer_syntax_uid}"))
                elif direct is not None:
                    cx = contexts[(f.sop_class_uid, f.transfer_syntax_uid)]
                    results.append((path, *direct.store(f, cx, message_id)))
                else:
                    results.append((path, *_pynetdicom_store(assoc, path, message_id)))
                if progress is not None:
                    progress()
    finally:
        if assoc.is_established:
            assoc.release()
    logger.debug("C-STORE of %d files to %s in %.2f s", len(paths), peer.name,
                 time.perf_counter() - t0)
    return results
