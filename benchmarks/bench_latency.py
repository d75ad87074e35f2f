"""Study-to-result latency and peak memory of `lungnode serve`, with a real Orthanc as destination.

For each study size (default 300 and 600 slices of 512x512 synthetic CT):

1. start Orthanc (TCP_NODELAY=1, empty temporary storage) and ``lungnode serve``
   (temporary configuration: SQLite and storage in a temporary folder,
   ``[completion] stable_seconds`` from ``--stable``, one worker, the model as
   configured by default, Orthanc as the only destination);
2. send the study to the node with DCMTK storescu (TCP_NODELAY=1) and note the
   moment storescu ends (its last C-STORE response, then release);
3. poll Orthanc's REST API every 50 ms until a Structured Report (modality SR)
   of that study is there.

Printed: the latency (SR in Orthanc minus storescu's end) and the same minus
``stable_seconds`` (the wait the configuration asks for), with the split that
the node's database records: completion tick lag (job created after the study
became stable), claim (job started), analysis (job finished), and from there
until Orthanc's REST API showed the SR (outbox tick, C-STORE, Orthanc's
indexing, the 50 ms poll); also when the outbox recorded all three results as
acknowledged (it records ``sent_at`` after the association).

Memory: the node's process tree (``serve`` and any receiver or worker
processes) is sampled with psutil every 50 ms; printed are the peak of the
tree's summed resident memory and of each process, during receiving and during
analysis and delivery, plus the kernel's high-water mark (VmHWM) of each process
(its true peak, not sampled). The issue's target is under 3 GB for 600 slices.

Nothing is asserted; figures only.

    .venv/bin/python benchmarks/bench_latency.py [--slices 300 600] [--stable 2] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from node.db import Delivery, Job, ResultObject, Study  # noqa: E402
from tests.peers import Orthanc, echoscu, free_port, storescu  # noqa: E402
from training.synth import SynthSpec, write_study  # noqa: E402

POLL = 0.05


class TreeSampler:
    """Resident memory of a process and its descendants, sampled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = POLL) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.phase = "start"
        self.peak_total: dict[str, int] = {}
        self.peak_proc: dict[str, dict[int, tuple[str, int]]] = {}
        self.hwm: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _procs(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample(self) -> None:
        total = 0
        per = self.peak_proc.setdefault(self.phase, {})
        for p in self._procs():
            try:
                rss = p.memory_info().rss
                name = "serve" if p.pid == self.root.pid else f"child {p.pid}"
                hwm = _vm_hwm(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
                continue
            total += rss
            if rss > per.get(p.pid, ("", 0))[1]:
                per[p.pid] = (name, rss)
            if hwm is not None and hwm > self.hwm.get(p.pid, ("", 0))[1]:
                self.hwm[p.pid] = (name, hwm)
        self.peak_total[self.phase] = max(self.peak_total.get(self.phase, 0), total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()


def _vm_hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Result:
    slices: int
    latency: float
    split: dict[str, float] = field(default_factory=dict)
    sampler: TreeSampler | None = None


def write_config(tmp: Path, port: int, orthanc: Orthanc, stable: float) -> Path:
    cfg = tmp / "lungnode.toml"
    cfg.write_text("\n".join([
        "log_level = 'INFO'",
        "[dicom]", "ae_title = 'LUNGNODE'", "host = '127.0.0.1'", f"port = {port}",
        "[storage]", f"root = '{tmp / 'storage'}'", "min_free_mb = 100",
        "[database]", f"url = 'sqlite:///{tmp / 'lungnode.db'}'",
        "[completion]", f"stable_seconds = {stable}",
        "[worker]", "count = 1",
        "[web]", "enabled = false",
        "[delivery]", "destinations = ['orthanc']",
        "[[peers]]", "name = 'storescu'", "ae_title = 'STORESCU'", "host = '127.0.0.1'", "port = 104",
        "[[peers]]", "name = 'orthanc'", f"ae_title = '{orthanc.aet}'", "host = '127.0.0.1'",
        f"port = {orthanc.dicom_port}", "",
    ]))
    return cfg


def start_node(cfg: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)],
                            cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while echoscu("127.0.0.1", port, "LUNGNODE", "STORESCU", check=False,
                  extra_args=("-ta", "2")).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the node did not start: {log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


def stop_node(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def sr_in_orthanc(orthanc: Orthanc, study_uid: str) -> bool:
    study = orthanc.find_study(study_uid)
    if study is None:
        return False
    return any(s["MainDicomTags"].get("Modality") == "SR" for s in orthanc.get(f"/studies/{study}/series"))


def _ts(dt: datetime | None) -> float | None:
    if dt is None:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def db_split(db: Path, study_uid: str, stable: float, sent_end: float, seen: float) -> dict[str, float]:
    engine = create_engine(f"sqlite:///{db}")
    out: dict[str, float] = {}
    with Session(engine) as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        job = s.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id.desc())).first()
        all_sent = [d for d in s.scalars(select(Delivery.sent_at).join(
            ResultObject, ResultObject.id == Delivery.result_object_id).where(
            ResultObject.study_id == study.id))]
        last_rx = _ts(study.last_received_at)
        created, started, finished = (_ts(job.created_at), _ts(job.started_at),
                                      _ts(job.finished_at)) if job else (None, None, None)
    engine.dispose()
    marks: list[tuple[str, float | None, float | None]] = [
        ("last instance stored -> storescu ended", last_rx, sent_end)]
    if last_rx is not None:
        marks += [("study stable -> job queued (completion tick)", last_rx + stable, created),
                  ("job queued -> started (claim)", created, started),
                  ("analysis (job started -> finished)", started, finished),
                  ("job finished -> SR seen in Orthanc's REST API", finished, seen)]
    for label, a, b in marks:
        if a is not None and b is not None:
            out[label] = b - a
    # the outbox records sent_at for a whole association (SR, SEG, summary) after it ends
    sent = [t for t in map(_ts, all_sent) if t is not None]
    if sent and finished is not None:
        out["job finished -> all results acknowledged"] = max(sent) - finished
    return out


def run_case(tmp: Path, slices: int, stable: float, timeout: float) -> Result:
    t0 = time.perf_counter()
    study = write_study(tmp / "study", SynthSpec(involvement=0.3, seed=11, slices=slices, rows=512,
                                                 slice_thickness_mm=300.0 / slices))
    print(f"  {slices} slices written in {time.perf_counter() - t0:.0f} s", flush=True)
    port = free_port()
    with Orthanc(tmp / "orthanc", tcp_nodelay=True) as orthanc:
        cfg = write_config(tmp, port, orthanc, stable)
        log = tmp / "node.log"
        node = start_node(cfg, port, log)
        try:
            with TreeSampler(node.pid) as sampler:
                time.sleep(0.2)
                sampler.phase = "idle"
                time.sleep(0.5)
                sampler.phase = "receiving"
                t_send = time.time()
                storescu([study.dicom_dir], "127.0.0.1", port, "LUNGNODE", "STORESCU",
                         tcp_nodelay=True)
                sent_end = time.time()
                sampler.phase = "analysis+delivery"
                deadline = time.monotonic() + timeout
                while not sr_in_orthanc(orthanc, study.study_instance_uid):
                    if node.poll() is not None:
                        raise RuntimeError(f"the node exited: {log.read_text()[-3000:]}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no SR in Orthanc after {timeout} s: "
                                           f"{log.read_text()[-3000:]}")
                    time.sleep(POLL)
                seen = time.time()
                time.sleep(0.5)  # the SEG and summary follow in the same association
        finally:
            stop_node(node)
    res = Result(slices, seen - sent_end, sampler=sampler)
    res.split = db_split(tmp / "lungnode.db", study.study_instance_uid, stable, sent_end, seen)
    res.split["storescu (send of the study)"] = sent_end - t_send
    return res


def _mb(n: int) -> str:
    return f"{n / 2**20:7.0f}"


def report(r: Result, stable: float) -> None:
    print(f"\n== {r.slices} slices of 512x512: SR in Orthanc {r.latency:.2f} s after storescu ended; "
          f"minus stable_seconds ({stable:g}): {r.latency - stable:.2f} s")
    for label, v in r.split.items():
        print(f"   {label:45} {v:7.2f} s")
    s = r.sampler
    if s is None:
        return
    print(f"   peak resident memory (MiB), whole process tree, sampled every {POLL * 1000:.0f} ms:")
    for phase, total in s.peak_total.items():
        procs = ", ".join(f"{name} {_mb(rss).strip()}" for name, rss in s.peak_proc.get(phase, {}).values())
        print(f"     {phase:20} {_mb(total)}   [{procs}]")
    hwm_total = sum(v for _, v in s.hwm.values())
    print(f"   kernel high-water marks (VmHWM, MiB): sum {_mb(hwm_total).strip()} = "
          + " + ".join(f"{name} {_mb(v).strip()}" for name, v in s.hwm.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, nargs="+", default=[300, 600])
    ap.add_argument("--stable", type=float, default=2.0, help="[completion] stable_seconds")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the SR")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folders (node log, database)")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"load {tuple(round(x, 2) for x in os.getloadavg())}")
    for r in range(args.rounds):
        for n in args.slices:
            tmp = Path(tempfile.mkdtemp(prefix=f"lungnode-bench-latency-{n}-"))
            print(f"round {r + 1}, {n} slices (work folder {tmp})", flush=True)
            try:
                report(run_case(tmp, n, args.stable, args.timeout), args.stable)
            finally:
                if not args.keep:
                    shutil.rmtree(tmp, ignore_errors=True)
            print(f"   load {tuple(round(x, 2) for x in os.getloadavg())}", flush=True)


if __name__ == "__main__":
    main()
