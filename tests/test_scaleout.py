"""Scale-out as the README describes it: two ``lungnode serve`` processes (two nodes, each with its
own DICOM port and workers) on one PostgreSQL database and one storage root.

Four studies are sent at once: one to each node, and two half to each (six senders).
Both nodes' completion ticks, workers and outboxes see all four; the claims must leave every study
analysed exactly once and every result delivered exactly once (counted in the database and in
what a DCMTK storescp receives, with unique file names so that a second copy would show).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pydicom
import pytest
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
from node.migrate import upgrade
from tests.conftest import write_config
from tests.peers import StoreSCP, free_port, storescu, wait_for
from tests.test_crash import ServeProcess
from training.synth import SynthSpec, write_study

SLICES = 32


@pytest.fixture
def two_nodes(tmp_path: Path, db_url: str) -> Iterator[tuple[list[int], StoreSCP]]:
    """Two ``serve`` processes sharing ``db_url`` and ``tmp_path/storage``; a storescp receives
    their results."""
    ports = [free_port(), free_port()]
    procs: list[ServeProcess] = []
    with StoreSCP(tmp_path / "received", aet="RECEIVER", extra_args=("+uf",)) as receiver:
        try:
            for i, port in enumerate(ports):
                config = write_config(tmp_path / f"node{i}.toml", {
                    "dicom": {"host": "127.0.0.1", "port": port},
                    "storage": {"root": str(tmp_path / "storage"), "min_free_mb": 1, "fsync": False},
                    "database": {"url": db_url},
                    "completion": {"stable_seconds": 2.0, "poll_seconds": 0.2},
                    "worker": {"count": 1, "lease_seconds": 600.0, "poll_seconds": 0.2,
                               "warm_up": False},
                    # a study caught half-way by a stalled sender is rejected, not reported on
                    "selection": {"min_slices": SLICES},
                    "model": {"enabled": False},
                    "analysis": {"anonymize": False},  # the archive copy is not what this is about
                    "delivery": {"destinations": ["receiver"], "poll_seconds": 0.2,
                                 "backoff_seconds": 0.5},
                    "web": {"enabled": False},
                }, [{"name": "ct", "ae_title": "STORESCU", "host": "127.0.0.1", "port": 104},
                    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},  # start probe
                    {"name": "receiver", "ae_title": "RECEIVER", "host": "127.0.0.1",
                     "port": receiver.port}])
                procs.append(ServeProcess(config, tmp_path / f"node{i}.log"))
            upgrade(db_url)  # as an operator would before starting nodes side by side
            _together([partial(proc.start, port) for proc, port in zip(procs, ports, strict=True)])
            yield ports, receiver
        finally:
            for proc in procs:  # SIGTERM to both, then wait for each
                if proc.proc is not None and proc.proc.poll() is None:
                    proc.proc.terminate()
            for proc in procs:
                proc.stop()


def _together(calls: list[Callable[[], object]]) -> None:
    """Run the calls in threads at once; re-raise the first error."""
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_nodes_on_one_database_analyse_and_deliver_each_study_once(
        two_nodes: tuple[list[int], StoreSCP], db_url: str, tmp_path: Path) -> None:
    ports, receiver = two_nodes
    studies = [write_study(tmp_path / f"study{k}", SynthSpec(
        seed=20 + k, involvement=0.1 * k, rows=128, slices=SLICES, slice_thickness_mm=8.0))
        for k in range(4)]
    # studies 2 and 3 half to each node (even slices to one, odd to the other: a PACS whose
    # associations a load balancer spreads); six senders at once, two studies' worth per node
    sends: list[tuple[list[Path], int]] = [([studies[0].dicom_dir], 0), ([studies[1].dicom_dir], 1)]
    for k in (2, 3):
        halves = [tmp_path / f"study{k}-even", tmp_path / f"study{k}-odd"]
        for half in halves:
            half.mkdir()
        for i, f in enumerate(sorted(studies[k].paths)):
            os.link(f, halves[i % 2] / f.name)
        sends += [([halves[0]], 0), ([halves[1]], 1)]
    _together([partial(storescu, folders, "127.0.0.1", ports[node], "LUNGNODE") for folders, node in sends])

    sessions = make_session_factory(make_engine(db_url))

    def all_delivered() -> bool:
        with sessions() as s:
            states = list(s.scalars(select(Study.state)))
            deliveries = list(s.scalars(select(Delivery.state)))
        return (len(states) == 4 and all(st in (StudyState.COMPLETE, StudyState.DELIVERED) for st in states)
                and len(deliveries) == 12 and all(d == DeliveryState.SENT for d in deliveries))

    wait_for(all_delivered, 180, 0.1, "4 studies analysed and their 12 results delivered")
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 4 * SLICES
        by_uid = {st.study_instance_uid: st for st in s.scalars(select(Study))}
        assert set(by_uid) == {st.study_instance_uid for st in studies}
        assert all(st.instance_count == SLICES and st.result_version == 1 for st in by_uid.values())
        results = list(s.scalars(select(ResultObject)))
        # each study: one job made its three results (a job of a half-arrived study, should a
        # sender have stalled past stable_seconds, is rejected and makes none)
        per_study = Counter(r.study_id for r in results)
        assert sorted(per_study.values()) == [3, 3, 3, 3]
        producers = {r.study_id: {x.job_id for x in results if x.study_id == r.study_id} for r in results}
        assert all(len(jobs) == 1 for jobs in producers.values())
        assert all(j.state == JobState.DONE for j in s.scalars(select(Job)))
    received = receiver.wait_for_files(12, 60)
    uids = Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received)
    assert set(uids) == {r.sop_instance_uid for r in results}
    assert all(n == 1 for n in uids.values()), f"delivered more than once: {uids}"
