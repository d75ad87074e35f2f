"""Training runs as the node records them: transitions, leases, scheduled slots, the child process."""

from __future__ import annotations

import itertools
import os
import signal
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.db import (
    LabelEvent,
    LabelSource,
    LabelValue,
    LearnStudy,
    RunState,
    TrainingRun,
    make_engine,
    make_session_factory,
    utcnow,
)
from node.errors import IllegalTransition, TrainingError
from node.learn.runs import (
    begin_run,
    claim_slot,
    create_run,
    expire_stale_runs,
    fail_run,
    finish_run,
    launch_run,
    run_command,
)
from node.migrate import upgrade
from node.work.state import RUN_TRANSITIONS, transition_run
from tests.dcmtk import wait_for

RUN_LEGAL = {
    (RunState.QUEUED, RunState.RUNNING),
    (RunState.QUEUED, RunState.FAILED),
    (RunState.RUNNING, RunState.RUNNING),
    (RunState.RUNNING, RunState.SUCCEEDED),
    (RunState.RUNNING, RunState.FAILED),
    (RunState.FAILED, RunState.RUNNING),
}


@pytest.mark.parametrize(("old", "new"), list(itertools.product(RunState, RunState)))
def test_run_transition_table(old: RunState, new: RunState) -> None:
    """Only the changes the run table lists are made; every other one is refused unchanged."""
    assert ((old, new) in RUN_LEGAL) == (new in RUN_TRANSITIONS[old])
    run = TrainingRun(id=3, state=old)
    if (old, new) in RUN_LEGAL:
        transition_run(run, new)
        assert run.state == new
    else:
        with pytest.raises(IllegalTransition, match=f"training run 3: {old.value} -> {new.value}"):
            transition_run(run, new)
        assert run.state == old


@pytest.fixture
def sessions(db_url: str) -> sessionmaker[Session]:
    upgrade(db_url)
    return make_session_factory(make_engine(db_url))


def _labels(sessions: sessionmaker[Session], n: int) -> None:
    with sessions() as session:
        study = LearnStudy(origin="archive", pseudo_study_uid=f"2.25.{n}{os.getpid()}",
                           pseudo_patient_id="P", source_path="x")
        session.add(study)
        session.flush()
        for _ in range(n):
            session.add(LabelEvent(learn_study_id=study.id, value=LabelValue.MILD, source=LabelSource.CLI,
                                   actor="test"))
        session.commit()


