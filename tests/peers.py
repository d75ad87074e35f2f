"""Real DICOM peers for tests and benchmarks: Orthanc, and the DCMTK tools of :mod:`tests.dcmtk`.

Every peer is a real process on 127.0.0.1 with free ports and its own folders, so
two test runs side by side do not collide.  Orthanc and the DCMTK tools are
started with ``TCP_NODELAY=1`` by default: without it each instance waits about
40 ms for a delayed TCP acknowledgement (see the project's DICOM notes).

Import it as ``tests.peers`` (benchmarks put the repository root on ``sys.path``).
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import pydicom
from pynetdicom import AE, evt
from pynetdicom.events import Event, EventHandlerType

from tests.dcmtk import (
    PROPOSE_OPTIONS,
    PeerError,
    StoreSCP,
    dicom_files,
    echoscu,
    env_for,
    free_port,
    stop_process,
    storescu,
    wait_for,
)

__all__ = [
    "ORTHANC_BIN",
    "PROPOSE_OPTIONS",
    "Orthanc",
    "OrthancError",
    "PeerError",
    "StoreSCP",
    "c_store_all",
    "dicom_files",
    "echoscu",
    "free_port",
    "read_orthanc_json",
    "storescu",
    "wait_for",
]

logger = logging.getLogger(__name__)

ORTHANC_BIN = "/usr/sbin/Orthanc"


class OrthancError(PeerError):
    """An Orthanc REST call was answered with an HTTP error status."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"Orthanc answered {method} {path} with HTTP {status}: {body[:2000]}")
        self.method, self.path, self.status, self.body = method, path, status, body


def read_orthanc_json(path: Path) -> dict[str, Any]:
    """Read an Orthanc configuration file: JSON with ``//`` and ``/* */`` comments."""
    text = Path(path).read_text()
    out: list[str] = []
    i, n, in_string = 0, len(text), False
    while i < n:
        c = text[i]
        if in_string:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
            out.append(c)
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise ValueError(f"{path}: comment opened at character {i} is never closed")
            i = end + 2
            continue
        else:
            out.append(c)
        i += 1
    config = json.loads("".join(out))
    if not isinstance(config, dict):
        raise ValueError(f"{path}: an Orthanc configuration is a JSON object")
    return config


