"""Training and evaluation data for the severity network from synthetic phantoms.

Each study is a phantom of :mod:`training.synth` (``make_phantom``); its class
follows the MosMedData bins of the lung involvement: non-COVID when nothing is
involved, then mild (< 25 %), moderate (25-50 %), severe (50-75 %) and
critical (> 75 %).  :func:`draw_specs` draws the phantoms: a class per study
(cycled for an exactly balanced evaluation set, drawn at random for a
training set, which :func:`class_balanced_sampler` balances as in COVID-Net
CT-S), an involvement inside the class's bin (``edge_margin`` away from the
bin edges), and the seed, image size, slice thickness, kernel, consolidation
share and coverage.

The network input is made by :func:`model.preprocess.preprocess_array`, the
same code inference uses, with the phantom's true lung masks for the crop.
:func:`build_tensor_set` caches each preprocessed study as a small ``.pt``
file (float16) in a cache folder (default: under the system's temporary
folder, never the repository) so a second run skips the generator.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from model.prediction import CLASS_NAMES
from model.preprocess import PreprocessConfig, preprocess_array
from training.synth import Phantom, SynthSpec, make_phantom

__all__ = [
    "CLASS_INVOLVEMENT",
    "SpecOptions",
    "TensorSet",
    "build_tensor_set",
    "class_balanced_sampler",
    "default_cache_dir",
    "draw_specs",
    "involvement_of",
    "label_for_involvement",
    "map_phantoms",
]

logger = logging.getLogger(__name__)

CLASS_INVOLVEMENT: tuple[tuple[float, float], ...] = (
    (0.0, 0.0), (0.0, 0.25), (0.25, 0.50), (0.50, 0.75), (0.75, 1.0))
"""Involvement fraction range of each class in :data:`CLASS_NAMES` order (MosMedData CT-0..CT-4)."""

_CACHE_VERSION = "1"


def label_for_involvement(fraction: float) -> int:
    """Class index (into :data:`CLASS_NAMES`) of a lung involvement fraction 0..1.

    0 is non-COVID; under 0.25 mild, 0.25-0.5 moderate, 0.5-0.75 severe, 0.75 and
    over critical (a value on an edge goes to the higher class, as in MosMedData).
    """
    if fraction <= 0.0:
        return 0
    return 1 + min(3, int(fraction * 4.0))


def involvement_of(phantom: Phantom) -> float:
    """Diseased share (ground glass + consolidation) of the phantom's lung voxels."""
    lungs = phantom.left_lung | phantom.right_lung
    n = int(lungs.sum())
    return float(((phantom.ground_glass | phantom.consolidation) & lungs).sum() / n) if n else 0.0


@dataclass(frozen=True)
class SpecOptions:
    """What :func:`draw_specs` varies, and within which bounds."""

    rows: tuple[int, ...] = (128,)
    slice_thickness_mm: tuple[float, ...] = (2.5, 5.0, 8.0)
    kernels: tuple[str, ...] = ("B40f", "B70f")
    consolidation_fraction: tuple[float, float] = (0.05, 0.6)
    partial_coverage: float = 0.1
    """Share of phantoms with the lung apex or base cut off."""
    edge_margin: float = 0.02
    """Involvement is drawn this far inside each class's bin."""
    contrast: float = 0.0
    """Share of phantoms scanned after intravenous contrast (drawn from a stream of its own, so the
    other draws, and the sets drawn before this option existed, do not change)."""


def draw_specs(n: int, base_seed: int, *, balanced: bool, options: SpecOptions = SpecOptions()
               ) -> list[SynthSpec]:
    """``n`` phantom specifications with seeds ``base_seed .. base_seed + n - 1``.

    Parameters
    ----------
    n:
        Number of studies.
    base_seed:
        First phantom seed; also seeds the draws, so the list is reproducible.
    balanced:
        Cycle through the classes (exactly balanced); otherwise draw each
        study's class at random.
    options:
        Image size, slice thickness, kernel and disease variation.
    """
    rng = np.random.default_rng([base_seed, 20261123])
    rng_contrast = np.random.default_rng([base_seed, 20261129])
    specs = []
    for i in range(n):
        cls = i % len(CLASS_NAMES) if balanced else int(rng.integers(len(CLASS_NAMES)))
        lo, hi = CLASS_INVOLVEMENT[cls]
        m = options.edge_margin
        involvement = 0.0 if cls == 0 else float(rng.uniform(lo + m, hi - m))
        specs.append(SynthSpec(
            involvement=round(involvement, 4),
            seed=base_seed + i,
            rows=int(rng.choice(options.rows)),
            slice_thickness_mm=float(rng.choice(options.slice_thickness_mm)),
            kernel=str(rng.choice(options.kernels)),
            consolidation_fraction=round(float(rng.uniform(*options.consolidation_fraction)), 3),
            coverage="partial" if rng.random() < options.partial_coverage else "full",
            contrast=bool(rng_contrast.random() < options.contrast),
        ))
    return specs


