"""Completion, the job queue and the study state table on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from node.db import AuditEntry, Job, JobState, Study, StudyState, make_engine, make_session_factory, utcnow
from node.dicom.catalog import Catalog, InstanceRecord
from node.errors import IllegalTransition
from node.migrate import upgrade
from node.work.claim import for_update
from node.work.jobs import (
    MAX_JOB_ATTEMPTS,
    claim_job,
    finish_job_failed,
    lease_owner,
    next_stable_at,
    queue_stable_studies,
    release_orphaned_leases,
    renew_lease,
)
from node.work.state import JOB_TRANSITIONS, transition, transition_job


@pytest.fixture
def sessions(db_url: str) -> sessionmaker[Session]:
    upgrade(db_url)
    return make_session_factory(make_engine(db_url))


def _receive(sessions: sessionmaker[Session], study: str, n: int, when=None) -> None:  # type: ignore[no-untyped-def]
    cat = Catalog(sessions)
    for i in range(n):
        cat.record_instance(InstanceRecord(study, f"{study}.1", f"{study}.1.{i + 1}",
                                           "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                                           "CT", f"instances/x/{i}.dcm", 10, "PACS"), now=when)


def test_study_is_queued_only_after_stable_seconds(sessions: sessionmaker[Session]) -> None:
    t0 = utcnow()
    _receive(sessions, "1.2.3", 5, when=t0)
    with sessions() as s:
        assert queue_stable_studies(s, 10, now=t0 + timedelta(seconds=9)) == []
    with sessions() as s:
        assert len(queue_stable_studies(s, 10, now=t0 + timedelta(seconds=10.5))) == 1
        study = s.scalars(select(Study)).one()
        assert study.state == StudyState.QUEUED
        assert s.scalars(select(Job)).one().instance_count == 5
    # queued once only
    with sessions() as s:
        assert queue_stable_studies(s, 10, now=t0 + timedelta(seconds=60)) == []


def test_next_stable_at_is_when_the_longest_waiting_study_becomes_stable(
        sessions: sessionmaker[Session]) -> None:
    t0 = utcnow()
    with sessions() as s:
        assert next_stable_at(s, 10) is None  # nothing waits
    _receive(sessions, "1.2.7", 2, when=t0 + timedelta(seconds=3))
    _receive(sessions, "1.2.8", 2, when=t0)
    with sessions() as s:
        assert next_stable_at(s, 10) == t0 + timedelta(seconds=10)
    with sessions() as s:  # once 1.2.8 is queued, 1.2.7 is next; once both are, nothing waits
        assert len(queue_stable_studies(s, 10, now=t0 + timedelta(seconds=10.01))) == 1
        assert next_stable_at(s, 10) == t0 + timedelta(seconds=13)
        assert len(queue_stable_studies(s, 10, now=t0 + timedelta(seconds=13.01))) == 1
        assert next_stable_at(s, 10) is None


def test_completion_is_computed_from_the_database_and_survives_restart(
        sessions: sessionmaker[Session], db_url: str) -> None:
    t0 = utcnow() - timedelta(seconds=30)
    _receive(sessions, "1.2.4", 3, when=t0)
    # a new process (new engine, new catalog cache) sees the same stable study
    fresh = make_session_factory(make_engine(db_url))
    with fresh() as s:
        assert len(queue_stable_studies(s, 10)) == 1


def test_two_workers_never_claim_the_same_job(sessions: sessionmaker[Session]) -> None:
    t0 = utcnow() - timedelta(seconds=60)
    for k in range(6):
        _receive(sessions, f"1.2.5.{k}", 2, when=t0)
    with sessions() as s:
        assert len(queue_stable_studies(s, 1)) == 6
    claims: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            with sessions() as s:
                c = claim_job(s, name, 600)
            if c is None:
                return
            with lock:
                claims.append(c.job_id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claims) == sorted(set(claims)) and len(claims) == 6
    with sessions() as s:
        assert {st.state for st in s.scalars(select(Study))} == {StudyState.ANALYSING}


def test_expired_lease_is_reclaimed_and_gives_up_after_max_attempts(
        sessions: sessionmaker[Session]) -> None:
    _receive(sessions, "1.2.6", 2, when=utcnow() - timedelta(seconds=60))
    with sessions() as s:
        queue_stable_studies(s, 1)
    now = utcnow()
    with sessions() as s:
        first = claim_job(s, "a", 10, now=now)
    assert first is not None
    with sessions() as s:  # lease still valid: nothing to claim
        assert claim_job(s, "b", 10, now=now + timedelta(seconds=5)) is None
    attempt = first.attempt
    t = now
    while attempt < MAX_JOB_ATTEMPTS:
        t += timedelta(seconds=11)
        with sessions() as s:
            c = claim_job(s, "b", 10, now=t)
        assert c is not None and c.job_id == first.job_id
        attempt = c.attempt
    with sessions() as s:
        assert claim_job(s, "c", 10, now=t + timedelta(seconds=11)) is None
        study = s.scalars(select(Study)).one()
        assert study.state == StudyState.FAILED
        assert f"{MAX_JOB_ATTEMPTS} attempts" in (study.reason or "")
        assert s.scalars(select(Job)).one().state == JobState.FAILED


def test_lease_renewal_and_loss(sessions: sessionmaker[Session]) -> None:
    _receive(sessions, "1.2.7", 1, when=utcnow() - timedelta(seconds=60))
    with sessions() as s:
        queue_stable_studies(s, 1)
        c = claim_job(s, "me", 10)
    assert c is not None
    assert renew_lease(sessions, c.job_id, "me", 10)
    assert not renew_lease(sessions, c.job_id, "someone-else", 10)
    with sessions() as s:  # a worker that lost its lease cannot end the job
        assert not finish_job_failed(s, c.job_id, "someone-else", "x")
    with sessions() as s:
        assert finish_job_failed(s, c.job_id, "me", "series 1.2.7.1 has 1 slice", StudyState.REJECTED)
        study = s.scalars(select(Study)).one()
        assert study.state == StudyState.REJECTED and "1 slice" in (study.reason or "")


def test_leases_of_a_dead_process_are_released_at_restart(sessions: sessionmaker[Session]) -> None:
    _receive(sessions, "1.2.8", 1, when=utcnow() - timedelta(seconds=60))
    me = lease_owner()
    host = me.split(":")[0]
    dead = f"{host}:999999:12345.000"
    with sessions() as s:
        queue_stable_studies(s, 1)
        assert claim_job(s, dead, 3600) is not None
    with sessions() as s:
        assert claim_job(s, me, 3600) is None
        assert release_orphaned_leases(s) == 1
    with sessions() as s:
        c = claim_job(s, me, 3600)
        assert c is not None and c.attempt == 2


def test_new_instances_after_analysis_queue_a_new_job(sessions: sessionmaker[Session]) -> None:
    t0 = utcnow() - timedelta(seconds=120)
    _receive(sessions, "1.2.9", 2, when=t0)
    with sessions() as s:
        queue_stable_studies(s, 1, now=t0 + timedelta(seconds=5))
        c = claim_job(s, "me", 600)
        assert c is not None
        finish_job_failed(s, c.job_id, "me", "no analysable series", StudyState.REJECTED)
    with sessions() as s:  # nothing new: stays rejected
        assert queue_stable_studies(s, 1) == []
    cat = Catalog(sessions)
    cat.record_instance(InstanceRecord("1.2.9", "1.2.9.2", "1.2.9.2.1", "1.2.840.10008.5.1.4.1.1.2",
                                       "1.2.840.10008.1.2.1", "CT", "instances/y.dcm", 10, "PACS"),
                        now=t0 + timedelta(seconds=10))
    with sessions() as s:
        assert len(queue_stable_studies(s, 1)) == 1
        assert len(list(s.scalars(select(Job)))) == 2


def test_illegal_transition_is_refused(sessions: sessionmaker[Session]) -> None:
    _receive(sessions, "1.2.10", 1)
    with sessions() as s:
        study = s.scalars(select(Study)).one()
        with pytest.raises(IllegalTransition, match="receiving -> complete"):
            transition(s, study, StudyState.COMPLETE)
        transition(s, study, StudyState.QUEUED, reason="test")
        s.commit()
        assert s.scalars(select(AuditEntry).where(AuditEntry.action == "state:queued")).one()


JOB_LEGAL = {
    (JobState.QUEUED, JobState.RUNNING),
    (JobState.RUNNING, JobState.RUNNING),
    (JobState.RUNNING, JobState.DONE),
    (JobState.RUNNING, JobState.FAILED),
}


@pytest.mark.parametrize("old", list(JobState))
@pytest.mark.parametrize("new", list(JobState))
def test_job_transition_table(old: JobState, new: JobState) -> None:
    """Only the changes the job table lists are made; every other one is refused unchanged."""
    assert ((old, new) in JOB_LEGAL) == (new in JOB_TRANSITIONS[old])
    job = Job(id=7, study_id=1, state=old)
    if (old, new) in JOB_LEGAL:
        transition_job(job, new)
        assert job.state == new
    else:
        with pytest.raises(IllegalTransition, match=f"job 7: {old.value} -> {new.value}"):
            transition_job(job, new)
        assert job.state == old


def test_a_finished_job_is_not_claimed_or_ended_again(sessions: sessionmaker[Session]) -> None:
    _receive(sessions, "1.2.11", 1, when=utcnow() - timedelta(seconds=60))
    with sessions() as s:
        queue_stable_studies(s, 1)
        c = claim_job(s, "me", 600)
    assert c is not None
    with sessions() as s:
        assert finish_job_failed(s, c.job_id, "me", "no analysable series", StudyState.REJECTED)
    with sessions() as s:
        job = s.get_one(Job, c.job_id)
        assert job.state == JobState.DONE
        assert claim_job(s, "me", 600, now=utcnow() + timedelta(days=1)) is None
        with pytest.raises(IllegalTransition, match="done -> running"):
            transition_job(job, JobState.RUNNING)


def test_claims_skip_locked_rows_on_postgresql_only(sessions: sessionmaker[Session],
                                                    db_url: str) -> None:
    """PostgreSQL gets FOR UPDATE (SKIP LOCKED for a queue scan); SQLite relies on BEGIN IMMEDIATE."""
    with sessions() as s:
        scan = str(for_update(s, select(Job)).compile(s.get_bind()))
        one = str(for_update(s, select(Job).where(Job.id == 1), skip_locked=False)
                  .compile(s.get_bind()))
    if db_url.startswith("postgresql"):
        assert scan.endswith("FOR UPDATE SKIP LOCKED")
        assert one.endswith("FOR UPDATE")
    else:
        assert "FOR UPDATE" not in scan and "FOR UPDATE" not in one


@pytest.mark.postgres
def test_a_connection_left_in_autocommit_returns_to_the_pool_transactional() -> None:
    """A pooled connection switched to autocommit through the driver must never hand autocommit
    to the next user (FOR UPDATE would lock nothing)."""
    from node.db import make_engine
    from tests.conftest import PG_ADMIN_URL

    engine = make_engine(PG_ADMIN_URL)
    try:
        raw = engine.raw_connection()
        raw.driver_connection.autocommit = True
        raw.close()  # back to the pool as such a holder would leave it
        with engine.connect() as conn:
            assert conn.connection.driver_connection.autocommit is False
    finally:
        engine.dispose()


def test_the_receivers_lookup_does_not_wait_for_a_sqlite_writer(tmp_path: Path) -> None:
    """Every SQLite transaction starts with BEGIN IMMEDIATE (the claim's single writer); the
    per-instance lookup of the receiver (``SINGLE_READ``) must not queue behind a writer that holds
    the lock, and reads the committed state."""
    url = f"sqlite:///{tmp_path / 'n.db'}"
    upgrade(url)
    sessions = make_session_factory(make_engine(url))
    _receive(sessions, "1.2.9", 1)
    catalog = Catalog(sessions)
    writer = make_engine(url)
    try:
        with writer.begin() as conn:  # holds SQLite's write lock until the block ends
            conn.execute(text("UPDATE studies SET reason = 'held'"))
            known = catalog.known_instance("1.2.9.1.1")
            assert known is not None and known.relative_path == "instances/x/0.dcm"
            assert catalog.known_instance("1.2.9.1.2") is None
            assert catalog.has_instance("1.2.9.1.1")
            assert catalog.instance_path("1.2.9.1.1") == "instances/x/0.dcm"
            with sessions.kw["bind"].connect() as other, pytest.raises(OperationalError,
                                                                       match="locked"):
                other.connection.driver_connection.execute("PRAGMA busy_timeout=50")
                other.execute(text("SELECT 1"))  # an ordinary transaction waits for the lock
    finally:
        writer.dispose()
