"""Ingest side by side: DCMTK storescu into Orthanc and into lungnode, same data, same run.

Prints instances per second for each receiver and the ratio node time /
Orthanc time (<= 1.0 means the node is at least as fast), for one sender and
four concurrent senders, with and without TCP_NODELAY on the DCMTK side, for
SQLite and PostgreSQL, plus the node's own SCU delivering into Orthanc next to
storescu doing the same.

Durability differs between the peers and is printed with the figures: Orthanc
1.10.1 never fsyncs the files of its storage area (it has no option for it),
while the node's default (``[storage] fsync = true``) flushes every file
before acknowledging it.  Each node case therefore runs twice: with
``fsync = false`` (what Orthanc does: an acknowledged instance survives a crash
of the receiving process, not a power loss) and with the default.  The node
receives in its one ``serve`` process.

    .venv/bin/python benchmarks/bench_ingest.py [--studies 3 --slices 240] [--skip-postgres]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402

from tests.peers import Orthanc, free_port  # noqa: E402
from training.synth import SynthSpec, write_study  # noqa: E402

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def make_data(root: Path, studies: int, slices: int) -> list[Path]:
    files: list[Path] = []
    for k in range(studies):
        study = write_study(root / f"study{k}", SynthSpec(involvement=0.1 * k, seed=100 + k,
                                                          slices=slices, rows=512,
                                                          slice_thickness_mm=1.25))
        files.extend(study.paths)
    return files


def split_dirs(files: list[Path], root: Path, parts: int) -> list[Path]:
    dirs = []
    for i in range(parts):
        d = root / f"part{i}"
        d.mkdir(parents=True, exist_ok=True)
        for f in files[i::parts]:
            os.link(f, d / f"{f.parent.parent.name}-{f.name}")
        dirs.append(d)
    return dirs


def storescu_time(dirs: list[Path], port: int, aet: str, nodelay: bool) -> float:
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aec", aet, "-aet", "STORESCU", "+sd", "127.0.0.1",
                               str(port), str(d)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for d in dirs]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-2000:]}")
    return time.perf_counter() - t0


@contextmanager
def lungnode(tmp: Path, db_url: str, orthanc: Orthanc | None = None, *,
             fsync: bool | None = None, max_pdu: int | None = None) -> Iterator[tuple[int, str]]:
    """``lungnode serve`` with its defaults except where given (None: the default)."""
    port = free_port()
    peers = [("STORESCU", 104)]
    cfg = tmp / f"node-{uuid.uuid4().hex[:6]}.toml"
    lines = [
        "log_level = 'WARNING'",
        "[dicom]", "host = '127.0.0.1'", f"port = {port}", "max_associations = 16",
        *([f"max_pdu = {max_pdu}"] if max_pdu is not None else []),
        "[storage]", f"root = '{tmp / ('storage-' + cfg.stem)}'", "min_free_mb = 100",
        *([f"fsync = {str(fsync).lower()}"] if fsync is not None else []),
        "[database]", f"url = '{db_url}'",
        "[completion]", "stable_seconds = 100000",
        "[worker]", "count = 0",
        "[web]", "enabled = false",
        "[delivery]", "destinations = []",
    ]
    for aet, p in peers:
        lines += ["[[peers]]", f"name = '{aet.lower()}'", f"ae_title = '{aet}'",
                  "host = '127.0.0.1'", f"port = {p}"]
    if orthanc is not None:
        lines += ["[[peers]]", "name = 'orthanc'", f"ae_title = '{orthanc.aet}'",
                  "host = '127.0.0.1'", f"port = {orthanc.dicom_port}"]
    cfg.write_text("\n".join(lines) + "\n")
    log = tmp / f"{cfg.stem}.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=log_file,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        # `serve` prints its "listening" line once every receiver process listens
        assert proc.stdout is not None
        line = proc.stdout.readline()
        while line and b"listening on" not in line:
            line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"node did not start: {log.read_text()[-2000:]}")
        if subprocess.run(["echoscu", "-aec", "LUNGNODE", "-aet", "STORESCU", "127.0.0.1",
                           str(port)], capture_output=True).returncode != 0:
            raise RuntimeError(f"node does not answer C-ECHO: {log.read_text()[-2000:]}")
        yield port, str(cfg)
    finally:
        proc.terminate()
        proc.wait(30)


def node_count(db_url: str) -> int:
    """Instances recorded by the node; checks that the study counters agree."""
    eng = sa.create_engine(db_url)
    with eng.connect() as c:
        n = int(c.exec_driver_sql("SELECT count(*) FROM instances").scalar() or 0)
        counted = int(c.exec_driver_sql("SELECT sum(instance_count) FROM studies").scalar() or 0)
    eng.dispose()
    assert counted == n, f"study counters say {counted}, instance rows {n}"
    return n


def _pg_setting(name: str) -> str:
    try:
        with sa.create_engine(PG).connect() as c:
            return str(c.exec_driver_sql(f"SHOW {name}").scalar())
    except sa.exc.OperationalError:
        return "(PostgreSQL not reachable)"


_SCHEMAS: list[str] = []


def fresh_pg_schema() -> str:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with sa.create_engine(PG).begin() as c:
        c.exec_driver_sql(f"CREATE SCHEMA {schema}")
    _SCHEMAS.append(schema)
    return f"{PG}?options=-csearch_path%3D{schema}"


def drop_pg_schemas() -> None:
    if _SCHEMAS:
        with sa.create_engine(PG).begin() as c:
            for schema in _SCHEMAS:
                c.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=3)
    ap.add_argument("--slices", type=int, default=240)
    ap.add_argument("--skip-postgres", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lungnode-bench-"))
    try:
        t0 = time.perf_counter()
        files = make_data(tmp / "data", args.studies, args.slices)
        n = len(files)
        print(f"{n} instances of 512x512 CT from the generator ({time.perf_counter() - t0:.0f} s to make)")
        one = split_dirs(files, tmp / "one", 1)
        four = split_dirs(files, tmp / "four", 4)
        rows: list[tuple[str, float, float]] = []

        def orthanc_run(dirs: list[Path], nodelay: bool) -> float:
            with Orthanc(tmp / f"orthanc-{uuid.uuid4().hex[:6]}", tcp_nodelay=nodelay) as o:
                t = storescu_time(dirs, o.dicom_port, o.aet, nodelay)
                count = len(o.get("/instances"))
                assert count == n, f"Orthanc holds {count} of {n}"
            return t

        def node_run(dirs: list[Path], nodelay: bool, db_url: str, fsync: bool | None) -> float:
            with lungnode(tmp, db_url, fsync=fsync) as (port, _):
                t = storescu_time(dirs, port, "LUNGNODE", nodelay)
            count = node_count(db_url)
            assert count == n, f"node recorded {count} of {n}"
            return t

        def sqlite_url() -> str:
            return f"sqlite:///{tmp / ('n-' + uuid.uuid4().hex[:6] + '.db')}"

        dbs = [("SQLite", sqlite_url)] + ([] if args.skip_postgres else [("PostgreSQL", fresh_pg_schema)])
        cases = [("1 sender, TCP_NODELAY=1", one, True),
                 ("4 senders, TCP_NODELAY=1", four, True),
                 ("1 sender, no TCP_NODELAY", one, False)]
        for label, dirs, nodelay in cases:
            t_o = orthanc_run(dirs, nodelay)
            for db_name, url in dbs if nodelay else dbs[:1]:
                for fsync in ((False, None) if nodelay else (None,)):
                    how = "fsync=true (default)" if fsync is None else "fsync=false"
                    t_n = node_run(dirs, nodelay, url(), fsync)
                    rows.append((f"{label}, {db_name}, {how}", t_o, t_n))

        # the node as sender: `lungnode send` into Orthanc vs storescu into Orthanc
        with Orthanc(tmp / "orthanc-send", tcp_nodelay=True) as o:
            t_scu = storescu_time(one, o.dicom_port, o.aet, True)
        with Orthanc(tmp / "orthanc-send2", tcp_nodelay=True) as o, \
                lungnode(tmp, f"sqlite:///{tmp / 'send.db'}", o) as (_, cfg):
            t1 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "node.cli", "--config", cfg, "send", str(one[0]),
                            "--to", "orthanc"], cwd=REPO, check=True, capture_output=True)
            t_send = time.perf_counter() - t1
            assert len(o.get("/instances")) == n
        # the same SCU in process (what the node's outbox calls to deliver results): no CLI start
        from node.dicom.scu import send_files
        from node.settings import DicomSettings, Peer

        def send_direct(nodelay: bool) -> float:
            with Orthanc(tmp / f"orthanc-send-{uuid.uuid4().hex[:6]}", tcp_nodelay=nodelay) as o:
                peer = Peer(name="orthanc", ae_title=o.aet, host="127.0.0.1", port=o.dicom_port)
                t1 = time.perf_counter()
                sent = send_files(sorted(one[0].iterdir()), peer, DicomSettings())
                elapsed = time.perf_counter() - t1
                assert all(status == 0 for _, status, _ in sent), "Orthanc refused an instance"
                assert len(o.get("/instances")) == n
            return elapsed

        t_direct = send_direct(True)
        # into an Orthanc that keeps DCMTK's default (Nagle on, no TCP_NODELAY): storescu with its
        # default waits for delayed ACKs; the node's SCU must not
        with Orthanc(tmp / "orthanc-send-nagle", tcp_nodelay=False) as o:
            t_scu_nagle = storescu_time(one, o.dicom_port, o.aet, False)
        t_direct_nagle = send_direct(False)

        w = 72
        print(f"\n{'case':{w}} {'Orthanc inst/s':>15} {'node inst/s':>12} {'node/Orthanc time':>18}")
        for label, t_o, t_n in rows:
            print(f"{label:{w}} {n / t_o:15.0f} {n / t_n:12.0f} {t_n / t_o:18.2f}")
        print("every run checked: all instances in Orthanc's index / the node's database "
              "(rows and study counters)")
        print("durability: Orthanc 1.10.1 writes storage files without fsync (it has no option "
              "for it), its SQLite index with synchronous=NORMAL;\n"
              "  node fsync=false: file renamed into place and row committed before the ack, "
              "nothing flushed (SQLite synchronous=NORMAL, PostgreSQL synchronous_commit=off):\n"
              "    survives a crash of the node, not a power loss (Orthanc's level);\n"
              "  node fsync=true (the default): the file, its folder and the commit are also flushed to the "
              "device before the ack (SQLite synchronous=FULL, PostgreSQL synchronous_commit="
              + _pg_setting("synchronous_commit") + ")")
        head = f"{'storescu inst/s':>15} {'node inst/s':>12} {'node/storescu time':>18}"
        print(f"\n{'sender into Orthanc':45} {head}")
        print(f"{'1 association, node.dicom.scu.send_files':45} {n / t_scu:15.0f} {n / t_direct:12.0f} "
              f"{t_direct / t_scu:18.2f}")
        print(f"{'1 association, `lungnode send` (CLI)':45} {n / t_scu:15.0f} {n / t_send:12.0f} "
              f"{t_send / t_scu:18.2f}")
        print(f"{'send_files, Orthanc and storescu without TCP_NODELAY':45} {n / t_scu_nagle:15.0f} "
              f"{n / t_direct_nagle:12.0f} {t_direct_nagle / t_scu_nagle:18.2f}")
        print("(TCP_NODELAY=1 for Orthanc and storescu unless the row says otherwise; the CLI time "
              "includes starting the process, about 1 s; send_files is what the outbox runs)")
    finally:
        drop_pg_schemas()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
