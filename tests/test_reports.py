"""Result objects (SR, SEG, summary image) from the real study, checked with real tools.

Every object is written with ``dcmwrite``, validated with ``dciodvfy -new``
(no ``Error`` line allowed) and read back with highdicom.  The lungs and the
quantification come from the product (:func:`model.lungs.segment_lungs`,
:func:`model.quantify.quantify`); the CNN prediction is test input made here
(softmax of fixed logits), as no model is trained in this test.
"""

from __future__ import annotations

import copy
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from model.lungs import LungMasks, segment_lungs
from model.prediction import CLASS_NAMES, Prediction
from model.quantify import Quantification, quantify
from model.volume import CTVolume, load_series
from node.errors import ReportError
from node.stages.reports import ReportContext, ResultObjects, build_reports
from node.stages.reports import codes as lc
from node.stages.reports.seg import SEGMENT_COLOURS, build_segmentation
from node.stages.reports.source import STUDY_IDENTIFIERS, clean_headers
from tests.conftest import B40F, B70F

pytestmark = pytest.mark.filterwarnings(
    # the test study's Patient's Name has one component; highdicom warns about the source's data
    "ignore:The string .* is unlikely to represent the intended person name:UserWarning")

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True, eq=False)
class Analysis:
    volume: CTVolume
    masks: LungMasks
    quantification: Quantification
    headers: Sequence[Dataset]


def _analyse(folder: Path) -> Analysis:
    volume = load_series(sorted(folder.glob("*.dcm")))
    masks = segment_lungs(volume)
    q = quantify(volume, masks)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in volume.paths]
    return Analysis(volume, masks, q, headers)


def _prediction() -> Prediction:
    """Test input: what the severity CNN returns, from fixed logits."""
    logits = np.array([0.3, 1.2, 0.4, -0.5, -1.5])
    p = np.exp(logits) / np.exp(logits).sum()
    probabilities = {name: float(v) for name, v in zip(CLASS_NAMES, p, strict=True)}
    return Prediction(probabilities=probabilities,
                      predicted_class=CLASS_NAMES[int(np.argmax(p))],
                      model_name="cov3d-test", model_version="0.0.1",
                      model_sha256="0123456789abcdef" * 4, device="cpu")


def _context(a: Analysis, **changes: object) -> ReportContext:
    ctx = ReportContext(volume=a.volume, masks=a.masks, quantification=a.quantification,
                        prediction=_prediction(), algorithm_name="lungnode",
                        algorithm_version="0.1.0", institution_name="Test Hospital")
    return replace(ctx, **changes)  # type: ignore[arg-type]


