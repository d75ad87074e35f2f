"""Learned lung segmentation with lungmask, and the choice between it and the classical method.

lungmask (Hofmanninger et al., Eur Radiol Exp 2020; PyPI ``lungmask``,
Apache-2.0) is a 2D U-Net run slice by slice: R231 and R231CovidWeb give
three classes (0 background, 1 right lung, 2 left lung), LTRCLobes six
(0 background, 1 left upper, 2 left lower, 3 right upper, 4 right middle,
5 right lower lobe).  Its inference (:class:`lungmask.LMInferer`) is used as
published, always with a local ``modelpath``: nothing is downloaded.  The
image goes to it as a SimpleITK image with the volume's geometry, so lungmask
turns it to LPS itself (the orientation it was trained in) and its labels come
back on the volume's own grid; the labels name the patient's sides.

:class:`LungSegmenter` picks the method per study: ``classical``
(:func:`model.lungs.segment_lungs`), ``lungmask``, or ``auto``: the classical
method first and lungmask only where its result cannot be trusted (extensive
opacity, an implausible volume, one side missing) and the estimated time fits
the budget; on a GPU, lungmask for every study.

The ``lungmask`` package is optional (``pip install lungnode[lungmask]``); it
is imported only when a learned segmenter is opened.  Importing it silences
Python's ``UserWarning`` for the whole process (lungmask does so in its
``mask`` module).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from model.errors import ModelError, NoLungsError, SegmentationError
from model.lungs import LungMasks, SegmentationMethod, segment_lungs
from model.quantify import Quantification, QuantifyParams
from model.registry import sha256_file
from model.volume import CTVolume

__all__ = ["LOBE_NAMES", "MODEL_CLASSES", "LearnedLungs", "LungSegmenter", "WeightsError",
           "check_weights_name", "masks_from_labels", "open_segmenter", "to_sitk",
           "untrusted_reason"]

logger = logging.getLogger(__name__)

MODEL_CLASSES = {"R231": 3, "R231CovidWeb": 3, "LTRCLobes": 6}
"""Output classes (background included) of each published lungmask model."""

LOBE_NAMES = {1: "left upper lobe", 2: "left lower lobe", 3: "right upper lobe",
              4: "right middle lobe", 5: "right lower lobe"}
"""LTRCLobes labels."""

_LEFT_LOBES = (1, 2)
_RIGHT_LOBES = (3, 4, 5)

CPU_SECONDS_PER_SLICE = 1.0
"""First estimate of lungmask's time per slice on a CPU, refined by every run (the mean of the
estimate and the run's figure).  Measured on the 2-core build machine (``benchmarks/
bench_analysis.py --segmenter lungmask``, 2 threads, batch 8): 0.45 s per 512x512 slice when idle,
0.97 s with another process busy on the CPUs; the first estimate takes the busy figure."""

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
"""torch hub's convention: ``name-<sha256 prefix>.pth`` (at least 8 hex digits here, so a name
such as ``model-2024.pth`` is not taken for one)."""


class WeightsError(ModelError):
    """A lungmask weights file is missing, damaged or not the model it should be."""


def check_weights_name(path: Path, sha256: str) -> None:
    """Refuse a file whose name carries a sha256 prefix (``unet_r231-d5d2fc3d.pth``) it does not match.

    Raises
    ------
    WeightsError
        The prefix in the name differs from the file's sha256.
    """
    match = _HASH_IN_NAME.search(path.name)
    if match and not sha256.startswith(match.group(1)):
        raise WeightsError(
            f"weights {path}: the name says sha256 {match.group(1)}..., the file's is {sha256[:16]}...; "
            "the file is damaged or not the published one (download it again)")


def masks_from_labels(labels: np.ndarray, model: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Left lung, right lung and (lobe models) the lobe labels from a lungmask label volume.

    R231/R231CovidWeb: 1 right lung, 2 left lung.  LTRCLobes: 1-2 the left
    lobes, 3-5 the right lobes (see :data:`LOBE_NAMES`); the lobe volume is
    returned as ``uint8`` with other labels set to 0.
    """
    if model == "LTRCLobes":
        lobes = np.where(labels <= 5, labels, 0).astype(np.uint8)
        return np.isin(lobes, _LEFT_LOBES), np.isin(lobes, _RIGHT_LOBES), lobes
    if model in ("R231", "R231CovidWeb"):
        return labels == 2, labels == 1, None
    raise ModelError(f"unknown lungmask model {model!r}; known: {', '.join(MODEL_CLASSES)}")