class Orthanc:
    """An Orthanc server with its own configuration and storage in ``workdir``.

    Use as a context manager: entering writes ``workdir/orthanc.json``, starts
    Orthanc and waits until its REST API answers; leaving stops it.

    Parameters
    ----------
    workdir
        Folder for the configuration, the storage, the index and ``orthanc.log``.
    aet
        Orthanc's AE title.
    modalities
        ``DicomModalities``: name -> (AE title, host, port).
    stable_age
        ``StableAge`` in seconds (when ``OnStableStudy`` runs); default 60.
    lua_scripts
        ``LuaScripts``.
    concurrent_jobs, http_timeout, check_called_aet
        ``ConcurrentJobs``, ``HttpTimeout``, ``DicomCheckCalledAet``.
    base_config
        A configuration to start from (e.g. :func:`read_orthanc_json` of the
        deployed file); the harness still sets its own ports, AE title, folders,
        local-only REST access without authentication and no plugins.
    tcp_nodelay
        Start Orthanc with ``TCP_NODELAY=1``.
    extra
        Keys applied last, over everything else.
    """

    def __init__(self, workdir: Path, *, aet: str = "ORTHANC",
                 modalities: Mapping[str, tuple[str, str, int]] | None = None,
                 stable_age: int | None = None, lua_scripts: Sequence[Path] | None = None,
                 concurrent_jobs: int | None = None, http_timeout: int | None = None,
                 check_called_aet: bool | None = None, base_config: Mapping[str, Any] | None = None,
                 tcp_nodelay: bool = True, extra: Mapping[str, Any] | None = None) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        self.tcp_nodelay = tcp_nodelay
        defaults: dict[str, Any] = {
            "StableAge": 60, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True, "ConcurrentJobs": 2, "HttpTimeout": 60,
            "DicomScuTimeout": 30, "StorageCompression": False, "SaveJobs": False,
            "DicomModalities": {}, "LuaScripts": [],
        }
        owned: dict[str, Any] = {
            "Name": f"lungnode-test-{uuid.uuid4().hex[:12]}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": aet, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
        }
        given = {"StableAge": stable_age, "ConcurrentJobs": concurrent_jobs,
                 "HttpTimeout": http_timeout, "DicomCheckCalledAet": check_called_aet,
                 "DicomModalities": None if modalities is None
                 else {k: list(v) for k, v in modalities.items()},
                 "LuaScripts": None if lua_scripts is None else [str(p) for p in lua_scripts]}
        self.config: dict[str, Any] = (defaults | dict(base_config or {}) | owned
                                       | {k: v for k, v in given.items() if v is not None}
                                       | dict(extra or {}))
        self.aet = str(self.config["DicomAet"])
        self.dicom_port, self.http_port = int(self.config["DicomPort"]), int(self.config["HttpPort"])
        self._ports_fixed = bool({"DicomPort", "HttpPort"} & set(extra or {}))
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """Process id of the running Orthanc, None when it is not running."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def __enter__(self) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 4):
            try:
                self._start()
                return self
            except PeerError as exc:  # a port taken since free_port(): take others
                if attempt == 3 or self._ports_fixed or "already in use" not in str(exc):
                    raise
                logger.info("Orthanc could not bind its ports; trying other ports (%s)", exc)
                self.dicom_port, self.http_port = free_port(), free_port()
                self.config |= {"DicomPort": self.dicom_port, "HttpPort": self.http_port}
        raise AssertionError("not reached")

    def _start(self) -> None:
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self._log = self.log_path.open("wb")
        logger.debug("starting Orthanc %s: DICOM port %d, HTTP port %d", self.aet, self.dicom_port,
                     self.http_port)
        self._proc = subprocess.Popen([ORTHANC_BIN, str(self.config_path)], env=env_for(self.tcp_nodelay),
                                      stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        try:
            wait_for(self._ready, 90, 0.05, "Orthanc to answer on its REST port")
        except TimeoutError as exc:
            self._shutdown()
            raise PeerError(f"Orthanc did not answer on port {self.http_port} within 90 s; "
                            f"its log ends with:\n{self.log_tail()}") from exc
        except BaseException:
            self._shutdown()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, 15)
        self._proc = None
        if self._log is not None:
            self._log.close()
        self._log = None

    def _ready(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise PeerError(f"Orthanc exited with status {self._proc.returncode} while starting; "
                            f"its log ends with:\n{self.log_tail()}")
        try:  # this Orthanc, not another program on the port
            return bool(self.request("GET", "/system", timeout=2).get("Name") == self.config["Name"])
        except (urllib.error.URLError, OSError, OrthancError, ValueError, AttributeError):
            return False

    def log_text(self) -> str:
        """Everything Orthanc has logged so far (Lua ``print`` lines included)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 3000) -> str:
        """The last ``n`` characters of the log."""
        return self.log_text()[-n:]

    # -- REST ---------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, *, raw: bool = False,
                timeout: float = 120) -> Any:
        """One REST call; ``body`` is JSON-encoded unless it is bytes or str.

        Returns the decoded JSON answer (None when empty), or bytes with ``raw``.

        Raises
        ------
        OrthancError
            On an HTTP error status, with Orthanc's answer.
        """
        data: bytes | None = None
        if isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode()
        elif body is not None:
            data = json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data,
                                     method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                payload: bytes = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise OrthancError(method, path, exc.code, detail) from exc
        if raw:
            return payload
        return json.loads(payload) if payload else None

    def get(self, path: str) -> Any:
        """GET ``path`` and decode the JSON answer."""
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        """POST ``body`` (JSON; bytes or str sent as they are) to ``path``."""
        return self.request("POST", path, {} if body is None else body)

    def put(self, path: str, body: Any) -> Any:
        """PUT ``body`` to ``path``."""
        return self.request("PUT", path, body)

    def delete(self, path: str) -> Any:
        """DELETE ``path``."""
        return self.request("DELETE", path)

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Add or replace the DICOM modality ``name``."""
        self.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def echo(self, modality: str) -> bool:
        """C-ECHO the modality; False when it does not answer or refuses."""
        try:
            self.post(f"/modalities/{modality}/echo", {})
            return True
        except OrthancError:
            return False

    def store_to_modality(self, modality: str, resources: list[str], synchronous: bool = True) -> Any:
        """C-STORE studies/series/instances (Orthanc ids) to a modality.

        Synchronous calls return once every instance was acknowledged and raise
        :class:`OrthancError` when the store failed; asynchronous ones return the job.
        """
        return self.post(f"/modalities/{modality}/store",
                         {"Resources": resources, "Synchronous": synchronous})

    def upload(self, path: Path) -> Any:
        """Store one DICOM file through the REST API."""
        return self.post("/instances", Path(path).read_bytes())

    def studies(self) -> list[str]:
        """Orthanc ids of all studies."""
        return [str(s) for s in self.get("/studies")]

    def count_instances(self) -> int:
        """How many instances Orthanc holds."""
        return int(self.get("/statistics")["CountInstances"])

    def find(self, uid: str, level: str = "Study") -> str | None:
        """Orthanc's id of the study/series/instance with this DICOM UID, None if absent."""
        for hit in self.post("/tools/lookup", uid) or []:
            if hit.get("Type") == level:
                return str(hit["ID"])
        return None

    def find_study(self, study_instance_uid: str) -> str | None:
        """Orthanc's id of the study with this Study Instance UID, None if absent."""
        return self.find(study_instance_uid, "Study")

    def study_instances(self, orthanc_study_id: str) -> list[dict[str, Any]]:
        """Instances of a study: ``ID`` (Orthanc's) and SOPClassUID, SOPInstanceUID,
        SeriesInstanceUID, Modality."""
        out = []
        for series in self.get(f"/studies/{orthanc_study_id}/series"):
            tags = series["MainDicomTags"]
            for inst in self.get(f"/series/{series['ID']}/instances"):
                out.append({
                    "ID": inst["ID"],
                    "SOPClassUID": self.request("GET", f"/instances/{inst['ID']}/metadata/SopClassUid",
                                                raw=True).decode(),
                    "SOPInstanceUID": inst["MainDicomTags"].get("SOPInstanceUID"),
                    "SeriesInstanceUID": tags.get("SeriesInstanceUID"),
                    "Modality": tags.get("Modality"),
                })
        return out

    def instance_file(self, orthanc_instance_id: str) -> bytes:
        """The DICOM file as Orthanc stored it."""
        return bytes(self.request("GET", f"/instances/{orthanc_instance_id}/file", raw=True))

    def instance_dataset(self, orthanc_instance_id: str) -> pydicom.Dataset:
        """The stored instance read with pydicom."""
        return pydicom.dcmread(io.BytesIO(self.instance_file(orthanc_instance_id)))

    wait_for = staticmethod(wait_for)


