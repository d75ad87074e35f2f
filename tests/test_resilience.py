"""The running node through faults around it: its database restarted, its disk filling up in the
middle of a study, a stored file damaged after it was acknowledged.

Each C-STORE the node cannot record gets a failure status, never 0x0000; everything acknowledged
ends in the database and on disk; the node carries on by itself once the cause is gone, and a
study is analysed once.

The database-restart test runs its own PostgreSQL server (``initdb`` into a temporary folder, a
free port) and stops and starts it under the node; the shared server on 127.0.0.1:5432 that the
other tests use is never touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select

from model.lungs import LungMasks
from model.prediction import CLASS_NAMES, Prediction
from model.volume import CTVolume
from node.db import (
    AuditEntry,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    ResultObject,
    Study,
    StudyState,
)
from node.service import Node
from node.settings import Settings
from node.work.jobs import queue_stable_studies
from tests.conftest import B40F
from tests.peers import StoreSCP, c_store_all, free_port, wait_for
from training.synth import SynthSpec, write_study

PG_VERSIONS = Path("/usr/lib/postgresql")
STATUS_OUT_OF_RESOURCES = 0xA700
CT_CONTEXT = ((CTImageStorage, pydicom.uid.ExplicitVRLittleEndian),)


# -- a PostgreSQL server of the test's own ---------------------------------------------------
def _pg_bin() -> Path:
    versions = sorted((p for p in PG_VERSIONS.glob("*/bin") if (p / "initdb").exists()),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if not versions:
        pytest.fail(f"no PostgreSQL server binaries under {PG_VERSIONS}; "
                    "deploy/setup.sh --dev installs them (package postgresql)")
    return versions[-1]


class PrivatePostgres:
    """A PostgreSQL server in a temporary folder on a free port, to stop and start at will.

    PostgreSQL refuses to run as root; as root the server runs as the ``postgres`` user
    (``runuser``), which owns the folder.
    """

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="lungnode-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)

    def __enter__(self) -> PrivatePostgres:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        res = self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                        "-E", "UTF8", "--no-sync")
        assert res.returncode == 0, f"initdb failed: {res.stderr[-2000:]}"
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c full_page_writes=off")
        res = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                        str(self.log), "-w", "-t", "60", "start")
        assert res.returncode == 0, f"pg_ctl start failed: {res.stderr}{self.log.read_text()[-2000:]}"
        wait_for(self.ready, 60, 0.05, "the private PostgreSQL to accept connections")

    def stop(self) -> None:
        res = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        assert res.returncode == 0, f"pg_ctl stop failed: {res.stderr}"
        wait_for(lambda: not self.ready(), 60, 0.05, "the private PostgreSQL to stop")

    def ready(self) -> bool:
        return subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                              timeout=30).returncode == 0


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    with PrivatePostgres() as pg:
        yield pg


# -- helpers ------------------------------------------------------------------------------------
def _codes(port: int, files: list[Path]) -> list[tuple[int | None, str]]:
    """Send ``files`` over one association; each C-STORE's status and error comment."""
    out = []
    for status in c_store_all(port, files, "PACS", CT_CONTEXT):
        code = int(status.Status) if "Status" in status else None
        out.append((code, str(status.get("ErrorComment", ""))))
    return out


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _queue_now(node: Node) -> list[int]:
    """Queue every study that waits, as the completion tick does once it is stable (the tests
    set ``stable_seconds`` to an hour so that no study is queued before all of it arrived)."""
    with node.sessions() as s:
        return queue_stable_studies(s, 0.0)


def _ended(node: Node, count: int, timeout: float = 120) -> list[Study]:
    def done() -> list[Study]:
        with node.sessions() as s:
            studies = list(s.scalars(select(Study).order_by(Study.id)))
        ends = (StudyState.COMPLETE, StudyState.DELIVERING, StudyState.DELIVERED, StudyState.REJECTED,
                StudyState.FAILED)
        return studies if len(studies) == count and all(st.state in ends for st in studies) else []

    return wait_for(done, timeout, 0.1, f"{count} studies to reach an end state")


def _count(node: Node, table: type) -> int:
    with node.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def _all_recorded_on_disk(node: Node, acked: set[str]) -> None:
    """Every acknowledged SOP Instance UID has its row, and the row's file holds that instance."""
    with node.sessions() as s:
        rows = {r.sop_instance_uid: r.path for r in s.scalars(select(Instance))}
    missing = acked - set(rows)
    assert not missing, f"acknowledged but not recorded: {sorted(missing)[:3]}"
    for uid in acked:
        assert _sop(node.settings.storage.root / rows[uid]) == uid


@pytest.fixture(scope="module")
def small_studies(tmp_path_factory: pytest.TempPathFactory) -> list[list[Path]]:
    """Three synthetic chest CT studies of 32 slices of 128x128 (each analysed in well under a
    second), written once for the module; each test sends them to a node of its own."""
    root = tmp_path_factory.mktemp("synth")
    return [sorted(write_study(root / f"study{seed}", SynthSpec(
        seed=seed, involvement=0.1 + 0.05 * seed, rows=128, slices=32, slice_thickness_mm=8.0)).paths)
        for seed in (1, 2, 3)]


