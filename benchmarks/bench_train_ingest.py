"""C-STORE response times of a running node with and without a training run beside it.

Starts ``lungnode serve`` (SQLite, no analysis during the measurement: the
studies are not yet stable), then sends three synthetic 512x512 studies over
one association each with pynetdicom, timing every C-STORE from the request to
the response:

1. the node alone (after 20 requests that are not counted: the node's first ones);
2. while a training run trains as a scheduled run does: ``nice -n 10`` and
   ``[training] threads = 1`` (``python -m training.retrain``, the trainer the
   node's child process runs);
3. while the same training runs without those caps (niceness 0, as many torch
   threads as cores), to show what the caps buy.

The training works on a manifest of random tensors at the network's input size
(64x128x128): the content does not change the CPU load.  Prints median, 99th
percentiles and longest response per phase and the ratio of the longest to
phase 1's.  The longest single response is noisy (a few requests of any phase
take about 50 ms: the flush of the instance file and of the database commit,
``[storage] fsync = true``); the median and the 95th percentile show the load.

    .venv/bin/python benchmarks/bench_train_ingest.py [--slices 300]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the node did not listen on {port} within {timeout} s")


def _random_manifest(root: Path, n: int) -> Path:
    from model.manifest import Manifest, ManifestItem
    from model.registry import read_card, sha256_file

    card = read_card(None)
    size = tuple(card.input_size)
    rng = np.random.default_rng(0)
    items = []
    (root / "tensors").mkdir(parents=True)
    labels = ("non-covid", "mild", "moderate", "severe", "critical")
    for i in range(n):
        path = root / "tensors" / f"t{i}.npy"
        np.save(path, rng.random((1, *size), dtype=np.float32))
        items.append(ManifestItem(study=f"bench:{i}", patient=f"bench:p{i}", origin="bench",
                                  label=labels[i % 5], label_event=i + 1, label_source="bench",
                                  split="train", fold=i % 3, tensor=f"tensors/t{i}.npy",
                                  tensor_sha256=sha256_file(path)))
    manifest = Manifest(id=1, kind="training", version=1, created_at="bench", as_of="bench",
                        created_by="bench", folds=3,
                        preprocessing={"input_size": list(size), "window": list(card.window),
                                       "margin_mm": card.margin_mm, "segmentation": "bench"},
                        items=tuple(items)).with_digest()
    path = root / "datasets" / "dataset-1.json"
    manifest.write(path)
    return path


def _send(port: int, files: list[Path]) -> list[float]:
    from pydicom import dcmread
    from pynetdicom import AE

    ae = AE(ae_title="BENCH")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGNODE")
    if not assoc.is_established:
        raise RuntimeError("the node refused the association")
    times = []
    try:
        for f in files:
            ds = dcmread(f)
            t = time.perf_counter()
            status = assoc.send_c_store(ds)
            times.append(time.perf_counter() - t)
            if status is None or int(status.Status) != 0:
                raise RuntimeError(f"C-STORE of {f.name} failed: {status}")
    finally:
        assoc.release()
    return times


def _trainer(manifest: Path, work: Path, *, niced: bool, threads: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "training.retrain", "--manifest", str(manifest),
           "--run-dir", str(work / f"run-{niced}"), "--registry", str(work / "models"),
           "--epochs", "1000", "--batch-size", "4", "--threads", str(threads)]
    if niced:
        cmd = ["nice", "-n", "10", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_training(proc: subprocess.Popen[bytes], run_dir: Path, timeout: float = 300.0) -> None:
    """Until the trainer is past its start-up (its run folder exists and it is using the CPU)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"the trainer stopped: {err[-2000:]}")
        if run_dir.exists():
            time.sleep(5.0)  # the first batches: the load it keeps while it trains
            return
        time.sleep(0.5)
    raise TimeoutError("the trainer did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300, help="instances per phase")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from training.synth import SynthSpec, write_study

    work = Path(tempfile.mkdtemp(prefix="lungnode-bench-train-"))
    node = None
    try:
        port = _free_port()
        (work / "lungnode.toml").write_text(
            f'[dicom]\nport = {port}\nhost = "127.0.0.1"\n[storage]\nroot = "storage"\n'
            f'[database]\nurl = "sqlite:///{work / "node.db"}"\n[completion]\nstable_seconds = 3600\n'
            '[worker]\nwarm_up = false\n[model]\nenabled = false\n[web]\nenabled = false\n'
            '[delivery]\ndestinations = []\n'
            '[[peers]]\nname = "bench"\nae_title = "BENCH"\nhost = "127.0.0.1"\nport = 104\n')
        studies = [write_study(work / f"s{i}", SynthSpec(seed=40 + i, involvement=0.2, rows=512,
                                                         slices=args.slices, slice_thickness_mm=2.0))
                   for i in range(3)]
        manifest = _random_manifest(work / "learn", 24)
        node = subprocess.Popen([str(ROOT / ".venv/bin/lungnode"), "serve", "--config",
                                 str(work / "lungnode.toml")], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        _wait_port(port)
        print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs; "
              f"{args.slices} C-STORE requests of 512x512 CT per phase, one association")
        warm = write_study(work / "warm", SynthSpec(seed=39, involvement=0.2, rows=512, slices=20,
                                                    slice_thickness_mm=2.0))
        _send(port, list(warm.paths))  # the node's first requests (imports, first writes): not counted
        phases = []
        phases.append(("node alone", _send(port, list(studies[0].paths))))
        for label, niced, threads, study in (
                ("training, nice 10, 1 thread (scheduled run)", True, 1, studies[1]),
                (f"training, nice 0, {os.cpu_count()} threads (no caps)", False, os.cpu_count() or 2,
                 studies[2])):
            trainer = _trainer(manifest, work, niced=niced, threads=threads)
            try:
                _wait_training(trainer, work / f"run-{niced}")
                phases.append((label, _send(port, list(study.paths))))
            finally:
                trainer.kill()
                trainer.wait()
        base = max(phases[0][1])
        print(f"{'phase':<48} {'median ms':>9} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} "
              f"{'max / alone':>11}")
        for label, times in phases:
            ms = sorted(t * 1000 for t in times)
            p95, p99 = (ms[min(len(ms) - 1, int(q * len(ms)))] for q in (0.95, 0.99))
            print(f"{label:<48} {statistics.median(ms):9.1f} {p95:8.1f} {p99:8.1f} {ms[-1]:8.1f} "
                  f"{ms[-1] / (base * 1000):11.2f}")
        print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
    finally:
        if node is not None:
            node.terminate()
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
