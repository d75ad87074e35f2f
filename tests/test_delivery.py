"""Deliveries that wait out an outage, and study states that say where the results are.

A destination down for longer than the old 8-attempt rule allowed still gets
everything once it is back (the horizon decides, not the attempts); a C-ECHO
probe sends the backlog as soon as the destination answers; the study goes
``delivering`` -> ``delivered``, or ``delivery-failed`` after the horizon until
an administrator re-queues (``lungnode deliveries retry --dead`` /
``--destination``).
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from node.cli import app
from node.db import (
    AuditEntry,
    Delivery,
    DeliveryState,
    ResultObject,
    Study,
    StudyState,
    make_engine,
    make_session_factory,
    utcnow,
)
from node.errors import IllegalTransition
from node.migrate import upgrade
from node.service import Node
from node.settings import DeliverySettings, DicomSettings, Peer, Settings
from node.web.app import WebServer
from node.work.outbox import (
    VERIFICATION,
    DestinationProbe,
    deliver_due,
    requeue_deliveries,
    study_delivered_at,
)
from node.work.state import TRANSITIONS, transition
from tests.conftest import write_config
from tests.dcmtk import wait_for
from tests.peers import Orthanc, StoreSCP, free_port, storescu
from tests.test_outbox import outbox  # noqa: F401 - the fixture: three real files, one delivery each
from training.synth import SynthSpec, write_study

S = StudyState
STUDY_LEGAL = {
    (S.RECEIVING, S.QUEUED), (S.QUEUED, S.ANALYSING),
    *((S.ANALYSING, s) for s in (S.COMPLETE, S.DELIVERING, S.REJECTED, S.FAILED, S.QUEUED,
                                 S.ANALYSING)),
    *((S.COMPLETE, s) for s in (S.QUEUED, S.DELIVERING, S.DELIVERED, S.DELIVERY_FAILED)),
    (S.DELIVERING, S.DELIVERED), (S.DELIVERING, S.DELIVERY_FAILED), (S.DELIVERING, S.QUEUED),
    (S.DELIVERED, S.QUEUED),
    (S.DELIVERY_FAILED, S.DELIVERING), (S.DELIVERY_FAILED, S.QUEUED),
    (S.REJECTED, S.QUEUED), (S.FAILED, S.QUEUED),
}


class _Rows:
    """Stands in for the session: what :func:`transition` adds (its audit entry)."""

    def __init__(self) -> None:
        self.added: list[object] = []

    def add(self, row: object) -> None:
        self.added.append(row)


def test_study_transition_table() -> None:
    """The study table is exactly the legal set; a re-analysis and `lungnode retry` (-> queued)
    start from every state with results, and the function refuses the rest unchanged."""
    assert {(old, new) for old, news in TRANSITIONS.items() for new in news} == STUDY_LEGAL
    assert set(TRANSITIONS) == set(StudyState)
    for old in StudyState:
        for new in StudyState:
            study = Study(id=1, study_instance_uid="1.2.3", state=old)
            rows = _Rows()
            if (old, new) in STUDY_LEGAL:
                transition(rows, study, new, reason="why", actor="test")  # type: ignore[arg-type]
                assert study.state == new and len(rows.added) == 1
            else:
                with pytest.raises(IllegalTransition, match=f"{old.value} -> {new.value}"):
                    transition(rows, study, new)  # type: ignore[arg-type]
                assert study.state == old and not rows.added


def _delivering(sessions: sessionmaker[Session]) -> int:
    """The fixture's study, as the pipeline leaves it once its results are queued."""
    with sessions() as s:
        study = s.scalars(select(Study)).one()
        study.state, study.result_version = StudyState.DELIVERING, 1
        s.commit()
        return study.id


def _study(sessions: sessionmaker[Session]) -> Study:
    with sessions() as s:
        return s.scalars(select(Study)).one()


