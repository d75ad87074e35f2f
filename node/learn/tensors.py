"""The tensor cache: each training study's preprocessed network input, computed once.

A frozen manifest names, per study, a ``.npy`` file (``(1, D, H, W)`` float32
in 0..1, :func:`model.preprocess.preprocess_array`) and its sha256; the trainer
reads those files and nothing else.  They live under
``<learn_root>/tensors/<key>.npy`` where ``key`` hashes the pseudonymous study ID
and the preprocessing parameters, so a change of input size, window, margin or
lung segmenter gives new files instead of silently reusing stale ones.

Files are written atomically (temporary name, then rename) with a sidecar
``<key>.sha256`` so freezing a large dataset again does not re-hash every
tensor.  A study that cannot be preprocessed (too few slices, no lungs found,
unreadable files) raises :class:`TensorError` with the reason; :func:`freeze
<node.learn.datasets.freeze>` reports it and leaves the study out.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import AnalysisError
from model.lungs import LungParams, segment_lungs
from model.preprocess import PreprocessConfig, preprocess_array
from model.registry import read_card, sha256_file
from model.volume import CTVolume, load_series
from node.errors import DatasetError
from node.settings import Settings

__all__ = ["MIN_SLICES", "SEGMENTATION", "CachedTensor", "TensorError", "archive_tensor",
           "cached_tensor", "default_preprocess", "preprocessing_params", "tensor_key",
           "tensor_relpath", "write_tensor"]

MIN_SLICES = 8
"""Fewer slices than this cannot be a chest CT volume (a scout, a single-slice series)."""

SEGMENTATION = "model.lungs.segment_lungs"
"""The lung segmenter that crops the network input (the node's classical segmentation)."""


class TensorError(DatasetError):
    """A study cannot be turned into a network input; the message says why."""


@dataclass(frozen=True)
class CachedTensor:
    """A cached tensor: ``path`` relative to the ``[training] root`` and its sha256."""

    path: str
    sha256: str


def default_preprocess() -> PreprocessConfig:
    """The shipped default model's preprocessing, so candidates keep its input.

    Raises
    ------
    DatasetError
        The default model's card cannot be read.
    """
    try:
        return read_card(None).preprocess
    except AnalysisError as exc:
        raise DatasetError(f"the default model's preprocessing is needed for the tensors: {exc}") from exc


def preprocessing_params(config: PreprocessConfig | None = None) -> dict[str, Any]:
    """The manifest's ``preprocessing``: input size, window, margin and the lung segmenter.

    The segmenter is named with the node's algorithm name and version (the ones
    written into its DICOM results) and its parameters, so a change of the
    classical segmentation changes the cache key and the manifest digest.
    """
    from node.pipeline import ALGORITHM_NAME, ALGORITHM_VERSION

    config = config or default_preprocess()
    return {
        "input_size": [int(v) for v in config.input_size],
        "window": [float(v) for v in config.window],
        "margin_mm": float(config.margin_mm),
        "segmentation": {"method": SEGMENTATION, "algorithm": ALGORITHM_NAME,
                         "version": ALGORITHM_VERSION, "params": asdict(LungParams())},
    }


def _config(params: dict[str, Any]) -> PreprocessConfig:
    return PreprocessConfig(input_size=tuple(params["input_size"]),  # type: ignore[arg-type]
                            window=tuple(params["window"]),  # type: ignore[arg-type]
                            margin_mm=float(params["margin_mm"]))


def tensor_key(pseudo_study_uid: str, params: dict[str, Any]) -> str:
    """The cache key: sha256 of the pseudonymous study ID and the preprocessing parameters."""
    text = json.dumps({"study": pseudo_study_uid, "preprocessing": params}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]


def tensor_relpath(pseudo_study_uid: str, params: dict[str, Any]) -> str:
    """Where the study's tensor lives, relative to the ``[training] root``."""
    return f"tensors/{tensor_key(pseudo_study_uid, params)}.npy"


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def cached_tensor(settings: Settings, pseudo_study_uid: str,
                  params: dict[str, Any]) -> CachedTensor | None:
    """The study's cached tensor, or ``None`` when it was not computed yet.

    The sha256 comes from the sidecar written with the tensor; a missing or
    stale sidecar (older than the tensor) is recomputed.
    """
    rel = tensor_relpath(pseudo_study_uid, params)
    path = settings.learn_root / rel
    if not path.is_file():
        return None
    side = path.with_suffix(".sha256")
    if side.is_file() and side.stat().st_mtime_ns >= path.stat().st_mtime_ns:
        value = side.read_text().strip()
        if len(value) == 64:
            return CachedTensor(rel, value)
    value = sha256_file(path)
    _atomic(side, value.encode())
    return CachedTensor(rel, value)


def write_tensor(settings: Settings, pseudo_study_uid: str, volume: CTVolume,
                 params: dict[str, Any]) -> CachedTensor:
    """Segment the lungs of ``volume``, preprocess it and cache the tensor (atomically).

    Raises
    ------
    TensorError
        Too few slices, no lungs found, or a volume the preprocessing refuses.
    """
    what = f"study {pseudo_study_uid}"
    if volume.shape[0] < MIN_SLICES:
        raise TensorError(f"{what} has {volume.shape[0]} slices; at least {MIN_SLICES} are needed "
                          "for a chest CT volume")
    try:
        masks = segment_lungs(volume)
        tensor = preprocess_array(volume.hu, masks.both, volume.spacing, _config(params),
                                  series=pseudo_study_uid)
    except AnalysisError as exc:
        raise TensorError(f"{what} cannot be preprocessed: {exc}") from exc
    array = np.ascontiguousarray(tensor.numpy(), dtype=np.float32)
    rel = tensor_relpath(pseudo_study_uid, params)
    path = settings.learn_root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        np.save(fh, array, allow_pickle=False)
    value = sha256_file(tmp)
    tmp.replace(path)
    _atomic(path.with_suffix(".sha256"), value.encode())
    return CachedTensor(rel, value)


def archive_tensor(settings: Settings, pseudo_study_uid: str, source_path: str,
                   params: dict[str, Any]) -> CachedTensor:
    """The cached tensor of an archived study, computed from its archived series when missing.

    ``source_path`` is the archived series folder relative to the archive root
    (a file in it is accepted too).

    Raises
    ------
    TensorError
        The archived series is missing or unreadable, or cannot be preprocessed.
    """
    found = cached_tensor(settings, pseudo_study_uid, params)
    if found is not None:
        return found
    folder = settings.archive_root / source_path
    if folder.is_file():
        folder = folder.parent
    files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
    if not files:
        raise TensorError(f"study {pseudo_study_uid}: no archived DICOM files under {folder}; "
                          "restore the archive copy or retract the study's label")
    try:
        volume = load_series(files)
    except (AnalysisError, OSError) as exc:
        raise TensorError(f"study {pseudo_study_uid}: the archived series cannot be read: {exc}") from exc
    return write_tensor(settings, pseudo_study_uid, volume, params)
