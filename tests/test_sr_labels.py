"""A radiologist's labelling SR, sent over a real association to the node's listener.

The SR is built with highdicom the way a viewer or PACS template would emit it
(observer context plus the ``SEVERITY-LABEL`` code of scheme ``99LUNGNODE``), in
the study of an archived study, and sent with pynetdicom to a running
:class:`node.dicom.scp.StoreSCP`.  Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db import (
    AuditEntry,
    Instance,
    LabelEvent,
    LabelSource,
    LabelValue,
    ResultObject,
    Study,
    make_engine,
    make_session_factory,
)
from node.dicom.catalog import Catalog
from node.dicom.scp import StoreSCP
from node.dicom.storage import InstanceStore
from node.errors import LabelError
from node.learn.labels import LabelRecorder
from node.learn.sr_labels import LABEL_CODES, SEVERITY_LABEL, SrLabel, parse_label_sr
from node.migrate import upgrade
from node.settings import Settings
from tests.learnkit import ArchivedStudy, archive_study
from tests.peers import c_store_all, free_port


@dataclass
class Node:
    settings: Settings
    sessions: sessionmaker[Session]
    port: int
    study: ArchivedStudy

    def count(self, model: type) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)

    def ct_files(self) -> list[Path]:
        return sorted((self.settings.incoming_root / self.study.study_uid).rglob("*.dcm"))


@pytest.fixture
def node(db_url: str, make_settings: Callable[..., Settings]) -> Iterator[Node]:
    port = free_port()
    s = make_settings(db_url, port=port,
                      peers=[{"name": "viewer", "ae_title": "VIEWER", "host": "127.0.0.1",
                              "port": 104}],
                      dicom={"require_known_peers": False})
    upgrade(s.database.url)
    sessions = make_session_factory(make_engine(s.database.url))
    study = archive_study(s, sessions, seed=21, patient_id="PSR", rows=32, slices=12)
    scp = StoreSCP(s.dicom, s.peers,
                   InstanceStore(s.storage.root, min_free_mb=s.storage.min_free_mb, fsync=False),
                   Catalog(sessions))
    scp.start()
    try:
        yield Node(s, sessions, port, study)
    finally:
        scp.stop()


def _labelling_sr(evidence: Dataset, value: LabelValue | None, observer: str = "House^Gregory",
                  sop_uid: str | None = None) -> hd.sr.ComprehensiveSR:
    """An SR as a viewer template emits it: observer context, then the severity code."""
    items: list[hd.sr.ContentItem] = list(hd.sr.ObservationContext(
        observer_person_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                name=observer))))
    if value is not None:
        items.append(hd.sr.CodeContentItem(name=SEVERITY_LABEL, value=LABEL_CODES[value],
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    else:
        items.append(hd.sr.TextContentItem(name=CodedConcept("121106", "DCM", "Comment"),
                                           value="looks fine to me",
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    root = hd.sr.ContainerContentItem(name=CodedConcept("LABELREPORT", "99LUNGNODE",
                                                        "Severity labelling"))
    root.ContentSequence = hd.sr.ContentSequence(items)
    return hd.sr.ComprehensiveSR(
        evidence=[evidence], content=root, series_instance_uid=generate_uid(), series_number=901,
        sop_instance_uid=sop_uid or generate_uid(), instance_number=1,
        manufacturer="Viewer Inc.", is_complete=True, is_final=True)


def _send(port: int, datasets: list[Dataset], calling: str = "VIEWER") -> list[Dataset]:
    return c_store_all(port, datasets, calling, ((ComprehensiveSRStorage, ExplicitVRLittleEndian),
                                                 (CTImageStorage, ExplicitVRLittleEndian)))


def _events(node: Node) -> list[LabelEvent]:
    with node.sessions() as s:
        return list(s.scalars(select(LabelEvent).order_by(LabelEvent.id)))


def test_a_labelling_sr_becomes_one_event_by_ae_and_observer_even_sent_twice(node: Node) -> None:
    ct = pydicom.dcmread(node.ct_files()[0], stop_before_pixels=True)
    sr = _labelling_sr(ct, LabelValue.MODERATE)
    instances_before = node.count(Instance)
    statuses = _send(node.port, [sr, sr])
    assert [int(st.Status) for st in statuses] == [0, 0]
    events = _events(node)
    assert len(events) == 1
    event = events[0]
    assert (event.value, event.source) == (LabelValue.MODERATE, LabelSource.DICOM)
    assert event.actor == "VIEWER/House^Gregory"
    assert event.source_ref == f"sr:{sr.SOPInstanceUID}"
    # kept as a file, never as an instance of the CT study (that would queue an analysis)
    kept = node.settings.storage.root / "labels" / f"{sr.SOPInstanceUID}.dcm"
    assert pydicom.dcmread(kept).SOPInstanceUID == sr.SOPInstanceUID
    assert node.count(Instance) == instances_before
    with node.sessions() as s:
        assert s.get_one(Study, node.study.study_id).instance_count == instances_before
        audit = s.scalars(select(AuditEntry).where(AuditEntry.action == "label-set")).one()
    assert audit.actor == "dicom:VIEWER/House^Gregory" and audit.study_id == node.study.study_id
    # a later SR from another radiologist changes the label: one more event, superseding
    second = _labelling_sr(ct, LabelValue.SEVERE, observer="Cuddy^Lisa")
    assert int(_send(node.port, [second])[0].Status) == 0
    events = _events(node)
    assert [e.value for e in events] == [LabelValue.MODERATE, LabelValue.SEVERE]
    assert events[1].supersedes_id == events[0].id and events[1].actor == "VIEWER/Cuddy^Lisa"


def test_sr_without_the_code_or_for_an_unknown_study_is_refused_and_recorded(node: Node) -> None:
    ct = pydicom.dcmread(node.ct_files()[0], stop_before_pixels=True)
    no_code = _labelling_sr(ct, None)
    stranger = Dataset()
    for kw in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate",
               "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "Modality"):
        setattr(stranger, kw, getattr(ct, kw, ""))
    stranger.SOPClassUID = CTImageStorage
    stranger.SOPInstanceUID, stranger.SeriesInstanceUID = generate_uid(), generate_uid()
    stranger.StudyInstanceUID = generate_uid()  # a study the node never received
    unknown_study = _labelling_sr(stranger, LabelValue.MILD)
    statuses = _send(node.port, [no_code, unknown_study])
    assert [int(st.Status) for st in statuses] == [0xC000, 0xC001]
    assert "no lungnode severity label" in str(statuses[0].ErrorComment)
    assert _events(node) == []
    with node.sessions() as s:
        refusals = list(s.scalars(select(AuditEntry).where(AuditEntry.action == "label-refused")
                                  .order_by(AuditEntry.id)))
        studies = list(s.scalars(select(Study.study_instance_uid)))
    assert len(refusals) == 2
    assert "carries no severity label" in (refusals[0].detail or "")
    assert "SEVERITY-LABEL" in (refusals[0].detail or "")
    assert "no study matches" in (refusals[1].detail or "")
    assert stranger.StudyInstanceUID not in studies  # a refusal creates no study
    assert not (node.settings.storage.root / "labels" / f"{unknown_study.SOPInstanceUID}.dcm").exists()
    # the same SR from a title that is not a configured peer is refused as well
    labelled = _labelling_sr(ct, LabelValue.MILD)
    assert int(_send(node.port, [labelled], calling="STRANGER")[0].Status) == 0xC001
    assert _events(node) == []


def test_a_ct_in_the_labelled_study_still_stores_as_before(node: Node) -> None:
    ct = pydicom.dcmread(node.ct_files()[0])
    assert int(_send(node.port, [_labelling_sr(ct, LabelValue.CRITICAL)])[0].Status) == 0
    before = node.count(Instance)
    ct.SOPInstanceUID = generate_uid()
    ct.file_meta.MediaStorageSOPInstanceUID = ct.SOPInstanceUID
    assert int(_send(node.port, [ct])[0].Status) == 0
    assert node.count(Instance) == before + 1
    with node.sessions() as s:
        row = s.scalars(select(Instance).where(Instance.sop_instance_uid == ct.SOPInstanceUID)).one()
        assert row.study_id == node.study.study_id
    assert (node.settings.storage.root / row.path).is_file()
    assert len(_events(node)) == 1


def test_parse_label_sr_finds_value_observer_study_and_references_or_says_what_is_missing(
        tmp_path: Path) -> None:
    ct = Dataset()
    ct.PatientID, ct.PatientName, ct.PatientBirthDate, ct.PatientSex = "X", "X^Y", "", ""
    ct.StudyDate, ct.StudyTime, ct.ReferringPhysicianName, ct.StudyID = "20260101", "", "", "1"
    ct.AccessionNumber, ct.Modality, ct.SOPClassUID = "A1", "CT", CTImageStorage
    ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID = (generate_uid(), generate_uid(),
                                                                    generate_uid())
    sr = _labelling_sr(ct, LabelValue.COVID_UNKNOWN, observer="Wilson^James")
    parsed = parse_label_sr(sr)
    assert parsed.value is LabelValue.COVID_UNKNOWN and parsed.observer == "Wilson^James"
    assert parsed.study_instance_uid == ct.StudyInstanceUID
    assert ct.SOPInstanceUID in parsed.referenced_sop_uids
    # a code of another scheme is not a label; nothing is guessed
    sr.ContentSequence[-1].ConceptCodeSequence[0].CodingSchemeDesignator = "99OTHER"
    with pytest.raises(LabelError, match="is not one of LABEL-NONCOVID"):
        parse_label_sr(sr)
    with pytest.raises(LabelError, match="carries no severity label"):
        parse_label_sr(_labelling_sr(ct, None))


def test_the_study_is_found_through_the_nodes_own_sr_or_the_de_identified_study_uid(
        node: Node) -> None:
    """A viewer may answer in another study, citing the node's SR, or label the archive copy."""
    recorder = LabelRecorder.from_settings(node.sessions, node.settings)
    own_sr = generate_uid()
    with node.sessions() as s:
        s.add(ResultObject(study_id=node.study.study_id, version=1, kind="sr",
                           sop_class_uid=Comprehensive3DSRStorage, sop_instance_uid=own_sr,
                           series_instance_uid=generate_uid(), path="results/x.dcm"))
        s.commit()
    citing = SrLabel(value=LabelValue.MILD, observer=None, study_instance_uid=generate_uid(),
                     sop_instance_uid=generate_uid(), referenced_sop_uids=(own_sr,))
    assert recorder.record(citing, "VIEWER")
    in_archive = SrLabel(value=LabelValue.SEVERE, observer="Chase^Robert",
                         study_instance_uid=node.study.anon_study_uid,
                         sop_instance_uid=generate_uid(), referenced_sop_uids=())
    assert recorder.record(in_archive, "VIEWER")
    assert not recorder.record(in_archive, "VIEWER")  # the same SR again adds nothing
    events = _events(node)
    assert [(e.value, e.actor) for e in events] == [
        (LabelValue.MILD, "VIEWER/unknown observer"), (LabelValue.SEVERE, "VIEWER/Chase^Robert")]
    # references into two different studies are not guessed between
    with node.sessions() as s:
        s.add(Study(study_instance_uid="1.2.3.9"))
        s.flush()
        other = s.scalars(select(Study.id).where(Study.study_instance_uid == "1.2.3.9")).one()
        s.add(ResultObject(study_id=other, version=1, kind="sr", sop_class_uid=ComprehensiveSRStorage,
                           sop_instance_uid="1.2.3.9.1", series_instance_uid="1.2.3.9.2",
                           path="results/y.dcm"))
        s.commit()
    split = SrLabel(value=LabelValue.MILD, observer=None, study_instance_uid=generate_uid(),
                    sop_instance_uid=generate_uid(), referenced_sop_uids=(own_sr, "1.2.3.9.1"))
    with pytest.raises(LabelError, match="2 different studies"):
        recorder.record(split, "VIEWER")