def test_the_horizon_not_the_attempts_makes_a_delivery_dead_and_retry_dead_brings_it_back(
        outbox: tuple[sessionmaker[Session], Path, list[int]], tmp_path: Path,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    sessions, root, ids = outbox
    study_id = _delivering(sessions)
    port = free_port()  # nothing listens: the destination is down
    peers = {"pacs": Peer(name="pacs", ae_title="RECEIVER", host="127.0.0.1", port=port)}
    dicom = DicomSettings(ae_title="LUNGNODE", network_timeout=5, acse_timeout=5)
    settings = DeliverySettings(destinations=["pacs"], backoff_seconds=0.2, backoff_max_seconds=1,
                                horizon_hours=1)
    t0 = utcnow()
    for i in range(12):  # the old rule gave up after 8 attempts
        out = deliver_due(sessions, root, peers, dicom, settings, "me",
                          now=t0 + timedelta(minutes=4 * i))
        assert (out.sent, out.failed, out.dead, out.unreachable) == (0, 3, 0, frozenset({"pacs"}))
    # the last retry before the horizon is at the horizon, however long the backoff
    long_backoff = settings.model_copy(update={"backoff_max_seconds": 7200.0})
    deliver_due(sessions, root, peers, dicom, long_backoff, "me", now=t0 + timedelta(minutes=50))
    with sessions() as s:
        for d in s.scalars(select(Delivery)):
            assert (d.state, d.attempts) == (DeliveryState.PENDING, 13)
            assert d.next_attempt_at == d.created_at + timedelta(hours=1)
    study = _study(sessions)
    assert study.state == StudyState.DELIVERING

    out = deliver_due(sessions, root, peers, dicom, settings, "me", now=t0 + timedelta(minutes=61))
    assert (out.failed, out.dead) == (0, 3)
    study = _study(sessions)
    assert study.state == StudyState.DELIVERY_FAILED
    assert "3 of 3 deliveries dead" in (study.reason or "") and "retry --dead" in (study.reason or "")
    with sessions() as s:
        dead = list(s.scalars(select(AuditEntry).where(AuditEntry.action == "delivery-dead")))
        assert len(dead) == 3 and "14 attempts over 1 hours" in (dead[0].detail or "")
        assert study_delivered_at(s, study_id) is None

    with sessions() as s:
        assert requeue_deliveries(s, "test", dead=True) == ids
    assert _study(sessions).state == StudyState.DELIVERING
    with sessions() as s:
        retried = list(s.scalars(select(AuditEntry).where(AuditEntry.action == "delivery-retry")))
        assert [a.actor for a in retried] == ["test"] * 3 and all(a.study_id == study_id
                                                                 for a in retried)
        assert all(d.attempts == 0 for d in s.scalars(select(Delivery)))
    caplog.set_level(logging.INFO, logger="node.work.outbox")
    with StoreSCP(tmp_path / "received", port=port, aet="RECEIVER") as receiver:
        assert deliver_due(sessions, root, peers, dicom, settings, "me").sent == 3
        assert len(receiver.wait_for_files(3)) == 3
    study = _study(sessions)
    assert study.state == StudyState.DELIVERED and "all 3 deliveries sent" in (study.reason or "")
    with sessions() as s:
        sent = {d.id: d for d in s.scalars(select(Delivery))}
        assert study_delivered_at(s, study_id) == max(d.sent_at for d in sent.values()
                                                     if d.sent_at is not None)
        uids = {o.id: o.sop_instance_uid for o in s.scalars(select(ResultObject))}
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("delivered to")]
    assert len(logged) == 3
    for d in sent.values():
        assert any(f"delivery {d.id}, SOP instance {uids[d.result_object_id]}, at " in m
                   for m in logged)
    source = pydicom.dcmread(next(root.rglob("*.dcm")), stop_before_pixels=True)
    assert str(source.PatientName) not in caplog.text and source.PatientID not in caplog.text


def test_the_probe_echoes_once_per_backoff_step_and_releases_the_whole_backlog(
        outbox: tuple[sessionmaker[Session], Path, list[int]]) -> None:  # noqa: F811
    """One C-ECHO per destination and backoff step, however many rows wait; an answer makes
    every waiting row due; a destination known to take associations is not probed."""
    sessions, _root, ids = outbox
    later = utcnow() + timedelta(hours=1)
    with sessions() as s:
        for d in s.scalars(select(Delivery)):
            d.attempts, d.next_attempt_at, d.last_error = 6, later, "refused"
        s.commit()
    answers: list[int] = []
    status = [0x0110]  # processing failure: the destination is not ready yet

    def on_echo(event: evt.Event) -> int:
        answers.append(1)
        return status[0]

    ae = AE(ae_title="RECEIVER")
    ae.add_supported_context(VERIFICATION)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_ECHO, on_echo)])
    assert server is not None
    try:
        peers = {"pacs": Peer(name="pacs", ae_title="RECEIVER", host="127.0.0.1", port=port)}
        dicom = DicomSettings(ae_title="LUNGNODE", network_timeout=5, acse_timeout=5)
        settings = DeliverySettings(destinations=["pacs"], backoff_seconds=30)
        probe = DestinationProbe()
        t0 = utcnow()
        for _ in range(3):
            assert probe.probe(sessions, peers, dicom, settings, now=t0) == {}
        assert len(answers) == 1
        assert probe.probe(sessions, peers, dicom, settings, now=t0 + timedelta(seconds=29)) == {}
        assert len(answers) == 1
        status[0] = 0x0000
        released = probe.probe(sessions, peers, dicom, settings, now=t0 + timedelta(seconds=30))
        assert released == {"pacs": 3} and len(answers) == 2
        with sessions() as s:
            assert [d.next_attempt_at for d in s.scalars(select(Delivery).order_by(Delivery.id))] \
                == [t0 + timedelta(seconds=30)] * 3
            s.get_one(Delivery, ids[0]).next_attempt_at = later
            s.commit()
        # up: its failures are the objects', which C-ECHO says nothing about; not probed again
        assert probe.probe(sessions, peers, dicom, settings, now=t0 + timedelta(minutes=5)) == {}
        assert len(answers) == 2
        probe.unreachable(["pacs"], t0 + timedelta(minutes=5))  # an association failed
        assert probe.probe(sessions, peers, dicom, settings,
                           now=t0 + timedelta(minutes=6)) == {"pacs": 1}
    finally:
        server.shutdown()


