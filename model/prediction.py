"""The CNN's output for one study, as reports and the CLI consume it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CLASS_NAMES", "DEFAULT_VALIDITY", "Prediction"]

CLASS_NAMES: tuple[str, ...] = ("non-COVID", "mild", "moderate", "severe", "critical")
"""The five Cov3d severity classes, in the network's output order."""

DEFAULT_VALIDITY = "validation on patient data not stated"
"""What the results say of a model whose card has no ``validity`` statement (never a claim of
validation)."""


@dataclass(frozen=True)
class Prediction:
    """Class probabilities of the severity network and where they came from."""

    probabilities: dict[str, float]
    """Class name to probability; sums to 1."""
    predicted_class: str
    model_name: str
    model_version: str
    model_sha256: str
    device: str
    """``cpu`` or ``cuda:N`` (with the GPU name where known)."""
    model_validity: str = DEFAULT_VALIDITY
    """The model card's statement of what the model was trained on and whether it was validated on
    patients (e.g. "trained on synthetic phantoms; not validated on patient data"); every result
    shows it next to the class and P(COVID)."""

    @property
    def p_covid(self) -> float:
        """Probability of any COVID-19 class: 1 - P(non-COVID)."""
        return 1.0 - self.probabilities[CLASS_NAMES[0]]
