"""Train a candidate severity model from a frozen dataset manifest (one process or torchrun).

:func:`train_run` is the whole run: read the manifest (:mod:`model.manifest`),
verify every tensor's sha256 (:mod:`training.manifest_data`), train on folds
1.., validate on fold 0 after each epoch and keep the best epoch (validation
severity macro F1, ties: lower validation loss), evaluate the best weights
once on the locked evaluation set if the manifest has one (reported apart,
never used for a choice), write the candidate into a registry folder
(:func:`model.registry.save_model`, with the provenance in the card's
``training`` dict) and a Markdown report with plots (:mod:`training.report`).
It never touches the database (see the shared design).

Runs that survive
    At the end of each epoch rank 0 writes ``checkpoint.pt`` into the run
    folder atomically (temporary file, fsync, rename): model, optimiser, LR
    schedule, sampler state, every random state (torch CPU and CUDA, numpy,
    Python ``random``, each rank's augmentation generator), the history and
    the best weights so far.  ``resume=True`` continues after the last
    checkpoint; on the CPU a run killed with SIGKILL and resumed saves a weights
    file with the same sha256 as an uninterrupted run.

Reproducibility
    The training order of an epoch is a pure function of ``(seed, epoch)``
    (:func:`epoch_order`), the augmentation draws from its own seeded
    ``torch.Generator``, data loading uses no randomness, the CPU runs with
    :func:`torch.use_deterministic_algorithms` and a fixed thread count.  Two
    CPU runs with the same manifest, options and thread count save
    byte-identical weights files: ``torch.save`` of the same state gives the
    same bytes (checked with torch 2.14), so the card's ``sha256`` of the file
    is the reproducibility check; ``training.state_sha256`` in the card hashes
    the tensors themselves (independent of the file format).  On CUDA cuDNN is
    put in deterministic mode but bf16 autocast and atomics make results
    differ slightly from the CPU and, for some kernels, between runs.

Scale-out
    Under ``torchrun --nproc_per_node N`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``)
    the network is wrapped in DistributedDataParallel (gloo on the CPU, NCCL
    on GPUs) and each step's global batch of ``batch_size`` studies is split
    into ``N`` equal slices (``batch_size / N`` per rank), so the averaged
    gradient equals the single-process one except for BatchNorm: on GPUs the
    BatchNorm layers become SyncBatchNorm; on the CPU (where PyTorch has no
    SyncBatchNorm) each rank normalises with its own slice's statistics and
    the weights end close to, not equal to, the single-process run (the test
    measures it).  Only rank 0 writes checkpoints, the registry and the report.

Command line (prints the :class:`RunResult` as one JSON object on rank 0)::

    python -m training.retrain --manifest M --run-dir D --registry R [--epochs 20] [--resume] [--json]
    torchrun --nproc_per_node 2 -m training.retrain --manifest M --run-dir D --registry R --json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from model.errors import ModelError
from model.manifest import Manifest, ManifestItem, read_manifest
from model.networks import ARCHITECTURES, build_network
from model.prediction import CLASS_NAMES
from model.registry import ModelCard, save_model, validity_statement
from training.dataset import class_balanced_sampler
from training.evaluate import metrics_from_labels
from training.losses import SeverityLoss
from training.manifest_data import ManifestDataset, split_items, training_root
from training.report import EvalSnapshot, write_report
from training.train import augment

__all__ = ["CHECKPOINT", "RunOptions", "RunResult", "epoch_order", "evaluate", "main", "rank_batches",
           "state_sha256", "train_run"]

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
"""The checkpoint file in the run folder (with ``checkpoint.json``, a small summary)."""
CHECKPOINT_FORMAT = "lungnode-checkpoint/1"

INTENDED_USE = (
    "Candidate severity model trained by lungnode's retraining on the node's labelled studies. Not for "
    "clinical use before the promotion gate and a qualified person have approved it; it is validated only "
    "on the data described here.")


@dataclass(frozen=True)
class RunOptions:
    """What a run trains and how; the snapshot goes into the model card."""

    architecture: str = "compact3d"
    """``compact3d`` or ``cov3d`` (r3d_18 Cov3d, randomly initialised: the trainer has no network)."""
    epochs: int = 20
    batch_size: int = 8
    """Global batch: under torchrun each of N ranks takes ``batch_size / N``."""
    lr: float = 1e-3
    """Peak learning rate of the one-cycle schedule (AdamW)."""
    weight_decay: float = 1e-4
    seed: int = 0
    class_balanced: bool = True
    """Draw training studies with probability inverse to their label's frequency (COVID-Net CT-S)."""
    augment: bool = True
    """Left-right mirror, small affine and intensity changes (:func:`training.train.augment`)."""
    threads: int = 2
    """torch CPU threads (fixed, for reproducible sums)."""
    device: str = "auto"
    """``auto``: CUDA when present, else the CPU; or ``cpu``, ``cuda``."""
    candidate: str | None = None
    """Name of the model in the registry; ``None``: ``candidate-m<manifest id>-<architecture>-s<seed>``."""
    widths: tuple[int, ...] | None = None
    """Compact3d widths (``None``: the network's default)."""
    dropout: float | None = None
    """Dropout before the classifier (``None``: the network's default)."""
    gamma: float = 2.0
    """Focal loss gamma."""
    emd_weight: float = 1.0
    workers: int = 0
    """DataLoader processes (they only read files; augmentation runs in the training process)."""
    cache: bool = False
    """Keep the verified tensors in memory (small datasets)."""

    def architecture_params(self) -> dict[str, Any]:
        """The card's ``architecture_params``."""
        params: dict[str, Any] = {}
        if self.architecture == "compact3d" and self.widths is not None:
            params["widths"] = [int(w) for w in self.widths]
        if self.dropout is not None:
            params["dropout"] = float(self.dropout)
        return params