def _init_worker() -> None:
    torch.set_num_threads(1)


_T = TypeVar("_T")
_R = TypeVar("_R")


def map_phantoms(fn: Callable[[_T], _R], items: Sequence[_T], workers: int) -> Iterator[_R]:
    """``fn(item)`` for each item in order, in ``workers`` processes (1: in this process).

    ``fn`` must be a module-level function (it is pickled for the workers).
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    ctx = get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
        yield from pool.map(fn, items, chunksize=2)


def default_cache_dir() -> Path:
    """``$TMPDIR/lungnode-train-cache`` (created on use, outside the repository)."""
    return Path(tempfile.gettempdir()) / "lungnode-train-cache"


def _cache_key(spec: SynthSpec, config: PreprocessConfig) -> str:
    text = repr((_CACHE_VERSION, sorted(asdict(spec).items()), asdict(config)))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class _Job:
    spec: SynthSpec
    config: PreprocessConfig
    path: Path | None


def _make_item(job: _Job) -> tuple[torch.Tensor, int, float]:
    if job.path is not None and job.path.is_file():
        blob = torch.load(job.path, weights_only=True)
        return blob["input"], int(blob["label"]), float(blob["involvement"])
    ph = make_phantom(job.spec)
    involvement = involvement_of(ph)
    x = preprocess_array(ph.hu, ph.left_lung | ph.right_lung, ph.spacing, job.config,
                         series=f"synthetic seed {job.spec.seed}").to(torch.float16)
    label = label_for_involvement(involvement)
    if job.path is not None:
        tmp = job.path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"input": x, "label": label, "involvement": involvement}, tmp)
        tmp.replace(job.path)
    return x, label, involvement


@dataclass(frozen=True, eq=False)
class TensorSet(Dataset[tuple[torch.Tensor, int]]):
    """Preprocessed studies in memory: ``inputs`` ``(N, 1, D, H, W)`` float16 in 0..1."""

    inputs: torch.Tensor
    labels: torch.Tensor
    """``(N,)`` class indices (int64)."""
    involvement: torch.Tensor
    """``(N,)`` true involvement fractions."""
    seeds: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.inputs[i], int(self.labels[i])

    def class_counts(self) -> list[int]:
        """Studies per class, in :data:`CLASS_NAMES` order."""
        return torch.bincount(self.labels, minlength=len(CLASS_NAMES)).tolist()


def build_tensor_set(specs: Sequence[SynthSpec], config: PreprocessConfig, *,
                     cache_dir: Path | None = None, workers: int = 1) -> TensorSet:
    """Generate, preprocess (true lung masks) and cache the studies of ``specs``.

    Parameters
    ----------
    specs:
        Phantoms to make (see :func:`draw_specs`).
    config:
        The model's preprocessing.
    cache_dir:
        Folder for the cached tensors; ``None``: :func:`default_cache_dir`.
    workers:
        Processes that generate phantoms in parallel.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [_Job(s, config, folder / f"{_cache_key(s, config)}.pt") for s in specs]
    cached = sum(1 for j in jobs if j.path is not None and j.path.is_file())
    logger.info("%d studies, %d cached in %s", len(jobs), cached, folder)
    inputs, labels, inv = [], [], []
    for i, (x, y, f) in enumerate(map_phantoms(_make_item, jobs, workers)):
        inputs.append(x)
        labels.append(y)
        inv.append(f)
        if (i + 1) % 100 == 0:
            logger.info("prepared %d of %d studies", i + 1, len(jobs))
    return TensorSet(inputs=torch.stack(inputs), labels=torch.tensor(labels, dtype=torch.int64),
                     involvement=torch.tensor(inv, dtype=torch.float32),
                     seeds=tuple(s.seed for s in specs))


def class_balanced_sampler(labels: torch.Tensor, num_samples: int | None = None,
                           seed: int = 0) -> WeightedRandomSampler:
    """Draw studies with probability inversely proportional to their class's size.

    Each class is then seen about equally often per epoch (COVID-Net CT-S);
    ``num_samples`` defaults to the number of studies.
    """
    counts = torch.bincount(labels, minlength=len(CLASS_NAMES)).double()
    weights = (1.0 / counts.clamp(min=1.0))[labels]
    gen = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights.tolist(), num_samples or len(labels), replacement=True,
                                 generator=gen)
