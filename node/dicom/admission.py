"""Admission of associations: a deadline for the request, and slots for admitted associations only.

pynetdicom reads a connection's A-ASSOCIATE-RQ with a blocking ``recv`` on a socket
without a timeout and looks at its ACSE timer only between reads, so a connection
that sends one byte, or a byte now and then, would hold its threads for good; and
its ``maximum_associations`` counts those connections, so a few dozen of them
answer a real peer "local limit exceeded".  :class:`Admission` (used by
:class:`node.dicom.scp.StoreSCP` from pynetdicom's public events) gives each new
connection ``request_timeout`` seconds: the socket's timeout bounds each read, the
association's ACSE timeout bounds the wait for the request, and a timer shuts the
socket down (ending a blocked ``recv`` at once) when the request is late.  Once the
request is in, the socket's timeout becomes ``network_timeout`` (a peer stalling in
the middle of a PDU is dropped after it) and ``max_associations`` counts only the
associations admitted here.

What pynetdicom 3.0 does, seen from outside: a read that times out, or a socket shut
down under it, ends in its "transport connection closed" event (the association
aborts, the socket is closed, both threads end); a timed-out read is logged at ERROR
with its traceback, a short read without, so the socket's timeout during the request
is a second longer than the timer's, which normally ends the read first.
"""

from __future__ import annotations

import logging
import socket
import threading
import weakref
from collections.abc import Callable

from pynetdicom.association import Association
from pynetdicom.events import Event

from node.settings import DicomSettings

__all__ = ["NO_PYNETDICOM_LIMIT", "Admission"]

logger = logging.getLogger(__name__)

NO_PYNETDICOM_LIMIT = 1 << 30
"""pynetdicom's ``maximum_associations``: high enough never to apply (:class:`Admission` limits)."""


def _raw_socket(assoc: Association) -> socket.socket | None:
    sock = assoc.dul.socket
    return sock.socket if sock is not None else None


def _set_timeout(assoc: Association, seconds: float) -> None:
    """Bound each blocking read and write on the association's socket."""
    raw = _raw_socket(assoc)
    if raw is not None:
        try:
            raw.settimeout(seconds)
        except OSError:  # the connection is already closed
            pass


class Admission:
    """Connections still owing their request (with the timer that closes them) and the
    associations admitted so far.

    Parameters
    ----------
    settings:
        ``[dicom]``: ``request_timeout``, ``network_timeout``, ``acse_timeout``,
        ``max_associations``.
    record_refusal:
        Records a refused association (``action``, ``detail``) in the audit log.
    """

    def __init__(self, settings: DicomSettings, record_refusal: Callable[[str, str], None]) -> None:
        self.settings = settings
        self.record_refusal = record_refusal
        self.lock = threading.Lock()
        self.waiting: dict[Association, threading.Timer] = {}
        self.admitted: weakref.WeakSet[Association] = weakref.WeakSet()

    def on_connection(self, event: Event) -> None:
        """``EVT_CONN_OPEN``: start the connection's ``request_timeout``."""
        assoc = event.assoc
        timeout = self.settings.request_timeout
        _set_timeout(assoc, timeout + 1.0)  # a backstop: the timer below acts first
        assoc.acse_timeout = timeout
        timer = threading.Timer(timeout, self._overdue, (assoc,))
        timer.daemon = True
        with self.lock:
            self.waiting[assoc] = timer
        timer.start()

    def _overdue(self, assoc: Association) -> None:
        with self.lock:
            if self.waiting.pop(assoc, None) is None:
                return  # the request came meanwhile
        logger.info("a connection from %s sent no association request within %g s; closed",
                    assoc.requestor.address, self.settings.request_timeout)
        raw = _raw_socket(assoc)
        if raw is not None:
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed already

    def requested(self, assoc: Association) -> None:
        """The request arrived (``EVT_REQUESTED``): stop its timer, set the normal timeouts."""
        with self.lock:
            timer = self.waiting.pop(assoc, None)
        if timer is not None:
            timer.cancel()
        _set_timeout(assoc, self.settings.network_timeout)
        assoc.acse_timeout = self.settings.acse_timeout

    def admit(self, assoc: Association, calling: str, address: str) -> bool:
        """Take a slot for a request from a peer the node accepts; with all
        ``max_associations`` slots taken, reject it (transient, local limit exceeded) and
        record why."""
        limit = self.settings.max_associations
        with self.lock:
            busy = sum(1 for a in self.admitted if a.is_alive() and a is not assoc)
            if busy < limit:
                self.admitted.add(assoc)
                return True
        self.record_refusal(
            "association-refused",
            f"calling AE title {calling!r} from {address}: {busy} associations are open, "
            f"[dicom] max_associations is {limit}; the peer may try again later")
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        assoc.kill()  # pynetdicom then skips its own negotiation (the request was rejected)
        return False
