"""Frozen dataset manifests, leak-free folds and the locked evaluation set.

``freeze`` turns the labels in force at a time (:func:`node.learn.history.current_labels`)
into a :class:`model.manifest.Manifest`: one item per labelled study with its
cached tensor (:mod:`node.learn.tensors`), its fold and its split.  The
manifest is the only thing the trainer reads.

Folds cannot leak: they are assigned per pseudonymous patient, once, and kept in
:class:`node.db.PatientFold` for ever.  A patient seen for the first time joins,
among the ``[training] folds`` folds, the one with the fewest patients of its
stratum (the label of the patient's first study), ties broken first by the
fewest patients in all (so small datasets still fill every fold, fold 0
included) and then by the keyed hash HMAC-SHA256(installation salt, patient
ID); the new patients of one freeze are taken in keyed-hash order.  So all
studies of a patient share a fold, adding studies never moves one, and the
folds are stratified by label.  Fold 0 validates (chooses the best epoch).

The locked evaluation set (``lock``) is a versioned list of patients whose
studies are evaluated at the end and never trained on nor used to choose an
epoch; a new version must keep every patient of the previous one (they were
already seen in evaluation).  ``freeze`` marks their studies ``locked-eval``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from model.errors import ModelError
from model.manifest import Manifest, ManifestItem, read_manifest
from node.db import AuditEntry, DatasetManifest, LearnStudy, PatientFold, utcnow
from node.errors import DatasetError
from node.learn.history import CurrentLabel, current_labels
from node.learn.tensors import (
    CachedTensor,
    TensorError,
    archive_tensor,
    cached_tensor,
    preprocessing_params,
)
from node.settings import Settings

__all__ = ["KIND_LOCK", "KIND_TRAINING", "Skipped", "assign_folds", "check_trainable", "diff",
           "freeze", "latest_lock", "list_datasets", "load_manifest", "lock", "locked_patients",
           "find", "patient_hash", "summary"]

KIND_TRAINING = "training"
KIND_LOCK = "locked-eval"


@dataclass(frozen=True)
class Skipped:
    """A labelled study left out of a manifest, and why."""

    study: str
    reason: str


def _salt(settings: Settings) -> bytes:
    """The installation secret ``archive_root/.salt`` (the anonymiser's), created when missing.

    An installation that imported public datasets before archiving any study
    has none yet; it is created in the anonymiser's format so both agree later.
    """
    path = settings.archive_root / ".salt"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".salt.{os.getpid()}.tmp")
            tmp.write_text(secrets.token_hex(32))
            if not path.exists():
                tmp.replace(path)
            else:
                tmp.unlink()
        value = path.read_text().strip()
    except OSError as exc:
        raise DatasetError(f"the installation secret {path} cannot be read or created ({exc}); "
                           "check the archive folder's permissions") from exc
    if not value:
        raise DatasetError(f"the installation secret {path} is empty; restore it from a backup")
    return value.encode()


def patient_hash(salt: bytes, pseudo_patient_id: str) -> str:
    """HMAC-SHA256(salt, patient ID) in hex: the keyed order and tie-break of fold assignment."""
    return hmac.new(salt, pseudo_patient_id.encode("utf-8"), hashlib.sha256).hexdigest()


def _utc(value: datetime | None) -> datetime:
    if value is None:
        return utcnow()
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _first_labels(session: Session, labels: Sequence[CurrentLabel]) -> dict[str, str]:
    """Each patient's stratum: the label of its first study (by creation, then id) among ``labels``."""
    ids = [c.learn_study_id for c in labels]
    created = dict(session.execute(select(LearnStudy.id, LearnStudy.created_at)
                                   .where(LearnStudy.id.in_(ids))).all()) if ids else {}
    out: dict[str, tuple[Any, int, str]] = {}
    for c in labels:
        key = (created.get(c.learn_study_id), c.learn_study_id, c.value)
        seen = out.get(c.pseudo_patient_id)
        if seen is None or (key[0], key[1]) < (seen[0], seen[1]):
            out[c.pseudo_patient_id] = key
    return {p: v[2] for p, v in out.items()}


def assign_folds(session: Session, settings: Settings, labels: Sequence[CurrentLabel]) -> dict[str, int]:
    """The fold of every patient of ``labels``, assigning new patients (rows added, not committed).

    Raises
    ------
    DatasetError
        A stored fold is outside ``[training] folds`` (the setting was lowered).
    """
    folds = settings.training.folds
    stored = {row.pseudo_patient_id: row for row in session.scalars(select(PatientFold))}
    too_high = sorted(p for p, r in stored.items() if r.fold >= folds)
    if too_high:
        raise DatasetError(f"{len(too_high)} patients were assigned to folds up to "
                           f"{max(stored[p].fold for p in too_high)}, but [training] folds is {folds}; "
                           "folds are never moved, so set [training] folds back to at least "
                           f"{max(stored[p].fold for p in too_high) + 1}")
    counts: Counter[tuple[str, int]] = Counter((r.stratum, r.fold) for r in stored.values())
    totals: Counter[int] = Counter(r.fold for r in stored.values())
    strata = _first_labels(session, labels)
    new = [p for p in strata if p not in stored]
    if new:
        salt = _salt(settings)
        keyed = sorted((patient_hash(salt, p), p) for p in new)
        for digest, patient in keyed:
            stratum = strata[patient]
            rank = {f: (counts[(stratum, f)], totals[f]) for f in range(folds)}
            fewest = min(rank.values())
            tied = [f for f in range(folds) if rank[f] == fewest]
            fold = tied[int(digest, 16) % len(tied)]
            counts[(stratum, fold)] += 1
            totals[fold] += 1
            row = PatientFold(pseudo_patient_id=patient, fold=fold, stratum=stratum)
            session.add(row)
            stored[patient] = row
        session.flush()
    return {p: stored[p].fold for p in strata}


def _tensor(settings: Settings, label: CurrentLabel, source_path: str,
            params: dict[str, Any]) -> CachedTensor:
    if label.origin == "archive":
        return archive_tensor(settings, label.pseudo_study_uid, source_path, params)
    found = cached_tensor(settings, label.pseudo_study_uid, params)
    if found is None:
        raise TensorError(f"study {label.pseudo_study_uid}: its tensor is missing from "
                          f"{settings.learn_root / 'tensors'}; import the {label.origin} dataset "
                          "again (`lungnode dataset import-...`), which recomputes it")
    return found


def _rows(session: Session, kind: str) -> list[DatasetManifest]:
    return list(session.scalars(select(DatasetManifest).where(DatasetManifest.kind == kind)
                                .order_by(DatasetManifest.version)))


def load_manifest(settings: Settings, row: DatasetManifest) -> Manifest:
    """Read and check the manifest file of a ``datasets`` row.

    Raises
    ------
    DatasetError
        The file is missing, edited or not a manifest.
    """
    try:
        manifest = read_manifest(settings.learn_root / row.path)
    except ModelError as exc:
        raise DatasetError(f"dataset {row.id} ({row.kind} version {row.version}): {exc}") from exc
    if manifest.digest != row.digest:
        raise DatasetError(f"dataset {row.id}: the file {row.path} has digest {manifest.digest[:12]} "
                           f"but the database recorded {row.digest[:12]}; it was replaced after freezing")
    return manifest


def latest_lock(session: Session, settings: Settings) -> Manifest | None:
    """The latest locked evaluation set, or ``None`` when none was declared."""
    rows = _rows(session, KIND_LOCK)
    return load_manifest(settings, rows[-1]) if rows else None


def locked_patients(lock_manifest: Manifest | None) -> frozenset[str]:
    """The patients of a locked evaluation set (:attr:`Manifest.patients` and its items)."""
    if lock_manifest is None:
        return frozenset()
    return frozenset(lock_manifest.patients) | {i.patient for i in lock_manifest.items}


def check_trainable(manifest: Manifest, locked: Iterable[str] = ()) -> None:
    """Refuse a manifest that would train or validate on a locked evaluation patient.

    ``locked`` is the node's locked set (:func:`locked_patients` of
    :func:`latest_lock`); the manifest's own ``locked-eval`` items count too.

    Raises
    ------
    DatasetError
        A ``train`` item belongs to a locked patient (the names are listed).
    """
    banned = set(locked) | {i.patient for i in manifest.locked()}
    leaked = sorted({i.patient for i in manifest.trainable() if i.patient in banned})
    if leaked:
        shown = ", ".join(leaked[:5]) + (" ..." if len(leaked) > 5 else "")
        raise DatasetError(f"the dataset trains on {len(leaked)} patient(s) of the locked evaluation "
                           f"set ({shown}); freeze the dataset again so they are split locked-eval")


def summary(manifest: Manifest) -> dict[str, Any]:
    """Counts by label, label source, origin, fold and split (informational, not in the digest)."""
    by_fold: dict[str, dict[str, int]] = {}
    for i in manifest.items:
        key = "locked-eval" if i.split == "locked-eval" else str(i.fold)
        fold = by_fold.setdefault(key, {})
        fold[i.label] = fold.get(i.label, 0) + 1
    return {
        "studies": len(manifest.items),
        "patients": len({i.patient for i in manifest.items}),
        "by_label": dict(sorted(Counter(i.label for i in manifest.items).items())),
        "by_source": dict(sorted(Counter(i.label_source for i in manifest.items).items())),
        "by_origin": dict(sorted(Counter(i.origin for i in manifest.items).items())),
        "by_split": dict(sorted(Counter(i.split for i in manifest.items).items())),
        "by_fold": dict(sorted(by_fold.items())),
    }


def _items(session: Session, settings: Settings, labels: Sequence[CurrentLabel],
           params: dict[str, Any], locked: frozenset[str],
           split_all: str | None = None) -> tuple[list[ManifestItem], list[Skipped]]:
    paths = dict(session.execute(select(LearnStudy.id, LearnStudy.source_path).where(
        LearnStudy.id.in_([c.learn_study_id for c in labels]))).all()) if labels else {}
    usable: list[tuple[CurrentLabel, CachedTensor]] = []
    skipped: list[Skipped] = []
    for c in labels:
        try:
            usable.append((c, _tensor(settings, c, paths[c.learn_study_id], params)))
        except TensorError as exc:
            skipped.append(Skipped(c.pseudo_study_uid, str(exc)))
    folds = assign_folds(session, settings, [c for c, _t in usable])
    items = [ManifestItem(study=c.pseudo_study_uid, patient=c.pseudo_patient_id, origin=c.origin,
                          label=c.value, label_event=c.event_id, label_source=c.source,
                          split=split_all or ("locked-eval" if c.pseudo_patient_id in locked else "train"),
                          fold=folds[c.pseudo_patient_id], tensor=t.path, tensor_sha256=t.sha256)
             for c, t in usable]
    return sorted(items, key=lambda i: i.study), skipped


def _store(session: Session, settings: Settings, *, kind: str, as_of: datetime, created_by: str,
           items: Sequence[ManifestItem], params: dict[str, Any], locked_eval: dict[str, Any] | None,
           extra: dict[str, Any], patients: tuple[str, ...] = ()) -> Manifest:
    version = (session.scalar(select(func.max(DatasetManifest.version))
                              .where(DatasetManifest.kind == kind)) or 0) + 1
    stem = "dataset" if kind == KIND_TRAINING else "locked-eval"
    rel = f"datasets/{stem}-{version}.json"
    created = utcnow()
    row = DatasetManifest(kind=kind, version=version, digest="", as_of=as_of, created_at=created,
                          created_by=created_by, path=rel, study_count=len(items))
    session.add(row)
    session.flush()
    manifest = Manifest(id=row.id, kind=kind, version=version, created_at=created.isoformat(),
                        as_of=as_of.isoformat(), created_by=created_by,
                        folds=settings.training.folds, preprocessing=params, items=tuple(items),
                        locked_eval=locked_eval, patients=patients, extra=extra).with_digest()
    counts = summary(manifest)
    manifest = Manifest(**{**manifest.__dict__, "extra": {**counts, **extra}})
    manifest.write(settings.learn_root / rel)
    row.digest = manifest.digest
    row.summary = json.dumps(counts, sort_keys=True)
    action = "dataset-frozen" if kind == KIND_TRAINING else "dataset-locked"  # what trains on what
    session.add(AuditEntry(actor=created_by[:64], action=action,
                           detail=f"{kind} version {version} (id {row.id}): {len(items)} studies of "
                                  f"{len(set(i.patient for i in items))} patients as of {as_of.isoformat()}, "
                                  f"digest {manifest.digest}"))
    session.flush()
    return manifest


def freeze(session: Session, settings: Settings, *, as_of: datetime | None = None,
           created_by: str) -> Manifest:
    """Freeze the labels in force at ``as_of`` (now when ``None``) into a training manifest.

    Computes missing tensors, assigns folds to new patients, applies the latest
    locked evaluation set, writes ``<learn_root>/datasets/dataset-<version>.json``
    and adds a :class:`node.db.DatasetManifest` row; the caller commits.  Studies
    that cannot be preprocessed are left out and listed in ``extra["skipped"]``.
    Freezing again ``as_of`` the same time gives the same digest (as long as no
    new locked set was declared in between: that deliberately changes the split).

    Raises
    ------
    DatasetError
        No labelled study at ``as_of``, none that can be preprocessed, or an
        inconsistent fold setting or locked set.
    """
    when = _utc(as_of)
    labels = current_labels(session, when)
    if not labels:
        raise DatasetError(f"no study has a label at {when.isoformat()}; label archived studies "
                           "(`lungnode label ...`) or import a public dataset (`lungnode dataset "
                           "import-mosmed` / `import-cov19ctdb`) first")
    params = preprocessing_params()
    lock_manifest = latest_lock(session, settings)
    locked = locked_patients(lock_manifest)
    items, skipped = _items(session, settings, labels, params, locked)
    if not items:
        reasons = "; ".join(s.reason for s in skipped[:3])
        raise DatasetError(f"none of the {len(labels)} labelled studies can be preprocessed "
                           f"({reasons}); nothing to freeze")
    locked_eval = None if lock_manifest is None else {
        "id": lock_manifest.id, "version": lock_manifest.version, "digest": lock_manifest.digest}
    manifest = _store(session, settings, kind=KIND_TRAINING, as_of=when, created_by=created_by,
                      items=items, params=params, locked_eval=locked_eval,
                      extra={"skipped": [{"study": s.study, "reason": s.reason} for s in skipped]})
    check_trainable(manifest, locked)
    return manifest


def lock(session: Session, settings: Settings, *, fold: int | None = None,
         studies: Sequence[str] | None = None, created_by: str) -> Manifest:
    """Declare the locked evaluation set: the patients of ``fold`` or of the listed studies.

    A new version must keep every patient of the previous one.  The manifest
    (kind ``locked-eval``) lists the patients' labelled studies (split
    ``locked-eval``) and the patients themselves in :attr:`Manifest.patients` (in its digest);
    it is written to ``<learn_root>/datasets/locked-eval-<version>.json``.
    The caller commits.

    Raises
    ------
    DatasetError
        Neither or both of ``fold`` and ``studies``, an unknown fold or study, no
        patient to lock, or a new version that would drop a locked patient.
    """
    if (fold is None) == (not studies):
        raise DatasetError("give either a fold (--fold N) or studies (--study S ...) to lock")
    now = utcnow()
    labels = current_labels(session, now)
    params = preprocessing_params()
    folds = assign_folds(session, settings, labels)
    if fold is not None:
        if not 0 <= fold < settings.training.folds:
            raise DatasetError(f"fold {fold} does not exist; folds are 0..{settings.training.folds - 1}")
        if fold == 0:
            raise DatasetError("fold 0 is the validation fold (it chooses the best epoch); "
                               f"lock another fold, e.g. {settings.training.folds - 1}")
        patients = {p for p, f in folds.items() if f == fold}
        patients |= set(session.scalars(select(PatientFold.pseudo_patient_id)
                                        .where(PatientFold.fold == fold)))
    else:
        wanted = sorted(set(studies or ()))
        found = dict(session.execute(select(LearnStudy.pseudo_study_uid, LearnStudy.pseudo_patient_id)
                                     .where(LearnStudy.pseudo_study_uid.in_(wanted))).all())
        unknown = [s for s in wanted if s not in found]
        if unknown:
            raise DatasetError(f"unknown studies {', '.join(unknown[:5])}; give pseudonymous study IDs "
                               "as `lungnode dataset show` lists them")
        patients = set(found.values())
    previous = latest_lock(session, settings)
    dropped = sorted(locked_patients(previous) - patients)
    if dropped:
        assert previous is not None
        raise DatasetError(f"the locked evaluation set version {previous.version} holds "
                           f"{len(dropped)} patient(s) this lock leaves out ({', '.join(dropped[:5])}); "
                           "they were already used in evaluation and may never be trained on: "
                           "include them (--study one of their studies, or lock the same fold)")
    if not patients:
        raise DatasetError("no patient to lock: the fold has no patients yet; freeze a dataset first")
    chosen = [c for c in labels if c.pseudo_patient_id in patients]
    items, skipped = _items(session, settings, chosen, params, frozenset(), split_all="locked-eval")
    return _store(session, settings, kind=KIND_LOCK, as_of=now, created_by=created_by, items=items,
                  params=params, locked_eval=None,
                  patients=tuple(sorted(patients)), extra={"fold": fold,
                         "skipped": [{"study": s.study, "reason": s.reason} for s in skipped]})


def list_datasets(session: Session) -> list[dict[str, Any]]:
    """Every frozen dataset and locked set: id, kind, version, digest, as_of, counts."""
    rows = session.scalars(select(DatasetManifest).order_by(DatasetManifest.kind, DatasetManifest.version))
    return [{"id": r.id, "kind": r.kind, "version": r.version, "digest": r.digest,
             "as_of": r.as_of.isoformat(), "created_at": r.created_at.isoformat(),
             "created_by": r.created_by, "path": r.path, "study_count": r.study_count,
             "summary": json.loads(r.summary) if r.summary else None} for r in rows]


def find(session: Session, settings: Settings, ident: str) -> Manifest:
    """A manifest by database id, ``dataset-<version>`` / ``locked-eval-<version>``, or file path.

    Raises
    ------
    DatasetError
        No such dataset, or a file that is not a valid manifest.
    """
    row: DatasetManifest | None = None
    if ident.isdigit():
        row = session.get(DatasetManifest, int(ident))
    else:
        for kind, stem in ((KIND_TRAINING, "dataset-"), (KIND_LOCK, "locked-eval-")):
            if ident.startswith(stem) and ident[len(stem):].isdigit():
                row = session.scalars(select(DatasetManifest).where(
                    DatasetManifest.kind == kind,
                    DatasetManifest.version == int(ident[len(stem):]))).first()
                break
        else:
            path = Path(ident)
            if not path.is_file() and (settings.learn_root / ident).is_file():
                path = settings.learn_root / ident
            if path.is_file():
                try:
                    return read_manifest(path)
                except ModelError as exc:
                    raise DatasetError(str(exc)) from exc
    if row is None:
        raise DatasetError(f"no dataset {ident!r}; `lungnode dataset list` shows the ids "
                           "(or give dataset-<version>, locked-eval-<version> or a manifest file)")
    return load_manifest(settings, row)


def diff(a: Manifest, b: Manifest) -> dict[str, Any]:
    """Studies added in ``b``, removed from ``a`` and relabelled, by pseudonymous study ID."""
    old = {i.study: i for i in a.items}
    new = {i.study: i for i in b.items}
    return {
        "a": {"id": a.id, "kind": a.kind, "version": a.version, "digest": a.digest},
        "b": {"id": b.id, "kind": b.kind, "version": b.version, "digest": b.digest},
        "added": sorted(s for s in new if s not in old),
        "removed": sorted(s for s in old if s not in new),
        "relabelled": [{"study": s, "from": old[s].label, "to": new[s].label}
                       for s in sorted(old.keys() & new.keys()) if old[s].label != new[s].label],
        "moved": [{"study": s, "from": [old[s].split, old[s].fold], "to": [new[s].split, new[s].fold]}
                  for s in sorted(old.keys() & new.keys())
                  if (old[s].split, old[s].fold) != (new[s].split, new[s].fold)],
    }
