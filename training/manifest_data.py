"""The torch Dataset over a frozen manifest, and the split of its items.

A manifest (:mod:`model.manifest`) names, per study, a cached preprocessed
tensor (``.npy``, ``(1, D, H, W)`` float32 in 0..1) relative to the training
root (the manifest folder's parent) and that file's sha256.  This module is the
only place that reads those files: every read hashes the bytes it loads and
refuses a mismatch (:class:`TensorMismatchError`), so a tensor changed after
the freeze can never be trained on silently.

Splits (:func:`split_items`): fold 0 of the ``train`` split validates and
chooses the best epoch, folds 1.. train; the ``locked-eval`` split is kept
apart and evaluated once at the end.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from model.errors import ModelError
from model.manifest import Manifest, ManifestItem

__all__ = ["ManifestDataset", "Splits", "TensorMismatchError", "split_items", "training_root"]


class TensorMismatchError(ModelError):
    """A tensor file is missing, malformed or does not have the sha256 its manifest says."""


def training_root(manifest_path: Path) -> Path:
    """The folder the manifest's tensor paths are relative to: the manifest folder's parent."""
    return Path(manifest_path).resolve().parent.parent


@dataclass(frozen=True)
class Splits:
    """The items of one manifest by role."""

    train: tuple[ManifestItem, ...]
    """``train`` split, folds 1..: trained on."""
    val: tuple[ManifestItem, ...]
    """``train`` split, fold 0: validates and chooses the best epoch."""
    locked: tuple[ManifestItem, ...]
    """``locked-eval`` split: evaluated once at the end, never trained on or used for choices."""


def split_items(manifest: Manifest) -> Splits:
    """Training, validation and locked items of ``manifest``.

    Raises
    ------
    ModelError
        No training or no validation studies (a manifest with one fold cannot train).
    """
    trainable = manifest.trainable()
    train = tuple(i for i in trainable if i.fold != 0)
    val = tuple(i for i in trainable if i.fold == 0)
    if not train or not val:
        raise ModelError(f"manifest {manifest.id}: {len(train)} training studies (folds 1..) and "
                         f"{len(val)} validation studies (fold 0); both are needed. Freeze a dataset "
                         "with at least two folds and more labelled studies")
    return Splits(train=train, val=val, locked=manifest.locked())


class ManifestDataset(Dataset[tuple[torch.Tensor, int]]):
    """Studies of a manifest as ``(input (1, D, H, W) float32, target)``; target ``-1`` = covid-unknown.

    Parameters
    ----------
    items:
        The manifest items (one split).
    root:
        The training root the tensor paths are relative to.
    cache:
        Keep tensors in memory after their first (verified) read; for small sets.
    """

    def __init__(self, items: Sequence[ManifestItem], root: Path, *, cache: bool = False) -> None:
        self.items = tuple(items)
        self.root = Path(root)
        self.targets = torch.tensor([i.target for i in self.items], dtype=torch.int64)
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def path(self, index: int) -> Path:
        """The tensor file of item ``index``."""
        return self.root / self.items[index].tensor

    def load(self, index: int) -> torch.Tensor:
        """Read, verify (sha256) and decode item ``index``'s tensor.

        Raises
        ------
        TensorMismatchError
            Missing or unreadable file, wrong sha256, shape or dtype.
        """
        item, path = self.items[index], self.path(index)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TensorMismatchError(f"study {item.study}: cannot read tensor {path}: {exc}; "
                                      "rebuild the tensor cache or freeze the dataset again") from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != item.tensor_sha256:
            raise TensorMismatchError(
                f"study {item.study}: tensor {path} has sha256 {digest}, the manifest says "
                f"{item.tensor_sha256}; the file changed after the dataset was frozen. Refusing to "
                "train on it: restore the file or freeze the dataset again")
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise TensorMismatchError(f"study {item.study}: {path} is not a .npy array: {exc}") from exc
        if array.ndim != 4 or array.shape[0] != 1 or array.dtype != np.float32:
            raise TensorMismatchError(f"study {item.study}: {path} holds {array.dtype} {array.shape}; "
                                      "expected float32 (1, D, H, W)")
        return torch.from_numpy(array)

    def verify(self) -> None:
        """Read and check every tensor once (fails early, before any training)."""
        for index in range(len(self)):
            x = self.load(index)
            if self._cache is not None:
                self._cache[index] = x

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._cache is not None and index in self._cache:
            return self._cache[index], int(self.targets[index])
        x = self.load(index)
        if self._cache is not None:
            self._cache[index] = x
        return x, int(self.targets[index])

    def studies(self) -> tuple[str, ...]:
        """Study IDs in index order."""
        return tuple(i.study for i in self.items)
