"""Real DICOM peers for tests and benchmarks: Orthanc, DCMTK storescu/echoscu/storescp."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pydicom

__all__ = ["Orthanc", "StoreSCP", "echoscu", "free_port", "storescu"]

ORTHANC_BIN = "/usr/sbin/Orthanc"


def free_port() -> int:
    """A TCP port that nothing listens on right now (127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tcp_nodelay: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if tcp_nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1,
             what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Orthanc:
    """An Orthanc server with its own configuration and storage in ``workdir``."""

    def __init__(self, workdir: Path, *, aet: str = "ORTHANC",
                 modalities: dict[str, tuple[str, str, int]] | None = None,
                 stable_age: int = 60, lua_scripts: Sequence[Path] = (),
                 tcp_nodelay: bool = True, extra: dict[str, Any] | None = None) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.log_path = self.workdir / "orthanc.log"
        self.tcp_nodelay = tcp_nodelay
        self.config = {
            "Name": "lungnode-test", "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"), "DicomAet": aet,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True, "StableAge": stable_age, "Plugins": [],
            "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
            "LuaScripts": [str(p) for p in lua_scripts], "ConcurrentJobs": 2,
            "HttpTimeout": 60, "DicomScuTimeout": 30, "StorageCompression": False,
        } | (extra or {})
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config, indent=2))
        self._proc = subprocess.Popen([ORTHANC_BIN, str(cfg)], env=_env(self.tcp_nodelay),
                                      stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT)
        try:
            wait_for(self._ready, 30, 0.1, "Orthanc to answer on its REST port")
        except TimeoutError as exc:
            self.__exit__(None, None, None)
            raise RuntimeError(f"Orthanc did not start: {self.log_tail()}") from exc
        return self

    def _ready(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {self._proc.returncode}: {self.log_tail()}")
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    # -- REST ---------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data,
                                     method=method)
        with urllib.request.urlopen(req, timeout=120) as resp:
            payload = resp.read()
        if raw:
            return payload
        return json.loads(payload) if payload else None

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self._request("POST", path, body if body is not None else {})

    def put(self, path: str, body: Any) -> Any:
        return self._request("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self._request("DELETE", path)

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        self.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def echo(self, modality: str) -> bool:
        try:
            self.post(f"/modalities/{modality}/echo", {})
            return True
        except urllib.error.HTTPError:
            return False

    def store_to_modality(self, modality: str, resources: list[str], synchronous: bool = True) -> Any:
        return self.post(f"/modalities/{modality}/store",
                         {"Resources": resources, "Synchronous": synchronous})

    def upload(self, path: Path) -> Any:
        return self.post("/instances", Path(path).read_bytes())

    def studies(self) -> list[str]:
        return list(self.get("/studies"))

    def find(self, uid: str, level: str = "Study") -> str | None:
        """Orthanc's id of the study/series/instance with this DICOM UID."""
        for hit in self.post("/tools/lookup", uid.encode()) or []:
            if hit.get("Type") == level:
                return str(hit["ID"])
        return None

    def find_study(self, study_instance_uid: str) -> str | None:
        return self.find(study_instance_uid, "Study")

    def study_instances(self, orthanc_study_id: str) -> list[dict[str, Any]]:
        out = []
        for inst in self.get(f"/studies/{orthanc_study_id}/instances"):
            tags = self.get(f"/instances/{inst['ID']}/simplified-tags")
            out.append({"ID": inst["ID"], "SOPClassUID": tags.get("SOPClassUID"),
                        "SOPInstanceUID": tags.get("SOPInstanceUID"),
                        "SeriesInstanceUID": tags.get("SeriesInstanceUID"),
                        "Modality": tags.get("Modality")})
        return out

    def instance_file(self, orthanc_instance_id: str) -> bytes:
        return bytes(self._request("GET", f"/instances/{orthanc_instance_id}/file", raw=True))

    def instance_dataset(self, orthanc_instance_id: str) -> pydicom.Dataset:
        import io

        return pydicom.dcmread(io.BytesIO(self.instance_file(orthanc_instance_id)))

    wait_for = staticmethod(wait_for)


def storescu(paths: Iterable[Path], host: str, port: int, called_aet: str,
             calling_aet: str = "STORESCU", *, tcp_nodelay: bool = True,
             extra_args: Sequence[str] = (), check: bool = True,
             timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """DCMTK ``storescu`` of files and folders (folders recursively)."""
    cmd = ["storescu", "-aec", called_aet, "-aet", calling_aet, "+sd", "+r", *extra_args,
           host, str(port), *[str(p) for p in paths]]
    res = subprocess.run(cmd, env=_env(tcp_nodelay), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"storescu failed ({res.returncode}): {res.stderr[-3000:]}")
    return res


def echoscu(host: str, port: int, called_aet: str, calling_aet: str = "ECHOSCU",
            *, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["echoscu", "-aec", called_aet, "-aet", calling_aet, host, str(port)],
                         env=_env(True), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"echoscu failed ({res.returncode}): {res.stderr[-2000:]}")
    return res


class StoreSCP:
    """DCMTK ``storescp`` writing what it receives into ``folder``.

    With ``refuse`` it listens but rejects every association (a destination
    that is up and refuses).
    """

    def __init__(self, folder: Path, *, port: int | None = None, aet: str = "STORESCP",
                 refuse: bool = False) -> None:
        self.folder = Path(folder)
        self.port = port or free_port()
        self.aet = aet
        self.refuse = refuse
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = ["storescp", "-aet", self.aet, "-od", str(self.folder), "+xa", "-uf"]
        if self.refuse:
            cmd.append("--refuse")
        cmd.append(str(self.port))
        self._proc = subprocess.Popen(cmd, env=_env(True), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)

        def up() -> bool:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError("storescp exited")
            res = echoscu("127.0.0.1", self.port, self.aet)
            if self.refuse:  # up once it answers, with a rejection
                return res.returncode != 0 and "Rejected" in res.stderr + res.stdout
            return res.returncode == 0

        wait_for(up, 20, 0.1, "storescp to listen")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None
