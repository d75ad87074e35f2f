"""Kill the node with SIGKILL while a study arrives and while its job runs.

After each restart every acknowledged instance must be on disk and in the
database, and the study must end analysed exactly once and delivered once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import func, select

from node.db import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    ResultObject,
    Study,
    StudyState,
    make_engine,
    make_session_factory,
)
from tests.conftest import B40F, write_config
from tests.dcmtk import wait_for
from tests.peers import StoreSCP, free_port
from training.synth import SynthSpec, write_study

REPO = Path(__file__).resolve().parent.parent


class ServeProcess:
    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> None:
        """Start serve; return once it answers an association and has logged that it is ready
        (a receiver may answer while the other is still starting)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config)],
            cwd=REPO, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        ae = AE(ae_title="PACS")
        ae.add_requested_context("1.2.840.10008.1.1")

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited: {self.log.read_text()[-3000:]}")
            assoc = ae.associate("127.0.0.1", port, ae_title="LUNGNODE")
            if not assoc.is_established:
                return False
            assoc.release()
            with self.log.open("rb") as f:
                f.seek(offset)
                return re.search(rb"node\.service: node \S+ ready \(", f.read()) is not None

        wait_for(up, 60, 0.05, "the node to listen")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[Callable[[Path], ServeProcess]]:
    procs: list[ServeProcess] = []

    def make(config: Path) -> ServeProcess:
        p = ServeProcess(config, tmp_path / "serve.log")
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()


