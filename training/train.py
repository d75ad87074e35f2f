"""Train the compact severity network on synthetic studies and register it.

Reproduce the shipped default model (``model/weights/compact3d-synthetic-v1``)::

    python -m training.train --out model/weights

The defaults are the shipped model's settings.  On a 2-core CPU shared with
other work it took about 9 minutes to generate the 460 training and
validation phantoms (``--workers 2``; cached afterwards), 15 minutes to train
and 3 minutes to evaluate; ``--device cuda`` trains on a GPU (bf16 autocast),
where the results differ slightly from a CPU run.  Steps:

1. draw the training, validation and held-out test phantoms from disjoint seed
   ranges (:func:`training.dataset.draw_specs`); generate, preprocess (true
   lung masks) and cache the training and validation inputs in a temporary
   folder;
2. train :class:`model.networks.Compact3d` with focal loss + earth mover's
   distance (:mod:`training.losses`), class-balanced sampling, AdamW with a
   one-cycle learning rate, mirror / affine / intensity augmentation, mixed
   precision on CUDA; keep the epoch with the best validation macro F1;
3. write the weights and model card (:func:`model.registry.save_model`), then
   evaluate the registered model through :class:`model.inference.InferenceEngine`
   on the held-out phantoms, with their true lung masks and with the masks of
   :func:`model.lungs.segment_lungs`, and write the metrics into the card.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.inference import InferenceEngine
from model.networks import build_compact3d
from model.prediction import CLASS_NAMES
from model.preprocess import PreprocessConfig
from model.registry import ModelCard, save_model, write_card
from training.dataset import SpecOptions, TensorSet, build_tensor_set, class_balanced_sampler, draw_specs
from training.evaluate import EVAL_OPTIONS, evaluate_engine, metrics_from_labels
from training.losses import SeverityLoss

__all__ = ["augment", "main", "parse_args", "train_network"]

logger = logging.getLogger(__name__)

TRAINING_DATA = (
    "SYNTHETIC DATA ONLY. {n_train} synthetic chest CT phantoms from lungnode's generator "
    "(training.synth.make_phantom; seeds {train_seeds}), validation {n_val} phantoms (seeds {val_seeds}). "
    "Class from the phantom's true involvement (ground glass + consolidation share of the lung voxels): "
    "non-COVID 0, mild <25 %, moderate 25-50 %, severe 50-75 %, critical >75 % (MosMedData CT-0..CT-4 bins); "
    "involvement drawn uniformly inside each bin at least {margin:.0%} from its edges; images {rows} pixels "
    "square, slice thickness {thickness} mm, kernels {kernels}, consolidation share {cons}, {partial:.0%} "
    "with partial lung coverage. Inputs cropped with the phantoms' true lung masks. No patient data.")

INTENDED_USE = (
    "NOT FOR CLINICAL USE. A demonstration model trained on synthetic phantoms only: it shows that "
    "lungnode's training, registry and inference work end to end. Its predictions on real patients' CT "
    "are meaningless; retrain on labelled studies (training.train) before any real use.")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m training.train``."""
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="registry folder to write weights + card into")
    p.add_argument("--name", default="compact3d-synthetic-v1")
    p.add_argument("--version", default="1.0.0")
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
    p.add_argument("--seed", type=int, default=0, help="torch seed (initialisation, sampling, augmentation)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=2, help="processes generating phantoms")
    p.add_argument("--cache-dir", type=Path, default=None, help="preprocessed tensors (default: temp folder)")
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


@torch.inference_mode()
def _predict(net: nn.Module, data: TensorSet, device: torch.device, batch: int) -> torch.Tensor:
    net.eval()
    out = []
    for i in range(0, len(data), batch):
        x = data.inputs[i:i + batch].to(device, dtype=torch.float32)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            p = torch.softmax(net(x).float(), 1) + torch.softmax(net(torch.flip(x, dims=[-1])).float(), 1)
        out.append(p.float().cpu() / 2)
    return torch.cat(out)


def train_network(args: argparse.Namespace, train: TensorSet, val: TensorSet,
                  device: torch.device) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train a Compact3d; returns the network of the epoch with the best validation macro F1
    (ties: lower validation loss) and the per-epoch history."""
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    net = build_compact3d(tuple(args.widths), args.dropout).to(device)
    loss_fn = SeverityLoss(gamma=args.gamma, emd_weight=args.emd_weight)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = math.ceil(len(train) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(args.seed)
    inputs = train.inputs.to(device) if device.type == "cuda" else train.inputs
    labels = train.labels.to(device)
    best: tuple[float, float] = (-1.0, -math.inf)
    best_state = copy.deepcopy(net.state_dict())
    history = []
    for epoch in range(args.epochs):
        net.train()
        t0 = time.perf_counter()
        order = torch.tensor(list(class_balanced_sampler(train.labels, len(train), seed=args.seed + epoch)))
        total = 0.0
        for i in range(steps):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x = augment(inputs[idx.to(inputs.device)].to(device, dtype=torch.float32), gen)
            y = labels[idx.to(labels.device)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        probs = _predict(net, val, device, 32)
        m = metrics_from_labels(val.labels.tolist(), probs.argmax(1).tolist())
        val_loss = float(loss_fn(torch.log(probs.clamp(min=1e-6)), val.labels))
        history.append({"epoch": epoch + 1, "train_loss": round(total / steps, 4),
                        "val_loss": round(val_loss, 4), "val_accuracy": round(m.accuracy, 4),
                        "val_macro_f1": round(m.macro_f1, 4)})
        logger.info("epoch %d: train loss %.4f, val loss %.4f, val accuracy %.3f, macro F1 %.3f (%.1f s)",
                    epoch + 1, total / steps, val_loss, m.accuracy, m.macro_f1, time.perf_counter() - t0)
        if (m.macro_f1, -val_loss) > best:
            best = (m.macro_f1, -val_loss)
            best_state = copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    return net.cpu().eval(), history


def main(argv: Sequence[str] | None = None) -> int:
    """Train, register and evaluate; prints the card's metrics as JSON."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    np.random.seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
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
    t0 = time.perf_counter()
    train = build_tensor_set(train_specs, config, cache_dir=args.cache_dir, workers=args.workers)
    val = build_tensor_set(val_specs, config, cache_dir=args.cache_dir, workers=args.workers)
    t_data = time.perf_counter() - t0
    logger.info("training classes %s, validation classes %s (%.0f s)", train.class_counts(),
                val.class_counts(), t_data)
    t0 = time.perf_counter()
    net, history = train_network(args, train, val, device)
    t_train = time.perf_counter() - t0
    rng = " or ".join(str(r) for r in args.rows)
    engine_device = str(device)
    if device.type == "cuda":
        engine_device += f" ({torch.cuda.get_device_name(device)})"
    card = ModelCard(
        name=args.name, version=args.version, architecture="compact3d", weights_file=f"{args.name}.pt",
        sha256="", input_size=config.input_size, window=config.window, margin_mm=config.margin_mm,
        classes=CLASS_NAMES,
        training_data=TRAINING_DATA.format(
            n_train=args.n_train, train_seeds=f"{args.train_seed}..{args.train_seed + args.n_train - 1}",
            n_val=args.n_val, val_seeds=f"{args.val_seed}..{args.val_seed + args.n_val - 1}",
            margin=options.edge_margin, rows=rng,
            thickness=" / ".join(f"{t:g}" for t in options.slice_thickness_mm),
            kernels=" and ".join(options.kernels),
            cons="{:.2f}..{:.2f}".format(*options.consolidation_fraction),
            partial=options.partial_coverage),
        intended_use=INTENDED_USE,
        architecture_params={"widths": list(args.widths), "dropout": args.dropout},
        training={
            "command": "python -m training.train " + shlex.join(sys.argv[1:] if argv is None else list(argv)),
            "seed": args.seed, "train_seeds": [args.train_seed, args.train_seed + args.n_train - 1],
            "val_seeds": [args.val_seed, args.val_seed + args.n_val - 1],
            "test_seeds": [args.test_seed, args.test_seed + args.n_test - 1],
            "class_counts_train": train.class_counts(), "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr, "weight_decay": args.weight_decay,
            "loss": f"focal (gamma {args.gamma}) + {args.emd_weight} x squared EMD",
            "sampling": "class-balanced (inverse class frequency)",
            "device": engine_device,
            "torch": torch.__version__, "data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1),
            "history": history},
    )
    card = save_model(net, card, args.out)
    engine = InferenceEngine.from_registry(card.name, args.out, device=str(device))
    results = evaluate_engine(engine, test_specs, sources=tuple(args.eval_masks), workers=args.workers)
    metrics: dict[str, object] = {
        "test_set": f"{args.n_test} held-out synthetic phantoms, seeds {args.test_seed}.."
                    f"{args.test_seed + args.n_test - 1} (training.dataset.draw_specs(n, {args.test_seed}, "
                    "balanced=True, options=training.evaluate.EVAL_OPTIONS)), 128 x 128 images, classes "
                    "balanced; engine with mirror TTA",
    }
    if "true" in results:
        metrics.update(results["true"].to_dict())
        metrics["masks"] = "true phantom lung masks"
    if "segmented" in results:
        metrics["with_segment_lungs_masks"] = results["segmented"].to_dict()
    card = replace(card, metrics=metrics)
    write_card(card, args.out)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
