"""DCMTK peers for tests and benchmarks: storescu, echoscu, storescp, and free ports.

Every tool runs on 127.0.0.1 with ``TCP_NODELAY=1`` by default: without it each
instance waits about 40 ms for a delayed TCP acknowledgement (see the project's
DICOM notes).  :mod:`tests.peers` re-exports all of it next to Orthanc.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

__all__ = [
    "PROPOSE_OPTIONS",
    "PeerError",
    "StoreSCP",
    "dicom_files",
    "echoscu",
    "env_for",
    "free_port",
    "stop_process",
    "storescu",
    "wait_for",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: storescu option that proposes a compressed transfer syntax (and all uncompressed ones)
PROPOSE_OPTIONS: dict[str, str] = {
    "1.2.840.10008.1.2.4.70": "--propose-lossless",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.50": "--propose-jpeg8",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "--propose-jpeg12",  # JPEG Extended
    "1.2.840.10008.1.2.4.90": "--propose-j2k-lossless",
    "1.2.840.10008.1.2.4.91": "--propose-j2k-lossy",
    "1.2.840.10008.1.2.4.80": "--propose-jls-lossless",
    "1.2.840.10008.1.2.4.81": "--propose-jls-lossy",
    "1.2.840.10008.1.2.5": "--propose-rle",
    "1.2.840.10008.1.2.1.99": "--propose-deflated",
}
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


class PeerError(RuntimeError):
    """A peer process did not start, or a DCMTK tool failed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Also the way to get "a destination where nothing listens": connections to it
    are refused until something binds it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.1,
             what: str = "condition") -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Raises
    ------
    TimeoutError
        After ``timeout`` seconds, naming ``what`` was awaited.
    """
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def env_for(tcp_nodelay: bool) -> dict[str, str]:
    """This process's environment, with ``TCP_NODELAY=1`` or without any TCP_NODELAY."""
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if tcp_nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Stop a child process: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def dicom_files(paths: Iterable[Path]) -> list[Path]:
    """The files among ``paths`` and under the folders among them (recursively)."""
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return out


def _proposal_for(paths: Iterable[Path]) -> str | None:
    """The storescu option that proposes the files' compressed transfer syntax."""
    found: dict[str, Path] = {}
    for f in dicom_files(paths):
        try:
            ts = str(read_file_meta_info(f).get("TransferSyntaxUID", ""))
        except (InvalidDicomError, OSError):
            continue  # storescu skips such files too (with a warning)
        if ts and ts not in _UNCOMPRESSED:
            found.setdefault(ts, f)
    if not found:
        return None
    unknown = [ts for ts in found if ts not in PROPOSE_OPTIONS]
    if unknown:
        raise ValueError(f"storescu has no option that proposes transfer syntax {unknown[0]} "
                         f"({found[unknown[0]]}); convert the file or pass a -xf profile in extra_args")
    if len(found) > 1:
        raise ValueError(f"the files use {len(found)} compressed transfer syntaxes ({', '.join(found)}); "
                         "storescu proposes one per run: send each kind in its own call")
    return PROPOSE_OPTIONS[next(iter(found))]


