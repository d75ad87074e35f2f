"""Analysis time per stage next to the pixel-decoding floor, and peak memory.

For synthetic 512x512 studies of 300 and 600 slices (the generator's output),
prints: the time pydicom needs merely to decode the series' pixel data (the
floor every analysis pays: ``dcmread(f).pixel_array`` over the same files),
the time of each stage (load, segment, quantify, CNN, reports, writing), the
whole, the ratios whole / floor and (load + segment + quantify) / floor, and
the peak resident memory of a process that analyses the study (measured in a
child process so each study size's peak is its own).

The child analyses the study ``--repeat`` times one after another, as a node
worker analyses study after study, and decodes the floor again before each
run.  Two rows per size: the first study after the process started, and the
median of the later ones (steady state).  The first run of a process is
slower on this kind of VM (it touches memory the process has not used yet:
page faults and zeroing of transparent huge pages), which is why both are
printed.

The CNN stage runs as the node runs it by default (``[model] enabled = true``,
the default model shipped in ``model/weights``, device ``auto``, mirror TTA);
the model is loaded before the clock starts, as the node loads it once at
start-up.  The benchmark says which model ran on which device, and stops when
the default model cannot be loaded (the node would refuse to start too).
``--no-cnn`` leaves the stage out.  The load average is printed with the
figures: the numbers are only comparable on an otherwise idle machine.

    .venv/bin/python benchmarks/bench_analysis.py [--slices 300 600] [--repeat 3] [--no-cnn]

``--segmenter lungmask --weights PATH`` measures the lung segmentation alone
instead: for a synthetic 512x512 study of each ``--slices`` count covering the
chest, the classical method's time and lungmask's (``--model``, ``--threads``,
``--batch-size``, ``--device``; after a two-slice warm-up), lungmask's seconds
per slice and what that makes for a 300-slice study.  A random-weights file
times the same network (it finds no lungs, which is reported).

    .venv/bin/python benchmarks/bench_analysis.py --segmenter lungmask --weights unet_r231.pth \
        --slices 16 --threads 2 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def child(dicom_dir: str, out_dir: str, with_cnn: bool, repeat: int) -> None:
    """Analyse the study ``repeat`` times in this process; print each run's timings as JSON lines.

    Each run first decodes the series with pydicom (the floor), then analyses it
    with fresh objects, as a node worker analyses study after study.
    """
    import pydicom

    from node.pipeline import analyse, report, write_results
    from node.records import SelectedSeries
    from node.settings import AnalysisSettings, ModelSettings

    paths = tuple(sorted(Path(dicom_dir).glob("*.dcm")))
    predictor = None
    model = ModelSettings()  # the node's defaults
    if with_cnn and model.enabled:
        from model.errors import ModelError
        from model.inference import InferenceEngine

        try:
            predictor = InferenceEngine.from_registry(model.name, model.registry, device=model.device,
                                                      tta=model.tta).predict
        except ModelError as exc:
            print(json.dumps({"error": f"the default severity model cannot be loaded: {exc}"}))
            return
        import gc

        gc.collect()  # as `lungnode serve` does after loading the model (node/cli.py)
        gc.freeze()
    for run in range(repeat):
        floor = decode_floor(Path(dicom_dir))
        t0 = time.perf_counter()
        ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
        selected = SelectedSeries(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), paths, "benchmark")
        analysis = analyse(selected, AnalysisSettings(), predictor)
        timings = dict(analysis.timings)
        t = time.perf_counter()
        objects = report(analysis)
        timings["reports"] = time.perf_counter() - t
        t = time.perf_counter()
        write_results(objects, Path(out_dir) / f"run{run}")
        timings["write"] = time.perf_counter() - t
        timings["whole"] = time.perf_counter() - t0
        timings["floor"] = floor
        timings["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out: dict[str, object] = dict(timings)
        out["cnn_enabled_by_default"] = model.enabled
        if analysis.prediction is not None:
            p = analysis.prediction
            out["cnn_model"] = f"{p.model_name} {p.model_version} on {p.device}"
        del analysis, objects
        print(json.dumps(out), flush=True)


def decode_floor(dicom_dir: Path) -> float:
    import pydicom

    t0 = time.perf_counter()
    for f in sorted(dicom_dir.glob("*.dcm")):
        _ = pydicom.dcmread(f).pixel_array
    return time.perf_counter() - t0


_STAGES = ("load", "segment", "quantify", "cnn", "reports", "write", "whole")


def bench_segmenter(args: argparse.Namespace) -> None:
    """Classical and lungmask segmentation time per study and per slice (see the module docstring)."""
    import torch

    from model.errors import NoLungsError
    from model.learned_lungs import LearnedLungs
    from model.lungs import segment_lungs
    from model.volume import load_series
    from training.synth import SynthSpec, write_study

    learned = LearnedLungs(args.model, Path(args.weights), device=args.device, threads=args.threads,
                           batch_size=args.batch_size)
    threads = args.threads or torch.get_num_threads()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs; "
          f"lungmask {args.model} on {learned.device}, {threads} torch threads, batch {args.batch_size}")
    tmp = Path(tempfile.mkdtemp(prefix="lungnode-bench-seg-"))
    try:
        warm = write_study(tmp / "warm", SynthSpec(seed=7, slices=2, rows=512, slice_thickness_mm=5.0))
        try:
            learned.segment(load_series(list(warm.paths)))
        except NoLungsError:
            pass
        print(f"{'slices':>6} {'classical s':>11} {'lungmask s':>10} {'s/slice':>8} "
              f"{'300 slices s':>12}  note")
        for n in args.slices:
            study = write_study(tmp / f"s{n}", SynthSpec(involvement=0.3, seed=7, slices=n, rows=512,
                                                        slice_thickness_mm=300.0 / n))
            volume = load_series(list(study.paths))
            t0 = time.perf_counter()
            segment_lungs(volume)
            classical = time.perf_counter() - t0
            note = ""
            t0 = time.perf_counter()
            try:
                learned.segment(volume)
            except NoLungsError:
                note = "lungmask found no lungs (random weights?)"
            lm = time.perf_counter() - t0
            print(f"{n:6d} {classical:11.2f} {lm:10.2f} {lm / n:8.2f} {300 * lm / n:12.0f}  {note}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, nargs="+", default=[300, 600])
    ap.add_argument("--no-cnn", action="store_true", help="leave the severity CNN out")
    ap.add_argument("--repeat", type=int, default=3,
                    help="studies analysed one after another by the same process (default 3)")
    ap.add_argument("--child", nargs=2, metavar=("DICOM_DIR", "OUT"))
    ap.add_argument("--segmenter", choices=["lungmask"], help="time the lung segmentation alone")
    ap.add_argument("--weights", help="lungmask state dict (.pth) for --segmenter lungmask")
    ap.add_argument("--model", default="R231", help="lungmask model of --weights (default R231)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args()
    if args.segmenter:
        if not args.weights:
            ap.error("--segmenter lungmask needs --weights PATH")
        bench_segmenter(args)
        return
    if args.child:
        child(args.child[0], args.child[1], not args.no_cnn, args.repeat)
        return
    from training.synth import SynthSpec, write_study

    tmp = Path(tempfile.mkdtemp(prefix="lungnode-bench-"))
    try:
        print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
              f"on {os.cpu_count()} CPUs; times in seconds")
        print(f"{'slices':>6} {'run':>7} {'floor':>6} " + " ".join(f"{k:>8}" for k in _STAGES) +
              f" {'whole/floor':>11} {'measure/floor':>13} {'peak MB':>8}")
        models = set()
        for n in args.slices:
            study = write_study(tmp / f"s{n}", SynthSpec(involvement=0.3, seed=7, slices=n, rows=512,
                                                        slice_thickness_mm=300.0 / n))
            cmd = [sys.executable, __file__, "--child", str(study.dicom_dir), str(tmp / f"out{n}"),
                   "--repeat", str(max(2, args.repeat))]
            if args.no_cnn:
                cmd.append("--no-cnn")
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs = [json.loads(line) for line in res.stdout.strip().splitlines() if line.startswith("{")]
            if "error" in runs[-1]:
                sys.exit(f"{runs[-1]['error']}\nthe node's default configuration would refuse to start; "
                         "fix model/weights or run with --no-cnn")
            for t in runs:
                if not args.no_cnn and "cnn" not in t and t.get("cnn_enabled_by_default", True):
                    sys.exit("the CNN stage did not run although the default model loaded")
                models.add(t.get("cnn_model", "not run: [model] enabled = false by default"))
            later = runs[1:]
            steady = {k: float(np.median([r[k] for r in later])) for k in (*_STAGES, "floor")}
            steady["peak_rss_mb"] = later[-1]["peak_rss_mb"]
            for label, t in (("first", runs[0]), ("steady", steady)):
                measure = t["load"] + t["segment"] + t["quantify"]
                floor = t["floor"]
                print(f"{n:6d} {label:>7} {floor:6.2f} " +
                      " ".join(f"{t.get(k, float('nan')):8.2f}" for k in _STAGES) +
                      f" {t['whole'] / floor:11.2f} {measure / floor:13.2f} {t['peak_rss_mb']:8.0f}")
        print("first: the first study after the process started; steady: median of the "
              f"{max(2, args.repeat) - 1} studies after it (a node worker analyses study after study);")
        print("floor: pydicom decoding the same files just before each run; "
              "measure = load + segment + quantify; peak MB: the process's peak resident memory so far")
        print("CNN: " + ("not run (--no-cnn)" if args.no_cnn else
                         f"{', '.join(sorted(models))} (the node's default [model] settings)"))
        print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