@dataclass(frozen=True)
class RunResult:
    """What a finished run produced (JSON-able: :meth:`to_json`)."""

    candidate: str
    weights: str
    weights_sha256: str
    card: str
    report: str
    best_epoch: int
    metrics: dict[str, Any]
    """``validation`` (best epoch) and, if the manifest has one, ``locked_eval`` (the same keys:
    ``loss``, ``severity_macro_f1``, ``presence_f1``, ``per_class_recall``, ``confusion_matrix`` ...);
    ``severity_macro_f1`` and ``presence_f1`` repeat the validation figures at the top level."""
    epochs_completed: int
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# ---------------------------------------------------------------------------------------------- sampling


def epoch_order(targets: torch.Tensor, epoch: int, seed: int, steps: int, batch_size: int,
                class_balanced: bool) -> torch.Tensor:
    """The global training order of ``epoch``: ``steps * batch_size`` indices into the training set.

    A pure function of its arguments (the sampler's whole state is the epoch),
    so a resumed run and every rank draw the same order.  Class-balanced draws
    treat covid-unknown (``-1``) as a sixth group.
    """
    n = int(targets.shape[0])
    total = steps * batch_size
    epoch_seed = seed * 1_000_003 + epoch
    if class_balanced:
        groups = torch.where(targets < 0, torch.full_like(targets, len(CLASS_NAMES)), targets)
        return torch.tensor(list(class_balanced_sampler(groups, total, seed=epoch_seed)), dtype=torch.int64)
    gen = torch.Generator().manual_seed(epoch_seed)
    chunks = [torch.randperm(n, generator=gen) for _ in range(math.ceil(total / n))]
    return torch.cat(chunks)[:total]


