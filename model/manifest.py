"""The frozen dataset manifest: the one file that says exactly what a model was trained on.

:mod:`node.learn.datasets` writes it (``lungnode dataset freeze``); :mod:`training`
reads it and nothing else (the trainer never touches the database).  It lives
in :mod:`model` because both sides import it and :mod:`node` never imports
:mod:`training`.

A manifest lists, per study, the pseudonymous study and patient IDs, the label
event used, the fold and the sha256 of the cached preprocessed tensor; and the
preprocessing parameters.  Its :attr:`Manifest.digest` is the sha256 of the
canonical JSON of everything that decides what the trainer sees (items, folds,
preprocessing, the locked evaluation set), not of when or by whom it was
frozen: freezing again ``--as-of`` the same time gives the same digest.

Splits: an item's ``split`` is ``train`` (trainable; ``fold`` 0 validates and
chooses the best epoch, the other folds train) or ``locked-eval`` (a study of a
patient in the locked evaluation set: evaluated at the end, never trained on and
never used to choose an epoch).

Tensor files are ``.npy`` arrays ``(1, D, H, W)`` float32 in 0..1 (the
network's input, :func:`model.preprocess.preprocess_array`), named by path
relative to the manifest's folder's parent (the ``[training] root``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.errors import ModelError
from model.prediction import CLASS_NAMES

__all__ = [
    "LABELS",
    "MANIFEST_FORMAT",
    "Manifest",
    "ManifestItem",
    "label_index",
    "read_manifest",
]

MANIFEST_FORMAT = "lungnode-dataset/1"

LABELS: tuple[str, ...] = ("non-covid", "mild", "moderate", "severe", "critical", "covid-unknown")
"""Label values; the first five are the network's classes in :data:`CLASS_NAMES` order."""

SPLITS = ("train", "locked-eval")


def label_index(label: str) -> int:
    """The class index of a label: 0-4 for the five classes, -1 for ``covid-unknown`` (partial)."""
    if label not in LABELS:
        raise ModelError(f"unknown label {label!r}; labels are {', '.join(LABELS)}")
    index = LABELS.index(label)
    return -1 if index == len(CLASS_NAMES) else index


@dataclass(frozen=True)
class ManifestItem:
    """One labelled study of a frozen dataset."""

    study: str
    """Pseudonymous study ID (the de-identified Study Instance UID, or the import's own ID)."""
    patient: str
    """Pseudonymous patient ID: all studies of one patient share a fold."""
    origin: str
    """``archive``, ``mosmed`` or ``cov19ctdb``."""
    label: str
    """One of :data:`LABELS`."""
    label_event: int
    """The label event used (its id in the node's database)."""
    label_source: str
    split: str
    """``train`` or ``locked-eval``."""
    fold: int
    tensor: str
    """The cached preprocessed tensor, relative to the ``[training] root``."""
    tensor_sha256: str

    @property
    def target(self) -> int:
        """:func:`label_index` of the label."""
        return label_index(self.label)


@dataclass(frozen=True)
class Manifest:
    """A frozen dataset (``kind = "training"``) or a locked evaluation set (``"locked-eval"``)."""

    id: int
    kind: str
    version: int
    created_at: str
    as_of: str
    created_by: str
    folds: int
    preprocessing: dict[str, Any]
    """``input_size``, ``window``, ``margin_mm`` (:class:`model.preprocess.PreprocessConfig`) and
    ``segmentation`` (the lung segmenter that cropped the input)."""
    items: tuple[ManifestItem, ...]
    locked_eval: dict[str, Any] | None = None
    """``{"id", "version", "digest"}`` of the locked evaluation set applied, if any."""
    patients: tuple[str, ...] = ()
    """A locked evaluation set's patients (pseudonymous), labelled studies or not; in the digest."""
    digest: str = ""
    format: str = MANIFEST_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)
    """Informational only (label counts by class and source ...); not in the digest."""

    def content_digest(self) -> str:
        """sha256 over what decides the training: items, folds, preprocessing, the locked set."""
        content = {
            "format": self.format,
            "kind": self.kind,
            "folds": self.folds,
            "preprocessing": self.preprocessing,
            "locked_eval": (self.locked_eval or {}).get("digest"),
            "items": [asdict(i) for i in sorted(self.items, key=lambda i: i.study)],
        }
        if self.patients:
            content["patients"] = sorted(self.patients)
        text = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def with_digest(self) -> Manifest:
        """This manifest with :attr:`digest` set from its content."""
        return Manifest(**{**self.__dict__, "digest": self.content_digest()})

    def to_json(self) -> str:
        data = asdict(self)
        data["items"] = [asdict(i) for i in self.items]
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    def write(self, path: Path) -> None:
        """Write atomically (temporary name, then rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    def trainable(self) -> tuple[ManifestItem, ...]:
        """Items that may be trained on or validated with (never the locked evaluation set)."""
        return tuple(i for i in self.items if i.split == "train")

    def locked(self) -> tuple[ManifestItem, ...]:
        return tuple(i for i in self.items if i.split == "locked-eval")


def read_manifest(path: Path) -> Manifest:
    """Read and check a manifest: format, labels, splits, patient-grouped folds, digest.

    Raises
    ------
    ModelError
        Not a lungnode manifest, an unknown label or split, one patient in two
        folds or on both sides of the locked set, or a digest that does not
        match the content (the file was edited after it was frozen).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read dataset manifest {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ModelError(f"{path} is not a lungnode dataset manifest ({MANIFEST_FORMAT})")
    try:
        items = tuple(ManifestItem(**i) for i in data.pop("items"))
        patients = tuple(str(p) for p in data.pop("patients", ()))
        manifest = Manifest(items=items, patients=patients, **data)
    except (KeyError, TypeError) as exc:
        raise ModelError(f"{path}: malformed manifest ({exc})") from exc
    folds: dict[str, tuple[str, int]] = {}
    for item in manifest.items:
        label_index(item.label)
        if item.split not in SPLITS:
            raise ModelError(f"{path}: study {item.study} has split {item.split!r}; "
                             f"splits are {', '.join(SPLITS)}")
        if not 0 <= item.fold < manifest.folds:
            raise ModelError(f"{path}: study {item.study} is in fold {item.fold} of {manifest.folds}")
        seen = folds.setdefault(item.patient, (item.split, item.fold))
        if seen != (item.split, item.fold):
            raise ModelError(f"{path}: patient {item.patient} is in {seen} and in "
                             f"{(item.split, item.fold)}; a patient's studies must share one split")
    if manifest.digest != manifest.content_digest():
        raise ModelError(f"{path}: the digest does not match the content; the manifest was changed "
                         "after it was frozen; freeze the dataset again")
    return manifest