def test_deliveries_retry_in_bulk_from_the_command_line(tmp_path: Path) -> None:
    config = write_config(tmp_path / "lungnode.toml", {
        "storage": {"root": "storage", "min_free_mb": 1},
        "database": {"url": "sqlite:///lungnode.db"},
    }, [{"name": n, "ae_title": n.upper(), "host": "127.0.0.1", "port": free_port()}
        for n in ("pacs", "other")])
    url = f"sqlite:///{tmp_path / 'lungnode.db'}"
    upgrade(url)
    sessions = make_session_factory(make_engine(url))
    plan = [("pacs", DeliveryState.DEAD), ("pacs", DeliveryState.PENDING),
            ("other", DeliveryState.DEAD), ("other", DeliveryState.SENT),
            ("other", DeliveryState.DEAD)]
    with sessions() as s:
        study = Study(study_instance_uid="1.2.826.0.1.5", state=StudyState.DELIVERY_FAILED,
                      result_version=1, reason="3 deliveries dead")
        s.add(study)
        s.flush()
        objs = [ResultObject(study_id=study.id, version=1, kind=k, sop_class_uid="1.2.3",
                             sop_instance_uid=f"1.2.826.0.1.5.{i}", series_instance_uid="1.2.4",
                             path=f"results/{k}.dcm") for i, k in enumerate(("sr", "seg", "summary"))]
        s.add_all(objs)
        s.flush()
        rows = [Delivery(result_object_id=objs[i % 3].id, destination=dest, state=state,
                         attempts=9, next_attempt_at=utcnow() + timedelta(hours=1))
                for i, (dest, state) in enumerate(plan)]
        s.add_all(rows)
        s.commit()
        ids = [d.id for d in rows]
        study_id = study.id

    def lungnode(*args: str) -> tuple[int, str]:
        res = CliRunner().invoke(app, ["--config", str(config), *args])
        return res.exit_code, res.output

    code, text = lungnode("deliveries", "retry")
    assert code == 2 and "--dead and/or --destination" in text
    code, text = lungnode("deliveries", "retry", str(ids[0]), "--dead")
    assert code == 2
    code, text = lungnode("deliveries", "retry", "--dead", "--destination", "other")
    assert code == 0 and f"2 deliveries re-queued: {ids[2]}, {ids[4]}" in text, text
    assert lungnode("show", str(study_id))[1].count("state: delivery-failed") == 1  # pacs's dead one
    web = WebServer("127.0.0.1", 0, sessions)
    web.start()
    try:
        page = urllib.request.urlopen(f"http://127.0.0.1:{web.port}/").read().decode()
        assert "<tr class='delivery-failed'>" in page and "retry --dead" in page
    finally:
        web.stop()
    code, text = lungnode("deliveries", "retry", "--destination", "pacs")
    assert code == 0 and f"2 deliveries re-queued: {ids[0]}, {ids[1]}" in text, text
    assert "state: delivering" in lungnode("show", str(study_id))[1]
    code, text = lungnode("studies", "--json")
    assert code == 0 and json.loads(text)[0]["state"] == "delivering"
    code, text = lungnode("deliveries", "retry", "--dead")
    assert code == 0 and "0 deliveries re-queued" in text
    code, text = lungnode("deliveries", "retry", str(ids[3]))
    assert code == 1 and "already sent" in text
    with sessions() as s:
        states = [s.get_one(Delivery, i).state for i in ids]
        assert states == [DeliveryState.PENDING] * 3 + [DeliveryState.SENT, DeliveryState.PENDING]
        audit = list(s.scalars(select(AuditEntry).where(AuditEntry.action == "delivery-retry")
                               .order_by(AuditEntry.id)))
        assert [(a.actor, a.study_id) for a in audit] == [("cli", study_id)] * 4
        assert [a.detail.split(" re-queued")[0] for a in audit if a.detail] == [
            f"delivery {i} to {plan[n][0]}" for n, i in ((2, ids[2]), (4, ids[4]), (0, ids[0]),
                                                          (1, ids[1]))]
        moves = [a.detail for a in s.scalars(select(AuditEntry).where(
            AuditEntry.action.startswith("state:")))]
        assert moves and (moves[-1] or "").startswith("delivery-failed -> delivering")