def rank_batches(order: torch.Tensor, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's slice of each global batch of ``order`` (``batch_size / world`` studies each)."""
    per = batch_size // world
    return [order[i + rank * per:i + (rank + 1) * per].tolist() for i in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate(net: nn.Module, data: ManifestDataset, device: torch.device, loss_fn: SeverityLoss,
             batch_size: int) -> EvalSnapshot:
    """Loss and metrics of ``net`` on ``data`` (no augmentation, no test-time mirror).

    Severity macro F1, per-class recall and the confusion matrix use the fully
    labelled studies; presence F1 (COVID vs non-COVID, predicted as
    ``P(COVID) > 0.5``) uses all studies.
    """
    net.eval()
    logits_all = []
    for i in range(0, len(data), batch_size):
        x = torch.stack([data[j][0] for j in range(i, min(i + batch_size, len(data)))]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits_all.append(net(x).float().cpu())
    logits = torch.cat(logits_all) if logits_all else torch.zeros(0, len(CLASS_NAMES))
    targets = data.targets
    loss = float(loss_fn(logits, targets)) if len(data) else 0.0
    probs = torch.softmax(logits, dim=1)
    pred = probs.argmax(dim=1)
    full = targets >= 0
    sev = metrics_from_labels(targets[full].tolist(), pred[full].tolist())
    cm = np.asarray(sev.confusion_matrix)
    support = cm.sum(axis=1)
    recall = {c: (round(float(cm[k, k] / support[k]), 4) if support[k] else None)
              for k, c in enumerate(CLASS_NAMES)}
    covid_true = targets != 0
    covid_pred = (1.0 - probs[:, 0]) > 0.5
    tp = int((covid_true & covid_pred).sum())
    fp = int((~covid_true & covid_pred).sum())
    fn = int((covid_true & ~covid_pred).sum())
    presence_f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    metrics = {"n": len(data), "n_full_labels": int(full.sum()), "n_partial_labels": int((~full).sum()),
               "loss": round(loss, 6), "severity_macro_f1": round(sev.macro_f1, 4),
               "severity_accuracy": round(sev.accuracy, 4),
               "severity_per_class_f1": {k: round(v, 4) for k, v in sev.per_class_f1.items()},
               "per_class_recall": recall, "presence_f1": round(presence_f1, 4),
               "presence_accuracy": round(float((covid_true == covid_pred).float().mean()), 4) if len(data)
               else 0.0,
               "confusion_matrix": sev.confusion_matrix,
               "confusion_matrix_axes": "rows true, columns predicted, classes in order; full labels only"}
    return EvalSnapshot(metrics=metrics, probs=probs.tolist(), targets=targets.tolist())


# ---------------------------------------------------------------------------------------------- helpers


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict's tensors (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _world() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def _device(option: str, local_rank: int) -> torch.device:
    if option == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if option == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(option)


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        lungnode = version("lungnode")
    except PackageNotFoundError:
        lungnode = "unknown"
    return {"torch": torch.__version__, "numpy": np.__version__, "lungnode": lungnode,
            "python": platform.python_version()}


def _label_counts(items: Sequence[ManifestItem]) -> dict[str, Any]:
    by_class = Counter(i.label for i in items)
    by_source: dict[str, dict[str, int]] = {}
    for i in items:
        row = by_source.setdefault(f"{i.origin}/{i.label_source}", {})
        row[i.label] = row.get(i.label, 0) + 1
    return {"n": len(items), "by_class": dict(sorted(by_class.items())),
            "by_source": {k: dict(sorted(v.items())) for k, v in sorted(by_source.items())}}


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _rng_state(aug: torch.Generator, device: torch.device) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "augment": aug.get_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict[str, Any], aug: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    aug.set_state(state["augment"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def _deterministic(device: torch.device, threads: int) -> Iterator[None]:
    """Deterministic algorithms and a fixed thread count for the run; the previous settings after it."""
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_num_threads(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.set_num_threads(prev[2])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[3], prev[4]


def _check_options(options: RunOptions, world: int) -> None:
    if options.architecture not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {options.architecture!r}; known: {', '.join(ARCHITECTURES)}")
    if options.epochs < 1 or options.batch_size < 1:
        raise ModelError(f"epochs and batch_size must be at least 1, not {options.epochs}, "
                         f"{options.batch_size}")
    if options.batch_size % world:
        raise ModelError(f"the global batch_size {options.batch_size} must split evenly over {world} "
                         "processes; change --batch-size or --nproc_per_node")


# ---------------------------------------------------------------------------------------------- the run


def train_run(manifest_path: Path, run_dir: Path, registry_dir: Path, options: RunOptions = RunOptions(),
              *, resume: bool = False, progress: bool = True) -> RunResult:
    """Train, validate, checkpoint and register one candidate from a frozen manifest.

    Parameters
    ----------
    manifest_path:
        The frozen dataset (its folder's parent is the training root the tensor paths are relative to).
    run_dir:
        Checkpoints (``checkpoint.pt``, ``checkpoint.json``) and the report (``report.md`` + PNGs).
    registry_dir:
        Registry folder the candidate's weights and card go into.
    options:
        See :class:`RunOptions`.
    resume:
        Continue after the last checkpoint in ``run_dir`` (from the start if there is none).
    progress:
        Progress bars on the console (stderr; rank 0 only).

    Raises
    ------
    ModelError
        Unreadable or changed manifest, a tensor whose sha256 does not match,
        too few studies, options that do not fit, or a checkpoint of another
        run (other manifest, options or world size) when resuming; a fresh run
        into a folder that already holds a checkpoint.
    """
    rank, world, local_rank = _world()
    _check_options(options, world)
    created_group = False
    device = _device(options.device, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created_group = True
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        with _deterministic(device, options.threads):
            return _train(Path(manifest_path), Path(run_dir), Path(registry_dir), options, resume=resume,
                          progress=progress and rank == 0, rank=rank, world=world, device=device)
    finally:
        if created_group:
            gc.collect()  # the DDP model and its reducer go while the group is alive (not at exit)
            # every rank past its last collective before the group goes (gloo aborts otherwise)
            with contextlib.suppress(RuntimeError):
                dist.barrier()
            dist.destroy_process_group()


def _train(manifest_path: Path, run_dir: Path, registry_dir: Path, options: RunOptions, *, resume: bool,
           progress: bool, rank: int, world: int, device: torch.device) -> RunResult:
    t_start = time.perf_counter()
    manifest = read_manifest(manifest_path)
    root = training_root(manifest_path)
    splits = split_items(manifest)
    train_ds = ManifestDataset(splits.train, root, cache=options.cache)
    val_ds = ManifestDataset(splits.val, root, cache=options.cache)
    locked_ds = ManifestDataset(splits.locked, root, cache=options.cache)
    for ds in (train_ds, val_ds, locked_ds):
        ds.verify()
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise ModelError(f"{run_dir} already holds a checkpoint of a run; resume it or train into a "
                         "new folder")

    torch.manual_seed(options.seed)
    np.random.seed(options.seed % 2**32)
    random.seed(options.seed)
    params = options.architecture_params()
    net = build_network(options.architecture, params).to(device)
    model: nn.Module = net
    if world > 1:
        if device.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = SeverityLoss(gamma=options.gamma, emd_weight=options.emd_weight)
    steps = max(1, math.ceil(len(train_ds) / options.batch_size))
    opt = torch.optim.AdamW(net.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=options.lr, total_steps=options.epochs * steps,
                                                pct_start=0.15)
    aug_seed = options.seed * 7919 + 104729 * (rank + 1)
    aug = torch.Generator().manual_seed(aug_seed)
    snapshot = json.loads(json.dumps(asdict(options)))
    history: list[dict[str, Any]] = []
    best_key: tuple[float, float] = (-math.inf, -math.inf)
    best_epoch = 0
    best_state = copy.deepcopy(net.state_dict())
    start_epoch = 0

    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise ModelError(f"{ckpt_path} is not a lungnode checkpoint ({CHECKPOINT_FORMAT})")
        mismatch = [k for k, mine in (("manifest_digest", manifest.digest), ("options", snapshot),
                                      ("world_size", world)) if ck.get(k) != mine]
        if mismatch:
            raise ModelError(f"{ckpt_path} belongs to another run (different {', '.join(mismatch)}); "
                             "resume with the same manifest, options and number of processes")
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        history = list(ck["history"])
        best_key = (float(ck["best_key"][0]), float(ck["best_key"][1]))
        best_epoch = int(ck["best_epoch"])
        best_state = ck["best_state"]
        start_epoch = int(ck["sampler"]["epoch"])
        np.random.set_state(("MT19937", np.asarray(ck["rng"]["numpy"][0], dtype=np.uint32),
                             *ck["rng"]["numpy"][1:]))
        random.setstate(ck["rng"]["python"])
        _set_rng_state(ck["rng"]["ranks"][rank], aug, device)
        logger.info("resuming %s after epoch %d of %d", run_dir, start_epoch, options.epochs)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=Console(stderr=True), disable=not progress)
    eval_batch = max(1, options.batch_size)
    with bars:
        run_task = bars.add_task("epochs", total=options.epochs, completed=start_epoch, info="")
        for epoch in range(start_epoch, options.epochs):
            t0 = time.perf_counter()
            model.train()
            order = epoch_order(train_ds.targets, epoch, options.seed, steps, options.batch_size,
                                options.class_balanced)
            loader = DataLoader(train_ds, batch_sampler=rank_batches(order, options.batch_size, rank, world),
                                num_workers=options.workers)
            step_task = bars.add_task(f"epoch {epoch + 1}", total=steps, info="")
            total = torch.zeros(2, dtype=torch.float64)
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device)
                if options.augment:
                    x = augment(x, aug)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(x)
                loss = loss_fn(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += torch.tensor([float(loss.detach()), 1.0], dtype=torch.float64)
                bars.update(step_task, advance=1, info=f"loss {float(loss.detach()):.4f}")
            bars.remove_task(step_task)
            if world > 1:
                dist.all_reduce(total)
            train_loss = float(total[0] / total[1].clamp(min=1))
            val = evaluate(net, val_ds, device, loss_fn, eval_batch)
            m = val.metrics
            key = (float(m["severity_macro_f1"]), -float(m["loss"]))
            if key > best_key:
                best_key, best_epoch = key, epoch + 1
                best_state = {k: v.detach().to("cpu").clone() for k, v in net.state_dict().items()}
            history.append({"epoch": epoch + 1, "train_loss": round(train_loss, 6), "val_loss": m["loss"],
                            "val_severity_macro_f1": m["severity_macro_f1"],
                            "val_presence_f1": m["presence_f1"],
                            "val_per_class_recall": m["per_class_recall"],
                            "val_confusion_matrix": m["confusion_matrix"],
                            "lr_end": round(float(sched.get_last_lr()[0]), 8),
                            "seconds": round(time.perf_counter() - t0, 2)})
            rng = _gather(_rng_state(aug, device), world)
            if rank == 0:
                np_state = cast(tuple[Any, ...], np.random.get_state())
                _atomic_save({
                    "format": CHECKPOINT_FORMAT, "manifest_digest": manifest.digest, "options": snapshot,
                    "world_size": world, "model": net.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "sampler": {"epoch": epoch + 1, "seed": options.seed},
                    "history": history, "best_key": list(best_key), "best_epoch": best_epoch,
                    "best_state": best_state,
                    "rng": {"ranks": rng, "python": random.getstate(),
                            "numpy": [np_state[1].tolist(), *np_state[2:]]},
                }, ckpt_path)
                _atomic_text(json.dumps({"epoch": epoch + 1, "epochs": options.epochs,
                                         "best_epoch": best_epoch,
                                         "manifest_digest": manifest.digest}) + "\n",
                             run_dir / "checkpoint.json")
                logger.info("checkpoint: epoch %d of %d written to %s (train loss %.4f, val loss %.4f, "
                            "val severity macro F1 %.3f)", epoch + 1, options.epochs, ckpt_path, train_loss,
                            m["loss"], m["severity_macro_f1"])
            bars.update(run_task, advance=1, info=f"val loss {m['loss']:.4f} F1 {m['severity_macro_f1']:.3f}")

    result = None
    if rank == 0:
        result = _finish(manifest, manifest_path, splits, run_dir, registry_dir, options, params, best_state,
                         best_epoch, history, val_ds, locked_ds, loss_fn, device, world,
                         time.perf_counter() - t_start)
    out: RunResult = _broadcast(result, world)
    return out


def _finish(manifest: Manifest, manifest_path: Path, splits: Any, run_dir: Path, registry_dir: Path,
            options: RunOptions, params: dict[str, Any], best_state: dict[str, torch.Tensor], best_epoch: int,
            history: list[dict[str, Any]], val_ds: ManifestDataset, locked_ds: ManifestDataset,
            loss_fn: SeverityLoss, device: torch.device, world: int, seconds: float) -> RunResult:
    """Rank 0: best weights -> validation and locked evaluation, registry, card, report."""
    final = build_network(options.architecture, params)
    final.load_state_dict(best_state)
    final = final.to(device)
    batch = max(1, options.batch_size)
    val = evaluate(final, val_ds, device, loss_fn, batch)
    locked = evaluate(final, locked_ds, device, loss_fn, batch) if len(locked_ds) else None
    final = final.cpu().eval()
    metrics: dict[str, Any] = {
        # the validation figures that chose the epoch, also at the top level for the run list
        "severity_macro_f1": val.metrics["severity_macro_f1"], "presence_f1": val.metrics["presence_f1"],
        "validation": {**val.metrics, "epoch": best_epoch, "set": "manifest fold 0 (chooses the best epoch)"}}
    if locked is not None:
        metrics["locked_eval"] = {**locked.metrics, "set": "manifest locked-eval split; evaluated once at "
                                  "the end, never trained on and never used to choose", **(
                                      {"locked_set": manifest.locked_eval} if manifest.locked_eval else {})}
    name = options.candidate or f"candidate-m{manifest.id}-{options.architecture}-s{options.seed}"
    pre = manifest.preprocessing
    dev_name = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    training = {
        "trainer": "training.retrain",
        "dataset_digest": manifest.digest, "dataset_id": manifest.id,
        "manifest": {"id": manifest.id, "digest": manifest.digest, "kind": manifest.kind,
                     "version": manifest.version, "path": str(manifest_path), "as_of": manifest.as_of,
                     "locked_eval": manifest.locked_eval},
        "label_counts": {"train": _label_counts(splits.train), "validation": _label_counts(splits.val),
                         "locked_eval": _label_counts(splits.locked)},
        "folds": {"train": sorted({i.fold for i in splits.train}), "validation": [0],
                  "locked_eval": "locked-eval split" if splits.locked else None,
                  "manifest_folds": manifest.folds},
        "git_revision": _git_revision(), "versions": _versions(),
        "options": json.loads(json.dumps(asdict(options))),
        "seeds": {"seed": options.seed, "init": f"torch.manual_seed({options.seed})",
                  "sampler": "epoch_order(seed, epoch)", "augment": [options.seed * 7919 + 104729 * (r + 1)
                                                                      for r in range(world)]},
        "loss": f"focal (gamma {options.gamma}) + {options.emd_weight} x squared EMD; covid-unknown: "
                "binary focal on P(COVID); mean over the batch",
        "best_epoch": best_epoch, "epochs": options.epochs, "world_size": world, "device": dev_name,
        "deterministic": device.type == "cpu", "state_sha256": state_sha256(best_state),
        "seconds": round(seconds, 1), "history": history,
    }
    counts = training["label_counts"]["train"]["by_class"]  # type: ignore[index]
    card = ModelCard(
        name=name, version="1.0.0", architecture=options.architecture, weights_file=f"{name}.pt", sha256="",
        input_size=tuple(int(v) for v in pre["input_size"]),  # type: ignore[arg-type]
        window=tuple(float(v) for v in pre["window"]),  # type: ignore[arg-type]
        margin_mm=float(pre["margin_mm"]), classes=CLASS_NAMES,
        training_data=(f"Frozen dataset manifest {manifest.id} (digest {manifest.digest[:16]}, as of "
                       f"{manifest.as_of}): {len(splits.train)} training studies "
                       f"(folds 1..{manifest.folds - 1}; "
                       f"labels {dict(counts)}), {len(splits.val)} validation studies (fold 0), "
                       f"{len(splits.locked)} locked evaluation studies. Inputs preprocessed as the manifest "
                       f"says ({pre.get('segmentation', 'segmentation not recorded')})."),
        intended_use=INTENDED_USE, architecture_params=params, metrics=metrics, training=training,
        validity=validity_statement(
            Counter(i.origin for i in splits.train), dataset=f"dataset {manifest.kind} v{manifest.version}",
            locked_origins=Counter(i.origin for i in splits.locked),
            locked_macro_f1=locked.metrics["severity_macro_f1"] if locked is not None else None))
    card = save_model(final, card, registry_dir)
    weights = registry_dir / card.weights_file
    report = write_report(run_dir, title=f"Training run: {name}", summary={
        "candidate": name, "manifest": f"{manifest.id} ({manifest.digest[:16]})",
        "architecture": options.architecture, "best epoch": f"{best_epoch} of {options.epochs}",
        "weights sha256": card.sha256,
        "processes": world, "device": dev_name, "git revision": training["git_revision"]},
        history=history, validation=val, locked=locked)
    return RunResult(candidate=name, weights=str(weights), weights_sha256=card.sha256,
                     card=str(registry_dir / f"{name}.json"), report=str(report), best_epoch=best_epoch,
                     metrics=metrics, epochs_completed=len(history), history=history)


# ---------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m training.retrain``."""
    d = RunOptions()
    p = argparse.ArgumentParser(prog="python -m training.retrain", description=__doc__.split("\n")[0])
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--registry", type=Path, required=True)
    p.add_argument("--architecture", default=d.architecture, choices=ARCHITECTURES)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-class-balanced", dest="class_balanced", action="store_false")
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--device", default=d.device)
    p.add_argument("--candidate", default=None)
    p.add_argument("--widths", type=int, nargs="+", default=None)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--cache", action="store_true", help="keep tensors in memory")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--json", action="store_true", help="print only the result as JSON (no progress bars)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run :func:`train_run` from the command line; rank 0 prints the :class:`RunResult` as JSON."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    fields = {f.name for f in dataclasses.fields(RunOptions)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if values.get("widths") is not None:
        values["widths"] = tuple(values["widths"])
    options = RunOptions(**values)
    try:
        result = train_run(args.manifest, args.run_dir, args.registry, options, resume=args.resume,
                           progress=not args.json)
    except ModelError as exc:
        print(f"training failed: {exc}", file=sys.stderr)
        return 2
    if _world()[0] == 0:
        print(result.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
