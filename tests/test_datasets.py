"""Frozen dataset manifests: tensors, leak-free folds, the locked evaluation set, diff and the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from model.manifest import Manifest, read_manifest
from node.cli import app
from node.db import (
    DatasetManifest,
    LabelEvent,
    LabelSource,
    LabelValue,
    LearnStudy,
    PatientFold,
    make_engine,
    make_session_factory,
)
from node.errors import DatasetError
from node.learn.datasets import check_trainable, diff, freeze, latest_lock, lock, locked_patients
from node.learn.tensors import preprocessing_params, tensor_relpath
from node.migrate import upgrade
from node.settings import Settings
from tests.learnkit import ArchivedStudy, archive_study


def _sessions(url: str) -> sessionmaker[Session]:
    upgrade(url)
    return make_session_factory(make_engine(url))


def _sqlite(make_settings: Callable[..., Settings], tmp_path: Path,
            folds: int = 3) -> tuple[Settings, sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'lungnode.db'}"
    return make_settings(url, training={"folds": folds}), _sessions(url)


def _label(session: Session, study: LearnStudy, value: LabelValue | None, actor: str = "tester") -> int:
    event = LabelEvent(learn_study_id=study.id, value=value, source=LabelSource.CLI, actor=actor)
    session.add(event)
    session.flush()
    return event.id


def _archived(session: Session, settings: Settings, a: ArchivedStudy, value: LabelValue) -> LearnStudy:
    """The rows the labelling code writes for an archived study."""
    folder = next((settings.archive_root / a.anon_study_uid).iterdir())
    study = LearnStudy(origin="archive", study_id=a.study_id, pseudo_study_uid=a.anon_study_uid,
                       pseudo_patient_id=a.anon_patient_id,
                       source_path=folder.relative_to(settings.archive_root).as_posix())
    session.add(study)
    session.flush()
    _label(session, study, value)
    return study


def _fake(session: Session, settings: Settings, name: str, patient: str, value: LabelValue) -> LearnStudy:
    """An imported study whose cached tensor is a small constant array (fold logic needs no CT)."""
    study = LearnStudy(origin="mosmed", pseudo_study_uid=name, pseudo_patient_id=patient,
                       source_path=f"/data/{name}.nii.gz")
    session.add(study)
    session.flush()
    path = settings.learn_root / tensor_relpath(name, preprocessing_params())
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.full((1, 4, 4, 4), 0.5, dtype=np.float32))
    session.add(LabelEvent(learn_study_id=study.id, value=value, source=LabelSource.IMPORT,
                           actor="test", source_ref=f"test:{name}"))
    session.flush()
    return study


def _salt(settings: Settings) -> None:
    settings.archive_root.mkdir(parents=True, exist_ok=True)
    (settings.archive_root / ".salt").write_text("ab" * 32)


def test_freeze_archived_studies(db_url: str, make_settings: Callable[..., Settings]) -> None:
    """Freeze writes a manifest read_manifest accepts; as-of gives the same digest; diff finds changes."""
    settings = make_settings(db_url, training={"folds": 3})
    sessions = _sessions(db_url)
    studies = [archive_study(settings, sessions, seed=s, patient_id=p, involvement=inv)
               for s, p, inv in ((301, "PA", 0.0), (302, "PA", 0.2), (303, "PB", 0.3))]
    with sessions() as session:
        rows = [_archived(session, settings, a, v) for a, v in
                zip(studies, (LabelValue.NON_COVID, LabelValue.MILD, LabelValue.MODERATE), strict=True)]
        broken = LearnStudy(origin="archive", pseudo_study_uid="2.25.999", pseudo_patient_id="PX",
                            source_path="2.25.999/2.25.998")
        session.add(broken)
        session.flush()
        _label(session, broken, LabelValue.SEVERE)
        session.commit()
        first = freeze(session, settings, created_by="test")
        session.commit()
        row = session.scalars(select(DatasetManifest)).one()

    assert (row.kind, row.version, row.digest, row.study_count) == ("training", 1, first.digest, 3)
    read = read_manifest(settings.learn_root / row.path)
    assert read.digest == first.digest and len(read.items) == 3
    assert [s["study"] for s in read.extra["skipped"]] == ["2.25.999"]
    assert "no archived DICOM files" in read.extra["skipped"][0]["reason"]
    assert read.preprocessing["segmentation"]["method"] == "model.lungs.segment_lungs"
    for item in read.items:
        path = settings.learn_root / item.tensor
        array = np.load(path)
        assert array.dtype == np.float32 and array.ndim == 4 and array.shape[0] == 1
        assert 0.0 <= array.min() and array.max() <= 1.0
        assert hashlib.sha256(path.read_bytes()).hexdigest() == item.tensor_sha256
    folds = {i.patient: set() for i in read.items}
    for i in read.items:
        folds[i.patient].add(i.fold)
    assert all(len(f) == 1 for f in folds.values()) and len(folds) == 2
    assert read.extra["by_label"] == {"mild": 1, "moderate": 1, "non-covid": 1}

    with sessions() as session:  # more labels arrive: a new study, a relabel, a retraction
        _fake(session, settings, "mosmed:study_0001", "mosmed:study_0001", LabelValue.CRITICAL)
        _label(session, session.get(LearnStudy, rows[1].id), LabelValue.SEVERE)  # type: ignore[arg-type]
        _label(session, session.get(LearnStudy, rows[2].id), None)  # type: ignore[arg-type]
        session.commit()
        second = freeze(session, settings, created_by="test")
        again = freeze(session, settings, as_of=datetime.fromisoformat(first.as_of), created_by="test")
        session.commit()
    assert again.digest == first.digest and again.version == 3
    assert second.digest != first.digest
    changes = diff(first, second)
    assert changes["added"] == ["mosmed:study_0001"]
    assert changes["removed"] == [studies[2].anon_study_uid]
    assert changes["relabelled"] == [{"study": studies[1].anon_study_uid, "from": "mild", "to": "severe"}]
    assert changes["moved"] == []


def test_freeze_refuses_an_empty_dataset(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings, sessions = _sqlite(make_settings, tmp_path)
    with sessions() as session, pytest.raises(DatasetError, match="no study has a label"):
        freeze(session, settings, created_by="test")


def test_folds_stratified_and_never_moved(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """Every fold gets patients of each class; later freezes never move a patient; no patient in two."""
    settings, sessions = _sqlite(make_settings, tmp_path, folds=3)
    _salt(settings)
    with sessions() as session:
        for n in range(9):
            _fake(session, settings, f"t:n{n}", f"pn{n}", LabelValue.NON_COVID)
            _fake(session, settings, f"t:s{n}", f"ps{n}", LabelValue.SEVERE)
        session.commit()
        first = freeze(session, settings, created_by="test")
        session.commit()
        before = {r.pseudo_patient_id: r.fold for r in session.scalars(select(PatientFold))}
    per_fold = {(i.fold, i.label) for i in first.items}
    assert per_fold == {(f, label) for f in range(3) for label in ("non-covid", "severe")}
    counts = [sum(1 for i in first.items if i.fold == f and i.label == "severe") for f in range(3)]
    assert counts == [3, 3, 3]

    with sessions() as session:  # second studies of old patients, and new patients
        for n in range(9):
            _fake(session, settings, f"t:n{n}b", f"pn{n}", LabelValue.MILD)
        for n in range(4):
            _fake(session, settings, f"t:m{n}", f"pm{n}", LabelValue.MILD)
        session.commit()
        second = freeze(session, settings, created_by="test")
        session.commit()
        after = {r.pseudo_patient_id: r.fold for r in session.scalars(select(PatientFold))}
    assert {p: after[p] for p in before} == before
    old = {i.study: i.fold for i in first.items}
    assert all(i.fold == old[i.study] for i in second.items if i.study in old)
    patients: dict[str, set[int]] = {}
    for i in second.items:
        patients.setdefault(i.patient, set()).add(i.fold)
    assert all(len(f) == 1 for f in patients.values())
    mild_new = sorted(after[f"pm{n}"] for n in range(4))
    assert len(set(mild_new)) == 3  # four new mild patients spread over all three folds
    assert read_manifest(settings.learn_root / "datasets" / "dataset-2.json").digest == second.digest


def test_small_dataset_fills_every_fold(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """Five patients of five labels in five folds: one each, so fold 0 can validate."""
    settings, sessions = _sqlite(make_settings, tmp_path, folds=5)
    _salt(settings)
    with sessions() as session:
        for n, value in enumerate(list(LabelValue)[:5]):
            _fake(session, settings, f"t:{n}", f"p{n}", value)
        session.commit()
        manifest = freeze(session, settings, created_by="test")
    assert sorted(i.fold for i in manifest.items) == [0, 1, 2, 3, 4]


def test_locked_set_never_trained(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings, sessions = _sqlite(make_settings, tmp_path, folds=3)
    _salt(settings)
    with sessions() as session:
        for n in range(6):
            _fake(session, settings, f"t:{n}", f"p{n}", LabelValue.MILD if n % 2 else LabelValue.NON_COVID)
        session.commit()
        freeze(session, settings, created_by="test")
        with pytest.raises(DatasetError, match="fold 0 is the validation fold"):
            lock(session, settings, fold=0, created_by="test")
        locked = lock(session, settings, fold=2, created_by="test")
        session.commit()
        assert (locked.kind, locked.version) == ("locked-eval", 1)
        patients = set(locked.patients)
        assert patients and all(i.split == "locked-eval" and i.fold == 2 for i in locked.items)
        manifest = freeze(session, settings, created_by="test")
        session.commit()
        assert manifest.locked_eval == {"id": locked.id, "version": 1, "digest": locked.digest}
        assert {i.patient for i in manifest.locked()} == patients
        assert not {i.patient for i in manifest.trainable()} & patients
        read_manifest(settings.learn_root / "datasets" / "dataset-2.json")

        other = next(i for i in manifest.trainable())
        with pytest.raises(DatasetError, match="leaves out"):
            lock(session, settings, studies=[other.study], created_by="test")
        session.rollback()
        grown = lock(session, settings, studies=[other.study, *[i.study for i in locked.items]],
                     created_by="test")
        session.commit()
        assert grown.version == 2 and set(grown.patients) == patients | {other.patient}
        assert locked_patients(latest_lock(session, settings)) == patients | {other.patient}

    leaked_items = tuple(dataclasses.replace(i, split="train") if i.patient in patients else i
                         for i in manifest.items)
    leaked = Manifest(**{**manifest.__dict__, "items": leaked_items}).with_digest()
    with pytest.raises(DatasetError, match="locked evaluation set"):
        check_trainable(leaked, patients)
    check_trainable(manifest, patients)


def test_cli_freeze_show_diff_list(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings, sessions = _sqlite(make_settings, tmp_path, folds=2)
    _salt(settings)
    config = str(tmp_path / "lungnode.toml")
    runner = CliRunner()
    with sessions() as session:
        _fake(session, settings, "t:a", "pa", LabelValue.MILD)
        session.commit()
    one = runner.invoke(app, ["dataset", "freeze", "--json", "--by", "alice", "--config", config])
    assert one.exit_code == 0, one.output
    lines = one.stdout.strip().splitlines()
    assert len(lines) == 1  # one line of JSON, for scripts
    first = json.loads(lines[0])
    assert first["created_by"] == "cli:alice" and len(first["items"]) == 1
    with sessions() as session:
        _fake(session, settings, "t:b", "pb", LabelValue.SEVERE)
        session.commit()
    two = runner.invoke(app, ["dataset", "freeze", "--config", config])
    assert two.exit_code == 0, two.output
    assert "training version 2" in two.stdout and "digest" in two.stdout

    shown = runner.invoke(app, ["dataset", "show", "dataset-1", "--json", "--config", config])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["digest"] == first["digest"]
    text = runner.invoke(app, ["dataset", "show", str(first["id"]), "--config", config])
    assert text.exit_code == 0 and "by label: mild 1" in text.stdout
    changes = runner.invoke(app, ["dataset", "diff", "dataset-1", "dataset-2", "--json", "--config", config])
    assert changes.exit_code == 0, changes.output
    assert json.loads(changes.stdout)["added"] == ["t:b"]
    listed = runner.invoke(app, ["dataset", "list", "--json", "--config", config])
    assert [r["version"] for r in json.loads(listed.stdout)] == [1, 2]
    missing = runner.invoke(app, ["dataset", "show", "dataset-9", "--config", config])
    assert missing.exit_code == 1 and "no dataset" in missing.stderr
    bad = runner.invoke(app, ["dataset", "freeze", "--as-of", "yesterday", "--config", config])
    assert bad.exit_code == 2
    lock_both = runner.invoke(app, ["dataset", "lock", "--config", config])
    assert lock_both.exit_code == 2