def to_sitk(volume: CTVolume) -> Any:
    """The volume as a SimpleITK image with its spacing, origin and direction (array ``(z, y, x)``)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.hu))
    image.SetSpacing((float(volume.spacing[2]), float(volume.spacing[1]), float(volume.spacing[0])))
    image.SetOrigin(tuple(float(v) for v in volume.origin))
    image.SetDirection(tuple(float(v) for v in np.asarray(volume.direction, dtype=float).ravel()))
    return image


class LearnedLungs:
    """A lungmask model loaded from local weights, checked, ready to segment.

    Parameters
    ----------
    model:
        ``R231``, ``R231CovidWeb`` or ``LTRCLobes``.
    weights:
        The model's state dict (``.pth``), as lungmask publishes it.
    fusion_weights:
        LTRCLobes only: an R231 state dict for lungmask's fusion (lobes filled
        out to the R231 lung outline); ``None``: the lobe model alone.
    device:
        ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    threads:
        torch CPU threads while lungmask runs (``None``: torch's setting).
    batch_size:
        Slices per forward pass.

    Raises
    ------
    WeightsError
        A file is missing, its name's sha256 prefix does not match, it does not
        load into lungmask's U-Net, or it has the wrong number of classes.
    ModelError
        Unknown model, lungmask not installed, or ``cuda`` without CUDA.
    """

    def __init__(self, model: str, weights: Path, *, fusion_weights: Path | None = None,
                 device: str = "auto", threads: int | None = None, batch_size: int = 8) -> None:
        if model not in MODEL_CLASSES:
            raise ModelError(f"unknown lungmask model {model!r}; known: {', '.join(MODEL_CLASSES)}")
        if fusion_weights is not None and model != "LTRCLobes":
            raise ModelError(f"fusion_weights is for the lobe model LTRCLobes, not {model}")
        try:
            import torch
            from lungmask import LMInferer
        except ImportError as exc:
            raise ModelError("the lungmask package is not installed: pip install 'lungnode[lungmask]' "
                             "(or lungmask==0.2.22), or use the classical segmentation") from exc
        logging.getLogger("lungmask").setLevel(logging.WARNING)  # its INFO goes to stdout
        if device not in ("auto", "cpu", "cuda"):
            raise ModelError(f"lungmask device {device!r}: use auto, cpu or cuda")
        if device == "cuda" and not torch.cuda.is_available():
            raise ModelError("lungmask device cuda: no CUDA device is available; use auto or cpu")
        self.model = model
        self.weights = weights
        self.sha256 = self._check_file(weights)
        fusion_sha = self._check_file(fusion_weights) if fusion_weights is not None else None
        self.threads = threads
        self.batch_size = batch_size
        force_cpu = device == "cpu" or not torch.cuda.is_available()
        try:
            self._inferer = LMInferer(modelpath=str(weights), force_cpu=force_cpu, batch_size=batch_size,
                                      fillmodel_path=str(fusion_weights) if fusion_weights else None,
                                      tqdm_disable=True)
        except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds on a foreign file
            raise WeightsError(self._load_message(weights, fusion_weights, exc)) from exc
        self.device = "cuda" if not force_cpu else "cpu"
        self._expect(weights, self._inferer.model, MODEL_CLASSES[model], model)
        if fusion_weights is not None:
            self._expect(fusion_weights, self._inferer.fillmodelm, 3, "the R231 fusion model")
        self.method = SegmentationMethod(
            "lungmask", model + ("+R231 fusion" if fusion_weights else ""), self.sha256,
            None if fusion_sha is None else f"fusion weights sha256 {fusion_sha}")
        self.seconds_per_slice = CPU_SECONDS_PER_SLICE if self.device == "cpu" else 0.05
        self._lock = threading.Lock()  # one inference at a time: torch threads are per process

    @staticmethod
    def _check_file(path: Path) -> str:
        if not path.is_file():
            raise WeightsError(f"lungmask weights {path} do not exist; download the published file "
                               "once (see the README) and set [segmentation] weights to it")
        sha = sha256_file(path)
        check_weights_name(path, sha)
        return sha

    def _load_message(self, weights: Path, fusion: Path | None, exc: Exception) -> str:
        files = f"{weights}" + (f" or {fusion}" if fusion else "")
        return (f"weights {files} do not load into lungmask's U-Net as model {self.model} "
                f"({MODEL_CLASSES[self.model]} output classes expected): {type(exc).__name__}: "
                f"{str(exc)[:300]}")

    @staticmethod
    def _expect(path: Path, net: Any, classes: int, what: str) -> None:
        found = int(net.last.out_channels)
        if found != classes:
            raise WeightsError(f"weights {path} have {found} output classes; {what} needs {classes}")

    def estimate_seconds(self, volume: CTVolume) -> float:
        """Expected seconds for this volume (slices x the measured time per slice)."""
        return volume.shape[0] * self.seconds_per_slice * (2 if self.method.model and "fusion"
                                                            in self.method.model else 1)

    def segment(self, volume: CTVolume) -> LungMasks:
        """Segment the lungs (and lobes) of one volume.

        Raises
        ------
        NoLungsError
            The network found less than 150 ml of lung (no lungs in the field of view).
        """
        import torch

        uid = volume.series_instance_uid
        t0 = time.perf_counter()
        with self._lock:
            before = torch.get_num_threads()
            if self.threads:
                torch.set_num_threads(self.threads)
            try:
                labels = np.asarray(self._inferer.apply(to_sitk(volume)))
            finally:
                torch.set_num_threads(before)
        elapsed = time.perf_counter() - t0
        per_slice = elapsed / max(volume.shape[0], 1)
        self.seconds_per_slice = 0.5 * self.seconds_per_slice + 0.5 * per_slice
        left, right, lobes = masks_from_labels(labels, self.model)
        left_ml, right_ml = (int(np.count_nonzero(m)) * volume.voxel_volume_ml for m in (left, right))
        logger.info("series %s: lungmask %s on %s: lungs %.0f ml left, %.0f ml right in %.1f s "
                    "(%.2f s per slice)", uid, self.model, self.device, left_ml, right_ml, elapsed, per_slice)
        if left_ml + right_ml < 150.0:
            raise NoLungsError(
                f"series {uid}: lungmask {self.model} found {left_ml + right_ml:.0f} ml of lung: no lungs "
                "in the field of view; the series may not cover the chest or may not be a lung CT")
        return LungMasks(left=left, right=right, method=self.method, lobes=lobes)


def untrusted_reason(masks: LungMasks, quant: Quantification, *,
                     extensive_percent: float = QuantifyParams.extensive_opacity_percent,
                     volume_ml: tuple[float, float] = (1500.0, 9000.0),
                     min_side_fraction: float = 0.15) -> str | None:
    """Why a classical result cannot be trusted, or ``None`` when it can.

    The reasons are those :mod:`model.quantify` flags: extensive opacity
    (dense disease against the mediastinum reads low), a total volume outside
    the plausible adult range, and one side missing or much smaller than the
    other (under ``min_side_fraction`` of the total).
    """
    total = quant.total
    smaller = min(quant.left.volume_ml, quant.right.volume_ml)
    if smaller < min_side_fraction * max(total.volume_ml, 1e-6):
        side = "left" if quant.left.volume_ml <= quant.right.volume_ml else "right"
        return f"{side} lung missing or small ({smaller:.0f} of {total.volume_ml:.0f} ml)"
    if total.percent_opacity >= extensive_percent:
        return f"extensive opacity ({total.percent_opacity:.0f} % of the lungs)"
    if not volume_ml[0] <= total.volume_ml <= volume_ml[1]:
        return f"lung volume {total.volume_ml:.0f} ml outside {volume_ml[0]:.0f}-{volume_ml[1]:.0f} ml"
    return None


Measure = Callable[[LungMasks], Quantification]


@dataclass
class LungSegmenter:
    """Which segmenter runs for a study (``[segmentation] method``).

    ``learned`` is ``None`` for the classical method, and where lungmask was
    configured but could not be opened and the fallback is classical
    (``unavailable`` then says why, and every result carries it).
    """

    method: Literal["classical", "lungmask", "auto"] = "classical"
    learned: LearnedLungs | None = None
    fallback: Literal["classical"] | None = None
    budget_seconds: float = 300.0
    unavailable: str | None = None

    def run(self, volume: CTVolume, measure: Measure) -> tuple[LungMasks, Quantification, dict[str, float]]:
        """Segment and quantify one volume; the masks, their quantification and the stage timings.

        Timings: ``segment`` (classical), ``segment_lungmask`` and ``quantify``
        (the last quantification's).
        """
        timings: dict[str, float] = {}
        learned = self.learned
        if learned is None or self.method == "classical":
            masks = self._classical(volume, timings, self.unavailable)
            return self._measured(masks, measure, timings)
        if self.method == "lungmask" or learned.device == "cuda":
            note = "auto: lungmask on the GPU for every study" if self.method == "auto" else None
            return self._measured(self._learned(volume, timings, note), measure, timings)
        # auto on a CPU: classical first, lungmask where that cannot be trusted and time allows
        masks_or_none: LungMasks | None
        quant_or_none: Quantification | None
        failed: SegmentationError | None = None
        try:
            masks_or_none, quant_or_none, timings = self._measured(
                self._classical(volume, timings, None), measure, timings)
            reason = untrusted_reason(masks_or_none, quant_or_none)
        except SegmentationError as exc:
            reason, masks_or_none, quant_or_none = f"classical segmentation failed ({exc})", None, None
            failed = exc
        if reason is None:
            assert masks_or_none is not None and quant_or_none is not None
            return (replace(masks_or_none, method=replace(masks_or_none.method,
                                                           note="auto: classical result trusted")),
                    quant_or_none, timings)
        estimate = learned.estimate_seconds(volume)
        if estimate > self.budget_seconds:
            note = (f"auto: {reason}, but lungmask would take about {estimate:.0f} s, over the "
                    f"{self.budget_seconds:.0f} s budget; classical result kept")
            logger.warning("series %s: %s", volume.series_instance_uid, note)
            if failed is not None or masks_or_none is None or quant_or_none is None:
                raise failed or SegmentationError(f"series {volume.series_instance_uid}: {note}")
            kept = replace(masks_or_none, method=replace(masks_or_none.method, note=note))
            return kept, quant_or_none, timings
        learned_masks = self._learned(volume, timings, f"auto: {reason}")
        return self._measured(learned_masks, measure, timings)

    def _classical(self, volume: CTVolume, timings: dict[str, float], note: str | None) -> LungMasks:
        t0 = time.perf_counter()
        masks = segment_lungs(volume)
        timings["segment"] = time.perf_counter() - t0
        return masks if note is None else replace(masks, method=replace(masks.method, note=note))

    def _learned(self, volume: CTVolume, timings: dict[str, float], note: str | None) -> LungMasks:
        assert self.learned is not None
        t0 = time.perf_counter()
        try:
            masks = self.learned.segment(volume)
        except (RuntimeError, MemoryError) as exc:  # CUDA out of memory, a torch failure
            timings["segment_lungmask"] = time.perf_counter() - t0
            if self.fallback != "classical":
                raise SegmentationError(f"series {volume.series_instance_uid}: lungmask failed: "
                                        f"{type(exc).__name__}: {exc}") from exc
            logger.warning("series %s: lungmask failed (%s); classical fallback",
                           volume.series_instance_uid, exc)
            return self._classical(volume, timings, f"lungmask failed ({type(exc).__name__}); "
                                                    "classical fallback")
        timings["segment_lungmask"] = time.perf_counter() - t0
        if note is not None:
            masks = replace(masks, method=replace(masks.method, note=note if masks.method.note is None
                                                  else f"{note}; {masks.method.note}"))
        return masks

    @staticmethod
    def _measured(masks: LungMasks, measure: Measure,
                  timings: dict[str, float]) -> tuple[LungMasks, Quantification, dict[str, float]]:
        t0 = time.perf_counter()
        quant = measure(masks)
        timings["quantify"] = time.perf_counter() - t0
        return masks, quant, timings


def open_segmenter(method: Literal["classical", "lungmask", "auto"] = "classical", *, model: str = "R231",
                   weights: Path | None = None, fusion_weights: Path | None = None,
                   fallback: Literal["classical"] | None = None, device: str = "auto",
                   threads: int | None = None, batch_size: int = 8,
                   budget_seconds: float = 300.0) -> LungSegmenter:
    """The segmenter a configuration asks for, its weights loaded and checked.

    Raises
    ------
    ModelError
        lungmask is asked for and cannot be opened (missing or wrong weights,
        package not installed) and ``fallback`` is not ``"classical"``.
    """
    if method == "classical":
        return LungSegmenter("classical")
    try:
        if weights is None:
            raise WeightsError(f"[segmentation] method = {method!r} needs weights (a local lungmask "
                               f"{model} .pth file)")
        learned = LearnedLungs(model, weights, fusion_weights=fusion_weights, device=device,
                               threads=threads, batch_size=batch_size)
    except ModelError as exc:
        if fallback != "classical":
            raise
        logger.warning("lungmask unavailable (%s); the classical segmentation runs instead", exc)
        return LungSegmenter(method, None, fallback, budget_seconds,
                             unavailable=f"lungmask unavailable ({exc}); classical fallback")
    return LungSegmenter(method, learned, fallback, budget_seconds)
