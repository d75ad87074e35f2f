"""The command line as an administrator uses it, on real files and sockets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pydicom
import pytest

from node.web.app import WebServer
from tests.conftest import B40F, CT_STUDY, write_config
from tests.peers import StoreSCP, free_port

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, config: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "node.cli"]
    if config is not None:
        cmd += ["--config", str(config)]
    res = subprocess.run(cmd + list(args), cwd=REPO, capture_output=True, text=True, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(
            f"lungnode {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "lungnode.toml", {
        "dicom": {"host": "127.0.0.1", "port": free_port()},
        "storage": {"root": "storage", "min_free_mb": 1},
        "database": {"url": "sqlite:///db/lungnode.db"},
        "web": {"enabled": False},
    }, [{"name": "receiver", "ae_title": "RECEIVER", "host": "127.0.0.1", "port": free_port()}])


def test_db_upgrade_is_idempotent_and_config_show_hides_nothing_but_passwords(config: Path) -> None:
    run_cli("db", "upgrade", config=config)
    run_cli("db", "upgrade", config=config)
    assert (config.parent / "db" / "lungnode.db").exists()
    shown = json.loads(run_cli("config", "show", config=config).stdout)
    assert shown["dicom"]["ae_title"] == "LUNGNODE"
    assert shown["peers"][0]["name"] == "receiver"
    assert shown["storage"]["root"] == str(config.parent / "storage")


def test_bad_configuration_exits_with_the_reason(tmp_path: Path) -> None:
    bad = write_config(tmp_path / "bad.toml", {"dicom": {"port": "eleven"}})
    res = run_cli("config", "show", config=bad, check=False)
    assert res.returncode == 2
    assert "port" in res.stderr


def _lungnode(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``lungnode ARGS`` exactly as typed, with extra environment variables."""
    return subprocess.run([sys.executable, "-m", "node.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


def test_db_upgrade_takes_config_after_the_command_and_only_it_reports_the_schema(
        config: Path) -> None:
    first = _lungnode("db", "upgrade", "--config", str(config))
    assert first.returncode == 0, first.stderr
    assert "upgraded to head" in first.stdout
    again = _lungnode("db", "upgrade", "--config", str(config))
    assert again.returncode == 0 and "already at head" in again.stdout
    # other commands open the database quietly when no migration ran
    listed = _lungnode("studies", "--json", env={"LUNGNODE_CONFIG": str(config)})
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    assert "schema" not in listed.stderr
    shown = _lungnode("config", "show", "--config", str(config))
    assert shown.returncode == 0 and "schema" not in shown.stderr


def test_error_messages_keep_the_section_names(tmp_path: Path) -> None:
    bad = write_config(tmp_path / "bad.toml", {"delivery": {"destinations": ["nowhere"]}}, [])
    res = run_cli("config", "show", config=bad, check=False)
    assert res.returncode == 2
    assert "[delivery] destinations ['nowhere'] are not names of [[peers]]" in res.stderr


def test_retry_goes_through_the_state_table(config: Path) -> None:
    from node.db import Study, StudyState, make_engine, make_session_factory
    from node.settings import load_settings

    run_cli("db", "upgrade", config=config)
    sessions = make_session_factory(make_engine(load_settings(config).database.url))
    with sessions() as s:
        queued = Study(study_instance_uid="1.2.826.0.1.7", state=StudyState.QUEUED)
        failed = Study(study_instance_uid="1.2.826.0.1.8", state=StudyState.FAILED)
        s.add_all([queued, failed])
        s.commit()
        ids = queued.id, failed.id
    res = run_cli("retry", str(ids[0]), config=config, check=False)
    assert res.returncode == 1 and "queued -> queued is not allowed" in res.stderr
    assert f"study {ids[1]} queued as job" in run_cli("retry", str(ids[1]), config=config).stdout


def test_send_echo_and_unknown_peer(config: Path, tmp_path: Path) -> None:
    port = int(json.loads(run_cli("config", "show", config=config).stdout)["peers"][0]["port"])
    out = tmp_path / "received"
    out.mkdir()
    with StoreSCP(out, port=port, aet="RECEIVER"):
        run_cli("echo", "receiver", config=config)
        res = run_cli("send", str(B40F), "--to", "receiver", config=config)
        assert "sent 30 of 30" in res.stdout
    got = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
           for p in out.rglob("*") if p.is_file()}
    want = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in B40F.iterdir()}
    assert got == want
    res = run_cli("send", str(B40F), "--to", "nowhere", config=config, check=False)
    assert res.returncode == 2 and "no peer named 'nowhere'" in res.stderr
    # the receiver is gone now: a clear error, non-zero exit
    res = run_cli("echo", "receiver", config=config, check=False)
    assert res.returncode == 1 and "did not accept" in res.stderr


