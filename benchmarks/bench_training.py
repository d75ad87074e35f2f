"""Training throughput of the retrainer, compute and data loading measured apart, in one run.

    python benchmarks/bench_training.py [--threads 2] [--steps 4] [--volumes 24] [--workers 0 2]

1. Compute: volumes per second through forward + backward + AdamW step of
   Compact3d (default widths) at 64 x 128 x 128, global batch 4, the focal +
   EMD loss of :mod:`training.losses` (bf16 autocast on CUDA, as
   :func:`training.retrain.train_run` runs it); random inputs, one warm-up step.
2. Data: volumes per second out of a DataLoader over
   :class:`training.manifest_data.ManifestDataset` (``.npy`` files read and
   sha256-verified at every read, batch 4) followed by the augmentation
   (:func:`training.train.augment`: mirror, affine resampling, intensity), for
   each ``--workers`` value; files written to a temporary folder first (page
   cache warm, as in a training run after its first epoch).

Prints the machine (CPU count, torch threads, GPU) and both figures; ``--json``
prints them as one object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.manifest import ManifestItem  # noqa: E402
from model.networks import build_compact3d  # noqa: E402
from model.registry import sha256_file  # noqa: E402
from training.losses import SeverityLoss  # noqa: E402
from training.manifest_data import ManifestDataset  # noqa: E402
from training.train import augment  # noqa: E402

SIZE = (64, 128, 128)


def compute_throughput(device: torch.device, batch: int, steps: int) -> float:
    """Volumes per second through forward + backward + optimiser step."""
    torch.manual_seed(0)
    net = build_compact3d().to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = SeverityLoss()
    x = torch.rand(batch, 1, *SIZE, device=device)
    y = torch.tensor([0, 2, -1, 4, 1, 3, 0, 2][:batch] * (batch // 8 + 1), device=device)[:batch]

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - t0)


def loader_throughput(folder: Path, volumes: int, batch: int, workers: int, passes: int = 2) -> float:
    """Volumes per second read (verified) and augmented, over ``passes`` passes of the files."""
    items = []
    rng = np.random.default_rng(0)
    for i in range(volumes):
        rel = f"t{i:03d}.npy"
        if not (folder / rel).exists():
            np.save(folder / rel, rng.random((1, *SIZE), dtype=np.float32))
        items.append(ManifestItem(study=str(i), patient=str(i), origin="bench", label="mild", label_event=i,
                                  label_source="bench", split="train", fold=1, tensor=rel,
                                  tensor_sha256=sha256_file(folder / rel)))
    data = ManifestDataset(items, folder)
    gen = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False, num_workers=workers)
    count = 0
    t0 = time.perf_counter()
    for _ in range(passes):
        for x, _y in loader:
            x = augment(x, gen)
            count += x.shape[0]
    return count / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="timed training steps (after one warm-up)")
    p.add_argument("--volumes", type=int, default=24, help=".npy files for the loader benchmark")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version(), "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    out: dict[str, object] = {"machine": machine}
    out["train_volumes_per_s"] = round(compute_throughput(device, args.batch, args.steps), 3)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        out["loader_volumes_per_s"] = {
            str(w): round(loader_throughput(Path(tmp), args.volumes, args.batch, w), 2) for w in args.workers}
    out["setting"] = (f"compact3d, input {SIZE[0]}x{SIZE[1]}x{SIZE[2]}, batch {args.batch}, "
                      f"{args.steps} timed steps; loader: {args.volumes} .npy files, sha256 verified, "
                      "augmentation in the main process, keyed by DataLoader workers")
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"machine: {machine}")
    print(f"training (forward + backward + AdamW, {device}): {out['train_volumes_per_s']} volumes/s")
    for w, v in out["loader_volumes_per_s"].items():  # type: ignore[attr-defined]
        print(f"data loader + augmentation, {w} workers: {v} volumes/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
