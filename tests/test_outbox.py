"""The outbox against real receivers: down, refusing, then back."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.db import (
    AuditEntry,
    Delivery,
    DeliveryState,
    ResultObject,
    Study,
    make_engine,
    make_session_factory,
    utcnow,
)
from node.errors import DeliveryError
from node.migrate import upgrade
from node.outbox import backoff, deliver_due, retry_delivery
from node.settings import DeliverySettings, DicomSettings, Peer
from tests.conftest import B40F
from tests.peers import StoreSCP, free_port


@pytest.fixture
def outbox(db_url: str, tmp_path: Path) -> tuple[sessionmaker[Session], Path, list[int]]:
    """Three result objects (real DICOM files) with one pending delivery each."""
    upgrade(db_url)
    sessions = make_session_factory(make_engine(db_url))
    root = tmp_path / "storage"
    ids = []
    with sessions() as s:
        study = Study(study_instance_uid="1.2.3.4")
        s.add(study)
        s.flush()
        for i, f in enumerate(sorted(B40F.iterdir())[:3]):
            rel = f"results/1.2.3.4/v1/{i}.dcm"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / rel)
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            obj = ResultObject(study_id=study.id, version=1, kind=f"k{i}", sop_class_uid=ds.SOPClassUID,
                               sop_instance_uid=ds.SOPInstanceUID,
                               series_instance_uid=ds.SeriesInstanceUID, path=rel)
            s.add(obj)
            s.flush()
            d = Delivery(result_object_id=obj.id, destination="pacs")
            s.add(d)
            s.flush()
            ids.append(d.id)
        s.commit()
    return sessions, root, ids


def _states(sessions: sessionmaker[Session]) -> list[DeliveryState]:
    with sessions() as s:
        return [d.state for d in s.scalars(select(Delivery).order_by(Delivery.id))]


def test_backoff_doubles_and_is_capped() -> None:
    s = DeliverySettings(backoff_seconds=5, backoff_max_seconds=60)
    assert [backoff(n, s) for n in (1, 2, 3, 4, 5, 6)] == [5, 10, 20, 40, 60, 60]


def test_destination_down_then_back_gets_everything_once(outbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sessions, root, ids = outbox
    port = free_port()
    peers = {"pacs": Peer(name="pacs", ae_title="RECEIVER", host="127.0.0.1", port=port)}
    settings = DeliverySettings(destinations=["pacs"], backoff_seconds=30, max_attempts=5)
    dicom = DicomSettings(ae_title="LUNGNODE", network_timeout=5, acse_timeout=5)
    out = deliver_due(sessions, root, peers, dicom, settings, "me")
    assert (out.sent, out.failed) == (0, 3)
    assert _states(sessions) == [DeliveryState.PENDING] * 3
    with sessions() as s:
        d = s.get_one(Delivery, ids[0])
        assert d.attempts == 1 and "could not be reached" in (d.last_error or "")
        assert d.next_attempt_at > utcnow() + timedelta(seconds=20)
    # not due yet: nothing is attempted
    assert deliver_due(sessions, root, peers, dicom, settings, "me").failed == 0
    received = tmp_path / "received"
    received.mkdir()
    with StoreSCP(received, port=port, aet="RECEIVER"):
        later = utcnow() + timedelta(seconds=31)
        out = deliver_due(sessions, root, peers, dicom, settings, "me", now=later)
        assert out.sent == 3
        assert deliver_due(sessions, root, peers, dicom, settings, "me", now=later).sent == 0
    files = [p for p in received.rglob("*") if p.is_file()]
    assert len(files) == 3
    assert _states(sessions) == [DeliveryState.SENT] * 3


def test_refusing_destination_goes_dead_and_retry_requeues(outbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sessions, root, ids = outbox
    port = free_port()
    settings = DeliverySettings(destinations=["pacs"], backoff_seconds=0.01, max_attempts=2)
    dicom = DicomSettings(ae_title="LUNGNODE", network_timeout=5, acse_timeout=5)
    received = tmp_path / "received"
    received.mkdir()
    peers = {"pacs": Peer(name="pacs", ae_title="RECEIVER", host="127.0.0.1", port=port)}
    with StoreSCP(received, port=port, aet="RECEIVER", refuse=True):  # up, but refuses
        for _ in range(2):
            deliver_due(sessions, root, peers, dicom, settings, "me",
                        now=utcnow() + timedelta(seconds=1))
        assert _states(sessions) == [DeliveryState.DEAD] * 3
        with sessions() as s:
            d = s.get_one(Delivery, ids[0])
            # storescp sends A-ASSOCIATE-RJ and closes at once; pynetdicom sees either
            assert "the association" in (d.last_error or "") and "RECEIVER" in (d.last_error or "")
            assert s.scalars(select(AuditEntry).where(AuditEntry.action == "delivery-dead")).first()
            retry_delivery(s, ids[0], actor="test")
        assert _states(sessions)[0] == DeliveryState.PENDING
    # the destination is fixed: the re-queued delivery goes through, the others stay dead
    with StoreSCP(received, port=port, aet="RECEIVER"):
        assert deliver_due(sessions, root, peers, dicom, settings, "me").sent == 1
    assert _states(sessions) == [DeliveryState.SENT, DeliveryState.DEAD, DeliveryState.DEAD]
    with sessions() as s, pytest.raises(DeliveryError, match="already sent"):
        retry_delivery(s, ids[0], actor="test")