def _waiting(node: Node) -> list[Delivery]:
    with node.sessions() as s:
        return list(s.scalars(select(Delivery).order_by(Delivery.id)))


def test_results_made_while_orthanc_is_down_arrive_once_when_it_answers_again(
        tmp_path: Path, make_settings: Callable[..., Settings],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node.work.outbox")
    orthanc = Orthanc(tmp_path / "orthanc")  # its ports are chosen; it is not running: down
    port = free_port()
    settings = make_settings(
        f"sqlite:///{tmp_path / 'node.db'}", port=port,
        peers=[{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                "port": orthanc.dicom_port},
               {"name": "ct", "ae_title": "STORESCU", "host": "127.0.0.1", "port": 104}],
        delivery={"destinations": ["orthanc"], "backoff_seconds": 0.2, "backoff_max_seconds": 0.5,
                  "poll_seconds": 0.1, "horizon_hours": 1.0},
        model={"enabled": False}, analysis={"anonymize": False})
    phantoms = [write_study(tmp_path / f"s{i}", SynthSpec(seed=40 + i, involvement=0.2, rows=64,
                                                          slices=40, slice_thickness_mm=5.0))
               for i in range(2)]
    node = Node(settings)
    node.start()
    try:
        for phantom in phantoms:
            storescu([phantom.dicom_dir], "127.0.0.1", port, "LUNGNODE")

        def retried_past_the_old_limit() -> bool:
            rows = _waiting(node)
            return len(rows) == 6 and all(d.attempts > 10 for d in rows)

        wait_for(retried_past_the_old_limit, 120, 0.1, "both studies' results retried 11 times")
        with node.sessions() as s:
            assert {st.state for st in s.scalars(select(Study))} == {StudyState.DELIVERING}
        assert {d.state for d in _waiting(node)} <= {DeliveryState.PENDING, DeliveryState.SENDING}
        # from here each delivery's own next attempt is minutes away (0.2 s * 2**11 after its
        # 12th failure); only the probe can send them sooner
        node.settings.delivery.backoff_max_seconds = 3600.0

        def far() -> dict[int, datetime] | None:
            rows = _waiting(node)
            soon = utcnow() + timedelta(seconds=300)
            if all(d.state == DeliveryState.PENDING and d.next_attempt_at > soon for d in rows):
                return {d.id: d.next_attempt_at for d in rows}
            return None

        held = wait_for(far, 60, 0.1, "every delivery's next attempt to be 5 minutes away")
        assert held is not None
        with orthanc:
            wait_for(lambda: all(d.state == DeliveryState.SENT for d in _waiting(node)), 60, 0.1,
                     "the backlog to be delivered")
            sent = _waiting(node)
            assert all(d.sent_at is not None and d.sent_at < held[d.id] for d in sent)
            with node.sessions() as s:
                made = {o.sop_instance_uid for o in s.scalars(select(ResultObject))}
                for st in s.scalars(select(Study)):
                    assert st.state == StudyState.DELIVERED
                    moves = [a.action for a in s.scalars(select(AuditEntry).where(
                        AuditEntry.study_id == st.id, AuditEntry.action.startswith("state:"))
                        .order_by(AuditEntry.id))]
                    assert moves[-2:] == ["state:delivering", "state:delivered"]
            assert len(made) == 6
            assert orthanc.count_instances() == 6
            stored = {orthanc.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]
                      for i in orthanc.get("/instances")}
            assert stored == made
    finally:
        node.stop()
    text = caplog.text
    assert "destination orthanc answers C-ECHO again" in text
    assert sum(1 for r in caplog.records if r.getMessage().startswith("delivered to orthanc")) == 6


def test_an_old_configuration_with_max_attempts_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """8 attempts (11 minutes) is the limit that lost results in an outage: not honoured silently."""
    from node.errors import ConfigError
    from node.settings import load_settings

    old = write_config(tmp_path / "old.toml", {"delivery": {"max_attempts": 8}})
    with pytest.raises(ConfigError, match=r"\[delivery\] max_attempts was replaced by horizon_hours"):
        load_settings(old)
    assert load_settings(write_config(tmp_path / "new.toml", {})).delivery.horizon_hours == 72.0
