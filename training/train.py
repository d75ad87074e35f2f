"""Train the shipped demonstration severity network on synthetic studies, through the retraining package.

Reproduce the shipped default model (``model/weights/compact3d-synthetic-v1``)::

    python -m training.train --out model/weights

The defaults are the shipped model's settings.  The model is trained by the
same code as a node's own candidates (:func:`training.retrain.train_run`, from
a frozen dataset manifest), so its card carries the same provenance (dataset
digest, label counts, folds, git revision, package versions, options, seeds)
and a CPU run with the same thread count should save the same weights file
(:mod:`training.retrain`'s determinism; not re-checked for this model).  On a 2-core CPU shared
with other work it takes about 9 minutes to generate the 460 training and
validation phantoms (``--workers 2``; cached afterwards), 6 to 11 minutes to
train and 1 to 3 minutes to evaluate; ``--device cuda`` trains on a GPU (bf16 autocast),
where the results differ slightly from a CPU run.  Steps:

1. draw the training, validation and held-out test phantoms from disjoint seed
   ranges (:func:`training.dataset.draw_specs`); generate, preprocess (true
   lung masks) and cache the training and validation inputs
   (:func:`training.dataset.build_tensor_set`);
2. write them as ``.npy`` tensors with their sha256 into a frozen manifest
   (:func:`write_phantom_manifest`: one pseudonymous patient per phantom,
   validation phantoms in fold 0, training phantoms in folds 1..);
3. train :class:`model.networks.Compact3d` with :func:`training.retrain.train_run`
   (focal loss + earth mover's distance, class-balanced sampling, AdamW with a
   one-cycle learning rate, mirror / affine / intensity augmentation
   (:func:`augment`); the epoch with the best validation macro F1 is kept),
   which registers the weights and a provenance card in ``--out``;
4. evaluate the registered model through :class:`model.inference.InferenceEngine`
   on the held-out phantoms, with their true lung masks and with the masks of
   :func:`model.lungs.segment_lungs`, and rewrite the card: the synthetic-data
   description, intended use, seed ranges and held-out metrics merged with the
   run's provenance (the held-out true-mask figures are the card's top-level
   metrics; the run's validation figures are under ``metrics["validation"]``).

The manifest, tensors, checkpoints and the run's report go into ``--work-dir``
(default: a temporary folder removed afterwards); with ``--work-dir`` a killed
run continues with ``--resume``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.inference import InferenceEngine
from model.manifest import LABELS, Manifest, ManifestItem
from model.preprocess import PreprocessConfig
from model.registry import load_model, read_card, write_card
from training.dataset import SpecOptions, TensorSet, build_tensor_set, draw_specs
from training.evaluate import EVAL_OPTIONS, evaluate_engine

__all__ = ["augment", "main", "parse_args", "write_phantom_manifest"]

logger = logging.getLogger(__name__)

TRAINING_DATA = (
    "SYNTHETIC DATA ONLY. {n_train} synthetic chest CT phantoms from lungnode's generator "
    "(training.synth.make_phantom; seeds {train_seeds}), validation {n_val} phantoms (seeds {val_seeds}). "
    "Class from the phantom's true involvement (ground glass + consolidation share of the lung voxels): "
    "non-COVID 0, mild <25 %, moderate 25-50 %, severe 50-75 %, critical >75 % (MosMedData CT-0..CT-4 bins); "
    "involvement drawn uniformly inside each bin at least {margin:.0%} from its edges; images {rows} pixels "
    "square, slice thickness {thickness} mm, kernels {kernels}, consolidation share {cons}, {partial:.0%} "
    "with partial lung coverage. Inputs cropped with the phantoms' true lung masks. No patient data. "
    "Trained {epochs} epochs by training.retrain from a frozen manifest of these phantoms "
    "(digest {digest}; validation phantoms fold 0, training phantoms folds 1..).")

INTENDED_USE = (
    "NOT FOR CLINICAL USE. A demonstration model trained on synthetic phantoms only: it shows that "
    "lungnode's training, registry and inference work end to end. Its predictions on real patients' CT "
    "are meaningless; retrain on labelled studies (lungnode's retraining, training.retrain) before any "
    "real use.")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m training.train``."""
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="registry folder to write weights + card into")
    p.add_argument("--name", default="compact3d-synthetic-v1")
    p.add_argument("--version", default="1.1.0")
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-val", type=int, default=60)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--train-seed", type=int, default=0, help="first training phantom seed")
    p.add_argument("--val-seed", type=int, default=500000, help="first validation phantom seed")
    p.add_argument("--test-seed", type=int, default=900000, help="first held-out test phantom seed")
    p.add_argument("--rows", type=int, nargs="+", default=[128], help="training image sizes")
    p.add_argument("--thickness", type=float, nargs="+", default=[2.5, 5.0, 8.0], help="slice thickness mm")
    p.add_argument("--input-size", type=int, nargs=3, default=[48, 96, 96], metavar=("D", "H", "W"))
    p.add_argument("--window", type=float, nargs=2, default=[-1000.0, 400.0])
    p.add_argument("--margin-mm", type=float, default=5.0)
    p.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--gamma", type=float, default=2.0, help="focal loss gamma")
    p.add_argument("--emd-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1,
                   help="run seed (initialisation, sampling, augmentation); the shipped model's is 1")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=2, help="processes generating phantoms")
    p.add_argument("--cache-dir", type=Path, default=None, help="preprocessed tensors (default: temp folder)")
    p.add_argument("--folds", type=int, default=5, help="manifest folds (0 validates, 1.. train)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="manifest, tensors, checkpoints and report (default: temporary, removed)")
    p.add_argument("--resume", action="store_true", help="continue the run in --work-dir")
    p.add_argument("--eval-masks", nargs="+", choices=["true", "segmented"], default=["true", "segmented"])
    return p.parse_args(argv)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random left-right mirror, small scale/shift/rotation, contrast and noise, on a batch.

    The scale and shift imitate a lung box a few millimetres larger or smaller
    than the true one (as a segmentation gives).
    """
    n, dev = x.shape[0], x.device

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen) * (hi - lo) + lo).to(dev)

    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.to(dev)[:, None, None, None, None], torch.flip(x, dims=[-1]), x)
    angle = u(-0.1, 0.1, n)
    cos, sin = torch.cos(angle), torch.sin(angle)
    scale = u(0.9, 1.1, n, 3)
    theta = torch.zeros(n, 3, 4, device=dev)
    # affine_grid's coordinates are (x, y, z); rotate in the axial (x, y) plane
    theta[:, 0, 0], theta[:, 0, 1] = cos * scale[:, 0], -sin * scale[:, 0]
    theta[:, 1, 0], theta[:, 1, 1] = sin * scale[:, 1], cos * scale[:, 1]
    theta[:, 2, 2] = scale[:, 2]
    theta[:, :, 3] = u(-0.05, 0.05, n, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast, shift = u(0.93, 1.07, n, 1, 1, 1, 1), u(-0.02, 0.02, n, 1, 1, 1, 1)
    noise = torch.randn(x.shape, generator=gen).to(dev) * u(0.0, 0.01, n, 1, 1, 1, 1)
    return ((x - 0.5) * contrast + 0.5 + shift + noise).clamp(0.0, 1.0)


def write_phantom_manifest(folder: Path, train: TensorSet, val: TensorSet, config: PreprocessConfig, *,
                           folds: int, extra: dict[str, Any]) -> Path:
    """Write the phantom tensors as ``.npy`` files and a frozen manifest over them; returns its path.

    Layout: ``folder/tensors/phantom-<seed>.npy`` and ``folder/manifest/manifest.json`` (the
    manifest folder's parent is the training root its tensor paths are relative to).  Each
    phantom is its own pseudonymous study and patient (``phantom:<seed>``), origin and label
    source ``synthetic``, label event the seed; validation phantoms are fold 0 and the training
    phantoms go round-robin into folds ``1..folds-1``.  The tensors are the cached float16
    inputs widened to float32 (exact), so the run sees the same values as before the manifest.
    """
    if folds < 2:
        raise SystemExit("--folds must be at least 2 (fold 0 validates, folds 1.. train)")
    tensors = folder / "tensors"
    tensors.mkdir(parents=True, exist_ok=True)
    items: list[ManifestItem] = []
    for data, fold_of in ((train, lambda i: 1 + i % (folds - 1)), (val, lambda i: 0)):
        for i, seed in enumerate(data.seeds):
            path = tensors / f"phantom-{seed}.npy"
            buf = io.BytesIO()
            np.save(buf, data.inputs[i].to(torch.float32).numpy(), allow_pickle=False)
            raw = buf.getvalue()
            if not path.is_file() or path.read_bytes() != raw:
                path.write_bytes(raw)
            items.append(ManifestItem(
                study=f"phantom:{seed}", patient=f"phantom:{seed}", origin="synthetic",
                label=LABELS[int(data.labels[i])], label_event=int(seed), label_source="synthetic",
                split="train", fold=fold_of(i), tensor=path.relative_to(folder).as_posix(),
                tensor_sha256=hashlib.sha256(raw).hexdigest()))
    now = datetime.now(UTC).isoformat(timespec="seconds")
    manifest = Manifest(
        id=0, kind="training", version=1, created_at=now, as_of=now, created_by="training.train",
        folds=folds, preprocessing={"input_size": list(config.input_size), "window": list(config.window),
                                    "margin_mm": config.margin_mm,
                                    "segmentation": "true phantom lung masks (synthetic)"},
        items=tuple(items), extra=extra).with_digest()
    path = folder / "manifest" / "manifest.json"
    manifest.write(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the phantoms, train them through :func:`training.retrain.train_run`, evaluate on
    held-out phantoms and write the merged card; prints the card's metrics as JSON."""
    # imported here: training.retrain imports this module's augment
    from training.retrain import RunOptions, train_run

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    config = PreprocessConfig(input_size=tuple(args.input_size), window=tuple(args.window),  # type: ignore[arg-type]
                              margin_mm=args.margin_mm)
    options = SpecOptions(rows=tuple(args.rows), slice_thickness_mm=tuple(args.thickness))
    train_specs = draw_specs(args.n_train, args.train_seed, balanced=False, options=options)
    val_specs = draw_specs(args.n_val, args.val_seed, balanced=True, options=options)
    test_specs = draw_specs(args.n_test, args.test_seed, balanced=True, options=EVAL_OPTIONS)
    seeds = [s.seed for s in train_specs + val_specs]
    if set(seeds) & {s.seed for s in test_specs}:
        raise SystemExit("the held-out test seeds overlap the training or validation seeds; "
                         "change --test-seed")
    train_range = f"{args.train_seed}..{args.train_seed + args.n_train - 1}"
    val_range = f"{args.val_seed}..{args.val_seed + args.n_val - 1}"
    test_range = f"{args.test_seed}..{args.test_seed + args.n_test - 1}"
    t0 = time.perf_counter()
    train = build_tensor_set(train_specs, config, cache_dir=args.cache_dir, workers=args.workers)
    val = build_tensor_set(val_specs, config, cache_dir=args.cache_dir, workers=args.workers)
    logger.info("training classes %s, validation classes %s", train.class_counts(), val.class_counts())
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lungnode-")))
        manifest_path = write_phantom_manifest(work, train, val, config, folds=args.folds, extra={
            "source": "training.train: synthetic phantoms (training.synth.make_phantom)",
            "train_seeds": train_range, "val_seeds": val_range})
        t_data = time.perf_counter() - t0
        logger.info("manifest %s (%.0f s)", manifest_path, t_data)
        run = RunOptions(architecture="compact3d", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, seed=args.seed, threads=args.threads,
                         device=args.device, candidate=args.name, widths=tuple(args.widths),
                         dropout=args.dropout, gamma=args.gamma, emd_weight=args.emd_weight, cache=True)
        t0 = time.perf_counter()
        result = train_run(manifest_path, work / "run", args.out, run, resume=args.resume, progress=False)
        t_train = time.perf_counter() - t0
    card = read_card(args.name, args.out)
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    engine = InferenceEngine.from_registry(card.name, args.out, device=device)
    results = evaluate_engine(engine, test_specs, sources=tuple(args.eval_masks), workers=args.workers)
    metrics: dict[str, Any] = {
        "test_set": f"{args.n_test} held-out synthetic phantoms, seeds {test_range} "
                    f"(training.dataset.draw_specs(n, {args.test_seed}, balanced=True, "
                    "options=training.evaluate.EVAL_OPTIONS)), 128 x 128 images, classes balanced; "
                    "engine with mirror TTA",
    }
    if "true" in results:
        metrics.update(results["true"].to_dict())
        metrics["masks"] = "true phantom lung masks"
    if "segmented" in results:
        metrics["with_segment_lungs_masks"] = results["segmented"].to_dict()
    # the run's own figures: validation phantoms (fold 0) at the best epoch, no test-time mirror
    metrics["validation"] = result.metrics["validation"]
    rng = " or ".join(str(r) for r in args.rows)
    training = {
        **card.training,
        "command": "python -m training.train " + shlex.join(sys.argv[1:] if argv is None else list(argv)),
        "train_seeds": [args.train_seed, args.train_seed + args.n_train - 1],
        "val_seeds": [args.val_seed, args.val_seed + args.n_val - 1],
        "test_seeds": [args.test_seed, args.test_seed + args.n_test - 1],
        "class_counts_train": train.class_counts(), "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay,
        "sampling": "class-balanced (inverse class frequency)",
        "data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1),
    }
    if args.work_dir is None:  # the temporary manifest is gone; the command rebuilds it (same digest)
        training["manifest"] = {**training["manifest"], "path": "temporary (python -m training.train "
                                "rebuilds it with the same digest)"}
    card = replace(
        card, version=args.version, metrics=metrics, training=training, intended_use=INTENDED_USE,
        training_data=TRAINING_DATA.format(
            n_train=args.n_train, train_seeds=train_range, n_val=args.n_val, val_seeds=val_range,
            margin=options.edge_margin, rows=rng,
            thickness=" / ".join(f"{t:g}" for t in options.slice_thickness_mm),
            kernels=" and ".join(options.kernels),
            cons="{:.2f}..{:.2f}".format(*options.consolidation_fraction),
            partial=options.partial_coverage, epochs=args.epochs,
            digest=card.training["dataset_digest"][:16]))
    write_card(card, args.out)
    load_model(card.name, args.out)  # the merged card still matches the weights
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
