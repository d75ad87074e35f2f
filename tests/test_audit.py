"""The sealed audit chain (:mod:`node.work.audit`), its append-only triggers (migration 0004),
``lungnode audit`` and the per-association receipt rows, on SQLite and PostgreSQL.

Tampering goes around the triggers the way someone with the database's owner
rights would (dropping or disabling them), then ``verify`` must name the row.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from node.cli import app
from node.db import AuditEntry, Study, make_engine, make_session_factory, utcnow
from node.migrate import upgrade
from node.service import Node
from node.settings import Settings
from node.work.audit import GENESIS, check, row_hash, seal, verify
from tests.conftest import B40F, write_config
from tests.peers import free_port, storescu, wait_for


def _factory(url: str) -> sessionmaker[Session]:
    upgrade(url)
    return make_session_factory(make_engine(url))


def _add(sessions: sessionmaker[Session], n: int, action: str = "test") -> list[int]:
    with sessions() as session:
        rows = [AuditEntry(actor="cli:tester", action=f"{action}-{i}",
                           detail=f"détail {i} ✓" if i % 2 else None) for i in range(n)]
        session.add_all(rows)
        session.commit()
        return [r.id for r in rows]


@contextmanager
def unguarded(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session on the table with its append-only triggers out of the way (an owner's rights)."""
    with sessions() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
            yield session
            session.execute(text("ALTER TABLE audit_log ENABLE TRIGGER USER"))
        else:
            triggers = list(session.execute(text(
                "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_log'")))
            assert len(triggers) == 3
            for name, _ in triggers:
                session.execute(text(f"DROP TRIGGER {name}"))
            yield session
            for _, sql in triggers:
                session.execute(text(sql))
        session.commit()


def _row(session: Session, row_id: int) -> dict[str, object]:
    entry = session.get_one(AuditEntry, row_id)
    return {c: getattr(entry, c) for c in ("id", "at", "actor", "action", "study_id", "detail",
                                           "prev_hash", "row_hash")}


def test_seal_and_verify_name_the_first_altered_row(db_url: str) -> None:
    sessions = _factory(db_url)
    _add(sessions, 6)
    with sessions() as s:
        assert check(s).intact and (check(s).sealed, check(s).unsealed) == (0, 6)
        assert seal(s) == 6 and seal(s) == 0
        result = check(s)
        assert (result.sealed, result.unsealed, result.bad_id) == (6, 0, None)
        first = s.get_one(AuditEntry, 1)
        assert first.prev_hash == GENESIS and first.row_hash == row_hash(GENESIS, first)
    ids = _add(sessions, 2, "later")
    with sessions() as s:
        assert (check(s).sealed, check(s).unsealed, verify(s)) == (6, 2, None)  # waiting, not an error
        assert seal(s) == 2 and verify(s) is None and check(s).head == s.get_one(AuditEntry, ids[-1]).row_hash

    def tampered(change: Callable[[Session], None], undo: Callable[[Session], None]) -> int | None:
        with unguarded(sessions) as s:
            change(s)
            s.commit()
        with sessions() as s:
            found = verify(s)
        with unguarded(sessions) as s:
            undo(s)
            s.commit()
        with sessions() as s:
            assert verify(s) is None
        return found

    with sessions() as s:
        row3, row5 = _row(s, 3), _row(s, 5)
    # an edited detail, actor or time
    assert tampered(lambda s: s.execute(update(AuditEntry).where(AuditEntry.id == 3).values(detail="x")),
                    lambda s: s.execute(update(AuditEntry).where(AuditEntry.id == 3)
                                        .values(detail=row3["detail"]))) == 3
    assert tampered(lambda s: s.execute(update(AuditEntry).where(AuditEntry.id == 3)
                                        .values(at=row3["at"] + timedelta(microseconds=1))),  # type: ignore[operator]
                    lambda s: s.execute(update(AuditEntry).where(AuditEntry.id == 3)
                                        .values(at=row3["at"]))) == 3
    # a row deleted from the middle: the row after it is named
    assert tampered(lambda s: s.execute(delete(AuditEntry).where(AuditEntry.id == 5)),
                    lambda s: s.execute(insert(AuditEntry).values(**row5))) == 6
    # an edited row whose hash was recomputed: the next row no longer follows it
    edited = AuditEntry(**{**row5, "detail": "y"})
    assert tampered(lambda s: s.execute(update(AuditEntry).where(AuditEntry.id == 5).values(
                        detail="y", row_hash=row_hash(str(row5["prev_hash"]), edited))),
                    lambda s: s.execute(update(AuditEntry).where(AuditEntry.id == 5)
                                        .values(detail=row5["detail"], row_hash=row5["row_hash"]))) == 6
    # a row inserted with a forged hash, at the end and in the middle of the chain
    forged = {"at": row3["at"], "actor": "cli:mallory", "action": "label-set", "detail": "forged"}
    assert tampered(lambda s: s.execute(insert(AuditEntry).values(id=50, prev_hash=check(s).head,
                                                                  row_hash="f" * 64, **forged)),
                    lambda s: s.execute(delete(AuditEntry).where(AuditEntry.id == 50))) == 50
    first = AuditEntry(id=0, prev_hash=GENESIS, **forged)
    assert tampered(lambda s: s.execute(insert(AuditEntry).values(
                        id=0, prev_hash=GENESIS, row_hash=row_hash(GENESIS, first), **forged)),
                    lambda s: s.execute(delete(AuditEntry).where(AuditEntry.id == 0))) == 1
    # a row's hashes removed: it looks unsealed, but rows after it are sealed
    assert tampered(lambda s: s.execute(update(AuditEntry).where(AuditEntry.id == 2)
                                        .values(prev_hash=None, row_hash=None)),
                    lambda s: s.execute(update(AuditEntry).where(AuditEntry.id == 2).values(
                        prev_hash=_row(s, 1)["row_hash"], row_hash=_row(s, 3)["prev_hash"]))) == 2


