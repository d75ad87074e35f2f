"""Classical lung segmentation (no network weights).

Implementation owned by the analysis work; the dataclass below is the
contract used by quantification, reports and the node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LungMasks", "segment_lungs"]


@dataclass(frozen=True, eq=False)
class LungMasks:
    """Boolean masks on the volume's grid ``(z, y, x)``.

    ``left`` is the patient's left lung (image right on a standard axial view,
    larger patient x in LPS).
    """

    left: np.ndarray
    right: np.ndarray

    @property
    def both(self) -> np.ndarray:
        return self.left | self.right


def segment_lungs(volume):  # type: ignore[no-untyped-def]  # implemented by the analysis work
    raise NotImplementedError
