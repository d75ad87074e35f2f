"""lungmask as the learned lung segmenter, tested without the published weights.

The weights are state dicts of lungmask's own U-Net (:class:`lungmask.resunet.UNet`)
made and saved here: random ones (3 and 6 classes) for loading and refusals, and
a "band" network whose weights are set so that it labels by HU alone: its first
block passes the normalised input through, the last up block turns it into
ramps, and the last layer makes one trapezoid per class (class 1 for about
-950..-910 HU, class 2 for about -850..-630 HU, 0 elsewhere).  A volume whose
patient-right lung is filled with -930 HU and whose left lung with -750 HU
then tells which mask lungmask's labels end in, through lungmask's own
inference (its LPS turn, crop, resize and post-processing) and ours.  Each
lungmask run costs about a second per slice on the CPU, so the volumes are a
handful of slices.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from lungmask.resunet import UNet
from scipy import ndimage as ndi
from typer.testing import CliRunner

from model.errors import ModelError, NoLungsError
from model.learned_lungs import (
    LearnedLungs,
    LungSegmenter,
    WeightsError,
    masks_from_labels,
    open_segmenter,
    to_sitk,
)
from model.lungs import LungMasks
from model.quantify import OpacityThresholds, Quantification, quantify
from model.registry import sha256_file
from model.volume import CTVolume, load_series
from node.cli import app
from node.errors import ConfigError
from node.pipeline import _segmentation_summary as segmentation_summary
from node.settings import load_settings
from tests.conftest import write_config
from tests.test_reports import dciodvfy_errors
from training.synth import SynthSpec, make_phantom, write_study

REPO = Path(__file__).resolve().parent.parent
RIGHT_HU, LEFT_HU = -930.0, -750.0
BANDS = {1: (-960.0, -945.0, -915.0, -900.0), 2: (-860.0, -830.0, -650.0, -620.0)}


def _unet(classes: int) -> UNet:
    # lungmask's own architecture, as its get_model builds it
    return UNet(n_classes=classes, padding=True, depth=5, up_mode="upsample", batch_norm=True,
                residual=False)


def _x(hu: float) -> float:
    """lungmask's input normalisation of a HU value."""
    return (hu + 1024.0) / 1624.0


def band_state_dict(classes: int = 3, bands: dict[int, tuple[float, ...]] | None = None
                    ) -> dict[str, torch.Tensor]:
    """A U-Net state dict that labels each pixel by its HU (``bands``, default :data:`BANDS`: class
    to the HU trapezoid where it wins; see the module docstring)."""
    bands = BANDS if bands is None else bands
    sd = _unet(classes).state_dict()
    for key, value in sd.items():
        if key.endswith("running_var") or key.endswith(".2.weight") or key.endswith(".5.weight"):
            value.fill_(1.0)  # batch norms: identity
        elif key.endswith("running_mean") or key.endswith(".2.bias") or key.endswith(".5.bias"):
            value.zero_()
    first, up = "down_path.0.block.", "up_path.3.conv_block.block."
    for conv in ("0", "3"):  # channel 0 of the first block (the bridge) is the input
        sd[first + conv + ".weight"].zero_()
        sd[first + conv + ".bias"].zero_()
        sd[first + conv + ".weight"][0, 0, 1, 1] = 1.0
    knots = [_x(v) for band in bands.values() for v in band]
    for conv in ("0", "3"):
        sd[up + conv + ".weight"].zero_()
        sd[up + conv + ".bias"].zero_()
    for i, t in enumerate(knots):  # ramps relu(x - t) from the bridge's channel 0 (input 64)
        sd[up + "0.weight"][i, 64, 1, 1] = 1.0
        sd[up + "0.bias"][i] = -t
        sd[up + "3.weight"][i, i, 1, 1] = 1.0
    sd["last.weight"].zero_()
    sd["last.bias"].zero_()
    height = 1000.0
    for j, (cls, band) in enumerate(bands.items()):
        scale = height / (_x(band[1]) - _x(band[0]))
        for k, sign in enumerate((1.0, -1.0, -1.0, 1.0)):  # a trapezoid of four ramps
            sd["last.weight"][cls, 4 * j + k, 0, 0] = sign * scale
        sd["last.bias"][cls] = -height / 2.0
    return sd


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    out = {"band": folder / "band-r231.pth", "random3": folder / "random-r231.pth",
           "random6": folder / "random-ltrclobes.pth", "lobes": folder / "band-ltrclobes.pth"}
    torch.save(band_state_dict(), out["band"])
    # the right lung's HU band as lobe 4 (right middle), the left's as lobe 2 (left lower)
    torch.save(band_state_dict(6, {4: BANDS[1], 2: BANDS[2]}), out["lobes"])
    torch.save(_unet(3).state_dict(), out["random3"])
    torch.save(_unet(6).state_dict(), out["random6"])
    return out