def _write(objects: ResultObjects, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("sr", "seg", "summary"):
        path = folder / f"{name}.dcm"
        pydicom.dcmwrite(path, getattr(objects, name), enforce_file_format=True)
        paths[name] = path
    return paths


def dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True,
                          check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert lines, f"dciodvfy printed nothing for {path}"  # it always names the IOD or warns
    return [line for line in lines if line.startswith("Error")]


@pytest.fixture(scope="module", params=[B40F, B70F], ids=["series-3-B40f", "series-2-B70f"])
def analysis(request: pytest.FixtureRequest) -> Analysis:
    return _analyse(request.param)


@pytest.fixture(scope="module")
def built(analysis: Analysis, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[ResultObjects, dict[str, Path]]:
    objects = build_reports(_context(analysis), analysis.headers)
    return objects, _write(objects, tmp_path_factory.mktemp("results"))


def _with_trap(headers: Sequence[Dataset]) -> list[Dataset]:
    """Copies carrying the non-conformances seen in real studies."""
    out = []
    for h in headers:
        ds = copy.deepcopy(h)
        no_class = Dataset()
        no_class.ReferencedSOPInstanceUID = "1.2.3.4.5.6.7.8.9"  # no Referenced SOP Class UID
        ds.ReferencedStudySequence = DicomSequence([no_class])
        no_instance = Dataset()
        no_instance.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.1.1"  # no instance UID
        ds.ReferencedPatientSequence = DicomSequence([no_instance])
        good, no_meaning = Dataset(), Dataset()
        good.CodeValue, good.CodingSchemeDesignator, good.CodeMeaning = "24627-2", "LN", "CT Chest"
        no_meaning.CodeValue, no_meaning.CodingSchemeDesignator = "XYZ", "99LOCAL"
        ds.ProcedureCodeSequence = DicomSequence([good, no_meaning])
        out.append(ds)
    return out


def test_all_objects_pass_dciodvfy(built: tuple[ResultObjects, dict[str, Path]]) -> None:
    _, paths = built
    for name, path in paths.items():
        assert dciodvfy_errors(path) == [], name


def test_objects_join_the_original_study(analysis: Analysis,
                                         built: tuple[ResultObjects, dict[str, Path]]) -> None:
    _, paths = built
    source = analysis.headers[0]
    read = {name: pydicom.dcmread(path) for name, path in paths.items()}
    for name, ds in read.items():
        for keyword in STUDY_IDENTIFIERS:
            assert keyword in ds, (name, keyword)
            assert ds.get(keyword) == source.get(keyword), (name, keyword)
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.SOPInstanceUID not in {h.SOPInstanceUID for h in analysis.headers}
    assert len({ds.SeriesInstanceUID for ds in read.values()}) == 3
    assert [read[n].SOPClassUID for n in ("sr", "seg", "summary")] == [SR_CLASS, SEG_CLASS, SC_CLASS]
    assert [int(read[n].SeriesNumber) for n in ("sr", "seg", "summary")] == [9100, 9101, 9102]
    assert read["seg"].FrameOfReferenceUID == source.FrameOfReferenceUID
    assert all(ds.InstitutionName == "Test Hospital" for ds in read.values())


Group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations


def _numbers(group: Group) -> dict[str, float]:
    return {m.name.value: float(m.value) for m in group.get_measurements()}


def _evaluations(group: Group) -> list[tuple[str, str]]:
    return [(e.name.value, e[0].ConceptCodeSequence[0].CodeValue)
            for e in group.get_qualitative_evaluations()]


def _texts(group: Group, name: hd.sr.CodedConcept) -> list[str]:
    return [item.TextValue for item in group[0].ContentSequence
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == name.value]


def test_sr_holds_the_quantification_and_prediction(
        analysis: Analysis, built: tuple[ResultObjects, dict[str, Path]]) -> None:
    objects, paths = built
    q = analysis.quantification
    sr = hd.sr.srread(paths["sr"])
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)

    volumetric = {g.tracking_identifier: g for g in report.get_volumetric_roi_measurement_groups()}
    assert set(volumetric) == {"left lung", "right lung"}
    for side, number, m in (("left", 1, q.left), ("right", 2, q.right)):
        group = volumetric[f"{side} lung"]
        site = group.finding_sites[0]
        assert site.value.value == "39607008"
        assert site.laterality is not None
        assert site.laterality.value == lc.LATERALITY[side].value
        assert _numbers(group) == {"118565006": pytest.approx(m.volume_ml, abs=0.05),
                                   "PO": pytest.approx(m.percent_opacity, abs=0.005),
                                   "PHO": pytest.approx(m.percent_high_opacity, abs=0.005)}
        segment = group.referenced_segment
        assert segment is not None
        ref = segment[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == objects.seg.SOPInstanceUID
        assert int(ref.ReferencedSegmentNumber) == number
        assert objects.seg.SegmentSequence[number - 1].SegmentLabel.lower().startswith(side)
        assert [e for e in _evaluations(group) if e[0] == "QUALITY"] == [
            ("QUALITY", lc.flag_code(f).value) for f in q.quality_flags]
        assert _texts(group, lc.QUALITY_TEXT) == list(q.quality_flags)

    other = {g.tracking_identifier: g for g in report.get_image_measurement_groups()}
    assert set(other) == {"both lungs", "CNN severity"}
    whole = other["both lungs"]
    assert all(site.laterality is None for site in whole.finding_sites)
    assert _numbers(whole) == {"118565006": pytest.approx(q.total.volume_ml, abs=0.05),
                               "PO": pytest.approx(q.total.percent_opacity, abs=0.005),
                               "PHO": pytest.approx(q.total.percent_high_opacity, abs=0.005)}
    evaluations = _evaluations(whole)
    assert ("SEVCAT", q.severity_category) in evaluations
    assert ("SCOPE", "WHOLEPERLUNG") in evaluations
    assert _texts(whole, lc.QUALITY_TEXT) == list(q.quality_flags)

    prediction = _prediction()
    cnn = other["CNN severity"]
    numbers = _numbers(cnn)
    for name in CLASS_NAMES:
        assert numbers[lc.probability_name(name).value] == pytest.approx(
            prediction.probabilities[name], abs=5e-5)
    assert numbers["PCOVID"] == pytest.approx(1 - prediction.probabilities["non-COVID"], abs=5e-5)
    assert _evaluations(cnn) == [("CNNCLASS", lc.CLASS_CODES[prediction.predicted_class].value)]

    # algorithm identification (TID 4019) in every group, read from the dataset itself
    def algorithm(group: Group) -> tuple[str, str, list[str]]:
        items = group[0].ContentSequence
        by_name = [(i.ConceptNameCodeSequence[0].CodeMeaning, i.get("TextValue")) for i in items]
        name = next(v for n, v in by_name if n == "Algorithm Name")
        version = next(v for n, v in by_name if n == "Algorithm Version")
        return name, version, [v for n, v in by_name if n == "Algorithm Parameters"]

    quantitative: list[Group] = [*volumetric.values(), whole]
    for g in quantitative:
        assert algorithm(g)[:2] == ("lungnode quantitative HU threshold", "0.1.0")
    name, version, parameters = algorithm(cnn)
    assert (name, version) == (prediction.model_name, prediction.model_version)
    assert f"sha256={prediction.model_sha256}" in parameters and "device=cpu" in parameters

    # image library and evidence: every analysed image, plus the SEG
    source_uids = {h.SOPInstanceUID for h in analysis.headers}
    library = [i for i in sr.ContentSequence
               if i.ConceptNameCodeSequence[0].CodeMeaning == "Image Library"]
    assert len(library) == 1
    entries = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
               for group in library[0].ContentSequence for i in group.ContentSequence
               if i.ValueType == "IMAGE"}
    assert entries == source_uids
    evidence = {r.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
    assert evidence == source_uids | {objects.seg.SOPInstanceUID}
    assert "PredecessorDocumentsSequence" not in sr


def test_dsrdump_renders_the_sr(built: tuple[ResultObjects, dict[str, Path]]) -> None:
    _, paths = built
    proc = subprocess.run(["dsrdump", str(paths["sr"])], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert not [line for line in proc.stderr.splitlines() if line.startswith(("E:", "F:"))]
    for text in ("Imaging Measurement Report", '"left lung"', '"right lung"', '"both lungs"',
                 "Probability of COVID-19", "Whole lung and per lung, no lobes", "(ml,UCUM"):
        assert text in proc.stdout, text


def test_seg_masks_equal_the_input_masks(analysis: Analysis,
                                         built: tuple[ResultObjects, dict[str, Path]]) -> None:
    _, paths = built
    seg = hd.seg.segread(paths["seg"])
    uids = [h.SOPInstanceUID for h in analysis.headers]
    referenced = [r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                  for r in s.ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(uids)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1, 2, 3],
        assert_missing_frames_are_empty=True)
    expected = np.stack([analysis.masks.left, analysis.masks.right,
                         analysis.quantification.opacity_mask], axis=-1)
    assert pixels.shape == expected.shape
    assert np.array_equal(pixels.astype(bool), expected)
    # only frames with segmented pixels are stored
    assert int(seg.NumberOfFrames) == int(expected.any(axis=(1, 2)).sum())
    # segment 1 is the patient's left lung: Lung with the modifier Left, at larger patient x
    descriptions = {int(d.SegmentNumber): d for d in seg.SegmentSequence}
    for number, side in ((1, "left"), (2, "right")):
        prop = descriptions[number].SegmentedPropertyTypeCodeSequence[0]
        assert prop.CodeValue == "39607008"
        assert prop.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == lc.LATERALITY[side].value
    assert descriptions[3].SegmentedPropertyTypeCodeSequence[0].CodeValue == "OPACITY"
    assert list(map(float, analysis.headers[0].ImageOrientationPatient)) == [1, 0, 0, 0, 1, 0]
    columns = np.arange(pixels.shape[2])
    mean_col = [float((pixels[..., s].sum(axis=(0, 1)) * columns).sum() / pixels[..., s].sum())
                for s in (0, 1)]
    assert mean_col[0] > pixels.shape[2] / 2 > mean_col[1]  # +x (patient left) is image right


def test_summary_image(analysis: Analysis, built: tuple[ResultObjects, dict[str, Path]]) -> None:
    _, paths = built
    sc = pydicom.dcmread(paths["summary"])
    assert sc.BurnedInAnnotation == "YES"
    assert sc.PhotometricInterpretation == "RGB" and int(sc.BitsAllocated) == 8
    rgb = sc.pixel_array
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.shape[1] > 1024
    for colour in SEGMENT_COLOURS:  # the outlines of left, right and opacity are drawn
        assert np.all(rgb[:, :1024] == colour, axis=-1).sum() > 50, colour
    text_area = rgb[:, 1024:]
    assert (text_area.max(axis=-1) > 128).sum() > 2000  # burned-in text


def test_trap_sequences_are_dropped_not_copied(analysis: Analysis, tmp_path: Path) -> None:
    trapped = _with_trap(analysis.headers)
    # control: highdicom copies the broken items and dciodvfy reports them
    raw_seg = build_segmentation(trapped, analysis.masks, analysis.quantification.opacity_mask,
                                 algorithm_name="lungnode", algorithm_version="0.1.0",
                                 series_number=1, manufacturer="lungnode")
    raw_path = tmp_path / "raw-seg.dcm"
    pydicom.dcmwrite(raw_path, raw_seg, enforce_file_format=True)
    errors = dciodvfy_errors(raw_path)
    assert any("ReferencedSOPClassUID" in e or "Referenced SOP Class UID" in e for e in errors), errors

    objects = build_reports(_context(analysis), trapped)
    paths = _write(objects, tmp_path / "clean")
    for name, path in paths.items():
        assert dciodvfy_errors(path) == [], name
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert "ReferencedStudySequence" not in ds and "ReferencedPatientSequence" not in ds
        if "ProcedureCodeSequence" in ds:
            assert [i.CodeValue for i in ds.ProcedureCodeSequence] == ["24627-2"]
    # the caller's datasets are untouched
    assert len(trapped[0].ReferencedStudySequence) == 1
    assert len(trapped[0].ProcedureCodeSequence) == 2


def test_clean_headers_repairs_copies_only(analysis: Analysis) -> None:
    trapped = _with_trap(analysis.headers[:2])
    del trapped[0].AccessionNumber
    trapped[0].add_new(0x00091001, "LO", "private")
    cleaned = clean_headers(trapped)
    assert cleaned[0].AccessionNumber == "" and "AccessionNumber" not in trapped[0]
    assert "ReferencedStudySequence" not in cleaned[0]
    assert [i.CodeValue for i in cleaned[0].ProcedureCodeSequence] == ["24627-2"]
    assert not any(e.tag.is_private for e in cleaned[0])
    assert cleaned[1].SOPInstanceUID == trapped[1].SOPInstanceUID
    assert cleaned[1].ImagePositionPatient == trapped[1].ImagePositionPatient


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit-vr", "implicit-vr"])
def test_clean_headers_on_files_as_read(analysis: Analysis, tmp_path: Path, implicit: bool) -> None:
    """Headers straight from files (undecoded elements), in either VR encoding."""
    trapped = _with_trap(analysis.headers[:1])[0]
    path = tmp_path / "trapped.dcm"
    if implicit:
        trapped.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    pydicom.dcmwrite(path, trapped, enforce_file_format=True)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    cleaned = clean_headers([header])[0]
    assert "ReferencedStudySequence" not in cleaned and "ReferencedPatientSequence" not in cleaned
    assert [i.CodeValue for i in cleaned.ProcedureCodeSequence] == ["24627-2"]
    assert cleaned.PatientID == header.PatientID
    assert len(header.ReferencedStudySequence) == 1


def test_reanalysis_references_the_predecessor(analysis: Analysis,
                                               built: tuple[ResultObjects, dict[str, Path]],
                                               tmp_path: Path) -> None:
    _, paths = built
    previous = pydicom.dcmread(paths["sr"], stop_before_pixels=True)
    objects = build_reports(_context(analysis, version=2, predecessor_sr=previous),
                            analysis.headers)
    new = _write(objects, tmp_path)
    sr = pydicom.dcmread(new["sr"])
    predecessors = [(study.StudyInstanceUID, series.SeriesInstanceUID, r.ReferencedSOPInstanceUID)
                    for study in sr.PredecessorDocumentsSequence
                    for series in study.ReferencedSeriesSequence
                    for r in series.ReferencedSOPSequence]
    assert predecessors == [(previous.StudyInstanceUID, previous.SeriesInstanceUID,
                             previous.SOPInstanceUID)]
    assert int(sr.SeriesNumber) == 9110
    assert int(objects.seg.SeriesNumber) == 9111 and int(objects.summary.SeriesNumber) == 9112
    assert dciodvfy_errors(new["sr"]) == []

    foreign = copy.deepcopy(previous)
    foreign.StudyInstanceUID = generate_uid()
    with pytest.raises(ReportError, match="belongs to study"):
        build_reports(_context(analysis, version=2, predecessor_sr=foreign), analysis.headers)


def test_no_model_and_no_opacity(analysis: Analysis, tmp_path: Path) -> None:
    q = replace(analysis.quantification, opacity_mask=np.zeros_like(analysis.masks.left),
                severity_category="CT-0")
    objects = build_reports(_context(analysis, quantification=q, prediction=None),
                            analysis.headers)
    paths = _write(objects, tmp_path)
    for name, path in paths.items():
        assert dciodvfy_errors(path) == [], name
    report = hd.sr.srread(paths["sr"]).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = {g.tracking_identifier for g in report.get_image_measurement_groups()}
    assert groups == {"both lungs"}
    seg = hd.seg.segread(paths["seg"])
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[h.SOPInstanceUID for h in analysis.headers],
        segment_numbers=[3], assert_missing_frames_are_empty=True)
    assert not pixels.any()


def test_errors_say_what_is_wrong(analysis: Analysis) -> None:
    headers = analysis.headers
    with pytest.raises(ReportError, match="source headers for a volume of"):
        build_reports(_context(analysis), headers[:-1])
    with pytest.raises(ReportError, match="slice order"):
        build_reports(_context(analysis), headers[::-1])
    broken = [copy.deepcopy(h) for h in headers]
    del broken[3].FrameOfReferenceUID
    with pytest.raises(ReportError, match=f"{broken[3].SOPInstanceUID} lacks FrameOfReferenceUID"):
        build_reports(_context(analysis), broken)
    small = LungMasks(left=analysis.masks.left[:, ::2, ::2], right=analysis.masks.right[:, ::2, ::2])
    with pytest.raises(ReportError, match="masks must be on the grid"):
        build_reports(_context(analysis, masks=small), headers)
    odd = replace(_prediction(), probabilities={"covid": 1.0}, predicted_class="covid")
    with pytest.raises(ReportError, match="does not know"):
        build_reports(_context(analysis, prediction=odd), headers)


@pytest.fixture
def tiled_study() -> Iterator[tuple[Analysis, int]]:
    """A 300-slice 512x512 study made by stacking the real series ten times (test input).

    Copies of the headers get new SOP Instance UIDs, one new series and 1 mm
    positions; masks and opacity are the real ones, tiled the same way.
    """
    a = _analyse(B40F)
    reps = 10
    series_uid = generate_uid()
    x, y, z0 = (float(v) for v in a.headers[0].ImagePositionPatient)
    headers = []
    for i in range(reps * len(a.headers)):
        h = copy.deepcopy(a.headers[i % len(a.headers)])
        h.SOPInstanceUID = generate_uid()
        h.SeriesInstanceUID = series_uid
        h.ImagePositionPatient = [x, y, z0 + i * 1.0]
        h.SliceThickness = 1
        h.InstanceNumber = i + 1
        headers.append(h)

    def tile(arr: np.ndarray) -> np.ndarray:
        return np.concatenate([arr] * reps, axis=0)

    volume = CTVolume(hu=tile(a.volume.hu), spacing=(1.0, *a.volume.spacing[1:]),
                      origin=a.volume.origin, direction=a.volume.direction,
                      series_instance_uid=series_uid,
                      sop_instance_uids=tuple(h.SOPInstanceUID for h in headers),
                      slice_thickness=1.0)
    masks = LungMasks(left=tile(a.masks.left), right=tile(a.masks.right))
    q = replace(a.quantification, opacity_mask=tile(a.quantification.opacity_mask))
    yield Analysis(volume, masks, q, headers), int(masks.both.any(axis=(1, 2)).sum())


def test_300_slice_study_builds(tiled_study: tuple[Analysis, int], tmp_path: Path) -> None:
    a, slices_with_lung = tiled_study
    assert a.volume.shape == (300, 512, 512)
    started = time.perf_counter()
    objects = build_reports(_context(a), a.headers)
    built_s = time.perf_counter() - started
    started = time.perf_counter()
    paths = _write(objects, tmp_path)
    written_s = time.perf_counter() - started
    sizes = {name: path.stat().st_size / 1e6 for name, path in paths.items()}
    print(f"\n300x512x512: SR+SEG+summary built in {built_s:.2f} s, written in {written_s:.2f} s; "
          f"sizes MB {', '.join(f'{k} {v:.2f}' for k, v in sizes.items())}; "
          f"SEG frames {int(objects.seg.NumberOfFrames)}")
    frames_expected = sum(int(m.any(axis=(1, 2)).sum()) for m in
                          (a.masks.left, a.masks.right, a.quantification.opacity_mask))
    assert int(objects.seg.NumberOfFrames) == frames_expected < 3 * 300
    assert slices_with_lung <= 300
    assert dciodvfy_errors(paths["seg"]) == []
    assert dciodvfy_errors(paths["sr"]) == []


def test_cnn_results_state_the_models_validity(analysis: Analysis,
                                               built: tuple[ResultObjects, dict[str, Path]]) -> None:
    """Without a statement on its card a model's results say "validation on patient data not
    stated" (a TEXT Comment in the CNN group; dciodvfy: test_all_objects_pass_dciodvfy), and a long
    statement is wrapped under the CNN's class on the summary image."""
    from model.prediction import DEFAULT_VALIDITY
    from node.stages.reports.sr import VALIDITY
    from node.stages.reports.summary import summary_lines

    _, paths = built
    sr = hd.sr.srread(paths["sr"])
    cnn = {g.tracking_identifier: g for g in sr.content.get_image_measurement_groups()}["CNN severity"]
    assert _texts(cnn, VALIDITY) == [DEFAULT_VALIDITY]
    statement = ("trained on 120 studies (100 of this node's archive, 20 MosMedData; dataset training "
                 "v3); tested once on a locked set of 30 patient studies: macro F1 0.81")
    prediction = replace(_prediction(), model_validity=statement)
    lines = [text for text, _ in summary_lines(analysis.quantification, prediction, "lungnode 0.1.0")]
    cnn_line = next(i for i, t in enumerate(lines) if t.startswith("CNN class:"))
    wrapped = []
    for text in lines[cnn_line + 1:]:
        if not text.startswith("  ") or text.startswith("  non-COVID"):
            break
        wrapped.append(text.strip())
    assert " ".join(wrapped) == statement and all(len(t) <= 62 for t in wrapped)
