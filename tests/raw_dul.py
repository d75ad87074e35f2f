"""A DICOM upper layer client written by hand, for hostile tests: it sends exactly the bytes given.

pynetdicom and DCMTK both parse and re-encode what they send, so neither can send a data
set with a repeated tag, an element longer than the data set, or a deflated "bomb".  This
client encodes the A-ASSOCIATE-RQ, the C-STORE-RQ command (with pynetdicom's
:func:`~pynetdicom.dsutils.encode`) and the P-DATA-TF PDUs itself (PS3.8 9.3), and
sends the data set's bytes as they are.

Import it as ``tests.raw_dul`` (benchmarks put the repository root on ``sys.path``).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

__all__ = ["RawAssociation", "associate_rq", "c_store_raw", "pdu"]

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.9.7156.1"


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _uid(uid: str) -> bytes:
    return uid.encode("ascii")


def pdu(kind: int, body: bytes) -> bytes:
    """One PDU: type, reserved byte, 4-byte length, body."""
    return struct.pack(">BBI", kind, 0, len(body)) + body


def associate_rq(called: str, calling: str, contexts: list[tuple[int, str, list[str]]],
                 max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing ``contexts`` ``(id, abstract syntax, transfer syntaxes)``."""
    body = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
    body += _item(0x10, APPLICATION_CONTEXT)
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, _uid(abstract)) + b"".join(_item(0x40, _uid(ts)) for ts in syntaxes)
        body += _item(0x20, bytes([cid, 0, 0, 0]) + sub)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, IMPLEMENTATION_UID)
    body += _item(0x50, user)
    return pdu(0x01, body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        piece = sock.recv(n - len(out))
        if not piece:
            raise ConnectionError(f"connection closed after {len(out)} of {n} bytes")
        out += piece
    return bytes(out)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """The next PDU's type and body."""
    kind, _, length = struct.unpack(">BBI", _recv_exact(sock, 6))
    return kind, _recv_exact(sock, length)


@dataclass
class RawAssociation:
    """An association opened with :func:`associate_rq`; ``accepted`` maps context ids to the
    transfer syntax the node accepted."""

    sock: socket.socket
    accepted: dict[int, str]
    max_pdu: int

    @classmethod
    def open(cls, port: int, calling: str, contexts: list[tuple[int, str, list[str]]],
             called: str = "LUNGNODE", timeout: float = 60) -> RawAssociation:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        sock.sendall(associate_rq(called, calling, contexts))
        kind, body = read_pdu(sock)
        if kind != 0x02:
            sock.close()
            raise ConnectionError(f"association not accepted: PDU type {kind:#04x}")
        accepted: dict[int, str] = {}
        max_pdu = 16384
        i = 68
        while i + 4 <= len(body):
            item, length = body[i], struct.unpack(">H", body[i + 2:i + 4])[0]
            value = body[i + 4:i + 4 + length]
            if item == 0x21 and value[2] == 0:
                accepted[value[0]] = value[8:].decode().rstrip("\0")
            elif item == 0x50 and value[:1] == b"\x51":
                max_pdu = struct.unpack(">I", value[4:8])[0] or 1 << 20
            i += 4 + length
        return cls(sock, accepted, max_pdu)

    def _send_pdvs(self, cid: int, data: bytes, command: bool) -> None:
        chunk = max(min(self.max_pdu, 1 << 16) - 12, 256)
        pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] or [b""]
        for n, piece in enumerate(pieces):
            control = (1 if command else 0) | (2 if n == len(pieces) - 1 else 0)
            pdv = struct.pack(">IBB", len(piece) + 2, cid, control) + piece
            self.sock.sendall(pdu(0x04, pdv))

    def c_store(self, cid: int, sop_class: str, sop_instance: str, data: bytes,
                msg_id: int = 1) -> int | None:
        """Send one C-STORE-RQ with ``data`` as its data set, verbatim; the response's Status,
        or ``None`` when the node aborted or closed the association instead."""
        cmd = Dataset()
        cmd.AffectedSOPClassUID = sop_class
        cmd.CommandField = 0x0001
        cmd.MessageID = msg_id
        cmd.Priority = 0
        cmd.CommandDataSetType = 0x0000
        cmd.AffectedSOPInstanceUID = sop_instance
        body = encode(cmd, True, True)
        assert body is not None
        cmd.CommandGroupLength = len(body)
        encoded = encode(cmd, True, True)
        assert encoded is not None
        try:
            self._send_pdvs(cid, encoded, True)
            self._send_pdvs(cid, data, False)
            while True:
                kind, pbody = read_pdu(self.sock)
                if kind != 0x04:
                    return None  # A-ABORT or another PDU: no status
                if pbody[5] & 1:  # command fragment: the response
                    rsp = decode(BytesIO(pbody[6:]), True, True)
                    return int(rsp.Status)
        except (ConnectionError, OSError):
            return None

    def release(self) -> bool:
        """A-RELEASE-RQ; whether the node answered A-RELEASE-RP."""
        try:
            self.sock.sendall(pdu(0x05, bytes(4)))
            kind, _ = read_pdu(self.sock)
            return kind == 0x06
        except (ConnectionError, OSError):
            return False
        finally:
            self.sock.close()


def c_store_raw(port: int, sop_class: str, transfer_syntax: str, sop_instance: str,
                data: bytes, calling: str = "PACS") -> int | None:
    """One association, one C-STORE of ``data`` (the encoded data set), released."""
    assoc = RawAssociation.open(port, calling, [(1, sop_class, [transfer_syntax])])
    try:
        if 1 not in assoc.accepted:
            raise ConnectionError(f"the node accepted no context for {transfer_syntax}")
        return assoc.c_store(1, sop_class, sop_instance, data)
    finally:
        assoc.release()
