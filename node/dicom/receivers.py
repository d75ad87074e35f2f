"""Receiving in several processes: ``[dicom] receivers`` above 1.

``serve`` opens the DICOM port once and starts the receiver processes
(:class:`ReceiverPool`); each runs a :class:`node.dicom.scp.StoreSCP` with its own
database engine and accepts associations from that one shared listening
socket.  A receiver accepts only while it has no more open associations than
the least busy live receiver (:func:`_accept_loop`; each publishes its count and
a heartbeat in shared memory), so four senders on two receivers are served two
and two.  (Separate ``SO_REUSEPORT`` sockets, tried first, let the kernel hash
connections to processes: four associations landed 3 + 1 or 4 + 0 in two runs
out of three, and one process then did most of the work.)

A receiver that dies is restarted; on :meth:`ReceiverPool.stop` every receiver
gets SIGTERM (SIGKILL after ``grace`` seconds), and one whose parent dies exits
by itself (Linux parent-death signal, and end of file on its pipe).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import MutableSequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from node.db import make_engine, make_session_factory
from node.dicom.catalog import Catalog
from node.dicom.scp import StoreSCP
from node.dicom.storage import InstanceStore
from node.errors import ConfigError
from node.settings import Settings

__all__ = ["ReceiverPool", "receiver_count", "run_receiver"]

logger = logging.getLogger(__name__)

_STARTING_SECONDS = 0.05
"""An accepted connection counts as open for this long before its association thread shows."""
_HEARTBEAT_SECONDS = 1.0
"""A receiver that has not published its count for this long is left out of the comparison."""
_BUSY_WAIT_SECONDS = 0.003
"""How often a receiver that is not the least busy looks again."""


def receiver_count(settings: Settings) -> int:
    """``[dicom] receivers`` with 0 resolved to the number of CPU cores (at most 8)."""
    n = settings.dicom.receivers
    return n if n > 0 else max(1, min(8, os.cpu_count() or 1))


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc


class ReceiverPool:
    """``[dicom] receivers`` child processes sharing the node's listening socket.

    Each child has its own database engine; SQLite serialises their short write
    transactions (``BEGIN IMMEDIATE`` on a lock file).  See the module
    docstring for how associations are spread over the children.
    """

    def __init__(self, settings: Settings, count: int, *, grace: float = 10.0) -> None:
        self.settings = settings
        self.count = count
        self.grace = grace
        self._ctx = multiprocessing.get_context("spawn")
        self._children: list[tuple[BaseProcess, Connection]] = []
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._listener: socket.socket | None = None
        # per receiver: open associations, and the wall-clock time it last published it
        self._loads = self._ctx.Array("d", 2 * count, lock=False)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p, _ in self._children if p.pid is not None and p.is_alive()]

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    def _launch(self, index: int) -> tuple[BaseProcess, Connection]:
        parent_end, child_end = self._ctx.Pipe()
        self._loads[2 * index] = 0.0
        self._loads[2 * index + 1] = 0.0
        proc = self._ctx.Process(target=run_receiver,
                                 args=(self.settings, index, child_end, self._listener, self._loads),
                                 name=f"lungnode-receiver-{index}", daemon=False)
        proc.start()
        child_end.close()
        return proc, parent_end

    @staticmethod
    def _await_ready(index: int, proc: BaseProcess, parent_end: Connection) -> None:
        if not parent_end.poll(120):
            proc.kill()
            raise ConfigError(f"receiver process {index} did not start within 120 s")
        try:
            kind, detail = parent_end.recv()
        except EOFError:
            kind, detail = "error", f"receiver process {index} exited with code {proc.exitcode}"
        if kind != "ready":
            proc.join(5)
            raise ConfigError(str(detail))

    def _spawn(self, index: int) -> tuple[BaseProcess, Connection]:
        child = self._launch(index)
        self._await_ready(index, *child)
        return child

    def start(self) -> None:
        """Open the port, start every receiver (in parallel) and return once all of them accept."""
        self._listener = _listening_socket(self.settings.dicom.host, self.settings.dicom.port)
        try:
            for i in range(self.count):
                self._children.append(self._launch(i))
            for i, child in enumerate(self._children):
                self._await_ready(i, *child)
        except BaseException:
            self.stop()
            raise
        self._monitor = threading.Thread(target=self._watch, name="receiver-monitor", daemon=True)
        self._monitor.start()
        logger.info("%d receiver processes on port %d: %s", self.count, self.port, self.pids)

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            for i, (proc, conn) in enumerate(self._children):
                if proc.is_alive() or self._stopping.is_set():
                    continue
                logger.error("receiver process %d (pid %s) ended with code %s; starting another",
                             i, proc.pid, proc.exitcode)
                conn.close()
                try:
                    self._children[i] = self._spawn(i)
                except ConfigError as exc:
                    logger.error("%s", exc)

    def stop(self) -> None:
        self._stopping.set()
        for proc, _ in self._children:
            if proc.is_alive():
                proc.terminate()
        for proc, conn in self._children:
            proc.join(self.grace)
            if proc.is_alive():
                logger.warning("receiver pid %s did not stop in %.0f s; killing it", proc.pid,
                               self.grace)
                proc.kill()
                proc.join(5)
            conn.close()
        if self._monitor is not None:
            self._monitor.join(5)
        self._children.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None


def _accept_loop(listener: socket.socket, scp: StoreSCP, loads: MutableSequence[float], index: int,
                 stop: threading.Event) -> None:
    """Accept associations on the shared socket while this receiver is among the least busy.

    Publishes ``loads[2 * index]`` (open associations, counting connections
    accepted in the last :data:`_STARTING_SECONDS` whose association has not
    started yet) and ``loads[2 * index + 1]`` (a heartbeat).  Ties all accept;
    the kernel gives each connection to one of them.
    """
    listener.setblocking(False)  # shared: another receiver may take the connection first
    n = len(loads) // 2
    starting: deque[float] = deque()
    while not stop.is_set():
        now = time.monotonic()
        while starting and now - starting[0] > _STARTING_SECONDS:
            starting.popleft()
        mine = scp.active_associations + len(starting)
        wall = time.time()
        loads[2 * index] = float(mine)
        loads[2 * index + 1] = wall
        others = [loads[2 * j] for j in range(n)
                  if j != index and wall - loads[2 * j + 1] < _HEARTBEAT_SECONDS]
        if others and mine > min(others):
            stop.wait(_BUSY_WAIT_SECONDS)
            continue
        try:
            ready, _, _ = select.select([listener], [], [], 0.02)
        except (OSError, ValueError):  # the socket was closed: the process is stopping
            return
        if not ready:
            continue
        try:
            conn, address = listener.accept()
        except (BlockingIOError, InterruptedError):  # another receiver took it
            continue
        except OSError as exc:  # e.g. out of file descriptors: wait, then try again
            logger.error("accept failed: %s", exc)
            stop.wait(0.1)
            continue
        starting.append(time.monotonic())
        loads[2 * index] = float(mine + 1)
        scp.serve_connection(conn, address)


def run_receiver(settings: Settings, index: int, parent: Connection, listener: socket.socket,
                 loads: MutableSequence[float]) -> None:
    """Entry point of one receiver process (spawned by :class:`ReceiverPool`).

    Accepts on the node's ``listener`` with its own database engine until
    SIGTERM or SIGINT, or until the parent goes away (``parent`` reaches end of
    file; on Linux the kernel also sends SIGKILL when the parent dies).
    Reports ``("ready", pid)`` or ``("error", message)`` on ``parent`` once.
    """
    _die_with_parent()
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s receiver-{index} %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def watch_parent() -> None:
        try:
            parent.recv()
        except (EOFError, OSError):
            pass
        if not stop.is_set():  # the parent died without stopping us: stop at once
            os._exit(0)

    engine = make_engine(settings.database.url, echo=settings.database.echo,
                         durable=settings.storage.fsync)
    store = InstanceStore(settings.storage.root, min_free_mb=settings.storage.min_free_mb,
                          fsync=settings.storage.fsync)
    scp = StoreSCP(settings.dicom, settings.peers, store,
                   Catalog(make_session_factory(engine), shared_sqlite=True))
    try:
        scp.start(listen=False)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which refuses to start
        parent.send(("error", f"receiver {index} cannot start: {exc}"))
        raise SystemExit(1) from exc
    accepting = threading.Thread(target=_accept_loop, args=(listener, scp, loads, index, stop),
                                 name="receiver-accept", daemon=True)
    accepting.start()
    parent.send(("ready", os.getpid()))
    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    stop.wait()
    accepting.join(1)
    listener.close()
    scp.stop()
    engine.dispose()


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent exits."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        logger.debug("prctl(PR_SET_PDEATHSIG) not available")


_PR_SET_PDEATHSIG = 1
