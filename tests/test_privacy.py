"""No patient data in the logs: a real node receives, analyses, delivers and archives a real CT
series whose patient attributes are known unique strings, with every logger at DEBUG and
Python's warnings routed to logging, and none of the strings appears in any log line.

The same run checks what the audit log holds for it (who sent it, what went where, which
algorithm, the archive copy), that the node sealed it when it stopped, and that the archive
copy gives a patient over 89 the age 090Y.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from node.db import AuditEntry, Study
from node.redaction import redact_library_values
from node.service import Node
from node.settings import Settings
from node.work.audit import check
from tests.conftest import B40F
from tests.peers import StoreSCP, free_port, storescu, wait_for

SECRETS = {
    "PatientName": "Qorvexilian",  # one component: highdicom used to warn with it quoted
    "PatientID": "PID-7Q3XK9",
    "PatientBirthDate": "1927-03-11",  # not a DA: pydicom quotes invalid values in its warnings
    "AccessionNumber": "ACC-93JDW1",
    "OtherPatientIDs": "OTHER-4T1MZ8",
    "ReferringPhysicianName": "Brumbelquist",
}


class _Lines(logging.Handler):
    """Keeps every record, formatted with its exception text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(threadName)s: %(message)s"))
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.name, self.format(record)))


@pytest.fixture
def every_log_line() -> Iterator[_Lines]:
    """The root logger at DEBUG, every logger's own level cleared, warnings routed to logging.

    SQLAlchemy's loggers keep the WARNING level SQLAlchemy gives them: at INFO they echo every
    statement, which the node turns on only with ``[database] echo`` (and its database holds no
    patient data)."""
    handler = _Lines()
    root = logging.getLogger()
    levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
              if isinstance(lg, logging.Logger) and not name.startswith("sqlalchemy")}
    root_level = root.level
    for name in levels:
        logging.getLogger(name).setLevel(logging.NOTSET)
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            redact_library_values()  # what the CLI does when it sets up logging
            yield handler
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(root_level)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_no_patient_data_in_any_log_line(tmp_path: Path, db_url: str, every_log_line: _Lines,
                                         make_settings: Callable[..., Settings]) -> None:
    src = tmp_path / "study"
    src.mkdir()
    for path in sorted(B40F.iterdir()):
        ds = pydicom.dcmread(path)
        for keyword, value in SECRETS.items():
            setattr(ds, keyword, value)
        ds.PatientAge = "093Y"
        ds.save_as(src / path.name, enforce_file_format=True)
    port = free_port()
    with StoreSCP(tmp_path / "received", aet="RECEIVER") as receiver:
        settings = make_settings(
            db_url, port=port,
            peers=[{"name": "receiver", "ae_title": "RECEIVER", "host": "127.0.0.1", "port": receiver.port},
                   {"name": "ct", "ae_title": "STORESCU", "host": "127.0.0.1", "port": 104}],
            delivery={"destinations": ["receiver"]})
        node = Node(settings)
        node.start()
        try:
            storescu([src], "127.0.0.1", port, "LUNGNODE")
            received = receiver.wait_for_files(3, timeout=180)

            def archived() -> list[AuditEntry]:
                with node.sessions() as s:
                    return list(s.scalars(select(AuditEntry).where(
                        AuditEntry.action.in_(["archived", "archive-failed", "archive-refused"]))))

            wait_for(archived, 180, 0.1, "the archive copy")

            def sent() -> int:
                with node.sessions() as s:
                    return len(list(s.scalars(select(AuditEntry).where(
                        AuditEntry.action == "delivery-sent"))))

            wait_for(lambda: sent() == 3, 60, 0.1, "three deliveries recorded as sent")
        finally:
            node.stop()
    assert len(received) == 3

    lines = every_log_line.lines
    names = {name.split(".")[0] for name, _ in lines}
    assert {"node", "pynetdicom", "highdicom"} <= names, names  # the capture saw every layer
    leaks = [line for _, line in lines for secret in SECRETS.values() if secret.lower() in line.lower()]
    assert not leaks, "\n".join(leaks[:5])
    # the malformed birth date was seen, and reported without its value
    assert any("Invalid value for VR DA (value not logged)" in line for _, line in lines)

    with node.sessions() as s:
        study = s.scalars(select(Study)).one()
        rows = list(s.scalars(select(AuditEntry).where(AuditEntry.study_id == study.id)
                              .order_by(AuditEntry.id)))
        actions = [r.action for r in rows]
        result = check(s)
    assert result.intact and result.unsealed == 0  # sealed when the node stopped
    assert {"received", "analysed", "archived"} <= set(actions) and actions.count("delivery-sent") == 3
    receipt = next(r for r in rows if r.action == "received")
    assert receipt.actor == "scp:STORESCU" and "30 instances of study" in (receipt.detail or "")
    assert all("to receiver (RECEIVER@127.0.0.1:" in (r.detail or "")
               for r in rows if r.action == "delivery-sent")
    copy = next((settings.archive_root).rglob("*.dcm"))
    assert pydicom.dcmread(copy, stop_before_pixels=True).PatientAge == "090Y"
    for row in rows:
        assert not any(secret.lower() in (row.detail or "").lower() for secret in SECRETS.values())
