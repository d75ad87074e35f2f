"""Socket options for the node's associations, set through pynetdicom's public event API.

Shared by the listener (:mod:`node.dicom.scp`) and the sender
(:mod:`node.dicom.scu`): each handler only sets a TCP option on the
association's socket (``event.assoc.dul.socket.socket``).
"""

from __future__ import annotations

import socket

from pynetdicom.events import Event

__all__ = ["no_delay", "quick_ack"]


def no_delay(event: Event) -> None:
    """``EVT_CONN_OPEN`` handler: switch Nagle's algorithm off on the association's socket,
    so that no PDU waits for the peer's delayed acknowledgement (see the DICOM notes)."""
    sock = event.assoc.dul.socket
    raw = sock.socket if sock is not None else None
    if raw is not None and raw.family in (socket.AF_INET, socket.AF_INET6):
        _set(raw, socket.TCP_NODELAY)


def quick_ack(event: Event) -> None:
    """``EVT_PDU_SENT`` handler: acknowledge the peer's response at once (Linux ``TCP_QUICKACK``).

    A peer that keeps Nagle's algorithm on (Orthanc and DCMTK as Debian ships
    them) writes its C-STORE response in pieces and holds each piece until the
    previous one is acknowledged; with delayed acknowledgements that costs
    ~40 ms per file.  The kernel leaves quick-ack mode on its own, so it is
    switched on again after each PDU sent, before the response is read.
    """
    sock = event.assoc.dul.socket
    raw = sock.socket if sock is not None else None
    if raw is not None and hasattr(socket, "TCP_QUICKACK") and raw.family in (
            socket.AF_INET, socket.AF_INET6):
        _set(raw, socket.TCP_QUICKACK)


def _set(raw: socket.socket, option: int) -> None:
    try:
        raw.setsockopt(socket.IPPROTO_TCP, option, 1)
    except OSError:  # the connection is already closed: nothing left to tune
        pass
