"""Network I/O tuning of pynetdicom associations (SCP and SCU).

pynetdicom 3.0 polls: its DUL thread sleeps 1 ms between looks at the socket,
and the association thread sleeps 1 ms between looks at the DIMSE queue.  For
a stream of 512x512 CT images that polling costs a third of the throughput,
and with several associations at once the wake-ups of idle threads compete
for the interpreter.  :func:`tune_connection` (an ``EVT_CONN_OPEN`` handler)
replaces both loops for the node's own associations by event-driven ones and
takes the delayed-ACK trap out of the socket (see ../dicom-notes in the
README).  The loops follow pynetdicom 3.0.4's (pinned in pyproject.toml);
tests/test_ingest.py and tests/test_outbox.py exercise them.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import threading
import time
import types
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.pdu import A_ABORT_RQ

__all__ = ["DUL_POLL_SECONDS", "tune_connection"]

logger = logging.getLogger(__name__)

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
    - reads straight into one buffer of the PDU's size (pynetdicom reads 4 KB
      pieces and appends them);
    - a shorter idle poll of pynetdicom's DUL thread (:data:`DUL_POLL_SECONDS`);
    - as acceptor, the association thread wakes when a DIMSE message is complete
      instead of polling every millisecond (:func:`_acceptor_reactor`), and
      the DUL thread waits in ``select`` for the peer's data or a PDU to send
      instead of polling at all (:func:`_dul_reactor`; not over TLS, where
      ``select`` does not see data the TLS layer has buffered).
    """
    assoc_socket = event.assoc.dul.socket
    raw = getattr(assoc_socket, "socket", None)
    if assoc_socket is None or raw is None:
        return
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    event.assoc.dul._run_loop_delay = DUL_POLL_SECONDS
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if isinstance(raw, socket.socket) and type(raw) is socket.socket:  # not TLS
        assoc_socket.recv = _direct_recv(raw, quickack)  # type: ignore[method-assign,assignment]
    elif quickack is not None:
        recv = assoc_socket.recv

        def recv_quickack(nr_bytes: int) -> bytearray:
            raw.setsockopt(socket.IPPROTO_TCP, quickack, 1)
            return recv(nr_bytes)

        assoc_socket.recv = recv_quickack  # type: ignore[method-assign]
    if event.assoc.is_acceptor:
        event.assoc._run_reactor = types.MethodType(_acceptor_reactor, event.assoc)  # type: ignore[method-assign]
        if isinstance(raw, socket.socket) and type(raw) is socket.socket and not event.assoc.dul.is_alive():
            _wait_in_select(event.assoc.dul, raw)


def _direct_recv(raw: socket.socket, quickack: int | None) -> Callable[[int], bytearray]:
    """``AssociationSocket.recv`` with ``recv_into`` one preallocated buffer."""

    def recv(nr_bytes: int) -> bytearray:
        buf = bytearray(nr_bytes)
        got = 0
        with memoryview(buf) as view:
            while got < nr_bytes:
                if quickack is not None:
                    raw.setsockopt(socket.IPPROTO_TCP, quickack, 1)
                n = raw.recv_into(view[got:])
                if not n:  # connection closed: what was read (as pynetdicom does)
                    break
                got += n
        if got < nr_bytes:
            del buf[got:]
        return buf

    return recv


def _acceptor_reactor(self: Association) -> None:
    """pynetdicom 3.0's ``Association._run_reactor`` (acceptor), except that it
    waits on the DIMSE message queue instead of sleeping 1 ms per turn: a
    C-STORE request is served as soon as its last fragment is decoded.  The
    release, abort and timeout checks still run at least every millisecond."""
    msg_queue = self.dimse.msg_queue
    ready = msg_queue.not_empty
    self._is_paused = False
    while not self._kill:
        with ready:
            if not msg_queue.queue:
                ready.wait(0.001)
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, cast(int, context_id))
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            logger.debug("association released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return
        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return
        if not self.dul.is_alive():
            self.kill()
            return
        if self.dul.idle_timer_expired():
            logger.error("network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


_DUL_WAIT_SECONDS = 0.02
"""Longest wait of the select-based DUL loop: the ARTIM timer and a kill request
are looked at least this often."""


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """The DUL's queue of primitives to send, which also wakes the DUL's ``select``."""

    def __init__(self) -> None:
        super().__init__()
        self.wake_r, self._wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._fd_lock = threading.Lock()
        self._closed = False

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        with self._fd_lock:
            if not self._closed:
                try:
                    os.write(self._wake_w, b"x")
                except BlockingIOError:  # the pipe is full: the DUL is awake anyway
                    pass

    def drain(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        with self._fd_lock:
            if not self._closed:
                self._closed = True
                os.close(self.wake_r)
                os.close(self._wake_w)


def _wait_in_select(dul: DULServiceProvider, raw: socket.socket) -> None:
    """Run ``dul`` with :func:`_dul_reactor` (set before its thread starts)."""
    wake = _WakingQueue()
    dul.to_provider_queue = wake
    dul.run = types.MethodType(lambda self: _dul_reactor(self, raw, wake), dul)  # type: ignore[method-assign]


def _dul_reactor(self: DULServiceProvider, raw: socket.socket, wake: _WakingQueue) -> None:
    """pynetdicom 3.0's ``DULServiceProvider.run_reactor``, except that an idle turn
    waits in ``select`` on the socket and on :class:`_WakingQueue` instead of
    sleeping ``_run_loop_delay`` and polling the socket again."""
    self._idle_timer.start()
    idle = False
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                idle = True
            if idle:
                try:
                    select.select([raw.fileno(), wake.wake_r], [], [], _DUL_WAIT_SECONDS)
                except (OSError, ValueError):  # the socket is closed: the turn below finds out
                    time.sleep(DUL_POLL_SECONDS)
                wake.drain()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - as pynetdicom: abort, never hang
                logger.error("exception in the DUL loop, aborting the association")
                logger.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                cast(Any, self.socket).send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            idle = False
    finally:
        wake.close()