@pytest.fixture(scope="module")
def band(weights: dict[str, Path]) -> LearnedLungs:
    return LearnedLungs("R231", weights["band"], device="cpu", threads=2, batch_size=8)


def _phantom(flip: bool) -> tuple[CTVolume, np.ndarray]:
    """A body of soft tissue with the patient-right lung at -930 HU, the left at -750 HU, and
    that right-lung mask; ``flip``: stored with columns running to the patient's right."""
    hu = np.full((6, 128, 128), -1000, dtype=np.int16)
    hu[:, 16:112, 8:120] = 40
    hu[:, 36:92, 16:56] = RIGHT_HU  # LPS: low columns are the patient's right
    hu[:, 36:92, 72:112] = LEFT_HU
    right = np.zeros(hu.shape, dtype=bool)
    right[:, 36:92, 16:56] = True
    direction = np.eye(3)
    if flip:
        hu, right = hu[:, :, ::-1].copy(), right[:, :, ::-1].copy()
        direction = np.diag([-1.0, 1.0, 1.0])
    volume = CTVolume(hu=hu, spacing=(5.0, 2.5, 2.5), origin=(0.0, 0.0, 0.0), direction=direction,
                      series_instance_uid="1.2.826.0.1.3680043.10.511.99.1",
                      sop_instance_uids=tuple(f"1.2.826.0.1.3680043.10.511.99.2.{i}" for i in range(6)),
                      slice_thickness=5.0)
    return volume, right


def _measure(volume: CTVolume):  # type: ignore[no-untyped-def]
    return lambda masks: quantify(volume, masks, OpacityThresholds())


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.count_nonzero(a & b)) / max(1, int(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def chest() -> CTVolume:
    """A clean synthetic chest covering the lungs (the node's warm-up study's size)."""
    ph = make_phantom(SynthSpec(seed=1, involvement=0.05, rows=128, slices=60, slice_thickness_mm=5.0))
    return CTVolume(hu=ph.hu, spacing=ph.spacing, origin=ph.origin, direction=np.eye(3),
                    series_instance_uid="1.2.826.0.1.3680043.10.511.99.3", sop_instance_uids=(),
                    slice_thickness=5.0)


# -- weights ---------------------------------------------------------------------------------------

def test_wrong_weights_are_refused_with_what_was_expected(weights: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"have 3 output classes; LTRCLobes needs 6"):
        LearnedLungs("LTRCLobes", weights["random3"], device="cpu")
    with pytest.raises(WeightsError, match=r"random-ltrclobes.pth have 6 output classes; R231 needs 3"):
        LearnedLungs("R231", weights["random6"], device="cpu")
    garbage = tmp_path / "unet_r231.pth"
    garbage.write_bytes(b"<html>404 Not Found</html>" * 10)
    with pytest.raises(WeightsError, match=r"unet_r231.pth do not load into lungmask's U-Net as model "
                                           r"R231 \(3 output classes expected\)"):
        LearnedLungs("R231", garbage, device="cpu")
    sha = sha256_file(weights["random3"])
    wrong = tmp_path / "unet_r231-d5d2fc3d.pth"  # the published name, other content
    shutil.copy(weights["random3"], wrong)
    with pytest.raises(WeightsError, match=r"the name says sha256 d5d2fc3d\.\.\., the file's is"):
        LearnedLungs("R231", wrong, device="cpu")
    with pytest.raises(WeightsError, match="do not exist"):
        LearnedLungs("R231", tmp_path / "missing.pth", device="cpu")
    with pytest.raises(ModelError, match="fusion_weights is for the lobe model"):
        LearnedLungs("R231", weights["random3"], fusion_weights=weights["random3"], device="cpu")
    named = tmp_path / f"unet_r231-{sha[:8]}.pth"  # a name whose prefix matches is taken
    shutil.copy(weights["random3"], named)
    learned = LearnedLungs("R231", named, device="cpu")
    method = learned.method
    assert (method.name, method.model, method.weights_sha256) == ("lungmask", "R231", sha)
    lobes = LearnedLungs("LTRCLobes", weights["random6"], fusion_weights=weights["random3"], device="cpu")
    assert lobes.method.model == "LTRCLobes+R231 fusion"
    assert lobes.method.weights_sha256 == sha256_file(weights["random6"])
    assert lobes.method.note == f"fusion weights sha256 {sha}"


def test_label_mapping_of_both_models() -> None:
    labels = np.array([[[0, 1, 2, 3, 4, 5]]], dtype=np.uint8)
    left, right, lobes = masks_from_labels(labels, "LTRCLobes")
    assert left.tolist() == [[[False, True, True, False, False, False]]]  # 1, 2: left upper, lower
    assert right.tolist() == [[[False, False, False, True, True, True]]]  # 3, 4, 5: right lobes
    assert lobes is not None and lobes.tolist() == labels.tolist()
    for model in ("R231", "R231CovidWeb"):
        left, right, lobes = masks_from_labels(labels[..., :3], model)
        assert right.tolist() == [[[False, True, False]]] and left.tolist() == [[[False, False, True]]]
        assert lobes is None


def test_lungmask_is_given_the_patient_orientation() -> None:
    """lungmask turns a SimpleITK image to LPS (low columns: the patient's right) before its U-Net;
    the image made from a volume stored the other way round must come out that way too."""
    for flip in (False, True):
        volume, right = _phantom(flip)
        image = to_sitk(volume)
        assert sitk.GetArrayViewFromImage(image).shape == volume.shape
        lps = sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))
        assert (lps[:, 36:92, 16:56] == RIGHT_HU).all() and (lps[:, 36:92, 72:112] == LEFT_HU).all()


