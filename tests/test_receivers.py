"""The receivers' accept rule (node.dicom.receivers._accept_loop) on a real listening socket.

A receiver accepts only while it has no more open associations than the least
busy live receiver; a receiver whose heartbeat is stale (dead, restarting) is
left out of the comparison.  The processes themselves are exercised by
tests/test_node.py and tests/test_crash.py.
"""

from __future__ import annotations

import socket
import threading
import time

from node.dicom.receivers import _accept_loop


class _FakeSCP:
    def __init__(self, active: int) -> None:
        self.active_associations = active
        self.served: list[socket.socket] = []

    def serve_connection(self, conn: socket.socket, address: tuple[str, int]) -> None:
        self.served.append(conn)
        self.active_associations += 1  # the association stays open


def _until(check, seconds: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return bool(check())


def test_a_busy_receiver_leaves_connections_to_a_less_busy_live_one() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()
    loads = [0.0] * 4  # receiver 0: the loop under test; receiver 1: another, idle
    busy = _FakeSCP(active=3)
    stop = threading.Event()
    beating = threading.Event()

    def other_is_alive() -> None:  # receiver 1 publishes 0 open associations and a heartbeat
        while not beating.is_set():
            loads[2], loads[3] = 0.0, time.time()
            beating.wait(0.02)

    heart = threading.Thread(target=other_is_alive, daemon=True)
    heart.start()
    time.sleep(0.05)
    loop = threading.Thread(target=_accept_loop, args=(listener, busy, loads, 0, stop), daemon=True)
    loop.start()
    client = socket.create_connection(address)
    try:
        assert not _until(lambda: busy.served, 0.3), "a busy receiver accepted while another was idle"
        assert loads[0] == 3.0 and time.time() - loads[1] < 1.0  # it publishes its own count
        # the other receiver stops publishing (it died): after the heartbeat limit the busy one
        # is the least busy live receiver and takes the waiting connection
        beating.set()
        heart.join()
        assert _until(lambda: len(busy.served) == 1, 3.0), "the waiting connection was never accepted"
    finally:
        beating.set()
        stop.set()
        loop.join(1)
        for c in [client, *busy.served]:
            c.close()
        listener.close()


def test_four_associations_go_two_and_two() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()
    loads = [0.0] * 4
    first, second = _FakeSCP(active=0), _FakeSCP(active=0)
    stop = threading.Event()
    loops = [threading.Thread(target=_accept_loop, args=(listener, scp, loads, i, stop), daemon=True)
             for i, scp in enumerate((first, second))]
    for t in loops:
        t.start()
    clients = []
    try:
        for n in range(1, 5):
            clients.append(socket.create_connection(address))
            assert _until(lambda n=n: len(first.served) + len(second.served) == n, 3.0)  # type: ignore[misc]
        # an accepted association stays open: the receiver that took one is busier, so the
        # other takes the next
        assert (len(first.served), len(second.served)) == (2, 2)
    finally:
        stop.set()
        for t in loops:
            t.join(1)
        for c in clients + first.served + second.served:
            c.close()
        listener.close()