class _HeldPredictor:
    """The severity step, held until :attr:`go` is set the first time it runs (so the test can take
    the database away while a job is in the middle of its analysis); then a fixed answer."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.calls = 0

    def __call__(self, volume: CTVolume, masks: LungMasks) -> Prediction:
        self.calls += 1
        self.entered.set()
        assert self.go.wait(120), "the test never let the analysis go on"
        probabilities = dict.fromkeys(CLASS_NAMES, 0.0) | {CLASS_NAMES[1]: 1.0}
        return Prediction(probabilities=probabilities, predicted_class=CLASS_NAMES[1],
                          model_name="held", model_version="0", model_sha256="0" * 64, device="cpu")


# -- the database restarted under a running node --------------------------------------------------
def test_postgresql_restart_under_a_running_node(
        private_pg: PrivatePostgres, tmp_path: Path, make_settings: Callable[..., Settings],
        caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL stopped twice under a running node: once while the study arrives, once while its
    job runs.  While it is away each C-STORE is answered 0xA700 (nothing acknowledged that is not
    recorded) and the workers and ticks keep running, logging the outage once each; when it is
    back the node reconnects by itself, the interrupted job is taken up again at once, and the
    study is analysed and delivered once with every acknowledged instance."""
    caplog.set_level(logging.WARNING)
    files = sorted(B40F.iterdir())
    port = free_port()
    predictor = _HeldPredictor()
    with StoreSCP(tmp_path / "received", aet="RECEIVER") as receiver:
        settings = make_settings(
            private_pg.url, port=port,
            peers=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                   {"name": "receiver", "ae_title": "RECEIVER", "host": "127.0.0.1",
                    "port": receiver.port}],
            completion={"stable_seconds": 3600.0, "poll_seconds": 0.2},
            worker={"lease_seconds": 600.0},  # the interrupted job must not wait for its lease
            delivery={"destinations": ["receiver"]},
        )
        node = Node(settings, predictor)
        node.start()
        try:
            # 1. the first third arrives and is acknowledged
            first = _codes(port, files[:10])
            assert [c for c, _ in first] == [0] * 10
            acked = {_sop(f) for f in files[:10]}

            # 2. PostgreSQL goes away: every C-STORE fails with a status and a comment
            private_pg.stop()
            during = _codes(port, files[10:20])
            assert [c for c, _ in during] == [STATUS_OUT_OF_RESOURCES] * 10, during
            assert all("database unavailable" in comment for _, comment in during)
            # the worker, the completion tick and the outbox each say so once, and keep running
            for part in ("worker", "completion tick", "outbox"):
                _wait_down(node, part)

            # 3. PostgreSQL is back: the node reconnects by itself; the rest arrives
            private_pg.start()
            rest = _codes(port, files[10:])
            assert [c for c, _ in rest] == [0] * 20
            acked |= {_sop(f) for f in files[10:]}
            with node.sessions() as s:
                assert s.scalars(select(Study)).one().instance_count == 30
            wait_for(lambda: not node.database.down, 30, 0.05, "every part to reach the database again")

            # 4. PostgreSQL goes away while the job runs (its analysis held at the severity step)
            assert _queue_now(node)
            assert predictor.entered.wait(60), "the worker did not start the job"
            private_pg.stop()
            predictor.go.set()  # the results cannot be committed: the job must not fail for it
            _wait_down(node, "worker")
            private_pg.start()

            study = _ended(node, 1)[0]
            assert study.state in (StudyState.COMPLETE, StudyState.DELIVERING, StudyState.DELIVERED), \
                study.reason
            wait_for(lambda: _delivered(node), 60, 0.1, "the results to be delivered")
            _all_recorded_on_disk(node, acked)
            with node.sessions() as s:
                assert s.scalar(select(func.count()).select_from(Instance)) == 30
                jobs = list(s.scalars(select(Job)))
                assert len(jobs) == 1 and jobs[0].state == JobState.DONE
                assert jobs[0].attempts == 2  # cut short by the outage once, then finished
                results = list(s.scalars(select(ResultObject)))
                assert len(results) == 3 and {r.job_id for r in results} == {jobs[0].id}
            assert predictor.calls == 2
            received = receiver.wait_for_files(3, 60)
            assert sorted(_sop(p) for p in received) == sorted(r.sop_instance_uid for r in results)
        finally:
            node.stop()
    outage_lines = [r.getMessage() for r in caplog.records if "database unavailable" in r.getMessage()
                    and r.name == "node.service"]
    for part in ("worker", "completion tick", "outbox"):
        # one line per outage (two outages), not one per poll
        assert 1 <= sum(line.startswith(f"{part}:") for line in outage_lines) <= 2, outage_lines
    assert any(r.getMessage() == "worker: database reachable again" for r in caplog.records)
    # no thread died and no tick raised into the scheduler
    assert not [r for r in caplog.records if r.name.startswith("apscheduler") and r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]