def test_studies_show_deliveries_on_an_empty_and_unknown_study(config: Path) -> None:
    assert "Study Instance UID" in run_cli("studies", config=config).stdout
    assert json.loads(run_cli("studies", "--json", config=config).stdout) == []
    res = run_cli("show", "1.2.3", config=config, check=False)
    assert res.returncode == 1 and "no study" in res.stderr
    assert json.loads(run_cli("deliveries", "--json", config=config).stdout) == []
    res = run_cli("deliveries", "retry", "42", config=config, check=False)
    assert res.returncode == 1 and "no delivery with id 42" in res.stderr


def test_synth_writes_a_study_with_truth(tmp_path: Path) -> None:
    res = run_cli("synth", str(tmp_path / "s"), "--involvement", "0.3", "--seed", "5",
                  "--rows", "128", "--slices", "24", "--thickness", "5")
    info = json.loads(res.stdout)
    assert info["files"] == 24
    truth = json.loads(Path(info["truth"]).read_text())
    assert truth["study_instance_uid"] == info["study_instance_uid"]
    assert truth["spec"]["contrast"] is False
    res = run_cli("synth", str(tmp_path / "c"), "--rows", "64", "--slices", "4", "--contrast")
    assert json.loads(Path(json.loads(res.stdout)["truth"]).read_text())["spec"]["contrast"] is True
    res = run_cli("synth", str(tmp_path / "t"), "--involvement", "3", check=False)
    assert res.returncode == 2


def test_analyze_the_real_study(tmp_path: Path) -> None:
    res = run_cli("analyze", str(CT_STUDY), "--out", str(tmp_path / "out"))
    result = json.loads(res.stdout)
    b40f_series = pydicom.dcmread(next(B40F.iterdir()), stop_before_pixels=True).SeriesInstanceUID
    assert result["series_instance_uid"] == b40f_series
    assert "B40f" in result["selection_reason"]
    assert 2500 < result["lung_volume_ml"]["total"] < 8000
    # both lungs found (the right one holds the tumour, so it measures less here)
    assert 700 < result["lung_volume_ml"]["left"] < 4500
    assert 700 < result["lung_volume_ml"]["right"] < 4500
    assert set(result["percent_opacity"]) == {"left", "right", "total"}
    assert result["severity_category"] in {"CT-0", "CT-1"}
    for kind in ("sr", "seg", "summary"):
        path = Path(result["outputs"][kind])
        proc = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True)
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], f"{kind}: {errors}"


def test_analyze_refuses_a_folder_without_an_analysable_series(tmp_path: Path) -> None:
    src = tmp_path / "three"
    src.mkdir()
    for f in sorted(B40F.iterdir())[:3]:
        (src / f.name).write_bytes(f.read_bytes())
    res = run_cli("analyze", str(src), "--out", str(tmp_path / "out"), check=False)
    assert res.returncode == 1
    assert "3 slices; at least 20" in res.stderr


def test_web_page_lists_studies(tmp_path: Path) -> None:
    from node.db import Study, make_engine, make_session_factory
    from node.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(url)
    sessions = make_session_factory(make_engine(url))
    with sessions() as s:
        s.add(Study(study_instance_uid="1.2.826.0.1.99", reason="refused: <script>x</script>"))
        s.commit()
    web = WebServer("127.0.0.1", 0, sessions)
    web.start()
    try:
        page = urllib.request.urlopen(f"http://127.0.0.1:{web.port}/").read().decode()
        assert "1.2.826.0.1.99" in page and "<script>x" not in page
        rows = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{web.port}/api/studies").read())
        assert rows[0]["state"] == "receiving"
    finally:
        web.stop()


@pytest.mark.parametrize("taken_port", ["dicom", "web"])
def test_serve_on_a_port_in_use_exits_with_the_reason(tmp_path: Path, taken_port: str) -> None:
    """A port another program holds stops `serve` with a message naming that port and its key."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        other = free_port()
        dicom_port, web_port = (port, other) if taken_port == "dicom" else (other, port)
        cfg = write_config(tmp_path / "lungnode.toml", {
            "dicom": {"host": "127.0.0.1", "port": dicom_port},
            "storage": {"root": "storage", "min_free_mb": 1},
            "database": {"url": "sqlite:///db/lungnode.db"},
            "worker": {"count": 0, "warm_up": False},
            "web": {"enabled": True, "host": "127.0.0.1", "port": web_port},
            "model": {"enabled": False},
        }, [])
        res = run_cli("serve", config=cfg, check=False)
    assert res.returncode == 2
    what = "DICOM listener" if taken_port == "dicom" else "web page"
    assert "cannot start" in res.stderr and f"{what} cannot listen on 127.0.0.1:{port}" in res.stderr
    assert f"[{taken_port}] port" in res.stderr
    assert "Traceback" not in res.stderr