def storescu(paths: Iterable[Path], host: str, port: int, called_aet: str,
             calling_aet: str = "STORESCU", *, propose: str | None = "auto",
             tcp_nodelay: bool = True, extra_args: Sequence[str] = (), check: bool = True,
             timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """DCMTK ``storescu`` of files and folders (folders recursively), one association.

    Parameters
    ----------
    paths
        DICOM files and folders.
    host, port, called_aet, calling_aet
        The receiver and the AE titles.
    propose
        Which compressed transfer syntax to propose besides the uncompressed ones:
        ``"auto"`` reads the files' transfer syntaxes (at most one compressed kind
        per call), None proposes only uncompressed ones, a transfer syntax UID or
        a storescu option (``"--propose-rle"``) that one.  Ignored when
        ``extra_args`` already holds a ``-x..`` proposal option.
    tcp_nodelay
        Run with ``TCP_NODELAY=1``.
    extra_args
        More storescu options, before the host.
    check
        Raise :class:`PeerError` when storescu exits with an error.
    timeout
        Seconds before storescu is killed (:class:`PeerError`).

    Returns
    -------
    subprocess.CompletedProcess
        With text ``stdout`` and ``stderr``.
    """
    paths = [Path(p) for p in paths]
    options: list[str] = []
    own_proposal = any(a.startswith(("-x", "--propose")) for a in extra_args)
    if propose is not None and not own_proposal:
        if propose == "auto":
            option = _proposal_for(paths)
        elif propose.startswith("-"):
            option = propose
        elif propose in PROPOSE_OPTIONS:
            option = PROPOSE_OPTIONS[propose]
        else:
            raise ValueError(f"propose={propose!r}: give 'auto', None, a storescu -x option or "
                             f"one of the transfer syntaxes {sorted(PROPOSE_OPTIONS)}")
        options = [option] if option else []
    cmd = ["storescu", "-aec", called_aet, "-aet", calling_aet, "+sd", "+r", *options, *extra_args,
           host, str(port), *map(str, paths)]
    try:
        res = subprocess.run(cmd, env=env_for(tcp_nodelay), capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"storescu to {called_aet}@{host}:{port} did not finish within {timeout} s") from exc
    if check and res.returncode != 0:
        raise PeerError(f"storescu to {called_aet}@{host}:{port} failed (exit {res.returncode}): "
                        f"{res.stderr[-3000:]}")
    return res


def echoscu(host: str, port: int, called_aet: str, calling_aet: str = "ECHOSCU", *,
            tcp_nodelay: bool = True, extra_args: Sequence[str] = (), check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """DCMTK ``echoscu`` (C-ECHO); raises :class:`PeerError` on failure unless ``check=False``."""
    cmd = ["echoscu", "-aec", called_aet, "-aet", calling_aet, *extra_args, host, str(port)]
    try:
        res = subprocess.run(cmd, env=env_for(tcp_nodelay), capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"echoscu to {called_aet}@{host}:{port} did not finish within {timeout} s") from exc
    if check and res.returncode != 0:
        raise PeerError(f"echoscu to {called_aet}@{host}:{port} failed (exit {res.returncode}): "
                        f"{res.stderr[-2000:]}")
    return res


class StoreSCP:
    """DCMTK ``storescp`` on 127.0.0.1 writing what it receives into ``folder``.

    It accepts every transfer syntax it supports and writes each instance as
    received.  With ``refuse`` it listens but rejects every association (a
    destination that is up and refuses); for one where nothing listens, use
    :func:`free_port` and start nothing.  One association at a time.

    storescp writes each file under its final name while the data arrive, so a
    listing can show a file cut short.  It runs a command after each file is
    complete (``--exec-on-reception``); that command leaves a marker of the
    same name in a folder of its own before the C-STORE response goes out
    (``--exec-sync``), and :meth:`files` lists only the files that have one.
    ``echo_args`` go to the echoscu that checks it is up (TLS options for a
    storescp started with ``+tls``).
    """

    def __init__(self, folder: Path, *, port: int | None = None, aet: str = "STORESCP",
                 refuse: bool = False, tcp_nodelay: bool = True,
                 extra_args: Sequence[str] = (), echo_args: Sequence[str] = ()) -> None:
        self.folder = Path(folder)
        self._port_given = port is not None
        self.port = port or free_port()
        self.aet = aet
        self.refuse = refuse
        self.tcp_nodelay = tcp_nodelay
        self.extra_args = tuple(extra_args)
        self.echo_args = tuple(echo_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._done: tempfile.TemporaryDirectory[str] | None = None

    @property
    def pid(self) -> int | None:
        """Process id of the running storescp, None when it is not running."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def __enter__(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 4):
            try:
                self._start()
                return self
            except PeerError as exc:  # a port taken since free_port(): take another
                if attempt == 3 or self._port_given or "already in use" not in str(exc):
                    raise
                logger.info("storescp could not listen on port %d; trying another", self.port)
                self.port = free_port()
        raise AssertionError("not reached")

    def _start(self) -> None:
        self._done = tempfile.TemporaryDirectory(prefix="storescp-done-")
        cmd = ["storescp", "-aet", self.aet, "-od", str(self.folder), "+xa",
               "--exec-on-reception", f"touch '{self._done.name}/#f'", "--exec-sync",
               *self.extra_args]
        if self.refuse:
            cmd.append("--refuse")
        cmd.append(str(self.port))
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(cmd, env=env_for(self.tcp_nodelay), stdout=self._log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_for(self._up, 60, 0.05, f"storescp to listen on port {self.port}")
        except BaseException:
            self._shutdown()
            raise

    def _up(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise PeerError(f"storescp on port {self.port} exited with status {self._proc.returncode}: "
                            f"{self.log_text()[-2000:]}")
        try:  # a short ACSE timeout: something else may hold the port and never answer
            res = echoscu("127.0.0.1", self.port, self.aet, extra_args=("-ta", "2", *self.echo_args),
                          check=False, timeout=5)
        except PeerError:
            return False
        if self.refuse:  # up once it answers, with a rejection
            answered = res.returncode != 0 and "Rejected" in res.stderr + res.stdout
        else:
            answered = res.returncode == 0
        return answered and self._proc.poll() is None  # ours answered, not another program

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, 10)
        self._proc = None
        if self._log is not None:
            self._log.close()
        self._log = None
        if self._done is not None:
            # storescp runs the marker command in a child; one started just before the stop can
            # outlive storescp and write its marker while the folder is being removed: try again
            wait_for(self._remove_markers, 60, 0.05, "storescp's marker folder to be removed")
        self._done = None

    def _remove_markers(self) -> bool:
        assert self._done is not None
        try:
            self._done.cleanup()
        except OSError:  # a marker written while the folder was being removed
            return False
        return True

    def log_text(self) -> str:
        """What storescp printed so far."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def files(self) -> list[Path]:
        """The files received so far, each written to its end."""
        if self._done is None:
            return []
        done = set(os.listdir(self._done.name))
        return sorted(p for p in self.folder.rglob("*") if p.is_file() and p.name in done)

    def wait_for_files(self, count: int, timeout: float = 60) -> list[Path]:
        """Wait until at least ``count`` files were received; return them."""
        def enough() -> list[Path]:
            files = self.files()
            return files if len(files) >= count else []

        try:
            return wait_for(enough, timeout, 0.1, f"{count} files in {self.folder}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; {len(self.files())} arrived") from None