def test_the_table_is_append_only(db_url: str) -> None:
    sessions = _factory(db_url)
    _add(sessions, 3)
    with sessions() as s:
        seal(s)
    _add(sessions, 1)  # row 4, unsealed
    refused = [
        update(AuditEntry).where(AuditEntry.id == 1).values(detail="changed"),
        update(AuditEntry).where(AuditEntry.id == 1).values(row_hash="0" * 64),
        update(AuditEntry).where(AuditEntry.id == 4).values(detail="changed before its seal"),
        update(AuditEntry).where(AuditEntry.id == 4).values(row_hash="0" * 64),  # both or neither
        delete(AuditEntry).where(AuditEntry.id == 2),
        delete(AuditEntry).where(AuditEntry.id == 4),
        insert(AuditEntry).values(actor="x", action="y", at=utcnow(), row_hash="a" * 64),
    ]
    if db_url.startswith("postgresql"):
        refused.append(text("TRUNCATE audit_log"))
    for statement in refused:
        with sessions() as s, pytest.raises(DBAPIError, match="audit_log"):
            s.execute(statement)
            s.commit()
    with sessions() as s:
        assert seal(s) == 1 and verify(s) is None and check(s).sealed == 4
        assert s.get_one(AuditEntry, 1).detail is None


def test_writers_and_sealers_at_once_keep_one_chain(db_url: str) -> None:
    """Four writers commit rows one by one while two sealers seal: one chain, nothing left out."""
    sessions = _factory(db_url)
    done = threading.Event()
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(30):
                with sessions() as s:
                    s.add(AuditEntry(actor=f"writer-{n}", action="test", detail=str(i)))
                    s.commit()
        except BaseException as exc:  # noqa: BLE001 - shown by the assertion below
            errors.append(exc)

    def sealer() -> None:
        try:
            while not done.is_set():
                with sessions() as s:
                    seal(s)
        except BaseException as exc:  # noqa: BLE001 - shown by the assertion below
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    sealers = [threading.Thread(target=sealer) for _ in range(2)]
    for t in writers + sealers:
        t.start()
    for t in writers:
        t.join(120)
    done.set()
    for t in sealers:
        t.join(120)
    assert not errors, errors
    with sessions() as s:
        seal(s)
        result = check(s)
        assert (result.bad_id, result.sealed, result.unsealed) == (None, 120, 0)
        ids = list(s.scalars(select(AuditEntry.id).order_by(AuditEntry.id)))
        assert ids == list(range(1, 121))  # ids drawn in order (PostgreSQL: by the trigger)


