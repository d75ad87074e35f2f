"""The run report: ``report.md`` in the run folder with PNG plots drawn with Pillow.

Plots (no matplotlib, so the node needs no plotting stack):

- ``loss.png``: training and validation loss per epoch;
- ``confusion_validation.png`` (and ``confusion_locked.png``): confusion
  matrices of the best weights, rows true, columns predicted;
- ``reliability_validation.png``: reliability diagram of P(predicted class):
  per confidence bin, the share of fully labelled studies predicted right
  against the mean confidence, with the expected calibration error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from model.prediction import CLASS_NAMES

__all__ = ["EvalSnapshot", "confusion_png", "loss_png", "reliability_bins", "reliability_png", "write_report"]

_SIZE = (640, 420)
_PAD = 60
_BLUE, _ORANGE, _GREY, _BLACK = (31, 119, 180), (255, 127, 14), (190, 190, 190), (0, 0, 0)


@dataclass(frozen=True)
class EvalSnapshot:
    """One evaluation: its metrics, and per study the class probabilities and target (-1: covid-unknown)."""

    metrics: dict[str, Any]
    probs: list[list[float]] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)


def _frame(title: str) -> tuple[Image.Image, ImageDraw.ImageDraw, tuple[int, int, int, int]]:
    img = Image.new("RGB", _SIZE, "white")
    draw = ImageDraw.Draw(img)
    box = (_PAD, 30, _SIZE[0] - 20, _SIZE[1] - _PAD)
    draw.text((_PAD, 8), title, fill=_BLACK)
    draw.rectangle(box, outline=_BLACK)
    return img, draw, box


def loss_png(history: Sequence[dict[str, Any]], path: Path) -> Path:
    """Training (blue) and validation (orange) loss against the epoch."""
    img, draw, (x0, y0, x1, y1) = _frame("loss per epoch: training (blue), validation (orange)")
    series = [[float(h["train_loss"]) for h in history], [float(h["val_loss"]) for h in history]]
    values = [v for s in series for v in s] or [0.0, 1.0]
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    n = max(len(history), 2)

    def xy(i: int, v: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * i / (n - 1), y1 - (y1 - y0) * (v - lo) / (hi - lo)

    for s, colour in zip(series, (_BLUE, _ORANGE), strict=True):
        points = [xy(i, v) for i, v in enumerate(s)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
    draw.text((4, y0), f"{hi:.3f}", fill=_BLACK)
    draw.text((4, y1 - 10), f"{lo:.3f}", fill=_BLACK)
    for i, h in enumerate(history):
        px, _ = xy(i, lo)
        draw.text((px - 4, y1 + 6), str(h["epoch"]), fill=_BLACK)
    draw.text(((x0 + x1) // 2 - 15, y1 + 24), "epoch", fill=_BLACK)
    img.save(path)
    return path


def confusion_png(matrix: Sequence[Sequence[int]], path: Path, title: str) -> Path:
    """A confusion matrix as shaded cells with counts (rows true, columns predicted)."""
    k = len(CLASS_NAMES)
    cell = 56
    img = Image.new("RGB", (120 + cell * k, 90 + cell * k), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), title + " (rows true, columns predicted)", fill=_BLACK)
    top = max((max(r) for r in matrix), default=0) or 1
    for r in range(k):
        draw.text((8, 60 + r * cell + cell // 2), CLASS_NAMES[r][:12], fill=_BLACK)
        for c in range(k):
            v = int(matrix[r][c]) if r < len(matrix) else 0
            shade = int(255 - 200 * v / top)
            x, y = 110 + c * cell, 60 + r * cell
            draw.rectangle((x, y, x + cell, y + cell), fill=(shade, shade, 255), outline=_BLACK)
            draw.text((x + cell // 2 - 6, y + cell // 2 - 6), str(v), fill=_BLACK)
    for c in range(k):
        draw.text((110 + c * cell + 2, 40), CLASS_NAMES[c][:8], fill=_BLACK)
    img.save(path)
    return path


def reliability_bins(probs: Sequence[Sequence[float]], targets: Sequence[int], bins: int = 10
                     ) -> tuple[list[tuple[float, float, int]], float]:
    """``(mean confidence, accuracy, count)`` per non-empty bin of P(predicted class), and the ECE.

    Only fully labelled studies (target >= 0) count.
    """
    pairs = [(max(p), int(max(range(len(p)), key=p.__getitem__) == t))
             for p, t in zip(probs, targets, strict=True) if t >= 0]
    out: list[tuple[float, float, int]] = []
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [(c, a) for c, a in pairs if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        if inside:
            conf = sum(c for c, _ in inside) / len(inside)
            acc = sum(a for _, a in inside) / len(inside)
            out.append((conf, acc, len(inside)))
            ece += len(inside) / len(pairs) * abs(acc - conf)
    return out, ece


def reliability_png(probs: Sequence[Sequence[float]], targets: Sequence[int], path: Path,
                    title: str) -> float:
    """Draw the reliability diagram; returns the expected calibration error."""
    bins, ece = reliability_bins(probs, targets)
    img, draw, (x0, y0, x1, y1) = _frame(f"{title}: accuracy vs P(predicted class), ECE {ece:.3f}")
    draw.line([(x0, y1), (x1, y0)], fill=_GREY, width=1)
    w = (x1 - x0) / 10
    for conf, acc, count in bins:
        b = min(int(conf * 10), 9)
        draw.rectangle((x0 + b * w + 2, y1 - (y1 - y0) * acc, x0 + (b + 1) * w - 2, y1), fill=_BLUE)
        draw.text((x0 + b * w + 4, max(y0 + 2, y1 - (y1 - y0) * acc - 14)), str(count), fill=_BLACK)
    for t in range(0, 11, 2):
        draw.text((x0 + (x1 - x0) * t / 10 - 8, y1 + 6), f"{t / 10:.1f}", fill=_BLACK)
        draw.text((20, y1 - (y1 - y0) * t / 10 - 6), f"{t / 10:.1f}", fill=_BLACK)
    img.save(path)
    return ece


def _metrics_table(m: dict[str, Any]) -> list[str]:
    rows = ["| metric | value |", "|---|---|"]
    for key in ("n", "n_full_labels", "n_partial_labels", "loss", "severity_macro_f1", "severity_accuracy",
                "presence_f1", "presence_accuracy"):
        if key in m:
            rows.append(f"| {key} | {m[key]} |")
    recall = m.get("per_class_recall", {})
    rows.append("| per-class recall | " + ", ".join(f"{k} {v if v is not None else '-'}"
                                                   for k, v in recall.items()) + " |")
    return rows


def write_report(run_dir: Path, *, title: str, summary: dict[str, Any], history: Sequence[dict[str, Any]],
                 validation: EvalSnapshot, locked: EvalSnapshot | None = None) -> Path:
    """Write ``report.md`` and its PNGs into ``run_dir``; returns the report's path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    loss_png(history, run_dir / "loss.png")
    confusion_png(validation.metrics["confusion_matrix"], run_dir / "confusion_validation.png",
                  "validation (best epoch)")
    ece = reliability_png(validation.probs, validation.targets, run_dir / "reliability_validation.png",
                          "validation")
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in summary.items()]
    lines += ["", "## Epochs", "",
              "| epoch | train loss | val loss | val severity macro F1 | val presence F1 |",
              "|---|---|---|---|---|"]
    lines += [f"| {h['epoch']} | {h['train_loss']:.4f} | {h['val_loss']:.4f} | "
              f"{h['val_severity_macro_f1']} | {h['val_presence_f1']} |" for h in history]
    lines += ["", "![loss](loss.png)", "", "## Validation (fold 0, best epoch)", ""]
    lines += _metrics_table(validation.metrics)
    lines += ["", f"Expected calibration error of P(predicted class): {ece:.4f}", "",
              "![confusion](confusion_validation.png)", "", "![reliability](reliability_validation.png)", ""]
    if locked is not None:
        confusion_png(locked.metrics["confusion_matrix"], run_dir / "confusion_locked.png",
                      "locked evaluation")
        lines += ["## Locked evaluation set", "",
                  "Evaluated once with the best weights; never trained on and never used to choose "
                  "the epoch.",
                  ""]
        lines += _metrics_table(locked.metrics)
        lines += ["", "![confusion locked](confusion_locked.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