# -- segmentation ------------------------------------------------------------------------------------

def test_auto_runs_lungmask_where_classical_cannot_be_trusted_and_the_sides_are_the_patients(
        band: LearnedLungs) -> None:
    volume, right = _phantom(flip=True)  # columns run to the patient's right
    segmenter = LungSegmenter("auto", band, budget_seconds=300.0)
    masks, quant, timings = segmenter.run(volume, _measure(volume))
    assert masks.method.name == "lungmask" and masks.method.model == "R231"
    assert masks.method.note is not None and masks.method.note.startswith("auto: ")
    assert _dice(masks.right, right) > 0.95, _dice(masks.right, right)
    assert _dice(masks.left, (volume.hu == LEFT_HU)) > 0.95
    assert isinstance(quant, Quantification) and quant.right.volume_ml > 0
    assert timings["segment_lungmask"] > 0 and "quantify" in timings


def test_auto_keeps_classical_for_a_clean_study_and_within_its_budget(
        band: LearnedLungs, chest: CTVolume) -> None:
    masks, quant, timings = LungSegmenter("auto", band).run(chest, _measure(chest))
    assert masks.method.name == "classical" and masks.method.note == "auto: classical result trusted"
    assert "segment_lungmask" not in timings and timings["segment"] > 0
    # one side removed: not to be trusted, but lungmask's estimate (60 slices) is over a 5 s budget
    one_side = LungMasks(left=masks.left, right=np.zeros_like(masks.right), box=masks.box)
    masks2, _, timings = LungSegmenter("auto", band, budget_seconds=5.0).run(
        chest, lambda m: quantify(chest, one_side if m.method.name == "classical" else m,
                                  OpacityThresholds()))
    assert masks2.method.name == "classical" and "segment_lungmask" not in timings
    assert masks2.method.note is not None
    assert "right lung missing or small" in masks2.method.note and "over the 5 s budget" in masks2.method.note


def test_auto_on_a_gpu_runs_lungmask_for_every_study(weights: dict[str, Path]) -> None:
    """The choice only: the segmenter is told it runs on CUDA (none here; the network runs on the CPU)."""
    learned = LearnedLungs("R231", weights["band"], device="cpu", threads=2)
    learned.device = "cuda"
    six, right = _phantom(flip=False)
    volume = replace(six, hu=six.hu[:2].copy(), sop_instance_uids=six.sop_instance_uids[:2])
    masks, _, timings = LungSegmenter("auto", learned, budget_seconds=0.001).run(volume, _measure(volume))
    assert masks.method.name == "lungmask" and "segment" not in timings
    assert masks.method.note == "auto: lungmask on the GPU for every study"
    assert _dice(masks.right, right[:2]) > 0.95