def c_store_all(port: int, items: Sequence[pydicom.Dataset | Path], calling: str,
                contexts: Sequence[tuple[str, str]], called: str = "LUNGNODE") -> list[pydicom.Dataset]:
    """pynetdicom's ``send_c_store`` of each item to the node on 127.0.0.1:``port``, in order.

    Returns each response's status data set (empty when there was none).  Like
    :func:`node.dicom.scu.send_files`, it records each C-STORE response as it is
    decoded (``EVT_DIMSE_RECV``): when pynetdicom's reactor takes a response that
    arrived (the race that module describes), the recorded status is returned
    and the remaining items go over a new association.
    """
    ae = AE(ae_title=calling)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    seen: dict[int, pydicom.Dataset] = {}

    def record(event: Event) -> None:
        command = event.message.command_set  # type: ignore[attr-defined]
        if command.get("CommandField") == 0x8001:  # C-STORE-RSP
            seen[int(command.MessageIDBeingRespondedTo)] = command

    handlers: list[EventHandlerType] = [(evt.EVT_DIMSE_RECV, record)]
    assoc = ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=handlers)
    assert assoc.is_established, f"the node on port {port} refused the association"
    out: list[pydicom.Dataset] = []
    try:
        for i, item in enumerate(items, start=1):
            if not assoc.is_established and out and "Status" in out[-1]:
                assoc = ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=handlers)
            if not assoc.is_established:
                out.append(pydicom.Dataset())
                continue
            status = assoc.send_c_store(item, msg_id=i)
            if "Status" not in status and i in seen:
                logger.warning("pynetdicom lost the response to C-STORE %d; the recorded one is used", i)
                status = seen[i]
            out.append(status)
    finally:
        if assoc.is_established:
            assoc.release()
    return out
