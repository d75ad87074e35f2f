"""Severity networks, preprocessing, registry and inference engine, and the shipped default model."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.errors import ModelError
from model.inference import InferenceEngine, resolve_device
from model.lungs import LungMasks, segment_lungs
from model.networks import Compact3d, Cov3d, adapt_kinetics_state_dict, build_cov3d, build_network
from model.prediction import CLASS_NAMES, Prediction
from model.preprocess import PreprocessConfig, lung_box, preprocess_array
from model.registry import (
    DEFAULT_MODEL,
    DEFAULT_REGISTRY,
    ModelCard,
    load_model,
    read_card,
    save_model,
    sha256_file,
)
from model.volume import CTVolume, load_series
from tests.conftest import B40F
from training.dataset import draw_specs, label_for_involvement
from training.evaluate import EVAL_OPTIONS, evaluate_engine, make_case, metrics_from_labels
from training.losses import SeverityLoss, emd_loss, focal_loss
from training.synth import SynthSpec, make_phantom


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    return InferenceEngine.from_registry(device="cpu")


@pytest.fixture(scope="module")
def study() -> tuple[CTVolume, LungMasks]:
    """A small synthetic study (128 x 128, 5 mm) with its true lung masks."""
    case = make_case(SynthSpec(involvement=0.35, seed=77, rows=128, slice_thickness_mm=5.0, kernel="B70f"))
    masks = case.masks["true"]
    assert masks is not None
    return case.volume, masks


def _small_card(architecture: str, params: dict[str, object]) -> ModelCard:
    return ModelCard(name=f"tiny-{architecture}", version="0.0.1", architecture=architecture,
                     weights_file=f"tiny-{architecture}.pt", sha256="", input_size=(16, 48, 48),
                     window=(-1000.0, 400.0), margin_mm=5.0, classes=CLASS_NAMES,
                     training_data="random initialisation (test)", intended_use="tests only",
                     architecture_params=params)


def _mirror(volume: CTVolume, masks: LungMasks) -> tuple[CTVolume, LungMasks]:
    flipped = CTVolume(hu=np.ascontiguousarray(volume.hu[:, :, ::-1]), spacing=volume.spacing,
                       origin=volume.origin, direction=volume.direction,
                       series_instance_uid=volume.series_instance_uid + ".9",
                       sop_instance_uids=volume.sop_instance_uids, slice_thickness=volume.slice_thickness)
    return flipped, LungMasks(left=np.ascontiguousarray(masks.right[:, :, ::-1]),
                              right=np.ascontiguousarray(masks.left[:, :, ::-1]))


def _probs(p: Prediction) -> np.ndarray:
    return np.array([p.probabilities[c] for c in CLASS_NAMES])


# --- networks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("architecture, params", [("compact3d", {"widths": [8, 16, 32], "dropout": 0.2}),
                                                  ("cov3d", {})])
def test_both_networks_give_five_class_probabilities_through_the_engine(
        tmp_path: Path, study: tuple[CTVolume, LungMasks], architecture: str,
        params: dict[str, object]) -> None:
    torch.manual_seed(0)
    net = build_network(architecture, params)
    logits = net.eval()(torch.rand(2, 1, 16, 48, 48))
    assert logits.shape == (2, len(CLASS_NAMES))
    card = save_model(net, _small_card(architecture, params), tmp_path)
    engine = InferenceEngine.from_registry(card.name, tmp_path, device="cpu")
    preds = engine.predict_batch([study, study])
    for p in preds:
        assert list(p.probabilities) == list(CLASS_NAMES)
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
        assert all(0.0 <= v <= 1.0 for v in p.probabilities.values())
        assert p.predicted_class == max(p.probabilities, key=p.probabilities.__getitem__)
        assert (p.model_name, p.model_version, p.model_sha256, p.device) == (
            card.name, "0.0.1", card.sha256, "cpu")
    single = engine.predict(*study)
    assert np.allclose(_probs(single), _probs(preds[0]), atol=1e-5)


def test_compact_network_is_small_and_cov3d_follows_the_paper() -> None:
    compact = Compact3d()
    n_compact = sum(p.numel() for p in compact.parameters())
    assert 30_000 <= n_compact <= 1_000_000
    cov = Cov3d()
    assert cov.stem[0].in_channels == 1
    assert [type(m).__name__ for m in cov.head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert (cov.head[0].in_features, cov.head[0].out_features, cov.head[3].out_features) == (512, 512, 5)
    assert all(isinstance(getattr(cov, f"drop{i}"), torch.nn.Dropout) for i in range(1, 5))


def test_kinetics_weights_are_adapted_to_one_channel_and_a_new_head(tmp_path: Path) -> None:
    from torchvision.models.video import r3d_18

    torch.manual_seed(1)
    path = tmp_path / "r3d18-kinetics-like.pt"
    torch.save(r3d_18(weights=None).state_dict(), path)
    state = torch.load(path, weights_only=True)
    model = build_cov3d(state)
    assert torch.equal(model.stem[0].weight, state["stem.0.weight"].sum(dim=1, keepdim=True))
    assert model.stem[0].weight.shape == (64, 1, 3, 7, 7)
    assert torch.equal(model.layer3[1].conv2[0].weight, state["layer3.1.conv2.0.weight"])
    assert torch.equal(model.stem[1].running_var, state["stem.1.running_var"])
    assert model.head[3].out_features == len(CLASS_NAMES)
    # a grey image (R = G = B) gives the same stem response through the summed kernel
    grey = torch.rand(1, 1, 4, 16, 16)
    rgb_conv = F.conv3d(grey.expand(1, 3, 4, 16, 16), state["stem.0.weight"], stride=(1, 2, 2),
                        padding=(1, 3, 3))
    assert torch.allclose(model.stem[0](grey), rgb_conv, atol=1e-5)
    assert "fc.weight" not in adapt_kinetics_state_dict(state)
    with pytest.raises(ModelError, match="r3d_18"):
        build_cov3d({"conv.weight": torch.zeros(3, 3)})


def test_losses_charge_by_distance_between_ordered_classes() -> None:
    target = torch.tensor([4])
    near = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0]])  # says severe
    far = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0]])   # says mild
    assert float(emd_loss(far, target)) > float(emd_loss(near, target)) > 0.0
    assert float(emd_loss(torch.tensor([[0.0, 0, 0, 0, 50.0]]), target)) < 1e-9
    logits = torch.randn(6, 5)
    labels = torch.tensor([0, 1, 2, 3, 4, 2])
    ce = float(F.cross_entropy(logits, labels))
    assert float(focal_loss(logits, labels, gamma=0.0)) == pytest.approx(ce)
    assert float(focal_loss(logits, labels, gamma=2.0)) < ce
    both = SeverityLoss(gamma=2.0, emd_weight=0.5)(logits, labels)
    assert float(both) == pytest.approx(float(focal_loss(logits, labels) + 0.5 * emd_loss(logits, labels)))


# --- preprocessing --------------------------------------------------------------------------------

def test_preprocessing_crops_the_lungs_and_scales_to_the_input_size(
        study: tuple[CTVolume, LungMasks]) -> None:
    volume, masks = study
    config = PreprocessConfig(input_size=(24, 40, 56), window=(-1000.0, 400.0), margin_mm=5.0)
    x = preprocess_array(volume.hu, masks.both, volume.spacing, config)
    assert x.shape == (1, 24, 40, 56) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    box = lung_box(masks.both, volume.spacing, 5.0)
    zz, yy, xx = np.nonzero(masks.both)
    assert box[2].start == max(0, xx.min() - round(5.0 / volume.spacing[2]))
    assert box[0].stop == min(volume.shape[0], zz.max() + 1 + round(5.0 / volume.spacing[0]))
    narrow = preprocess_array(volume.hu, masks.both, volume.spacing,
                              replace(config, window=(-600.0, -500.0)))
    assert float((narrow == 0).float().mean()) > float((x == 0).float().mean())


def test_thin_and_thick_slices_of_one_phantom_preprocess_alike() -> None:
    """Area averaging of thin slices: a 2.5 mm and an 8 mm series of one phantom give close inputs,
    closer than plain trilinear resizing of the same crops."""
    config = PreprocessConfig(input_size=(48, 96, 96))
    out, naive = [], []
    for thickness in (2.5, 8.0):
        ph = make_phantom(SynthSpec(involvement=0.3, seed=21, rows=128, slice_thickness_mm=thickness))
        lungs = ph.left_lung | ph.right_lung
        out.append(preprocess_array(ph.hu, lungs, ph.spacing, config))
        crop = torch.from_numpy(ph.hu[lung_box(lungs, ph.spacing, config.margin_mm)].astype(np.float32))
        crop = (crop.clamp(-1000, 400) + 1000) / 1400
        naive.append(F.interpolate(crop[None, None], size=config.input_size, mode="trilinear")[0])
    diff = float((out[0] - out[1]).abs().mean())
    assert diff < 0.035
    assert diff < float((naive[0] - naive[1]).abs().mean())


# --- inference engine -----------------------------------------------------------------------------

def test_mirror_tta_makes_a_study_and_its_mirror_agree(engine: InferenceEngine,
                                                       study: tuple[CTVolume, LungMasks]) -> None:
    assert engine.tta
    a, b = engine.predict(*study), engine.predict(*_mirror(*study))
    assert np.allclose(_probs(a), _probs(b), atol=1e-5)
    assert a.predicted_class == b.predicted_class
    plain = InferenceEngine(engine.net, engine.card, device="cpu", tta=False)
    one, other = plain.predict(*study), plain.predict(*_mirror(*study))
    tta_mean = (_probs(one) + _probs(other)) / 2
    assert np.allclose(tta_mean, _probs(a), atol=1e-5)


def test_engine_runs_on_the_real_ct_with_segmented_lungs(engine: InferenceEngine) -> None:
    volume = load_series(sorted(B40F.glob("*.dcm")))
    p = engine.predict(volume, segment_lungs(volume))
    assert p.predicted_class in CLASS_NAMES
    assert sum(p.probabilities.values()) == pytest.approx(1.0)
    assert p.device == "cpu" and p.model_name == DEFAULT_MODEL
    assert 0.0 <= p.p_covid <= 1.0


def test_bad_inputs_raise_model_errors(engine: InferenceEngine, study: tuple[CTVolume, LungMasks]) -> None:
    volume, masks = study
    nan = volume.hu.astype(np.float32)
    nan[masks.both] = np.nan
    with pytest.raises(ModelError, match="NaN"):
        engine.predict(replace(volume, hu=nan), masks)
    z = int(np.nonzero(masks.both.any(axis=(1, 2)))[0].mean())
    thin = replace(volume, hu=volume.hu[z:z + 3])
    thin_masks = LungMasks(left=masks.left[z:z + 3], right=masks.right[z:z + 3])
    with pytest.raises(ModelError, match="at least 40 mm"):
        engine.predict(thin, thin_masks)
    with pytest.raises(ModelError, match="do not match the volume"):
        engine.predict(volume, thin_masks)
    empty = LungMasks(left=np.zeros_like(masks.left), right=np.zeros_like(masks.right))
    with pytest.raises(ModelError, match="empty"):
        engine.predict(volume, empty)
    with pytest.raises(ModelError, match="volume .* differ in shape"):
        preprocess_array(volume.hu, masks.both[:-1], volume.spacing)
    with pytest.raises(ModelError, match="no model card"):
        InferenceEngine.from_registry("no-such-model")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device("quantum")


# --- registry -------------------------------------------------------------------------------------

@pytest.fixture
def registry_copy(tmp_path: Path) -> Path:
    for suffix in (".pt", ".json"):
        shutil.copy(DEFAULT_REGISTRY / f"{DEFAULT_MODEL}{suffix}", tmp_path)
    return tmp_path


def _edit_card(folder: Path, **changes: object) -> None:
    path = folder / f"{DEFAULT_MODEL}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_registry_refuses_a_tampered_weights_file(registry_copy: Path) -> None:
    load_model(DEFAULT_MODEL, registry_copy)  # the untouched copy loads
    weights = registry_copy / f"{DEFAULT_MODEL}.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256 .* the file was changed"):
        InferenceEngine.from_registry(DEFAULT_MODEL, registry_copy)


def test_registry_refuses_cards_that_do_not_match(registry_copy: Path, tmp_path: Path) -> None:
    original = (registry_copy / f"{DEFAULT_MODEL}.json").read_text()
    cases: list[tuple[dict[str, object], str]] = [
             ({"architecture": "cov3d"}, "weights are for architecture 'compact3d'"),
             ({"architecture_params": {"widths": [8, 16], "dropout": 0.1}}, "architecture parameters"),
             ({"classes": ["negative", "positive"]}, "lungnode needs"),
             ({"architecture": "resnet50"}, "unknown architecture"),
             ({"input_size": [64, 128]}, "malformed|input_size"),
             ({"name": "other-model"}, "is for model 'other-model'")]
    for changes, message in cases:
        (registry_copy / f"{DEFAULT_MODEL}.json").write_text(original)
        _edit_card(registry_copy, **changes)
        with pytest.raises(ModelError, match=message):
            load_model(DEFAULT_MODEL, registry_copy)
    # a card and weights of another network under the right name and digest
    other = tmp_path / "other"
    card = save_model(build_network("compact3d", {"widths": [8, 16, 32]}),
                      replace(_small_card("compact3d", {"widths": [8, 16, 32]}), name=DEFAULT_MODEL,
                              weights_file=f"{DEFAULT_MODEL}.pt"), other)
    blob = torch.load(registry_copy / f"{DEFAULT_MODEL}.pt", weights_only=True)
    torch.save({**blob, "architecture_params": card.architecture_params}, other / card.weights_file)
    _edit_card(other, sha256=sha256_file(other / card.weights_file))
    with pytest.raises(ModelError, match="do not fit architecture"):
        load_model(DEFAULT_MODEL, other)
    # a bare state dict is not a lungnode weights file
    torch.save(blob["state_dict"], other / card.weights_file)
    _edit_card(other, sha256=sha256_file(other / card.weights_file))
    with pytest.raises(ModelError, match="not a lungnode weights file"):
        load_model(DEFAULT_MODEL, other)


# --- the shipped default model --------------------------------------------------------------------

def test_default_model_card_states_synthetic_data_and_its_metrics() -> None:
    card = read_card()
    assert card.name == DEFAULT_MODEL and card.architecture == "compact3d"
    assert "SYNTHETIC" in card.training_data and "NOT FOR CLINICAL USE" in card.intended_use
    m = card.metrics
    assert m["n"] >= 50 and sum(map(sum, m["confusion_matrix"])) == m["n"]
    assert m["macro_f1"] > 0.5  # chance is 0.2 for five balanced classes
    assert "python -m training.train" in card.training["command"]
    assert (DEFAULT_REGISTRY / card.weights_file).stat().st_size < 5_000_000
    assert set(range(card.training["test_seeds"][0], card.training["test_seeds"][1] + 1)).isdisjoint(
        range(card.training["train_seeds"][0], card.training["train_seeds"][1] + 1))


def test_default_model_keeps_its_card_macro_f1_on_held_out_phantoms(engine: InferenceEngine) -> None:
    card = engine.card
    first = card.training["test_seeds"][0]
    specs = draw_specs(25, first, balanced=True, options=EVAL_OPTIONS)
    train_lo, train_hi = card.training["train_seeds"]
    assert all(not train_lo <= s.seed <= train_hi for s in specs)
    metrics = evaluate_engine(engine, specs, sources=("true",))["true"]
    assert metrics.n == 25 and metrics.failed == 0
    assert metrics.macro_f1 >= card.metrics["macro_f1"] - 0.05, metrics.confusion_matrix


def test_metrics_and_labels() -> None:
    assert [label_for_involvement(f) for f in (0.0, 0.01, 0.2499, 0.25, 0.5, 0.74, 0.75, 1.0)] == [
        0, 1, 1, 2, 3, 3, 4, 4]
    m = metrics_from_labels([0, 1, 2, 3, 4, 4], [0, 1, 2, 3, 4, 3])
    assert m.accuracy == pytest.approx(5 / 6)
    assert m.confusion_matrix[4] == [0, 0, 0, 1, 1]
    assert m.per_class_f1["severe"] == pytest.approx(2 / 3) and m.per_class_f1["non-COVID"] == 1.0
    assert m.macro_f1 == pytest.approx((1 + 1 + 1 + 2 / 3 + 2 / 3) / 5)


def test_a_contrast_share_leaves_the_other_draws_alone() -> None:
    plain = draw_specs(40, 700, balanced=True, options=EVAL_OPTIONS)
    mixed = draw_specs(40, 700, balanced=True, options=replace(EVAL_OPTIONS, contrast=0.5))
    assert not any(s.contrast for s in plain)
    assert 8 <= sum(s.contrast for s in mixed) <= 32
    assert [replace(s, contrast=False) for s in mixed] == plain  # the sets drawn before stay the same


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_engine_agrees_with_the_cpu(engine: InferenceEngine, study: tuple[CTVolume, LungMasks]) -> None:
    gpu_engine = InferenceEngine.from_registry(device="cuda")
    assert gpu_engine.device_name.startswith("cuda:") and "(" in gpu_engine.device_name
    a, b = engine.predict(*study), gpu_engine.predict(*study)
    assert np.allclose(_probs(a), _probs(b), atol=0.05)
    batch = gpu_engine.predict_batch([study] * 4)
    assert all(np.allclose(_probs(p), _probs(b), atol=1e-2) for p in batch)