def test_fallback_to_classical_says_so(chest: CTVolume, tmp_path: Path) -> None:
    missing = tmp_path / "unet_r231-d5d2fc3d.pth"
    with pytest.raises(WeightsError, match="do not exist"):
        open_segmenter("lungmask", model="R231", weights=missing)
    segmenter = open_segmenter("lungmask", model="R231", weights=missing, fallback="classical")
    assert segmenter.learned is None
    masks, _, timings = segmenter.run(chest, _measure(chest))
    assert masks.method.name == "classical"
    assert masks.method.note is not None and "lungmask unavailable" in masks.method.note
    assert str(missing) in masks.method.note and "segment" in timings
    assert open_segmenter("classical").method == "classical"


def test_lobes_map_to_their_sides_and_stay_on_the_result(weights: dict[str, Path]) -> None:
    six, right = _phantom(flip=True)
    volume = replace(six, hu=six.hu[:3].copy(), sop_instance_uids=six.sop_instance_uids[:3])
    lobes_model = LearnedLungs("LTRCLobes", weights["lobes"], device="cpu", threads=2)
    masks = lobes_model.segment(volume)
    assert masks.method.model == "LTRCLobes"
    assert masks.lobes is not None and set(np.unique(masks.lobes)) == {0, 2, 4}
    assert _dice(masks.right, right[:3]) > 0.95 and _dice(masks.left, volume.hu == LEFT_HU) > 0.95
    assert ((masks.lobes == 4) == masks.right).all() and ((masks.lobes == 2) == masks.left).all()
    summary = segmentation_summary(masks, volume.voxel_volume_ml)
    right_ml = round(float(masks.right.sum()) * volume.voxel_volume_ml, 1)
    assert summary["lobes_ml"]["right middle lobe"] == right_ml
    assert summary["lobes_ml"]["right upper lobe"] == 0.0


def test_a_body_without_lungs_gives_a_segmentation_error(band: LearnedLungs) -> None:
    six, _ = _phantom(flip=False)
    volume = replace(six, hu=six.hu[:2].copy(), sop_instance_uids=six.sop_instance_uids[:2])
    volume.hu[volume.hu < 0] = 40  # no air-filled region at all
    volume.hu[:, :4, :] = -1000
    with pytest.raises(NoLungsError, match=r"lungmask R231 found \d+ ml of lung: no lungs in the field"):
        band.segment(volume)


# -- configuration and the command line ----------------------------------------------------------

def test_settings_resolve_the_weights_and_refuse_missing_ones(tmp_path: Path,
                                                             weights: dict[str, Path]) -> None:
    assert load_settings(write_config(tmp_path / "plain.toml", {})).segmentation.method == "classical"
    (tmp_path / "w").mkdir()
    shutil.copy(weights["random6"], tmp_path / "w" / "lobes.pth")
    cfg = write_config(tmp_path / "ok.toml", {"segmentation": {
        "method": "auto", "model": "LTRCLobes", "weights": "w/lobes.pth", "threads": 2, "batch_size": 4,
        "auto_budget_seconds": 60.0}})
    seg = load_settings(cfg).segmentation
    assert seg.weights == tmp_path / "w" / "lobes.pth" and seg.threads == 2
    bad = write_config(tmp_path / "missing.toml", {"segmentation": {"method": "lungmask",
                                                                    "weights": "w/unet_r231.pth"}})
    with pytest.raises(ConfigError, match=r"\[segmentation\] weights .*unet_r231.pth does not exist"):
        load_settings(bad)
    none = write_config(tmp_path / "none.toml", {"segmentation": {"method": "auto"}})
    with pytest.raises(ConfigError, match="needs weights = PATH"):
        load_settings(none)
    fallback = write_config(tmp_path / "fb.toml", {"segmentation": {
        "method": "lungmask", "weights": "w/unet_r231.pth", "fallback": "classical"}})
    assert load_settings(fallback).segmentation.fallback == "classical"


