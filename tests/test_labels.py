"""Labels as an append-only history: keys, values, CSV imports and the ``lungnode label`` CLI.

Studies are archived the node's own way (:mod:`tests.learnkit`); the label
functions run on SQLite and PostgreSQL, the CLI through typer's CliRunner.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from node.cli import app
from node.db import (
    AuditEntry,
    LabelEvent,
    LabelSource,
    LabelValue,
    LearnStudy,
    Study,
    StudyState,
    make_engine,
    make_session_factory,
)
from node.errors import LabelError
from node.learn import labels
from node.learn.history import current_labels
from node.migrate import upgrade
from node.settings import Settings
from tests.learnkit import ArchivedStudy, archive_study


@dataclass
class Env:
    settings: Settings
    sessions: sessionmaker[Session]

    def count(self, model: type) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)


@pytest.fixture
def env(db_url: str, make_settings: Callable[..., Settings]) -> Env:
    s = make_settings(db_url)
    upgrade(s.database.url)
    return Env(s, make_session_factory(make_engine(s.database.url)))


def _archive(env: Env, **kw: object) -> ArchivedStudy:
    """A small archived study (32 x 32 x 12 voxels: the labels need its files, not its lungs)."""
    return archive_study(env.settings, env.sessions, rows=32, slices=12, **kw)  # type: ignore[arg-type]


def _set(env: Env, key: str, value: str, actor: str = "alice", **kw: object) -> LabelEvent | None:
    with env.sessions() as s:
        event = labels.set_label(s, env.settings, key, value, source=LabelSource.CLI, actor=actor,
                                 **kw)  # type: ignore[arg-type]
        s.commit()
        return event


def test_set_change_retract_keep_the_history_in_order_with_supersedes(env: Env) -> None:
    st = _archive(env, seed=1, patient_id="P1")
    first = _set(env, st.study_uid, "mild")
    assert first is not None
    # the same value from the same kind of source adds nothing
    assert _set(env, st.study_uid, "mild", actor="bob") is None
    second = _set(env, st.anon_study_uid, "Severe", reason="re-read")
    assert second is not None
    with env.sessions() as s:
        gone = labels.retract_label(s, env.settings, st.study_uid, source=LabelSource.CLI,
                                    actor="alice", reason="wrong patient")
        s.commit()
        assert gone is not None
        assert labels.retract_label(s, env.settings, st.study_uid, source=LabelSource.CLI,
                                    actor="alice") is None  # nothing left to retract
        events = labels.history(s, env.settings, st.accession_number)
        assert [e.value for e in events] == [LabelValue.MILD, LabelValue.SEVERE, None]
        assert [e.supersedes_id for e in events] == [None, events[0].id, events[1].id]
        assert events[1].reason == "re-read"
        assert current_labels(s) == []  # retracted: no label in force
        learn = s.scalars(select(LearnStudy)).one()
        assert (learn.origin, learn.study_id) == ("archive", st.study_id)
        assert learn.pseudo_study_uid == st.anon_study_uid
        assert learn.pseudo_patient_id == st.anon_patient_id
        assert learn.source_path.startswith(st.anon_study_uid + "/")
        assert (env.settings.archive_root / learn.source_path).is_dir()
        audit = list(s.scalars(select(AuditEntry).where(AuditEntry.action.like("label-%"))
                               .order_by(AuditEntry.id)))
    assert [a.action for a in audit] == ["label-set", "label-set", "label-retracted"]
    assert audit[0].actor == "cli:alice" and audit[0].study_id == st.study_id
    assert "none -> mild" in (audit[0].detail or "")
    assert "wrong patient" in (audit[2].detail or "")


def test_the_three_keys_name_one_study_and_bad_keys_and_values_say_why(env: Env) -> None:
    a = _archive(env, seed=2, patient_id="P2", accession="ACC-A")
    b = _archive(env, seed=3, patient_id="P3", accession="ACC-B")
    with env.sessions() as s:
        for key in (a.study_uid, a.anon_study_uid, "ACC-A", f"  {a.accession_number} "):
            assert labels.resolve_study(s, env.settings, key).pseudo_study_uid == a.anon_study_uid
        assert labels.resolve_study(s, env.settings, "ACC-B").pseudo_study_uid == b.anon_study_uid
        s.commit()
    assert env.count(LearnStudy) == 2
    # a study imported from a public dataset has no node study: its pseudonymous UID names it
    with env.sessions() as s:
        s.add(LearnStudy(origin="mosmed", study_id=None, pseudo_study_uid="mosmed-study_0042",
                         pseudo_patient_id="mosmed-study_0042", source_path="CT-1/study_0042.nii.gz"))
        s.commit()
    imported = _set(env, "mosmed-study_0042", "moderate", actor="MosMedData")
    assert imported is not None and imported.value is LabelValue.MODERATE
    with pytest.raises(LabelError, match="allowed values: non-covid, mild, moderate, severe, "
                                         "critical, covid-unknown"):
        _set(env, a.study_uid, "terrible")
    with pytest.raises(LabelError, match="no study matches 'ACC-NOPE'"):
        _set(env, "ACC-NOPE", "mild")
    # a study the node holds but has not archived yet is refused, with what to do
    with env.sessions() as s:
        s.add(Study(study_instance_uid="1.2.3.4.5", state=StudyState.RECEIVING))
        s.commit()
    with pytest.raises(LabelError, match="not archived yet .*wait until"):
        _set(env, "1.2.3.4.5", "mild")
    assert env.count(LabelEvent) == 1  # the imported study's only


def test_an_ambiguous_accession_number_lists_the_studies_and_guesses_nothing(env: Env) -> None:
    a = _archive(env, seed=4, patient_id="P4", accession="SAME")
    b = _archive(env, seed=5, patient_id="P5", accession="SAME")
    with pytest.raises(LabelError, match="names 2 studies") as info:
        _set(env, "SAME", "mild")
    assert a.anon_study_uid in str(info.value) and b.anon_study_uid in str(info.value)
    assert env.count(LabelEvent) == 0


def _archive_two(env: Env) -> tuple[ArchivedStudy, ArchivedStudy]:
    return (_archive(env, seed=6, patient_id="P6", accession="ACC6"),
            _archive(env, seed=7, patient_id="P7", accession="ACC7"))


def test_csv_import_twice_adds_nothing_and_unmatched_rows_are_listed(env: Env, tmp_path: Path) -> None:
    a, b = _archive_two(env)
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text(
        "Study,severity,reason,comment\n"
        f"ACC6,moderate,report 12,ignored\n"
        f"{b.anon_study_uid},critical,,\n"
        "ACC-UNKNOWN,mild,,\n"
        "ACC7,worse,,\n"
        ",mild,,\n")
    with env.sessions() as s:
        report = labels.import_csv(s, env.settings, csv_file, actor="carol", dry_run=False)
    assert report.applied
    assert [(r.row, r.pseudo_study_uid, r.value) for r in report.added] == [
        (2, a.anon_study_uid, "moderate"), (3, b.anon_study_uid, "critical")]
    assert [(u.row, u.key) for u in report.unmatched] == [(4, "ACC-UNKNOWN"), (5, "ACC7"), (6, "")]
    assert "no study matches" in report.unmatched[0].reason
    assert "unknown severity 'worse'" in report.unmatched[1].reason
    with env.sessions() as s:
        events = list(s.scalars(select(LabelEvent).order_by(LabelEvent.id)))
        assert {e.source for e in events} == {LabelSource.CSV}
        assert {e.source_ref for e in events} == {report.source_ref}
        assert report.source_ref.startswith("csv:") and len(report.source_ref) == 4 + 64
        assert events[0].reason == "report 12" and events[0].actor == "carol"
        # ACC7's bad value guessed nothing: only the row that named b by UID labelled it
        assert {c.pseudo_study_uid: c.value for c in current_labels(s)} == {
            a.anon_study_uid: "moderate", b.anon_study_uid: "critical"}
    with env.sessions() as s:
        again = labels.import_csv(s, env.settings, csv_file, actor="carol", dry_run=False)
    assert again.added == [] and len(again.unchanged) == 2
    assert env.count(LabelEvent) == 2


def test_conflicting_rows_and_strict_mode_apply_nothing_guessed(env: Env, tmp_path: Path) -> None:
    a, b = _archive_two(env)
    csv_file = tmp_path / "conflict.csv"
    csv_file.write_text(f"study,severity\nACC6,mild\n{a.study_uid},severe\nACC7,mild\n")
    with env.sessions() as s:
        strict = labels.import_csv(s, env.settings, csv_file, actor="dan", dry_run=False,
                                   strict=True)
    assert not strict.applied and [u.row for u in strict.unmatched] == [2, 3]
    assert "different severities" in strict.unmatched[0].reason
    assert env.count(LabelEvent) == 0
    with env.sessions() as s:
        lenient = labels.import_csv(s, env.settings, csv_file, actor="dan", dry_run=False)
    assert lenient.applied and [r.pseudo_study_uid for r in lenient.added] == [b.anon_study_uid]
    assert env.count(LabelEvent) == 1


def test_dry_run_writes_nothing_and_a_file_without_header_is_refused(env: Env, tmp_path: Path) -> None:
    a, _b = _archive_two(env)
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("study,severity\nACC6,mild\nACC7,covid-unknown\n")
    with env.sessions() as s:
        report = labels.import_csv(s, env.settings, csv_file, actor="erin", dry_run=True)
    assert report.dry_run and not report.applied and len(report.added) == 2
    assert env.count(LabelEvent) == 0 and env.count(LearnStudy) == 0
    with env.sessions() as s:
        audits = s.scalars(select(func.count()).select_from(AuditEntry)
                           .where(AuditEntry.action.like("label-%"))).one()
    assert audits == 0
    headless = tmp_path / "headless.csv"
    headless.write_text(f"{a.study_uid},mild\n")
    with env.sessions() as s, pytest.raises(LabelError, match="header with the columns 'study'"):
        labels.import_csv(s, env.settings, headless, actor="erin", dry_run=False)


def test_cli_set_list_history_import_and_errors(make_settings: Callable[..., Settings],
                                                tmp_path: Path) -> None:
    # SQLite only: the CLI is the same on both databases, the functions run on both above
    s = make_settings(f"sqlite:///{tmp_path / 'cli.db'}")
    upgrade(s.database.url)
    factory = make_session_factory(make_engine(s.database.url))
    st = archive_study(s, factory, seed=8, patient_id="P8", accession="ACC8", rows=32, slices=12)
    config = ["--config", str(tmp_path / "lungnode.toml")]
    runner = CliRunner()

    res = runner.invoke(app, ["label", "set", "ACC8", "--severity", "mild", "--by", "frank",
                              "--reason", "first read", *config])
    assert res.exit_code == 0, res.output
    assert "labelled mild by frank" in res.output
    res = runner.invoke(app, ["label", "set", st.study_uid, "--severity", "severe", *config])
    assert res.exit_code == 0, res.output

    res = runner.invoke(app, ["label", "list", "--json", *config])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert len(rows) == 1
    assert rows[0]["study"] == st.anon_study_uid and rows[0]["patient"] == st.anon_patient_id
    assert (rows[0]["value"], rows[0]["source"]) == ("severe", "cli")
    assert st.study_uid not in res.output and "ACC8" not in res.output  # pseudonyms only

    res = runner.invoke(app, ["label", "history", st.anon_study_uid, "--json", *config])
    assert res.exit_code == 0, res.output
    events = json.loads(res.output)
    assert [e["value"] for e in events] == ["mild", "severe"]
    assert events[0]["actor"] == "frank" and events[0]["reason"] == "first read"
    assert events[1]["supersedes"] == events[0]["id"]

    res = runner.invoke(app, ["label", "retract", "ACC8", "--by", "frank", *config])
    assert res.exit_code == 0 and "retracted" in res.output
    res = runner.invoke(app, ["label", "history", "ACC8", *config])
    assert res.exit_code == 0
    assert "retracted" in res.output and f"supersedes {events[1]['id']}" in res.output

    res = runner.invoke(app, ["label", "set", "ACC8", "--severity", "bad", *config])
    assert res.exit_code == 1 and "allowed values" in res.output
    res = runner.invoke(app, ["label", "set", "NOPE", "--severity", "mild", *config])
    assert res.exit_code == 1 and "no study matches 'NOPE'" in res.output

    csv_file = tmp_path / "in.csv"
    csv_file.write_text("study,severity\nACC8,critical\nNOPE,mild\n")
    res = runner.invoke(app, ["label", "import", str(csv_file), "--dry-run", *config])
    assert res.exit_code == 1  # an unmatched row
    assert "row 2: ACC8" in res.output and "would add critical" in res.output
    assert "row 3: NOPE: not imported" in res.output and "dry run" in res.output
    res = runner.invoke(app, ["label", "list", "--json", *config])
    assert json.loads(res.output) == []
    res = runner.invoke(app, ["label", "import", str(csv_file), "--by", "gina", *config])
    assert res.exit_code == 1 and "1 added, 0 unchanged, 1 not matched" in res.output
    res = runner.invoke(app, ["label", "list", "--json", *config])
    assert [(r["value"], r["source"], r["actor"]) for r in json.loads(res.output)] == [
        ("critical", "csv", "gina")]
