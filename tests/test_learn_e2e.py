"""Retraining end to end through the real node.

Synthetic studies of several patients go to a running node over DICOM
(DCMTK storescu); the node analyses and archives them; an administrator
labels them with a CSV of accession numbers, freezes a dataset, trains a
candidate, and finds it in ``lungnode model list`` with a card that names the
dataset it was trained on.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select
from typer.testing import CliRunner

from node.cli import app
from node.db import RunState, Study, StudyState, UidMapping
from node.service import Node
from node.settings import Settings
from tests.dcmtk import wait_for
from tests.faults import killed_after_first_checkpoint
from tests.peers import free_port, storescu
from training.synth import SynthSpec, write_study

# (patient, involvement, label): two studies of P1 (one fold), classes 0-3 and a partial label
STUDIES = [
    ("P1", 0.0, "non-covid"), ("P1", 0.15, "mild"), ("P2", 0.35, "moderate"),
    ("P3", 0.6, "severe"), ("P4", 0.1, "covid-unknown"), ("P5", 0.0, "non-covid"),
]


def _cli(*args: str) -> dict | list:  # type: ignore[type-arg]
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_studies_received_labelled_frozen_trained(tmp_path: Path,
                                                 make_settings: Callable[..., Settings]) -> None:
    port = free_port()
    settings = make_settings(
        f"sqlite:///{tmp_path / 'node.db'}", port=port,
        peers=[{"name": "ct", "ae_title": "STORESCU", "host": "127.0.0.1", "port": 104}],
        model={"enabled": False},
        training={"folds": 3, "epochs": 2, "batch_size": 2, "min_new_labels": 1},
    )
    config = str(settings.config_path)
    folders = []
    for i, (patient, involvement, _label) in enumerate(STUDIES):
        synth = write_study(tmp_path / "src" / f"s{i}", SynthSpec(
            seed=700 + i, involvement=involvement, rows=64, slices=40, slice_thickness_mm=5.0,
            patient_id=patient, accession_number=f"E2E{i:03d}"))
        folders.append(synth.dicom_dir)
    node = Node(settings)
    node.start()
    try:
        for folder in folders:
            storescu([folder], "127.0.0.1", port, "LUNGNODE")

        def archived() -> bool:
            with node.sessions() as s:
                done = s.scalar(select(func.count(Study.id)).where(Study.state == StudyState.COMPLETE))
                mapped = s.scalar(select(func.count(func.distinct(UidMapping.study_id))))
            return done == len(STUDIES) and mapped == len(STUDIES)

        wait_for(archived, 300, 0.5, "every study analysed and archived")
    finally:
        node.stop()

    csv = tmp_path / "labels.csv"
    csv.write_text("study,severity\n" + "".join(f"E2E{i:03d},{label}\n"
                                                for i, (_p, _inv, label) in enumerate(STUDIES)))
    runner = CliRunner()
    imported = runner.invoke(app, ["label", "import", str(csv), "--config", config], catch_exceptions=False)
    assert imported.exit_code == 0, imported.output
    labels = _cli("label", "list", "--json", "--config", config)
    assert sorted(str(row["value"]) for row in labels) == sorted(label for *_x, label in STUDIES)

    manifest = _cli("dataset", "freeze", "--json", "--config", config)
    assert isinstance(manifest, dict)
    patients = {}
    for item in manifest["items"]:
        patients.setdefault(item["patient"], set()).add(item["fold"])
    assert len(patients) == 5 and all(len(f) == 1 for f in patients.values())

    result = _cli("train", "--json", "--config", config)
    assert isinstance(result, dict)
    models = _cli("model", "list", "--json", "--config", config)
    candidate = next(m for m in models if isinstance(m, dict) and m["name"] == result["candidate"])
    assert candidate["kind"] == "candidate"
    assert candidate["dataset_digest"] == manifest["digest"]
    runs = _cli("runs", "--json", "--config", config)
    assert [(r["state"], r["candidate"]) for r in runs] == [(RunState.SUCCEEDED.value, result["candidate"])]
    card = json.loads((settings.learn_root / "models" / f"{result['candidate']}.json").read_text())
    assert card["training"]["dataset_digest"] == manifest["digest"]

    # killed with SIGKILL right after its first checkpoint (from inside, by a logging handler),
    # then `lungnode train --resume`: the same weights as the uninterrupted run above
    killed = subprocess.run(killed_after_first_checkpoint("node.cli", "train", "--json", "--config", config),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    runs = _cli("runs", "--json", "--config", config)
    assert runs[-1]["state"] == RunState.RUNNING.value  # its lease is held by a process that is gone
    resumed = _cli("train", "--resume", str(runs[-1]["run"]), "--json", "--config", config)
    assert isinstance(resumed, dict) and resumed["run"] == runs[-1]["run"]
    assert resumed["weights_sha256"] == result["weights_sha256"]

    # the same command under torchrun: two processes, one run recorded by rank 0, one candidate
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--standalone",
                           str(Path(sys.executable).parent / "lungnode"), "train", "--json", "--epochs",
                           "1", "--config", config], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    distributed = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = _cli("runs", "--json", "--config", config)
    assert [r["state"] for r in runs] == [RunState.SUCCEEDED.value] * 3
    assert runs[2]["candidate"] == distributed["candidate"] != result["candidate"]
    assert (settings.learn_root / "models" / f"{distributed['candidate']}.json").is_file()

    # the schedule fires: a new label since the last run, so the slot is claimed and the run
    # freezes a dataset and trains in a niced child process (`python -m node.cli train --run N`)
    relabel = CliRunner().invoke(app, ["label", "set", "E2E005", "--severity", "mild", "--config", config])
    assert relabel.exit_code == 0, relabel.output
    scheduler = Node(settings, receive=False, work=False, schedule=False)
    scheduler.training_tick()
    assert len(scheduler.training_watchers) == 1
    scheduler.training_watchers[0].join(timeout=600)
    runs = _cli("runs", "--json", "--config", config)
    assert len(runs) == 4 and runs[3]["trigger"] == "schedule"
    assert runs[3]["state"] == RunState.SUCCEEDED.value, runs[3]["error"]
    assert runs[3]["dataset"] not in (None, runs[0]["dataset"])  # it froze its own dataset
    scheduler.training_tick()  # the same minute again, or no new labels: nothing starts
    assert len(scheduler.training_watchers) == 1
    scheduler.engine.dispose()
