"""Evaluation of a severity model on synthetic studies: accuracy, macro F1, confusion matrix.

:func:`evaluate_engine` runs a real :class:`model.inference.InferenceEngine`
(the node's code path: CTVolume and LungMasks in, Prediction out) on phantoms
of fixed seeds, with the phantoms' true lung masks and/or the masks of
:func:`model.lungs.segment_lungs` (what the node uses).

Command line (prints one JSON object)::

    python -m training.evaluate --n 100 --base-seed 900000 --masks true segmented
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.errors import AnalysisError, SegmentationError
from model.inference import InferenceEngine
from model.lungs import LungMasks, segment_lungs
from model.prediction import CLASS_NAMES
from model.volume import CTVolume
from training.dataset import SpecOptions, draw_specs, involvement_of, label_for_involvement, map_phantoms
from training.synth import SynthSpec, make_phantom

__all__ = [
    "EVAL_OPTIONS",
    "EvalCase",
    "Metrics",
    "confusion_matrix",
    "evaluate_engine",
    "main",
    "make_case",
    "metrics_from_labels",
]

logger = logging.getLogger(__name__)

EVAL_OPTIONS = SpecOptions(rows=(128,))
"""Held-out studies: 128 x 128 images, slice thickness 2.5, 5 or 8 mm, both kernels."""

MASK_SOURCES = ("true", "segmented")


@dataclass(frozen=True)
class Metrics:
    """Classification quality over :data:`CLASS_NAMES`."""

    n: int
    accuracy: float
    macro_f1: float
    per_class_f1: dict[str, float]
    confusion_matrix: list[list[int]]
    """Rows: true class, columns: predicted class, in :data:`CLASS_NAMES` order."""
    failed: int = 0
    """Studies without a prediction (e.g. segmentation failed); not in the matrix."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (as stored in model cards)."""
        return {"n": self.n, "accuracy": round(self.accuracy, 4), "macro_f1": round(self.macro_f1, 4),
                "per_class_f1": {k: round(v, 4) for k, v in self.per_class_f1.items()},
                "confusion_matrix": self.confusion_matrix, "confusion_matrix_axes": "rows true, columns "
                "predicted, in the order of classes", "failed": self.failed}


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int = len(CLASS_NAMES)
                     ) -> np.ndarray:
    """``(n_classes, n_classes)`` counts; rows are the true class, columns the predicted one."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        cm[int(t), int(p)] += 1
    return cm


def metrics_from_labels(y_true: Sequence[int], y_pred: Sequence[int], failed: int = 0) -> Metrics:
    """Accuracy, per-class F1 and macro F1 (mean over the classes present in truth or prediction)."""
    cm = confusion_matrix(y_true, y_pred)
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    present = denom > 0
    n = int(cm.sum())
    return Metrics(n=n, accuracy=float(tp.sum() / n) if n else 0.0,
                   macro_f1=float(f1[present].mean()) if present.any() else 0.0,
                   per_class_f1={c: float(f) for c, f in zip(CLASS_NAMES, f1, strict=True)},
                   confusion_matrix=cm.tolist(), failed=failed)


@dataclass(frozen=True, eq=False)
class EvalCase:
    """One synthetic study ready for the engine."""

    spec: SynthSpec
    volume: CTVolume
    label: int
    involvement: float
    masks: dict[str, LungMasks | None]
    """Mask source (``true``, ``segmented``) to masks; ``None`` where segmentation failed."""
    errors: dict[str, str]


def make_case(spec: SynthSpec, sources: tuple[str, ...] = ("true",)) -> EvalCase:
    """Generate one phantom as a :class:`CTVolume` with the asked-for lung masks."""
    ph = make_phantom(spec)
    volume = CTVolume(hu=ph.hu, spacing=ph.spacing, origin=ph.origin, direction=np.eye(3),
                      series_instance_uid=f"synthetic-seed-{spec.seed}", sop_instance_uids=(),
                      slice_thickness=spec.slice_thickness_mm, kernel=spec.kernel)
    masks: dict[str, LungMasks | None] = {}
    errors: dict[str, str] = {}
    for source in sources:
        if source == "true":
            masks[source] = LungMasks(left=ph.left_lung, right=ph.right_lung)
        elif source == "segmented":
            try:
                masks[source] = segment_lungs(volume)
            except SegmentationError as exc:
                masks[source] = None
                errors[source] = str(exc)
        else:
            raise ValueError(f"unknown mask source {source!r}; use one of {MASK_SOURCES}")
    involvement = involvement_of(ph)
    return EvalCase(spec=spec, volume=volume, label=label_for_involvement(involvement),
                    involvement=involvement, masks=masks, errors=errors)


def _make_case_true(spec: SynthSpec) -> EvalCase:
    return make_case(spec, ("true",))


def _make_case_both(spec: SynthSpec) -> EvalCase:
    return make_case(spec, MASK_SOURCES)


def evaluate_engine(engine: InferenceEngine, specs: Sequence[SynthSpec], *,
                    sources: tuple[str, ...] = ("true",), workers: int = 1, batch: int = 8
                    ) -> dict[str, Metrics]:
    """Metrics of ``engine`` on the phantoms of ``specs``, per mask source.

    Parameters
    ----------
    engine:
        The model to evaluate.
    specs:
        Held-out phantoms (seeds not used in training).
    sources:
        ``"true"`` (the phantoms' lung masks) and/or ``"segmented"``
        (:func:`model.lungs.segment_lungs`, as the node does).
    workers:
        Processes generating phantoms (and segmenting) in parallel.
    batch:
        Studies per :meth:`InferenceEngine.predict_batch` call.
    """
    fn = _make_case_both if "segmented" in sources else _make_case_true
    truth: dict[str, list[int]] = {s: [] for s in sources}
    pred: dict[str, list[int]] = {s: [] for s in sources}
    failed = dict.fromkeys(sources, 0)
    pending: list[EvalCase] = []

    def flush() -> None:
        for source in sources:
            ready = [c for c in pending if c.masks.get(source) is not None]
            failed[source] += len(pending) - len(ready)
            for c in pending:
                if source in c.errors:
                    logger.warning("seed %d: %s masks failed: %s", c.spec.seed, source, c.errors[source])
            if not ready:
                continue
            items = [(c.volume, c.masks[source]) for c in ready]
            try:
                preds = engine.predict_batch(items)  # type: ignore[arg-type]
            except AnalysisError as exc:
                logger.warning("batch failed (%s); predicting one by one", exc)
                preds = []
                for c, item in zip(ready, items, strict=True):
                    try:
                        preds.append(engine.predict(*item))  # type: ignore[arg-type]
                    except AnalysisError as err:
                        logger.warning("seed %d (%s masks): %s", c.spec.seed, source, err)
                        failed[source] += 1
                        preds.append(None)  # type: ignore[arg-type]
            for c, p in zip(ready, preds, strict=True):
                if p is None:
                    continue
                truth[source].append(c.label)
                pred[source].append(CLASS_NAMES.index(p.predicted_class))
        pending.clear()

    for case in map_phantoms(fn, specs, workers):
        pending.append(case)
        if len(pending) >= batch:
            flush()
    flush()
    return {s: metrics_from_labels(truth[s], pred[s], failed[s]) for s in sources}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: evaluate a registered model on held-out phantoms; prints JSON."""
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model name (default: the shipped default model)")
    parser.add_argument("--registry", type=Path, default=None,
                        help="registry folder (default: model/weights)")
    parser.add_argument("--n", type=int, default=100, help="number of phantoms")
    parser.add_argument("--base-seed", type=int, default=900000, help="first phantom seed (held-out)")
    parser.add_argument("--masks", nargs="+", choices=MASK_SOURCES, default=["true", "segmented"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-tta", action="store_true")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--contrast", type=float, default=0.0,
                        help="share 0..1 of the phantoms scanned after intravenous contrast")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    engine = InferenceEngine.from_registry(args.model, args.registry, device=args.device, tta=not args.no_tta)
    specs = draw_specs(args.n, args.base_seed, balanced=True,
                       options=dataclasses.replace(EVAL_OPTIONS, contrast=args.contrast))
    result = evaluate_engine(engine, specs, sources=tuple(args.masks), workers=args.workers)
    print(json.dumps({"model": engine.card.name, "version": engine.card.version, "device": engine.device_name,
                      "n": args.n, "base_seed": args.base_seed, "contrast": args.contrast,
                      "metrics": {k: v.to_dict() for k, v in result.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
