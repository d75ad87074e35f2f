"""Load: several DCMTK storescu senders at once while the workers analyse, with Orthanc as the peer.

Each of ``--senders`` storescu processes sends ``--studies`` synthetic studies of ``--slices``
512x512 slices (written once by ``lungnode synth`` and cached under ``--cache``) over one
association, all senders at the same time, into a ``lungnode serve`` with its default
configuration (fsync on, the CNN, one worker, warm-up) except ``stable_seconds`` (short, so the
workers analyse while the senders still send) and the database.  The node's results go to a
DCMTK storescp that writes every copy under a name of its own.  Then the same senders send the
same files into Orthanc (``tests.peers.Orthanc``), in the same run.

Printed: instances per second for both receivers and their ratio, the longest and the 99th
percentile C-STORE response time each sender saw (storescu's log, timestamped to the
millisecond: from "Sending Store Request" to "Received Store Response"), the node's queue
length sampled every second (queued and running jobs, studies finished), and the checks: every
acknowledged instance in the database and on disk (its file, its size), every study analysed
once (one job made its results) and delivered once (database and receiver).

    .venv/bin/python benchmarks/bench_load.py [--senders 4 --studies 5 --slices 300]
        [--database sqlite|postgresql] [--stable-seconds 3] [--cache /tmp/lungnode-bench-load]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from tests.peers import Orthanc, StoreSCP, echoscu, free_port  # noqa: E402

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
LOG_CONFIG = """\
log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%H:%M:%S.%q} %m%n
"""
_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) (.*)$")


# -- data -----------------------------------------------------------------------------------------
def make_data(cache: Path, count: int, slices: int) -> list[Path]:
    """``count`` studies from ``lungnode synth`` (cached); their DICOM folders."""
    dirs = []
    for k in range(count):
        study = cache / f"s{slices}-{k:02d}"
        if not (study / "done").exists():
            shutil.rmtree(study, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "node.cli", "synth", str(study), "--slices", str(slices),
                            "--seed", str(500 + k), "--involvement", f"{(k % 10) / 10:.1f}"],
                           cwd=REPO, check=True, capture_output=True)
            sops = {str(p.relative_to(study)): str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                    for p in sorted((study / "dicom").iterdir())}
            (study / "sops.json").write_text(json.dumps(sops))
            (study / "done").touch()
        dirs.append(study)
    return dirs


def sop_of(studies: list[Path]) -> dict[str, str]:
    """Absolute file path -> SOP Instance UID, for every file of the studies."""
    out = {}
    for study in studies:
        for rel, uid in json.loads((study / "sops.json").read_text()).items():
            out[str(study / rel)] = uid
    return out


# -- senders --------------------------------------------------------------------------------------
@dataclass
class SendResult:
    seconds: float
    acknowledged: set[str] = field(default_factory=set)
    """Files answered with Success."""
    refused: int = 0
    response_ms: list[float] = field(default_factory=list)


def _ms(match: re.Match[str]) -> float:
    h, m, s, ms = (int(match.group(i)) for i in range(1, 5))
    return ((h * 60 + m) * 60 + s) * 1000.0 + ms


def parse_storescu_log(text: str, into: SendResult) -> None:
    current: str | None = None
    sent_at: float | None = None
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        message = match.group(5)
        if message.startswith("Sending file: "):
            current = message[len("Sending file: "):].strip()
        elif message.startswith("Sending Store Request"):
            sent_at = _ms(match)
        elif message.startswith("Received Store Response") and sent_at is not None:
            into.response_ms.append((_ms(match) - sent_at) % 86_400_000)
            sent_at = None
            if "(Success)" in message and current is not None:
                into.acknowledged.add(current)
            else:
                into.refused += 1


def send_all(groups: list[list[Path]], port: int, aet: str, work: Path) -> SendResult:
    """One storescu per group (its studies over one association), all at once; timed from the
    first start to the last exit."""
    config = work / "storescu-log.cfg"
    config.write_text(LOG_CONFIG)
    env = dict(os.environ, TCP_NODELAY="1")
    logs = [work / f"storescu-{aet}-{i}.log" for i in range(len(groups))]
    t0 = time.perf_counter()
    procs = []
    for group, log in zip(groups, logs, strict=True):
        with log.open("wb") as out:
            procs.append(subprocess.Popen(
                ["storescu", "-lc", str(config), "-aec", aet, "-aet", "STORESCU", "+sd", "+r", "-nh",
                 "127.0.0.1", str(port), *(str(s / "dicom") for s in group)],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    for p in procs:
        p.wait(3600)
    result = SendResult(time.perf_counter() - t0)
    for log in logs:
        parse_storescu_log(log.read_text(errors="replace"), result)
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


# -- the node -------------------------------------------------------------------------------------
def write_node_config(path: Path, port: int, db_url: str, storage: Path, receiver_port: int,
                      stable_seconds: float) -> None:
    path.write_text("\n".join([
        "log_level = 'INFO'",
        "[dicom]", "host = '127.0.0.1'", f"port = {port}", "max_associations = 16",
        "[storage]", f"root = '{storage}'", "min_free_mb = 1000",
        "[database]", f"url = '{db_url}'",
        "[completion]", f"stable_seconds = {stable_seconds}", "poll_seconds = 1.0",
        "[web]", "enabled = false",
        "[delivery]", "destinations = ['receiver']",
        "[[peers]]", "name = 'ct'", "ae_title = 'STORESCU'", "host = '127.0.0.1'", "port = 104",
        "[[peers]]", "name = 'receiver'", "ae_title = 'RECEIVER'", "host = '127.0.0.1'",
        f"port = {receiver_port}",
    ]) + "\n")


class Sampler(threading.Thread):
    """Every second: queued and running jobs, studies finished (their state is past analysis)."""

    def __init__(self, db_url: str, t0: float) -> None:
        super().__init__(daemon=True)
        self.engine = sa.create_engine(db_url)
        self.t0 = t0
        self.samples: list[tuple[float, int, int, int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                with self.engine.connect() as c:
                    jobs: dict[str, int] = {str(k): int(v) for k, v in c.exec_driver_sql(
                        "SELECT state, count(*) FROM jobs GROUP BY state").all()}
                    done = c.exec_driver_sql(
                        "SELECT count(*) FROM studies WHERE state IN "
                        "('complete', 'delivering', 'delivered', 'rejected', 'failed')").scalar() or 0
                    instances = c.exec_driver_sql("SELECT count(*) FROM instances").scalar() or 0
            except sa.exc.OperationalError:
                continue
            self.samples.append((time.perf_counter() - self.t0, int(jobs.get("queued", 0)),
                                 int(jobs.get("running", 0)), int(done), int(instances)))


def wait_node(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    end = time.monotonic() + 180
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited: {log.read_text()[-3000:]}")
        text = log.read_bytes()
        # ready, and the warm-up analysis (a default) over: it would compete with the first C-STOREs
        if (b" ready (" in text and (b"warm-up analysis" in text or b"(0 workers)" in text)
                and echoscu("127.0.0.1", port, "LUNGNODE", "STORESCU", check=False).returncode == 0):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the node did not start: {log.read_text()[-3000:]}")


def check_node(db_url: str, storage: Path, acknowledged: set[str], studies: int,
               received: list[Path]) -> list[str]:
    """The checks, as printable lines (an ``AssertionError`` names the first that fails)."""
    eng = sa.create_engine(db_url)
    with eng.connect() as c:
        rows = {uid: (path, size) for uid, path, size in c.exec_driver_sql(
            "SELECT sop_instance_uid, path, size_bytes FROM instances")}
        counted = int(c.exec_driver_sql("SELECT sum(instance_count) FROM studies").scalar() or 0)
        producers = c.exec_driver_sql(
            "SELECT study_id, count(DISTINCT job_id), count(*) FROM result_objects GROUP BY study_id").all()
        jobs_per_study = Counter(sid for (sid,) in c.exec_driver_sql("SELECT study_id FROM jobs"))
        deliveries = Counter(state for (state,) in c.exec_driver_sql("SELECT state FROM deliveries"))
        result_uids = {u for (u,) in c.exec_driver_sql("SELECT sop_instance_uid FROM result_objects")}
    eng.dispose()
    missing = acknowledged - set(rows)
    assert not missing, f"{len(missing)} acknowledged instances are not in the database"
    bad_files = [uid for uid in acknowledged if not (storage / rows[uid][0]).is_file()
                 or (storage / rows[uid][0]).stat().st_size != rows[uid][1]]
    assert not bad_files, f"{len(bad_files)} acknowledged instances' files differ from their rows"
    assert counted == len(rows), f"study counters say {counted}, instance rows {len(rows)}"
    assert len(producers) == studies, f"{len(producers)} of {studies} studies have results"
    twice = [sid for sid, jobs, objects in producers if jobs != 1 or objects != 3]
    assert not twice, f"studies {twice} were reported on by more than one job"
    got = Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received)
    assert set(got) == result_uids, "the receiver's objects are not the results"
    twice_sent = [u for u, n in got.items() if n > 1]
    assert not twice_sent, f"delivered more than once: {twice_sent}"
    return [
        f"{len(acknowledged)} acknowledged instances: every one in the database and on disk (file size "
        f"= recorded size); study counters = {counted} rows",
        f"{studies} studies, each reported on by one job ({sum(jobs_per_study.values())} jobs in all; "
        f"{sum(1 for n in jobs_per_study.values() if n > 1)} studies had more than one)",
        f"deliveries: {dict(deliveries)}; the receiver got {len(got)} objects, each once",
    ]


def run_node(studies: list[Path], groups: list[list[Path]], work: Path, db_url: str,
             stable_seconds: float, sops: dict[str, str]) -> tuple[SendResult, Sampler, float, list[str]]:
    port = free_port()
    storage = work / "node-storage"
    config = work / "node.toml"
    log = work / "node.log"
    with StoreSCP(work / "received", aet="RECEIVER", extra_args=("+uf",)) as receiver:
        write_node_config(config, port, db_url, storage, receiver.port, stable_seconds)
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
                                    cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            wait_node(port, proc, log)
            t0 = time.perf_counter()
            sampler = Sampler(db_url, t0)
            sampler.start()
            sent = send_all(groups, port, "LUNGNODE", work)
            expected = len(studies) * 3
            end = time.monotonic() + 3600
            eng = sa.create_engine(db_url)
            while time.monotonic() < end:
                with eng.connect() as c:
                    n_sent = c.exec_driver_sql(
                        "SELECT count(*) FROM deliveries WHERE state = 'sent'").scalar()
                if n_sent == expected and len(receiver.files()) >= expected:
                    break
                time.sleep(0.5)
            eng.dispose()
            all_done = time.perf_counter() - t0
            sampler.stop.set()
            sampler.join()
        finally:
            proc.terminate()
            proc.wait(60)
        acknowledged = {sops[f] for f in sent.acknowledged}
        checks = check_node(db_url, storage, acknowledged, len(studies), receiver.files())
    return sent, sampler, all_done, checks


def fresh_pg_schema() -> tuple[str, str]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with sa.create_engine(PG).begin() as c:
        c.exec_driver_sql(f"CREATE SCHEMA {schema}")
    return schema, f"{PG}?options=-csearch_path%3D{schema}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--studies", type=int, default=5, help="studies per sender")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--stable-seconds", type=float, default=3.0)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lungnode-bench-load")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    studies = make_data(args.cache, args.senders * args.studies, args.slices)
    sops = sop_of(studies)
    total = len(sops)
    size_mb = sum(f.stat().st_size for s in studies for f in (s / "dicom").iterdir()) / 1e6
    print(f"{args.senders} senders x {args.studies} studies x {args.slices} slices of 512x512 = {total} "
          f"instances ({size_mb:.0f} MB; data ready in {time.perf_counter() - t0:.0f} s, cached in "
          f"{args.cache})")
    groups = [studies[i * args.studies:(i + 1) * args.studies] for i in range(args.senders)]
    work = Path(tempfile.mkdtemp(prefix="lungnode-bench-load-"))
    schema = None
    try:
        with Orthanc(work / "orthanc", tcp_nodelay=True) as orthanc:
            peer = send_all(groups, orthanc.dicom_port, orthanc.aet, work)
            peer_count = orthanc.count_instances()
        assert peer_count == total, f"Orthanc holds {peer_count} of {total}"
        shutil.rmtree(work / "orthanc", ignore_errors=True)
        if args.database == "postgresql":
            schema, db_url = fresh_pg_schema()
        else:
            db_url = f"sqlite:///{work / 'node.db'}"
        node, sampler, all_done, checks = run_node(studies, groups, work, db_url, args.stable_seconds, sops)

        print(f"\nnode: lungnode serve, defaults (fsync on, CNN on, 1 worker), {args.database}, "
              f"stable_seconds {args.stable_seconds:g}; Orthanc 1.10.1 (no fsync); storescu TCP_NODELAY=1")
        print(f"{'receiver':10} {'acked':>6} {'refused':>7} {'inst/s':>7} {'max C-STORE ms':>15} "
              f"{'p99 ms':>7}")
        for name, r in (("Orthanc", peer), ("node", node)):
            print(f"{name:10} {len(r.acknowledged):6d} {r.refused:7d} {len(r.acknowledged) / r.seconds:7.0f} "
                  f"{max(r.response_ms):15.0f} {percentile(r.response_ms, 0.99):7.1f}")
        print(f"ratio node time / Orthanc time (ingest, the node's worker analysing meanwhile): "
              f"{node.seconds / peer.seconds:.2f}")
        print(f"node: all {len(studies)} studies analysed and delivered {all_done:.0f} s after the first "
              f"C-STORE (ingest took {node.seconds:.0f} s)")
        print("\nqueue (every second: t s, queued jobs, running jobs, studies finished, instances)")
        for t, queued, running, done, instances in sampler.samples:
            print(f"  {t:5.0f} {queued:3d} {running:2d} {done:3d} {instances:6d}")
        print("\nchecks:")
        for line in checks:
            print(f"  {line}")
    finally:
        if schema is not None:
            with sa.create_engine(PG).begin() as c:
                c.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
