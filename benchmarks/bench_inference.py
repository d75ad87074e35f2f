"""Severity inference timings: preprocessing and forward pass per study, CPU and GPU.

    python benchmarks/bench_inference.py [--rows 512] [--thickness 1.25] [--threads 2]

CPU: per-study time of the preprocessing (crop, window, resize) and of the
forward pass (with the mirror TTA, as the engine runs it) for the shipped
compact model and for Cov3d (random weights: same cost as trained ones), on
the real test CT (30 slices of 512 x 512) and on a synthetic study of
``--rows`` x ``--rows`` pixels and ``--thickness`` mm slices (true lung masks;
segmentation is not timed here, see bench_analysis.py).

GPU (where CUDA is available): forward-pass time per batch and throughput
in studies per second at batch sizes 1, 4 and 16 for both networks (inputs
already preprocessed; the time includes the host-to-device copy, the mirror
TTA and bf16 autocast, as in :meth:`InferenceEngine.probabilities`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.inference import InferenceEngine  # noqa: E402
from model.lungs import LungMasks, segment_lungs  # noqa: E402
from model.networks import build_cov3d  # noqa: E402
from model.prediction import CLASS_NAMES  # noqa: E402
from model.registry import ModelCard  # noqa: E402
from model.volume import CTVolume, load_series  # noqa: E402

REAL_SERIES = ROOT / "tests" / "data" / "ct" / "lung-pet-ct-dx-A0002" / "series-3-B40f"


def _timed(fn: Callable[[], object], repeats: int, sync: bool = False) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _engines(device: str) -> dict[str, InferenceEngine]:
    compact = InferenceEngine.from_registry(device=device)
    card = ModelCard(name="cov3d-untrained", version="0", architecture="cov3d", weights_file="-", sha256="-",
                     input_size=(64, 128, 128), window=(-1000.0, 400.0), margin_mm=5.0, classes=CLASS_NAMES,
                     training_data="none (random weights, for timing)", intended_use="benchmark")
    return {"compact3d": compact, "cov3d": InferenceEngine(build_cov3d(), card, device=device)}


def _studies(rows: int, thickness: float, real: bool) -> list[tuple[str, CTVolume, LungMasks]]:
    from training.synth import SynthSpec, make_phantom

    out = []
    if real and REAL_SERIES.is_dir():
        vol = load_series(sorted(REAL_SERIES.glob("*.dcm")))
        out.append(("real B40f", vol, segment_lungs(vol)))
    ph = make_phantom(SynthSpec(involvement=0.3, seed=3, rows=rows, slice_thickness_mm=thickness))
    vol = CTVolume(hu=ph.hu, spacing=ph.spacing, origin=ph.origin, direction=np.eye(3),
                   series_instance_uid="synthetic", sop_instance_uids=(), slice_thickness=thickness)
    out.append((f"synthetic {thickness:g} mm", vol, LungMasks(left=ph.left_lung, right=ph.right_lung)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=512, help="synthetic study image size")
    parser.add_argument("--thickness", type=float, default=1.25, help="synthetic study slice thickness (mm)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-real", action="store_true", help="skip the real test CT")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    studies = _studies(args.rows, args.thickness, not args.no_real)
    cpu = _engines("cpu")
    print(f"CPU: {args.threads} torch threads, torch {torch.__version__}; median of {args.repeats} runs")
    print(f"{'network':<10} {'study':<20} {'voxels (z,y,x)':>17} {'input':>12} {'preproc ms':>11} "
          f"{'forward ms':>11} {'total ms':>9}")
    inputs: dict[str, torch.Tensor] = {}
    for net_name, engine in cpu.items():
        for study_name, vol, masks in studies:
            t_pre = _timed(partial(engine.preprocess, vol, masks), args.repeats)
            x = engine.preprocess(vol, masks)[None]
            inputs[net_name] = x
            t_fwd = _timed(partial(engine.probabilities, x), args.repeats)
            shape = "x".join(str(s) for s in vol.shape)
            size = "x".join(str(s) for s in engine.card.input_size)
            print(f"{net_name:<10} {study_name:<20} {shape:>17} {size:>12} {1000 * t_pre:>11.1f} "
                  f"{1000 * t_fwd:>11.1f} {1000 * (t_pre + t_fwd):>9.1f}")

    if not torch.cuda.is_available():
        print("\nGPU: CUDA is not available here; no GPU figures.")
        return 0
    gpu = _engines("cuda")
    print(f"\nGPU: {next(iter(gpu.values())).device_name}; forward with mirror TTA, bf16 autocast, "
          "host-to-device copy included")
    print(f"{'network':<10} {'batch':>5} {'ms/batch':>9} {'studies/s':>10}")
    for net_name, engine in gpu.items():
        for bs in args.batch_sizes:
            batch = inputs[net_name].expand(bs, -1, -1, -1, -1).contiguous().pin_memory()
            t = _timed(partial(engine.probabilities, batch), max(args.repeats, 10), sync=True)
            print(f"{net_name:<10} {bs:>5} {1000 * t:>9.2f} {bs / t:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
