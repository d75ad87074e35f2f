"""Model registry: a folder of weights files, each with its JSON model card.

Like torchvision's ``Weights`` entries, the card keeps the preprocessing with
the weights: architecture, input size, HU window, margin, class names,
version, what the model was trained on, its metrics, and the sha256 of the
weights file.  A registry folder holds ``<name>.json`` cards; each names its
weights file (``<name>.pt``).  A weights file whose digest does not match its
card is refused, and so is a card whose classes, preprocessing or
architecture do not fit lungnode.

The weights file is a ``torch.save`` of ``{"format", "architecture",
"architecture_params", "state_dict"}`` (tensors and plain values only, so it
loads with ``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.errors import ModelError
from model.networks import ARCHITECTURES, build_network
from model.prediction import CLASS_NAMES, DEFAULT_VALIDITY
from model.preprocess import PreprocessConfig

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_REGISTRY",
    "WEIGHTS_FORMAT",
    "ModelCard",
    "list_models",
    "load_model",
    "read_card",
    "save_model",
    "sha256_file",
    "validity_statement",
    "write_card",
]

logger = logging.getLogger(__name__)

DEFAULT_REGISTRY = Path(__file__).resolve().parent / "weights"
"""The models shipped with lungnode."""
DEFAULT_MODEL = "compact3d-synthetic-v1"
"""The model :func:`load_model` loads when no name is given."""
WEIGHTS_FORMAT = "lungnode-weights/1"

_INNERMOST = re.compile(r"[\[{][^\[\]{}]*[\]}]")


def _one_line(match: re.Match[str]) -> str:
    text = match.group(0)
    if "\n" not in text:  # also leaves brackets inside strings alone (JSON strings hold no newline)
        return text
    flat = re.sub(r"\s*\n\s*", " ", text)
    flat = flat[0] + flat[1:-1].strip() + flat[-1]
    return flat if len(flat) <= 100 else text


@dataclass(frozen=True)
class ModelCard:
    """What a weights file is, how to feed it and how well it did (``<name>.json``)."""

    name: str
    version: str
    architecture: str
    """One of :data:`model.networks.ARCHITECTURES`."""
    weights_file: str
    """File name in the same folder as the card."""
    sha256: str
    """Hex digest of the weights file."""
    input_size: tuple[int, int, int]
    """Depth, height, width."""
    window: tuple[float, float]
    """HU window mapped to 0..1."""
    margin_mm: float
    classes: tuple[str, ...]
    training_data: str
    """Plain description of the data the model was trained on."""
    intended_use: str
    architecture_params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    """How to reproduce it: command, seeds, epochs, ..."""
    validity: str = DEFAULT_VALIDITY
    """One line for the reader of every result: what the model was trained on and whether it was
    validated on patients ("trained on synthetic phantoms; not validated on patient data").  A card
    without it reads "validation on patient data not stated": the node never claims validation."""

    @property
    def preprocess(self) -> PreprocessConfig:
        """The preprocessing the weights were trained with."""
        return PreprocessConfig(input_size=self.input_size, window=self.window, margin_mm=self.margin_mm)

    def to_json(self) -> str:
        """The card as indented JSON (the file format), short lists and objects on one line."""
        return _INNERMOST.sub(_one_line, json.dumps(asdict(self), indent=2)) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "card") -> ModelCard:
        """Build and check a card from its JSON object.

        Raises
        ------
        ModelError
            Missing or malformed fields, classes other than :data:`CLASS_NAMES`,
            an unknown architecture or an impossible preprocessing.
        """
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"{source}: unknown fields {unknown}; is it a lungnode model card?")
        try:
            card = cls(**{**data,
                          "input_size": tuple(int(v) for v in data["input_size"]),
                          "window": tuple(float(v) for v in data["window"]),
                          "margin_mm": float(data["margin_mm"]),
                          "classes": tuple(str(c) for c in data["classes"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source}: missing or malformed field ({exc!r}); a card needs "
                             f"{', '.join(sorted(known))}") from exc
        if card.classes != CLASS_NAMES:
            raise ModelError(f"{source}: the model predicts {list(card.classes)}, lungnode needs "
                             f"{list(CLASS_NAMES)} in that order; retrain or fix the card")
        if card.architecture not in ARCHITECTURES:
            raise ModelError(f"{source}: unknown architecture {card.architecture!r}; known: "
                             f"{', '.join(ARCHITECTURES)}")
        if not isinstance(card.validity, str) or not card.validity.strip():
            raise ModelError(f"{source}: validity must be a sentence saying what the model was trained on "
                             "and whether it was validated on patients (or leave the field out)")
        card.preprocess  # noqa: B018 - validates input size, window and margin
        return card


_ORIGIN_WORDS = {"archive": "of this node's archive", "mosmed": "MosMedData", "cov19ctdb": "COV19-CT-DB",
                 "synthetic": "synthetic phantoms"}


def validity_statement(train_origins: Mapping[str, int], *, dataset: str,
                       locked_origins: Mapping[str, int] | None = None,
                       locked_macro_f1: float | None = None) -> str:
    """The card's ``validity`` line for a model trained from a frozen dataset.

    Parameters
    ----------
    train_origins:
        Training studies per origin (``archive``, ``mosmed``, ``cov19ctdb``, ``synthetic``).
    dataset:
        Names the dataset (e.g. ``"dataset training v3"``).
    locked_origins, locked_macro_f1:
        The locked evaluation set's studies per origin and the macro F1 measured on it once,
        when there is one.

    Returns
    -------
    str
        E.g. "trained on 120 studies (100 of this node's archive, 20 MosMedData; dataset
        training v3); tested once on a locked set of 30 patient studies: macro F1 0.81 (internal
        test, no external validation)", or for phantoms alone "trained on 400 synthetic phantoms
        (...); not validated on patient data".
    """
    n = sum(train_origins.values())
    parts = [f"{c} {_ORIGIN_WORDS.get(o, o)}" for o, c in sorted(train_origins.items()) if c]
    if set(o for o, c in train_origins.items() if c) <= {"synthetic"}:
        trained = f"trained on {n} synthetic phantoms ({dataset})"
    else:
        trained = f"trained on {n} studies ({', '.join(parts)}; {dataset})"
    locked = {o: c for o, c in (locked_origins or {}).items() if c}
    patients = sum(c for o, c in locked.items() if o != "synthetic")
    if patients and locked_macro_f1 is not None:
        return (f"{trained}; tested once on a locked set of {patients} patient studies: macro F1 "
                f"{locked_macro_f1:.2f} (internal test, no external validation)")
    tested = "not validated on patient data"
    if locked and locked_macro_f1 is not None:
        tested += (f" (locked set of {sum(locked.values())} synthetic phantoms: macro F1 "
                   f"{locked_macro_f1:.2f})")
    return f"{trained}; {tested}"


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as JSON gives them back (tuples become lists)."""
    out: dict[str, Any] = json.loads(json.dumps(dict(params)))
    return out


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_models(registry_dir: Path | None = None) -> list[str]:
    """Names of the cards in a registry folder (default: the shipped models)."""
    folder = Path(registry_dir) if registry_dir is not None else DEFAULT_REGISTRY
    return sorted(p.stem for p in folder.glob("*.json"))