def _wait_down(node: Node, part: str) -> None:
    wait_for(lambda: part in node.database.down, 30, 0.05, f"the {part} to notice the outage")


def _delivered(node: Node) -> bool:
    with node.sessions() as s:
        ds = list(s.scalars(select(Delivery)))
    return bool(ds) and all(d.state == DeliveryState.SENT for d in ds)


# -- the disk fills up in the middle of a study ----------------------------------------------------
@pytest.fixture
def sqlite_node(tmp_path: Path, make_settings: Callable[..., Settings]) -> Iterator[Node]:
    settings = make_settings(
        f"sqlite:///{tmp_path / 'n.db'}", port=free_port(),
        peers=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
        completion={"stable_seconds": 3600.0, "poll_seconds": 0.2},
    )
    node = Node(settings)
    node.start()
    yield node
    node.stop()


def test_disk_threshold_crossed_in_the_middle_of_a_study(sqlite_node: Node,
                                                         small_studies: list[list[Path]]) -> None:
    """``[storage] min_free_mb`` reached while a study arrives: 0xA700 from that instance on,
    recorded; space back: the node takes the rest (the refused ones sent again) and the whole
    study is analysed once.  The threshold is moved over the real free space, not the disk filled."""
    node = sqlite_node
    files = small_studies[0]
    port = node.settings.dicom.port
    assert [c for c, _ in _codes(port, files[:12])] == [0] * 12

    free = node.store.free_bytes()
    node.store.min_free_bytes = free + 1024 ** 4  # a terabyte more than there is: "disk full"
    refused = _codes(port, files[12:20])
    assert [c for c, _ in refused] == [STATUS_OUT_OF_RESOURCES] * 8
    assert all("out of disk space" in comment for _, comment in refused)
    assert _count(node, Instance) == 12
    with node.sessions() as s:
        audit = list(s.scalars(select(AuditEntry).where(AuditEntry.action == "instance-refused")))
    assert len(audit) == 8 and all("MB required" in (a.detail or "") for a in audit)

    node.store.min_free_bytes = 1024 * 1024  # space is back
    assert [c for c, _ in _codes(port, files[12:])] == [0] * 20
    _all_recorded_on_disk(node, {_sop(f) for f in files})
    _queue_now(node)
    study = _ended(node, 1)[0]
    assert study.state == StudyState.COMPLETE, study.reason
    assert study.instance_count == 32
    with node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1
        assert s.scalar(select(func.count()).select_from(ResultObject)) == 3


# -- a stored file damaged after it was acknowledged -----------------------------------------------
@pytest.mark.parametrize("damage", ["pixel data cut short", "header cut short", "overwritten"])
def test_a_damaged_stored_file_fails_its_study_and_the_other_goes_on(
        sqlite_node: Node, small_studies: list[list[Path]], damage: str) -> None:
    """A file of one study truncated in the storage root between receipt and analysis (a disk
    fault, a torn copy by hand): that study fails or is rejected with a reason naming the instance;
    the other study is analysed as usual."""
    node = sqlite_node
    port = node.settings.dicom.port
    bad, good = small_studies[1], small_studies[2]
    assert [c for c, _ in _codes(port, bad + good)] == [0] * 64
    victim_uid = _sop(bad[15])
    with node.sessions() as s:
        victim = node.settings.storage.root / s.scalars(
            select(Instance.path).where(Instance.sop_instance_uid == victim_uid)).one()
    data = victim.read_bytes()
    damaged = {"pixel data cut short": data[: len(data) // 2], "header cut short": data[:300],
               "overwritten": bytes(len(data))}  # zeros: no DICOM preamble and prefix any more
    victim.write_bytes(damaged[damage])

    _queue_now(node)
    studies = {st.study_instance_uid: st for st in _ended(node, 2)}
    bad_study = studies[_study_uid(bad[0])]
    good_study = studies[_study_uid(good[0])]
    assert good_study.state == StudyState.COMPLETE, good_study.reason
    assert bad_study.state in (StudyState.FAILED, StudyState.REJECTED)
    reason = bad_study.reason or ""
    assert "internal error" not in reason, reason
    if damage == "pixel data cut short":  # found when the volume is loaded
        assert bad_study.state == StudyState.FAILED
        assert f"cannot decode pixel data of SOP {victim_uid}" in reason, reason
        assert "less than expected" in reason
    else:  # found when the series is chosen: nothing of it can be analysed
        assert bad_study.state == StudyState.REJECTED
        assert f"has an unreadable file {victim.name} (SOP {victim_uid})" in reason, reason
        if damage == "header cut short":
            assert "ends after 300 bytes, before its pixel data" in reason, reason
    with node.sessions() as s:
        producers = set(s.scalars(select(ResultObject.study_id)))
    assert producers == {good_study.id}


def _study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
