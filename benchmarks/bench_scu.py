"""The node as a DICOM sender, side by side with DCMTK storescu, into the same kind of Orthanc.

Each round sends the same files over one association into a fresh Orthanc
(started with TCP_NODELAY=1, empty storage) three ways, in an order that
rotates between rounds (ratios: time relative to storescu into the
TCP_NODELAY=1 Orthanc of the same round):

- ``storescu``: DCMTK storescu (TCP_NODELAY=1), the process timed from start
  to exit (a C program: its start is a few milliseconds);
- ``node send_files``: ``node.dicom.scu.send_files`` in this process, timed
  around the call (association, sends, release): what the outbox does for a
  delivery, without any process start (pynetdicom's ``send_c_store`` from
  the file path, streamed with ``STORE_SEND_CHUNKED_DATASET``);
- ``lungnode send (CLI)``: ``python -m node.cli send`` end to end, from
  process start to exit (imports, configuration, file scan, progress bar).

Then storescu and ``send_files`` once more into an Orthanc started without
TCP_NODELAY (storescu without it too), as Debian ships them: a DCMTK sender
waits for delayed acknowledgements there, the node must not (``--skip-nagle``
leaves these out; the storescu case takes about 40 ms per instance).

Every case checks that Orthanc holds all instances afterwards. Printed:
seconds, instances per second, time relative to storescu in the same round,
and the sender's CPU seconds (user + system; for storescu and the CLI those of
the child process).

    .venv/bin/python benchmarks/bench_scu.py [--studies 3 --slices 240 --rounds 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_ingest import make_data as make_files  # noqa: E402
from node.dicom.scu import send_files  # noqa: E402
from node.settings import DicomSettings, Peer  # noqa: E402
from tests.dcmtk import env_for  # noqa: E402
from tests.peers import Orthanc  # noqa: E402


def make_data(root: Path, studies: int, slices: int) -> list[Path]:
    """The ingest benchmark's studies (same generator settings), one folder per study."""
    return sorted({p.parent for p in make_files(root, studies, slices)})


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_storescu(dirs: list[Path], o: Orthanc) -> tuple[float, float]:
    cmd = ["storescu", "-aec", o.aet, "-aet", "STORESCU", "+sd", "+r", "127.0.0.1",
           str(o.dicom_port), *map(str, dirs)]
    c0, t0 = _children_cpu(), time.perf_counter()
    res = subprocess.run(cmd, env=env_for(o.tcp_nodelay), capture_output=True, text=True)
    t, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if res.returncode != 0:
        raise RuntimeError(f"storescu failed: {res.stderr[-2000:]}")
    return t, cpu


def run_send_files(files: list[Path], o: Orthanc) -> tuple[float, float]:
    peer = Peer(name="orthanc", ae_title=o.aet, host="127.0.0.1", port=o.dicom_port)
    c0, t0 = _self_cpu(), time.perf_counter()
    results = send_files(files, peer, DicomSettings(ae_title="LUNGNODE"))
    t, cpu = time.perf_counter() - t0, _self_cpu() - c0
    bad = [r for r in results if r[1] != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} files not stored, first: {bad[0]}")
    return t, cpu


def run_cli(dirs: list[Path], o: Orthanc, tmp: Path) -> tuple[float, float]:
    cfg = tmp / "send.toml"
    cfg.write_text("\n".join([
        "log_level = 'WARNING'",
        "[dicom]", "ae_title = 'LUNGNODE'",
        "[storage]", f"root = '{tmp / 'storage'}'",
        "[database]", f"url = 'sqlite:///{tmp / 'send.db'}'",
        "[[peers]]", "name = 'orthanc'", f"ae_title = '{o.aet}'", "host = '127.0.0.1'",
        f"port = {o.dicom_port}", "",
    ]))
    cmd = [sys.executable, "-m", "node.cli", "--config", str(cfg), "send", *map(str, dirs),
           "--to", "orthanc"]
    c0, t0 = _children_cpu(), time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    t, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if res.returncode != 0:
        raise RuntimeError(f"lungnode send failed: {res.stderr[-2000:]}")
    return t, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=3)
    ap.add_argument("--slices", type=int, default=240)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data", type=Path, help="reuse (or create) the generated data in this folder")
    ap.add_argument("--skip-nagle", action="store_true",
                    help="skip the two cases with Orthanc and storescu without TCP_NODELAY")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lungnode-bench-scu-"))
    try:
        data = args.data or tmp / "data"
        t0 = time.perf_counter()
        dirs = sorted(p for p in data.glob("study*/dicom") if p.is_dir()) if args.data else []
        if len(dirs) != args.studies:
            shutil.rmtree(data, ignore_errors=True)
            dirs = make_data(data, args.studies, args.slices)
        files = [f for d in dirs for f in sorted(d.iterdir()) if f.suffix == ".dcm"]
        n = len(files)
        print(f"{n} instances of 512x512 CT ({sum(f.stat().st_size for f in files) / 2**20:.0f} MiB, "
              f"{time.perf_counter() - t0:.0f} s to make or find); load: {os.getloadavg()}")
        Case = tuple[str, bool, Callable[[Orthanc, Path], tuple[float, float]]]
        cases: list[Case] = [
            ("storescu", True, lambda o, w: run_storescu(dirs, o)),
            ("node send_files", True, lambda o, w: run_send_files(files, o)),
            ("lungnode send (CLI)", True, lambda o, w: run_cli(dirs, o, w)),
        ]
        if not args.skip_nagle:  # both ends as Debian ships them: Nagle on, delayed ACKs
            cases += [("storescu, no TCP_NODELAY", False, lambda o, w: run_storescu(dirs, o)),
                      ("node send_files, no TCP_NODELAY", False,
                       lambda o, w: run_send_files(files, o))]
        rows: list[tuple[int, str, float, float, float]] = []
        for r in range(args.rounds):
            order = cases[r % len(cases):] + cases[:r % len(cases)]
            times: dict[str, tuple[float, float]] = {}
            for label, nodelay, fn in order:
                work = tmp / f"r{r}-{label.split()[0]}-{nodelay}"
                with Orthanc(work / "orthanc", tcp_nodelay=nodelay) as o:
                    times[label] = fn(o, work)
                    count = len(o.get("/instances"))
                    if count != n:
                        raise RuntimeError(f"{label}: Orthanc holds {count} of {n} instances")
                shutil.rmtree(work, ignore_errors=True)
            for label, _, _ in cases:
                t, cpu = times[label]
                rows.append((r + 1, label, t, cpu, t / times["storescu"][0]))
        print(f"\n{'round':>5} {'sender into Orthanc':36} {'s':>7} {'inst/s':>7} "
              f"{'x storescu':>10} {'CPU s':>6}")
        for r, label, t, cpu, ratio in rows:
            print(f"{r:5} {label:36} {t:7.2f} {n / t:7.0f} {ratio:10.2f} {cpu:6.2f}")
        print(f"load afterwards: {os.getloadavg()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