def read_card(name: str | None = None, registry_dir: Path | None = None) -> ModelCard:
    """Read and check the card ``<name>.json`` (no weights are read).

    Raises
    ------
    ModelError
        No such card, or a card that cannot be used.
    """
    folder = Path(registry_dir) if registry_dir is not None else DEFAULT_REGISTRY
    name = name or DEFAULT_MODEL
    path = folder / f"{name}.json"
    if not path.is_file():
        known = list_models(folder)
        raise ModelError(f"no model card {path}; models in {folder}: {', '.join(known) or 'none'}. "
                         "Check the model name or train one with python -m training.train")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"model card {path} cannot be read as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"model card {path} is not a JSON object")
    card = ModelCard.from_dict(data, source=f"model card {path}")
    if card.name != name:
        raise ModelError(f"model card {path} is for model {card.name!r}, not {name!r}; "
                         "a card's file name must be its model name")
    return card


def load_model(name: str | None = None, registry_dir: Path | None = None) -> tuple[nn.Module, ModelCard]:
    """The network ``name`` (``None``: :data:`DEFAULT_MODEL`) in eval mode on the CPU, with its card.

    Parameters
    ----------
    name:
        Model name (the card's file stem).
    registry_dir:
        Registry folder; ``None``: the models shipped in ``model/weights``.

    Raises
    ------
    ModelError
        No such model, a weights file missing or not matching the card's
        sha256 (tampered, or belonging to another card), or weights of another
        architecture.
    """
    folder = Path(registry_dir) if registry_dir is not None else DEFAULT_REGISTRY
    card = read_card(name, folder)
    weights = folder / card.weights_file
    if not weights.is_file():
        raise ModelError(f"model {card.name}: weights file {weights} is missing; restore it or "
                         "retrain the model")
    digest = sha256_file(weights)
    if digest != card.sha256:
        raise ModelError(
            f"model {card.name}: weights file {weights} has sha256 {digest}, its card says {card.sha256}; "
            "the file was changed or belongs to another card. Restore the original file (git checkout) "
            "or write a new card with python -m training.train")
    try:
        blob = torch.load(weights, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError) as exc:
        raise ModelError(f"model {card.name}: weights file {weights} cannot be read by torch: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
        raise ModelError(f"model {card.name}: {weights} is not a lungnode weights file "
                         f"(format {WEIGHTS_FORMAT}); save it with model.registry.save_model")
    if blob.get("architecture") != card.architecture:
        raise ModelError(f"model {card.name}: the weights are for architecture {blob.get('architecture')!r}, "
                         f"the card says {card.architecture!r}; the card does not belong to these weights")
    if _plain(blob.get("architecture_params") or {}) != _plain(card.architecture_params):
        raise ModelError(f"model {card.name}: the weights were saved with architecture parameters "
                         f"{blob.get('architecture_params')}, the card says {card.architecture_params}")
    net = build_network(card.architecture, card.architecture_params)
    try:
        net.load_state_dict(blob["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise ModelError(f"model {card.name}: the weights in {weights} do not fit architecture "
                         f"{card.architecture!r}: {str(exc)[:400]}") from exc
    net.eval()
    logger.info("loaded model %s %s (sha256 %s)", card.name, card.version, card.sha256[:12])
    return net, card


def save_model(net: nn.Module, card: ModelCard, registry_dir: Path) -> ModelCard:
    """Write the weights and the card into ``registry_dir``; returns the card with its sha256.

    The card's ``sha256`` is replaced by the digest of the file written.  The file
    is written through a file object, so its bytes depend on the weights only: given a
    path, ``torch.save`` names the archive's records after the file, and two
    candidates with equal weights but other names would differ in sha256.  Written
    to a temporary name and renamed.
    """
    folder = Path(registry_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / card.weights_file
    card = replace(card, architecture_params=_plain(card.architecture_params))
    state = {k: v.detach().to("cpu").clone() for k, v in net.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        torch.save({"format": WEIGHTS_FORMAT, "architecture": card.architecture,
                    "architecture_params": card.architecture_params, "state_dict": state}, fh)
    tmp.replace(path)
    final = replace(card, sha256=sha256_file(path))
    write_card(final, folder)
    logger.info("saved model %s %s to %s", final.name, final.version, folder)
    return final


def write_card(card: ModelCard, registry_dir: Path) -> Path:
    """Check ``card`` and write it as ``<name>.json`` in ``registry_dir``; returns the path.

    Raises
    ------
    ModelError
        The card would not load (see :meth:`ModelCard.from_dict`).
    """
    ModelCard.from_dict(json.loads(card.to_json()), source=f"card of {card.name}")
    path = Path(registry_dir) / f"{card.name}.json"
    path.write_text(card.to_json())
    return path
