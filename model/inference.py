"""Severity inference: one engine per worker process, the model loaded once.

:class:`InferenceEngine` loads a model from a registry folder
(:mod:`model.registry`, sha256-checked), preprocesses each study with the
card's settings (:mod:`model.preprocess`), runs on CUDA when available
(mixed precision with ``torch.autocast``) and on the CPU otherwise, averages
the prediction with that of the left-right mirrored input (test-time
augmentation, on by default) and batches several studies in one forward pass.

The node calls :meth:`InferenceEngine.predict` as its
``Predictor = Callable[[CTVolume, LungMasks], Prediction]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from model.errors import ModelError
from model.lungs import LungMasks
from model.prediction import CLASS_NAMES, Prediction
from model.preprocess import preprocess
from model.registry import ModelCard, load_model
from model.volume import CTVolume

__all__ = ["InferenceEngine", "resolve_device"]

logger = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises
    ------
    ModelError
        CUDA asked for but not available, or an unknown device string.
    """
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} was asked for but CUDA is not available here; use "
                             "device='auto' or 'cpu'")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise ModelError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index} ({torch.cuda.get_device_name(device)})"
    return "cpu"


class InferenceEngine:
    """A loaded severity network and how to run it.

    Parameters
    ----------
    net:
        The network (its weights loaded); moved to ``device`` and set to eval mode.
    card:
        Its model card (preprocessing, name, version, sha256).
    device:
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    tta:
        Average each prediction with that of the left-right mirrored input.
    max_batch:
        Most studies per forward pass in :meth:`predict_batch`.
    """

    def __init__(self, net: nn.Module, card: ModelCard, *, device: str = "auto", tta: bool = True,
                 max_batch: int = 16) -> None:
        self.card = card
        self.device = resolve_device(device)
        self.device_name = _describe(self.device)
        self.net = net.to(self.device).eval()
        self.tta = tta
        self.max_batch = max(1, int(max_batch))
        self._amp_dtype = torch.float32
        if self.device.type == "cuda":
            self._amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        logger.info("model %s %s ready on %s (TTA %s)", card.name, card.version, self.device_name,
                    "on" if tta else "off")

    @classmethod
    def from_registry(cls, name: str | None = None, registry_dir: Path | None = None, *,
                      device: str = "auto", tta: bool = True) -> InferenceEngine:
        """Load a registered model (``None``: the default model shipped in ``model/weights``).

        Raises
        ------
        ModelError
            Unknown model, tampered weights or a card that does not fit them.
        """
        net, card = load_model(name, registry_dir)
        return cls(net, card, device=device, tta=tta)

    def preprocess(self, volume: CTVolume, masks: LungMasks) -> torch.Tensor:
        """The ``(1, D, H, W)`` input of one study, with this model's preprocessing."""
        if masks.left.shape != volume.shape or masks.right.shape != volume.shape:
            raise ModelError(f"series {volume.series_instance_uid}: lung masks {masks.left.shape} do not "
                             f"match the volume {volume.shape}; segment this volume's lungs")
        return preprocess(volume, masks, self.card.preprocess)

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities ``(N, 5)`` (CPU, float32) of a preprocessed ``(N, 1, D, H, W)`` batch."""
        out = []
        for start in range(0, batch.shape[0], self.max_batch):
            x = batch[start:start + self.max_batch].to(self.device, dtype=torch.float32, non_blocking=True)
            with torch.autocast(device_type=self.device.type, dtype=self._amp_dtype,
                                enabled=self.device.type == "cuda"):
                p = torch.softmax(self.net(x).float(), dim=1)
                if self.tta:
                    p = 0.5 * (p + torch.softmax(self.net(torch.flip(x, dims=[-1])).float(), dim=1))
            out.append(p.float().cpu())
        probs = torch.cat(out)
        if not bool(torch.isfinite(probs).all()):
            raise ModelError(f"model {self.card.name}: the network produced non-finite probabilities; "
                             "the weights may be corrupt")
        return probs

    def _prediction(self, p: torch.Tensor) -> Prediction:
        p = p.double()
        p = p / p.sum()
        probs = {name: float(v) for name, v in zip(CLASS_NAMES, p.tolist(), strict=True)}
        return Prediction(probabilities=probs, predicted_class=CLASS_NAMES[int(p.argmax())],
                          model_name=self.card.name, model_version=self.card.version,
                          model_sha256=self.card.sha256, device=self.device_name,
                          model_validity=self.card.validity)

    def predict(self, volume: CTVolume, masks: LungMasks) -> Prediction:
        """Severity class probabilities of one study (the node's ``Predictor``).

        Raises
        ------
        ModelError
            Masks that do not fit the volume, lungs too small, NaN in the volume.
        """
        return self._prediction(self.probabilities(self.preprocess(volume, masks)[None])[0])

    def predict_batch(self, items: Sequence[tuple[CTVolume, LungMasks]]) -> list[Prediction]:
        """Predictions of several studies, run in batches of at most ``max_batch``.

        Raises
        ------
        ModelError
            As :meth:`predict`, naming the series at fault.
        """
        if not items:
            return []
        batch = torch.stack([self.preprocess(v, m) for v, m in items])
        return [self._prediction(p) for p in self.probabilities(batch)]

