"""Fuzz a running ``lungnode serve`` with a few thousand hostile cases; print its memory before and after.

The cases are those of ``tests/test_fuzz.py`` (hypothesis strategies, derandomized):
C-STORE data sets (truncated, byte-mutated, huge declared lengths, pixel data not
matching the image, Number of Frames 10^9, other transfer syntaxes, a deflated data set
inflating past the bound) and raw association traffic (wrong lengths, oversized and
cut-short PDUs, garbage, silent clients).  The node runs as its own process (receive
only, SQLite); the figure is the resident set of that process and its children, after
a warm-up of normal traffic, before and after the cases, and after a normal storescu
at the end (which must succeed).

    .venv/bin/python benchmarks/bench_fuzz.py [--cases 2000]
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian  # noqa: E402

from tests.dcmtk import free_port, storescu  # noqa: E402
from tests.raw_dul import RawAssociation, read_pdu  # noqa: E402
from tests.test_fuzz import _BASE, FILES, data_sets, traffic  # noqa: E402


def rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    total = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
    return total / 2**20


def start_node(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cfg = tmp / "node.toml"
    cfg.write_text("\n".join([
        "log_level = 'ERROR'",
        "[dicom]", "host = '127.0.0.1'", f"port = {port}", "request_timeout = 2.0",
        "[storage]", f"root = '{tmp / 'storage'}'", "min_free_mb = 100", "fsync = false",
        "max_inflated_mb = 16",
        "[database]", f"url = 'sqlite:///{tmp / 'node.db'}'",
        "[completion]", "stable_seconds = 100000",
        "[worker]", "count = 0", "warm_up = false",
        "[web]", "enabled = false",
        "[[peers]]", "name = 'ct'", "ae_title = 'STORESCU'", "host = '127.0.0.1'", "port = 104",
        "[[peers]]", "name = 'pacs'", "ae_title = 'PACS'", "host = '127.0.0.1'", "port = 4242",
    ]) + "\n")
    subprocess.run([sys.executable, "-m", "node.cli", "db", "upgrade", "--config", str(cfg)],
                   cwd=REPO, check=True, capture_output=True)
    log = (tmp / "node.log").open("wb")
    proc = subprocess.Popen(  # its log: ERROR and above, with pynetdicom's tracebacks
[sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=log,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    while line and b"listening on" not in line:
        line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the node did not start: {(tmp / 'node.log').read_text()[-2000:]}")
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000, help="cases of each kind (data sets, traffic)")
    parser.add_argument("--log", type=Path, help="keep the node's log here")
    args = parser.parse_args()
    outcomes: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory(prefix="bench-fuzz-") as name:
        tmp = Path(name)
        proc, port = start_node(tmp)
        try:
            storescu(FILES[:10], "127.0.0.1", port, "LUNGNODE", calling_aet="STORESCU")  # warm-up
            before = rss_mb(proc.pid)
            bounded = settings(max_examples=args.cases, derandomize=True, deadline=None,
                               database=None, suppress_health_check=list(HealthCheck))

            @bounded
            @given(case=data_sets())
            def store(case: tuple[str, bytes, str]) -> None:
                syntax, body, _label = case
                assoc = RawAssociation.open(port, "PACS", [(1, CTImageStorage, [syntax])])
                try:
                    status = assoc.c_store(1, CTImageStorage, _BASE.SOPInstanceUID, body)
                finally:
                    assoc.release()
                outcomes["c-store " + ("abort" if status is None else f"{status:#06x}")] += 1

            @bounded
            @given(case=traffic())
            def talk(case: tuple[bytes, bool, str]) -> None:
                data, half_close, _label = case
                if data.startswith(b"AC"):
                    assoc = RawAssociation.open(port, "PACS",
                                                [(1, CTImageStorage, [ExplicitVRLittleEndian])])
                    sock = assoc.sock
                    sock.sendall(data[2:])
                else:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                    sock.sendall(data)
                try:
                    if half_close:
                        sock.shutdown(socket.SHUT_WR)
                    try:
                        kind, _ = read_pdu(sock)
                        outcomes[f"traffic pdu {kind:#04x}"] += 1
                    except ConnectionError:
                        outcomes["traffic closed"] += 1
                finally:
                    sock.close()

            t0 = time.perf_counter()
            store()
            middle = rss_mb(proc.pid)
            talk()
            elapsed = time.perf_counter() - t0
            after = rss_mb(proc.pid)
            res = storescu(FILES[10:12], "127.0.0.1", port, "LUNGNODE", calling_aet="STORESCU")
            final = rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
            if args.log is not None:
                args.log.write_bytes((tmp / "node.log").read_bytes())
    print(f"cases: {args.cases} data sets + {args.cases} association exchanges in {elapsed:.0f} s")
    for key, n in sorted(outcomes.items()):
        print(f"  {key}: {n}")
    print(f"node resident set: {before:.0f} MB before, {middle:.0f} MB after the data sets, "
          f"{after:.0f} MB after the traffic, {final:.0f} MB after a normal storescu "
          f"(exit {res.returncode})")


if __name__ == "__main__":
    main()