def _send_acknowledged(port: int, files: list[Path], stop_after: int | None = None,
                       on_progress: Callable[[int], None] | None = None) -> list[str]:
    """Send files one by one; return the SOP Instance UIDs the node acknowledged."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGNODE")
    acked: list[str] = []
    if not assoc.is_established:
        return acked
    try:
        for i, f in enumerate(files):
            if not assoc.is_established:
                break
            status = assoc.send_c_store(f)
            if "Status" in status and int(status.Status) == 0:
                acked.append(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))
            if on_progress is not None:
                on_progress(i)
            if stop_after is not None and i + 1 >= stop_after:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return acked


@pytest.mark.slow
def test_sigkill_during_receive_and_during_job(tmp_path: Path, db_url: str,
                                               serve_factory: Callable[[Path], ServeProcess]) -> None:
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    with StoreSCP(out, port=free_port(), aet="RECEIVER") as receiver:
        config = write_config(tmp_path / "lungnode.toml", {
            "dicom": {"host": "127.0.0.1", "port": port},
            "storage": {"root": "storage", "min_free_mb": 1},
            "database": {"url": db_url},
            "completion": {"stable_seconds": 2.0, "poll_seconds": 0.2},
            "worker": {"count": 1, "lease_seconds": 600.0, "poll_seconds": 0.2},
            "delivery": {"destinations": ["receiver"], "poll_seconds": 0.2, "backoff_seconds": 0.5},
            "web": {"enabled": False},
        }, [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            {"name": "receiver", "ae_title": "RECEIVER", "host": "127.0.0.1", "port": receiver.port}])
        sessions = make_session_factory(make_engine(db_url))
        files = sorted(B40F.iterdir())
        node = serve_factory(config)
        node.start(port)

        # 1. SIGKILL in the middle of the series
        acked = _send_acknowledged(port, files, stop_after=12)
        node.kill()
        # the sender keeps going against a dead node: nothing more is acknowledged
        assert _send_acknowledged(port, files[12:]) == []
        storage = tmp_path / "storage"
        with sessions() as s:
            rows = {r.sop_instance_uid: r.path for r in s.scalars(select(Instance))}
        assert set(acked) <= set(rows), "an acknowledged instance is missing from the database"
        for uid in acked:
            ds = pydicom.dcmread(storage / rows[uid])
            assert ds.SOPInstanceUID == uid and len(ds.PixelData) == 512 * 512 * 2
        # no half file under a real name: every *.dcm is complete (a torn write stays a .tmp-*)
        for f in (storage / "instances").rglob("*.dcm"):
            assert len(pydicom.dcmread(f).PixelData) == 512 * 512 * 2

        # 2. restart; the PACS sends the whole series again (repeats are not double counted)
        node.start(port)
        _send_acknowledged(port, files)
        with sessions() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == 30
            assert s.scalars(select(Study)).one().instance_count == 30

        # 3. SIGKILL while the analysis job runs
        def analysing() -> bool:
            with sessions() as s:
                return s.scalars(select(Study)).one().state == StudyState.ANALYSING

        wait_for(analysing, 60, 0.05, "the job to start")
        node.kill()
        with sessions() as s:
            assert s.scalars(select(Study)).one().state == StudyState.ANALYSING
            assert s.scalar(select(func.count()).select_from(ResultObject)) == 0

        # 4. restart: the orphaned job is re-claimed and finishes once
        node.start(port)

        def delivered() -> bool:
            with sessions() as s:
                ds = list(s.scalars(select(Delivery)))
                return bool(ds) and all(d.state == DeliveryState.SENT for d in ds)

        wait_for(delivered, 120, 0.05, "the results to be delivered")
        with sessions() as s:
            study = s.scalars(select(Study)).one()
            assert study.state == StudyState.DELIVERED
            assert study.result_version == 1
            # (the 12 instances of before the first kill may have been judged on their own
            # at restart: a job that ends "rejected, 12 slices" before the rest arrives)
            jobs = list(s.scalars(select(Job)))
            assert all(j.state == JobState.DONE for j in jobs)
            results = list(s.scalars(select(ResultObject)))
            assert len(results) == 3 and len({r.job_id for r in results}) == 1
            producer = s.get_one(Job, results[0].job_id)
            assert producer.attempts == 2  # killed once, finished once
        received = receiver.wait_for_files(3, 60)
        uids = [str(pydicom.dcmread(p).SOPInstanceUID) for p in received]
        assert len(uids) == len(set(uids)) == 3


class _HoldingPeer:
    """A destination that takes the association and the first C-STORE, then holds its response
    until released: the node is caught in the middle of a delivery."""

    def __init__(self, port: int, aet: str) -> None:
        self.port, self.aet = port, aet
        self.entered = threading.Event()
        self.release = threading.Event()
        self.server: ThreadedAssociationServer | None = None

    def _on_store(self, event: Event) -> int:
        self.entered.set()
        self.release.wait(120)
        return 0xA700  # whatever it says, the node is gone by then

    def __enter__(self) -> _HoldingPeer:
        ae = AE(ae_title=self.aet)
        syntaxes = [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian]
        for context in StoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), syntaxes)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()


@pytest.mark.slow
def test_sigkill_during_delivery(tmp_path: Path, serve_factory: Callable[[Path], ServeProcess]) -> None:
    """The node is killed while it sends a study's results (the destination holds its response);
    after the restart each result arrives, and the results of a study delivered before the kill
    are not sent again (the receiver writes every copy under a name of its own)."""
    port, dest_port = free_port(), free_port()
    config = write_config(tmp_path / "lungnode.toml", {
        "dicom": {"host": "127.0.0.1", "port": port},
        "storage": {"root": "storage", "min_free_mb": 1, "fsync": False},
        "database": {"url": f"sqlite:///{tmp_path / 'lungnode.db'}"},
        "completion": {"stable_seconds": 1.0, "poll_seconds": 0.2},
        "worker": {"count": 1, "lease_seconds": 600.0, "poll_seconds": 0.2, "warm_up": False},
        "selection": {"min_slices": 32},  # a study caught half-way by a stalled sender makes no results
        "model": {"enabled": False},
        "analysis": {"anonymize": False},
        "delivery": {"destinations": ["receiver"], "poll_seconds": 0.2, "backoff_seconds": 0.5},
        "web": {"enabled": False},
    }, [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
        {"name": "receiver", "ae_title": "RECEIVER", "host": "127.0.0.1", "port": dest_port}])
    sessions = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'lungnode.db'}"))
    first, second = (sorted(write_study(tmp_path / name, SynthSpec(
        seed=seed, rows=128, slices=32, slice_thickness_mm=8.0)).paths)
        for name, seed in (("first", 31), ("second", 32)))

    def results_of(study_uid: str) -> set[str]:
        with sessions() as s:
            return set(s.scalars(select(ResultObject.sop_instance_uid).join(
                Study, Study.id == ResultObject.study_id).where(Study.study_instance_uid == study_uid)))

    def deliveries(state: DeliveryState, count: int) -> Callable[[], bool]:
        def check() -> bool:
            with sessions() as s:
                return s.scalar(select(func.count()).select_from(Delivery).where(
                    Delivery.state == state)) == count
        return check

    def study_uid(files: list[Path]) -> str:
        return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    node = serve_factory(config)
    node.start(port)
    # 1. the first study's results are delivered
    with StoreSCP(tmp_path / "received-1", port=dest_port, aet="RECEIVER", extra_args=("+uf",)) as receiver:
        assert len(_send_acknowledged(port, first)) == 32
        wait_for(deliveries(DeliveryState.SENT, 3), 120, 0.05, "the first study's results delivered")
        before = receiver.wait_for_files(3, 30)
    assert sorted(_uids(before)) == sorted(results_of(study_uid(first)))

    # 2. the second study's delivery: killed while the destination holds the first response
    with _HoldingPeer(dest_port, "RECEIVER") as holding:
        assert len(_send_acknowledged(port, second)) == 32
        assert holding.entered.wait(120), "the node did not start delivering the second study"
        node.kill()
    with sessions() as s:
        states = {d.id: d.state for d in s.scalars(select(Delivery))}
    assert sorted(states.values()) == [DeliveryState.SENDING] * 3 + [DeliveryState.SENT] * 3

    # 3. restart with the destination back: the second study's results arrive, once each,
    # and nothing of the first study is sent again
    with StoreSCP(tmp_path / "received-2", port=dest_port, aet="RECEIVER", extra_args=("+uf",)) as receiver:
        node.start(port)
        wait_for(deliveries(DeliveryState.SENT, 6), 120, 0.05, "every result delivered")
        after = receiver.wait_for_files(3, 30)
        node.stop()  # nothing more may arrive: the node is stopped before the files are counted
        after = receiver.files()
    assert sorted(_uids(after)) == sorted(results_of(study_uid(second)))  # each once, none of the first
    with sessions() as s:
        jobs = list(s.scalars(select(Job)))
        assert len(jobs) == 2 and all(j.state == JobState.DONE for j in jobs)
        assert s.scalar(select(func.count()).select_from(ResultObject)) == 6


def _uids(files: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