def test_a_run_records_its_lease_candidate_and_failure(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        run = create_run(session, dataset_id=None, trigger="cli", created_by="cli:test", params={"e": 1})
        session.commit()
        assert run.run_dir == f"runs/run-{run.id}"
        run_id = run.id
    with sessions() as session:
        begin_run(session, run_id, "host:1", 60)
        session.commit()
    with sessions() as session, pytest.raises(TrainingError, match="is running in host:1"):
        begin_run(session, run_id, "host:2", 60)
    with sessions() as session:
        finish_run(session, run_id, candidate="candidate-run1", metrics={"severity_macro_f1": 0.5})
    with sessions() as session:
        row = session.get_one(TrainingRun, run_id)
        assert (row.state, row.candidate, row.lease_owner) == (RunState.SUCCEEDED, "candidate-run1", None)
        with pytest.raises(TrainingError, match="already succeeded"):
            begin_run(session, run_id, "host:2", 60)
        fail_run(session, run_id, "late error")  # a finished run is left alone
        assert session.get_one(TrainingRun, run_id).state == RunState.SUCCEEDED


def test_an_expired_lease_fails_the_run_and_resume_takes_it_over(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        run = create_run(session, dataset_id=None, trigger="cli", created_by="cli:test", params={})
        session.flush()
        with pytest.raises(TrainingError, match="never started"):
            begin_run(session, run.id, "host:1", 60, resume=True)
        begin_run(session, run.id, "host:1", 60)
        run.lease_expires_at = utcnow() - timedelta(seconds=1)  # its process died
        session.commit()
        run_id = run.id
    with sessions() as session:
        assert expire_stale_runs(session) == [run_id]
        row = session.get_one(TrainingRun, run_id)
        assert row.state == RunState.FAILED
        assert f"lungnode train --resume {run_id}" in (row.error or "")
        begin_run(session, run_id, "host:2", 60, resume=True)
        session.commit()
        assert session.get_one(TrainingRun, run_id).lease_owner == "host:2"


def test_a_slot_waits_for_enough_new_labels(sessions: sessionmaker[Session], make_settings,  # type: ignore[no-untyped-def]
                                            db_url: str) -> None:
    s = make_settings(db_url, training={"min_new_labels": 3})
    fire = datetime(2026, 12, 5, 2, 0, tzinfo=UTC)
    _labels(sessions, 2)
    assert claim_slot(sessions, s, fire, "node-a") is None
    _labels(sessions, 1)
    first = claim_slot(sessions, s, fire, "node-a")
    assert first is not None
    # the next slot needs three labels newer than that run
    assert claim_slot(sessions, s, fire + timedelta(days=7), "node-a") is None


def test_two_nodes_claim_one_run_per_slot(make_settings, db_url: str) -> None:  # type: ignore[no-untyped-def]
    """Two nodes on one database (two engines) fire in the same minute: exactly one run is claimed."""
    upgrade(db_url)
    s = make_settings(db_url, training={"min_new_labels": 1})
    node_a = make_session_factory(make_engine(db_url))
    node_b = make_session_factory(make_engine(db_url))
    _labels(node_a, 1)
    fire = datetime(2026, 12, 5, 2, 0, tzinfo=UTC)
    results: dict[str, int | None] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def tick(name: str, factory: sessionmaker[Session]) -> None:
        barrier.wait(timeout=60)
        try:
            results[name] = claim_slot(factory, s, fire, name)
        except BaseException as exc:  # noqa: BLE001 - shown by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=tick, args=(n, f)) for n, f in (("a", node_a), ("b", node_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    claimed = [v for v in results.values() if v is not None]
    assert len(results) == 2 and len(claimed) == 1
    with node_a() as session:
        runs = list(session.scalars(select(TrainingRun)))
        assert [(r.slot, r.trigger, r.state) for r in runs] == [
            ("2026-12-05T02:00Z", "schedule", RunState.QUEUED)]


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_node_schedulers_on_postgresql_start_one_run(make_settings, db_url: str) -> None:  # type: ignore[no-untyped-def]
    """Two nodes' schedulers fire in the same minute on one PostgreSQL: one run, one process."""
    from node.service import Node

    upgrade(db_url)
    s = make_settings(db_url, training={"min_new_labels": 1, "nice": 5})
    nodes = [Node(s, receive=False, work=False, schedule=False) for _ in range(2)]
    _labels(nodes[0].sessions, 1)
    fire = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def tick(node: Node) -> None:
        barrier.wait(timeout=60)
        try:
            node.training_tick(fire)
        except BaseException as exc:  # noqa: BLE001 - shown by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=tick, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    watchers = [w for n in nodes for w in n.training_watchers]
    assert len(watchers) == 1
    watchers[0].join(timeout=300)  # the child: it finds nothing archived to freeze and says so
    with nodes[0].sessions() as session:
        runs = list(session.scalars(select(TrainingRun)))
    assert [(r.slot, r.trigger) for r in runs] == [("2026-12-05T03:00Z", "schedule")]
    assert runs[0].state == RunState.FAILED  # the child's reason: nothing can be frozen
    assert "cannot train" in (runs[0].error or "") and "nothing to freeze" in (runs[0].error or "")
    log = (s.learn_root / "logs" / f"run-{runs[0].id}.log").read_text()
    assert "cannot train" in log, log[-2000:]
    for n in nodes:
        n.engine.dispose()


def test_the_child_process_is_niced_and_a_kill_is_recorded(sessions: sessionmaker[Session], make_settings,  # type: ignore[no-untyped-def]
                                                           db_url: str, tmp_path: Path) -> None:
    """A scheduled run's process killed with SIGKILL (as the out-of-memory killer does) fails the run."""
    s = make_settings(db_url, training={"nice": 7, "threads": 1})
    with sessions() as session:
        run = create_run(session, dataset_id=None, trigger="schedule", created_by="t", params={},
                         slot="2026-12-05T02:00Z")
        session.commit()
        run_id = run.id
    cmd = run_command(s, run_id)
    assert cmd[:3] == ["nice", "-n", "7"] and cmd[-3:] == ["train", "--run", str(run_id)]
    # a stand-in for the trainer, niced the same way, that waits to be killed
    marker = tmp_path / "started"
    stand_in = ["nice", "-n", "7", "python3", "-c",
                f"import os,pathlib; pathlib.Path({str(marker)!r}).write_text("
                "str(os.getpid())+' '+str(os.nice(0))); import signal; signal.pause()"]
    watcher = launch_run(sessions, s, run_id, log_dir=tmp_path / "logs", command=stand_in)
    text = wait_for(lambda: marker.exists() and marker.read_text(), 60, what="the training process")
    pid, niceness = (int(v) for v in text.split())
    assert niceness == 7
    os.kill(pid, signal.SIGKILL)
    watcher.join(timeout=60)
    with sessions() as session:
        row = session.get_one(TrainingRun, run_id)
        assert row.state == RunState.FAILED
        assert "signal 9" in (row.error or "") and "out of memory" in (row.error or "")
