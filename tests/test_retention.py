"""Retention (node.work.retention, ``lungnode purge``): what goes when, and what stays.

Studies are real synthetic series written into the storage root and archived by the worker's
own archive step (tests/learnkit.py); their results and deliveries are the rows the worker and
the outbox write, with small files in their place.  The clock is injected (``now``); low free
space is a threshold set relative to the file system's real free space.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from node.cli import app
from node.db import (
    AuditEntry,
    Delivery,
    DeliveryState,
    Instance,
    LabelEvent,
    LabelSource,
    LabelValue,
    LearnStudy,
    ResultObject,
    Study,
    StudyState,
    UidMapping,
    make_engine,
    make_session_factory,
    utcnow,
)
from node.learn.datasets import freeze
from node.migrate import upgrade
from node.service import Node
from node.settings import RetentionSettings, Settings
from node.work.retention import DiskUsage, disk_usage, plan_purge, purge
from node.work.views import study_rows
from tests.dcmtk import wait_for
from tests.learnkit import ArchivedStudy, archive_study

NOW = utcnow()
DAY = timedelta(days=1)


def _sessions(url: str) -> sessionmaker[Session]:
    upgrade(url)
    return make_session_factory(make_engine(url))


def _study(settings: Settings, sessions: sessionmaker[Session], seed: int,
           deliveries: Sequence[DeliveryState] = (DeliveryState.SENT, DeliveryState.SENT),
           sent_at: datetime | None = None, state: StudyState = StudyState.COMPLETE,
           rows: int = 32) -> ArchivedStudy:
    """A received, analysed and archived study with three result files, each sent to
    ``len(deliveries)`` destinations in the given states (``sent_at`` for the sent ones)."""
    a = archive_study(settings, sessions, seed=seed, patient_id=f"P{seed}", rows=rows,
                      slices=40 if rows > 32 else 20)
    rel_dir = f"results/{a.study_uid}/v1-job1"
    (settings.storage.root / rel_dir).mkdir(parents=True)
    with sessions() as session:
        study = session.get_one(Study, a.study_id)
        study.state, study.result_version = state, 1
        for kind in ("sr", "seg", "summary"):
            (settings.storage.root / rel_dir / f"{kind}.dcm").write_bytes(b"result" * 100)
            obj = ResultObject(study_id=a.study_id, version=1, kind=kind, sop_class_uid="1.2.3",
                               sop_instance_uid=generate_uid(), series_instance_uid=generate_uid(),
                               path=f"{rel_dir}/{kind}.dcm", created_at=(sent_at or NOW) - DAY)
            session.add(obj)
            session.flush()
            for n, st in enumerate(deliveries):
                session.add(Delivery(result_object_id=obj.id, destination=f"pacs{n}", state=st,
                                     attempts=1, sent_at=sent_at if st == DeliveryState.SENT else None))
        session.commit()
    return a


def _files(settings: Settings, a: ArchivedStudy) -> int:
    root = settings.storage.root
    return sum(1 for _ in (root / "instances" / a.study_uid).rglob("*.dcm")) + \
        sum(1 for _ in (root / "results" / a.study_uid).rglob("*.dcm"))


def _audit(sessions: sessionmaker[Session], action: str) -> list[AuditEntry]:
    with sessions() as session:
        return list(session.scalars(select(AuditEntry).where(AuditEntry.action == action)
                                    .order_by(AuditEntry.id)))


def test_delivered_study_purged_after_its_days(db_url: str, make_settings: Callable[..., Settings],
                                               tmp_path: Path) -> None:
    """Past the horizon: files and instance rows gone, purged_at and audit set; everything not
    delivered, in progress or younger stays; the dry run lists the same set and changes nothing."""
    settings = make_settings(db_url)
    sessions = _sessions(db_url)
    old = _study(settings, sessions, 1, sent_at=NOW - 10 * DAY)
    young = _study(settings, sessions, 2, sent_at=NOW - 2 * DAY)
    pending = _study(settings, sessions, 3, (DeliveryState.SENT, DeliveryState.PENDING),
                     sent_at=NOW - 10 * DAY)
    dead = _study(settings, sessions, 4, (DeliveryState.SENT, DeliveryState.DEAD),
                  sent_at=NOW - 10 * DAY)
    busy = _study(settings, sessions, 5, sent_at=NOW - 10 * DAY, state=StudyState.QUEUED)
    no_dest = _study(settings, sessions, 6, (), sent_at=NOW - 10 * DAY)  # results made 11 days ago
    unarchived = _study(settings, sessions, 7, sent_at=NOW - 10 * DAY)
    with sessions() as session:  # a stop between the results and the archive copy
        session.execute(delete(UidMapping).where(UidMapping.study_id == unarchived.study_id))
        session.commit()
    kept = (young, pending, dead, busy, unarchived)
    first = sorted((settings.storage.root / "instances" / old.study_uid).rglob("*.dcm"))[0]
    Path(f"{first}.resend-0123456789abcdef").write_bytes(first.read_bytes())  # a keep-first copy
    before = {a.study_id: _files(settings, a) for a in (old, *kept, no_dest)}
    assert all(n == 23 for n in before.values())

    dry = purge(sessions, settings, now=NOW, dry_run=True)
    # oldest done first: no_dest's results were made a day before old's were delivered
    assert [(i.uid, i.rule) for i in dry.plan.items] == [(no_dest.study_uid, "horizon"),
                                                         (old.study_uid, "horizon")]
    assert "no destinations" in dry.plan.items[0].reason
    assert "results delivered" in dry.plan.items[1].reason
    assert dry.plan.items[1].bytes > 0 and dry.plan.items[1].files == 23 and not dry.done
    assert {a.study_id: _files(settings, a) for a in (old, *kept, no_dest)} == before
    assert not _audit(sessions, "purge-originals")

    report = purge(sessions, settings, now=NOW)
    assert [i.uid for i in report.done] == [i.uid for i in dry.plan.items] and not report.errors
    for a in (old, no_dest):
        assert _files(settings, a) == 0
        assert not (settings.storage.root / "instances" / a.study_uid).exists()
        assert not (settings.storage.root / "results" / a.study_uid).exists()
        assert (settings.archive_root / a.anon_study_uid).is_dir()  # training material stays
    for a in kept:
        assert _files(settings, a) == 23
    with sessions() as session:
        purged = {s.id: s.purged_at for s in session.scalars(select(Study))}
        assert purged[old.study_id] == NOW and purged[no_dest.study_id] == NOW
        assert all(purged[a.study_id] is None for a in kept)
        remaining = {sid for sid in session.scalars(select(Instance.study_id))}
        assert old.study_id not in remaining and young.study_id in remaining
        # the record stays: the result objects and their deliveries
        assert len(session.scalars(select(ResultObject).where(
            ResultObject.study_id == old.study_id)).all()) == 3
    audits = _audit(sessions, "purge-originals")
    assert [(a.study_id, a.actor) for a in audits] == [(no_dest.study_id, "retention"),
                                                        (old.study_id, "retention")]
    assert "20 instances" in (audits[1].detail or "") and "3 result files" in (audits[1].detail or "")
    assert "P1" not in (audits[1].detail or "")

    # later (the injected clock): the young study's time has come; the rest still stays
    again = purge(sessions, settings, now=NOW + 6 * DAY)
    assert [i.study_id for i in again.done] == [young.study_id]
    assert all(_files(settings, a) == 23 for a in (pending, dead, busy, unarchived))
    with sessions() as session:  # the archive copy failed (recorded): its wait is over
        session.add(AuditEntry(actor="worker", action="archive-failed", study_id=unarchived.study_id))
        session.commit()
    assert [i.study_id for i in purge(sessions, settings, now=NOW + 6 * DAY).done] == [unarchived.study_id]

    # the command line: show says purged; a dry run has nothing left to do
    runner = CliRunner()
    config = str(settings.config_path)
    shown = runner.invoke(app, ["--config", config, "show", str(old.study_id)])
    assert shown.exit_code == 0, shown.output
    assert "purged" in shown.output and "purge-originals" in shown.output
    studies = runner.invoke(app, ["--config", config, "studies"])
    assert studies.exit_code == 0 and "purged" in studies.output, studies.output
    with sessions() as session:  # what the web page shows
        rows = {r["id"]: r for r in study_rows(session)}
    assert rows[old.study_id]["purged_at"] is not None and rows[pending.study_id]["purged_at"] is None
    assert rows[old.study_id]["reason"].startswith("purged ")
    listed = runner.invoke(app, ["purge", "--dry-run", "--json", "--config", config])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output)["planned"] == []


def test_cli_purge_dry_run_then_purge(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """``lungnode purge --dry-run`` lists study, why and size and deletes nothing; ``purge`` does it
    as ``cli:<user>``."""
    url = f"sqlite:///{tmp_path / 'lungnode.db'}"
    settings = make_settings(url, retention={"originals_days": 0})
    sessions = _sessions(url)
    a = _study(settings, sessions, 11, sent_at=utcnow() - timedelta(minutes=1))
    runner = CliRunner()
    config = str(settings.config_path)
    dry = runner.invoke(app, ["purge", "--dry-run", "--config", config])
    assert dry.exit_code == 0, dry.output
    assert a.study_uid in dry.output and "would delete 1 item(s)" in dry.output
    assert "kept 0 days" in dry.output and _files(settings, a) == 23
    done = runner.invoke(app, ["purge", "--by", "alice", "--config", config])
    assert done.exit_code == 0, done.output
    assert "deleted 1 item(s)" in done.output and _files(settings, a) == 0
    assert [(e.actor, e.study_id) for e in _audit(sessions, "purge-originals")] == [("cli:alice", a.study_id)]


def test_emergency_purges_oldest_delivered_first(make_settings: Callable[..., Settings],
                                                 tmp_path: Path) -> None:
    """Under the free-space threshold the oldest delivered studies go before their days, just
    enough of them; undelivered ones never, even when space stays short."""
    url = f"sqlite:///{tmp_path / 'lungnode.db'}"
    settings = make_settings(url)
    sessions = _sessions(url)
    newest = _study(settings, sessions, 21, sent_at=NOW - 1 * DAY)
    oldest = _study(settings, sessions, 22, sent_at=NOW - 3 * DAY)
    middle = _study(settings, sessions, 23, sent_at=NOW - 2 * DAY)
    undelivered = _study(settings, sessions, 24, (DeliveryState.PENDING,), sent_at=NOW - 5 * DAY)
    real = disk_usage(settings.storage.root)  # measured once: the test's own snapshot
    with sessions() as session:
        assert plan_purge(session, settings, now=NOW, usage=real).items == ()  # nothing due
        sizes = {i.study_id: i.bytes for i in plan_purge(
            session, settings.model_copy(update={"retention": RetentionSettings(
                emergency_free_percent=100)}), now=NOW, usage=real).items}
    # everything goes at 100 %: the three delivered, oldest first, never the undelivered one
    assert list(sizes) == [oldest.study_id, middle.study_id, newest.study_id]

    # a threshold that the oldest study's bytes do not quite reach: two studies go
    need = sizes[oldest.study_id] + sizes[middle.study_id] // 2
    percent = 100 * (real.free + need) / real.total
    s = settings.model_copy(update={"retention": RetentionSettings(emergency_free_percent=percent)})
    report = purge(sessions, s, now=NOW, usage=real)
    assert [(i.study_id, i.rule) for i in report.done] == [(oldest.study_id, "emergency"),
                                                           (middle.study_id, "emergency")]
    assert "emergency" in report.done[0].reason and not report.plan.notes
    assert _files(settings, oldest) == _files(settings, middle) == 0
    assert _files(settings, newest) == _files(settings, undelivered) == 23
    assert [e.study_id for e in _audit(sessions, "purge-originals")] == [oldest.study_id, middle.study_id]

    # space stays short: the rest of the delivered go; the undelivered one stays, and a note says why
    full = settings.model_copy(update={"retention": RetentionSettings(emergency_free_percent=100)})
    last = purge(sessions, full, now=NOW, usage=DiskUsage(total=real.total, free=0))
    assert [i.study_id for i in last.done] == [newest.study_id]
    assert _files(settings, undelivered) == 23
    assert "1 studies with data are in progress or not yet delivered" in last.plan.notes[0]

    # above the threshold nothing happens early
    calm = settings.model_copy(update={"retention": RetentionSettings(
        emergency_free_percent=max(0.0, real.free_percent - 1))})
    with sessions() as session:
        assert plan_purge(session, calm, now=NOW, usage=real).items == ()


def _label(session: Session, settings: Settings, a: ArchivedStudy) -> None:
    folder = next((settings.archive_root / a.anon_study_uid).iterdir())
    study = LearnStudy(origin="archive", study_id=a.study_id, pseudo_study_uid=a.anon_study_uid,
                       pseudo_patient_id=a.anon_patient_id,
                       source_path=folder.relative_to(settings.archive_root).as_posix())
    session.add(study)
    session.flush()
    session.add(LabelEvent(learn_study_id=study.id, value=LabelValue.MILD, source=LabelSource.CLI,
                           actor="tester"))
    session.flush()


def _age(settings: Settings, a: ArchivedStudy, when: datetime) -> None:
    for p in (settings.archive_root / a.anon_study_uid).rglob("*"):
        os.utime(p, (when.timestamp(), when.timestamp()))


def test_archive_quota_spares_manifest_studies(make_settings: Callable[..., Settings],
                                               tmp_path: Path) -> None:
    """Over quota: unlabelled before labelled, oldest first; a study in a frozen manifest never."""
    url = f"sqlite:///{tmp_path / 'lungnode.db'}"
    settings = make_settings(url, training={"folds": 2})
    sessions = _sessions(url)
    frozen = _study(settings, sessions, 31, (DeliveryState.PENDING,), rows=64)
    labelled = _study(settings, sessions, 32, (DeliveryState.PENDING,))
    unlabelled = _study(settings, sessions, 33, (DeliveryState.PENDING,))
    with sessions() as session:
        _label(session, settings, frozen)
        session.commit()
        freeze(session, settings, created_by="test")
        _label(session, settings, labelled)  # after the freeze: in no manifest
        session.commit()
    for a, days in ((frozen, 30), (labelled, 20), (unlabelled, 10)):
        _age(settings, a, NOW - days * DAY)
    size = {a.anon_study_uid: sum(p.stat().st_size for p in (settings.archive_root / a.anon_study_uid)
                                  .rglob("*") if p.is_file()) for a in (frozen, labelled, unlabelled)}
    total = sum(size.values())

    with sessions() as session:  # no quota (the default): nothing
        assert plan_purge(session, settings, now=NOW).items == ()
    quota_mb = (total - size[unlabelled.anon_study_uid] // 2) / (1024 * 1024)
    over = settings.model_copy(update={"retention": RetentionSettings(archive_quota_mb=quota_mb)})
    report = purge(sessions, over, now=NOW)
    assert [(i.kind, i.uid, i.rule) for i in report.done] == [
        ("archive", unlabelled.anon_study_uid, "quota")]
    assert not (settings.archive_root / unlabelled.anon_study_uid).exists()
    assert _files(settings, unlabelled) == 23  # originals are not the archive's business

    zero = settings.model_copy(update={"retention": RetentionSettings(archive_quota_mb=0)})
    report = purge(sessions, zero, now=NOW)
    assert [i.uid for i in report.done] == [labelled.anon_study_uid]
    assert (settings.archive_root / frozen.anon_study_uid).is_dir()
    assert "referenced by frozen or locked dataset manifests" in report.plan.notes[0]
    audits = _audit(sessions, "purge-archive")
    assert [a.study_id for a in audits] == [unlabelled.study_id, labelled.study_id]
    with sessions() as session:
        note = session.get_one(Study, labelled.study_id).archive_note
        assert note is not None and "archive quota" in note


def test_service_purges_periodically(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """``serve``'s scheduler runs the purge every ``[retention] poll_seconds``."""
    url = f"sqlite:///{tmp_path / 'lungnode.db'}"
    settings = make_settings(url, retention={"poll_seconds": 0.2})
    sessions = _sessions(url)
    a = _study(settings, sessions, 41, sent_at=utcnow() - 8 * DAY)
    node = Node(settings, receive=False, work=False, schedule=True)
    node.start()
    try:
        wait_for(lambda: _audit(sessions, "purge-originals"), 60, what="the scheduled purge")
    finally:
        node.stop()
    assert _files(settings, a) == 0
    assert [(e.actor, e.study_id) for e in _audit(sessions, "purge-originals")] == [("retention", a.study_id)]