def test_cli_verify_seal_and_list(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lungnode.db'}"
    config = ["--config", str(write_config(tmp_path / "lungnode.toml", {"database": {"url": url}}))]
    sessions = _factory(url)
    with sessions() as s:
        study = Study(study_instance_uid="1.2.826.0.1.3680043.8.498.1")
        s.add(study)
        s.flush()
        s.add_all([AuditEntry(actor="scp", action="study-created", study_id=study.id),
                   AuditEntry(actor="worker", action="archived", study_id=study.id, detail="series 1.2"),
                   AuditEntry(actor="cli:ann", action="delivery-retry", detail="delivery 1")])
        s.commit()
    runner = CliRunner()
    res = runner.invoke(app, ["audit", "verify", *config])
    assert res.exit_code == 0 and "audit chain intact: 0 rows sealed, 3 not yet sealed" in res.output
    res = runner.invoke(app, ["audit", "seal", *config])
    assert res.exit_code == 0 and "sealed 3 rows" in res.output
    res = runner.invoke(app, ["audit", "verify", *config])
    assert res.exit_code == 0 and "audit chain intact: 3 rows sealed, 0 not yet sealed" in res.output
    res = runner.invoke(app, ["audit", "list", "--study", "1.2.826.0.1.3680043.8.498.1", *config])
    assert res.exit_code == 0 and "study-created" in res.output and "archived" in res.output
    assert "delivery-retry" not in res.output
    res = runner.invoke(app, ["audit", "list", "--limit", "1", *config])
    assert res.exit_code == 0 and "delivery-retry" in res.output and "archived" not in res.output
    assert runner.invoke(app, ["audit", "list", "--study", "9.9.9", *config]).exit_code == 1
    with unguarded(sessions) as s:
        s.execute(update(AuditEntry).where(AuditEntry.id == 2).values(detail="series 9.9"))
    res = runner.invoke(app, ["audit", "verify", *config])
    assert res.exit_code == 1
    assert "row 2 (at " in res.output and "action archived) was altered or a row before it was removed" \
        in res.output
    with sessions() as s:  # verify sealed nothing
        assert s.get_one(AuditEntry, 2).detail == "series 9.9"


def test_each_association_is_recorded_with_its_sender_and_counts(
        tmp_path: Path, db_url: str, make_settings: Callable[..., Settings]) -> None:
    """Three slices and one without pixel data in one association: one ``received`` row for the
    study with the calling AE, its address, 4 requests, 3 stored, 1 refused; sealed at stop."""
    src = tmp_path / "send"
    src.mkdir()
    files = sorted(B40F.iterdir())[:4]
    for f in files[:3]:
        (src / f.name).write_bytes(f.read_bytes())
    broken = pydicom.dcmread(files[3])
    del broken.PixelData
    broken.save_as(src / "z-no-pixels.dcm", enforce_file_format=True)
    port = free_port()
    settings = make_settings(db_url, port=port, peers=[
        {"name": "ct", "ae_title": "CTSCANNER", "host": "127.0.0.1", "port": 104}])
    node = Node(settings, receive=True, work=False, schedule=False)
    node.start()
    try:
        storescu([src], "127.0.0.1", port, "LUNGNODE", calling_aet="CTSCANNER", extra_args=["-nh"],
                 check=False)
        def receipt() -> list[AuditEntry]:
            with node.sessions() as s:
                return list(s.scalars(select(AuditEntry).where(AuditEntry.action == "received")))

        rows = wait_for(receipt, 60, 0.1, "the association's receipt row")
    finally:
        node.stop()
    study_uid = str(broken.StudyInstanceUID)
    assert len(rows) == 1
    detail = rows[0].detail or ""
    assert rows[0].actor == "scp:CTSCANNER" and rows[0].study_id is not None
    assert f"3 instances of study {study_uid} from AE 'CTSCANNER' at 127.0.0.1:" in detail
    assert "released: 4 C-STORE requests, 3 stored, 1 refused (0xA900 x1)" in detail
    with node.sessions() as s:
        result = check(s)
        assert result.intact and result.unsealed == 0 and result.sealed >= 3  # sealed at stop


def test_training_runs_are_audited(tmp_path: Path) -> None:
    from node.learn.runs import begin_run, create_run, fail_run

    sessions = _factory(f"sqlite:///{tmp_path / 'lungnode.db'}")
    with sessions() as s:
        run = create_run(s, dataset_id=None, trigger="cli", created_by="ann", params={"epochs": 1})
        s.commit()
        begin_run(s, run.id, "host:1:owner", 60.0)
        s.commit()
        fail_run(s, run.id, "stopped by the test")
        rows = list(s.scalars(select(AuditEntry).order_by(AuditEntry.id)))
    assert [r.action for r in rows] == ["run:running", "run:failed"]
    assert rows[0].actor == "training:ann" and f"training run {run.id} (cli, by ann" in (rows[0].detail or "")