def test_the_node_refuses_to_start_without_usable_weights(tmp_path: Path, weights: dict[str, Path]) -> None:
    runner = CliRunner()
    missing = write_config(tmp_path / "missing.toml", {"segmentation": {
        "method": "lungmask", "weights": str(tmp_path / "unet_r231.pth")}})
    res = runner.invoke(app, ["--config", str(missing), "serve"])
    assert res.exit_code == 2, res.output
    assert "unet_r231.pth does not exist" in res.output
    wrong = write_config(tmp_path / "wrong.toml", {"segmentation": {
        "method": "lungmask", "model": "R231", "weights": str(weights["random6"])}})
    res = runner.invoke(app, ["--config", str(wrong), "serve"])
    assert res.exit_code == 2, res.output
    assert "have 6 output classes; R231 needs 3" in res.output


def paint_slices(paths: Sequence[Path], paint: Callable[[int, np.ndarray], None]) -> None:
    """Rewrite each slice's HU in place: ``paint(z, hu)`` with ``z`` in the loaded volume's order."""
    volume = load_series(list(paths))
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    for z, uid in enumerate(volume.sop_instance_uids):
        ds = pydicom.dcmread(by_uid[uid])
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        paint(z, hu)
        stored = np.round((hu - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
        ds.PixelData = stored.astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(by_uid[uid], enforce_file_format=True)


@pytest.fixture
def sided_study(tmp_path: Path) -> Iterator[tuple[Path, np.ndarray]]:
    """A 5-slice synthetic study whose patient-right lung reads -930 HU and left lung -750 HU
    (the band network's classes 1 and 2), with its right-lung mask in the volume's order."""
    study = write_study(tmp_path / "synth", SynthSpec(seed=3, involvement=0.0, rows=128, slices=5,
                                                      slice_thickness_mm=5.0))
    truth = np.load(study.directory / "truth.npz")  # z in increasing position: the volume's order
    grow = np.ones((1, 5, 5), dtype=bool)
    right, left = (ndi.binary_dilation(truth[k], grow) for k in ("right_lung", "left_lung"))
    rng = np.random.default_rng(3)

    def paint(z: int, hu: np.ndarray) -> None:
        for mask, value in ((right[z], RIGHT_HU), (left[z], LEFT_HU)):
            hu[mask] = value + rng.normal(0.0, 4.0, int(mask.sum()))

    paint_slices(study.paths, paint)
    yield study.dicom_dir, right


def test_analyze_with_lungmask_end_to_end(tmp_path: Path, weights: dict[str, Path],
                                          sided_study: tuple[Path, np.ndarray]) -> None:
    dicom_dir, right = sided_study
    cfg = write_config(tmp_path / "lm.toml", {
        "selection": {"min_slices": 4},
        "analysis": {"min_lung_volume_ml": 100.0},
        "segmentation": {"method": "lungmask", "model": "R231", "weights": str(weights["band"]),
                         "threads": 2, "batch_size": 5},
        "model": {"enabled": False}})
    res = subprocess.run([sys.executable, "-m", "node.cli", "--config", str(cfg), "analyze", str(dicom_dir),
                          "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)  # lungmask's own log (stdout) must not get in the way
    sha = sha256_file(weights["band"])
    assert out["segmentation"] == {"method": "lungmask", "model": "R231", "weights_sha256": sha}
    assert out["timings_s"]["segment_lungmask"] > 0 and "segment" not in out["timings_s"]
    volume = load_series(sorted(dicom_dir.glob("*.dcm")))
    right_ml = float(right.sum()) * volume.voxel_volume_ml
    assert abs(out["lung_volume_ml"]["right"] - right_ml) < 0.1 * right_ml, (out["lung_volume_ml"], right_ml)
    assert out["lung_volume_ml"]["left"] > 0
    sr = pydicom.dcmread(out["outputs"]["sr"])
    params = [str(item.TextValue) for item in _walk(sr) if "TextValue" in item
              and item.ConceptNameCodeSequence[0].CodeValue == "111002"]  # Algorithm Parameters
    assert "lung segmentation lungmask R231" in params, params
    assert f"lung segmentation weights sha256={sha}" in params, params
    assert dciodvfy_errors(Path(out["outputs"]["sr"])) == []


def _walk(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield item
                yield from _walk(item)
