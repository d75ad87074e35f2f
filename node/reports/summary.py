"""The summary image: a Secondary Capture any viewer can show.

An axial slice through the largest lung area and a coronal reformat, in a
lung window with the left lung (green), right lung (blue) and opacity (red)
outlined, next to the numbers in burned-in text.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from scipy import ndimage as ndi

from model.lungs import LungMasks
from model.prediction import Prediction
from model.quantify import Quantification
from model.volume import CTVolume

__all__ = ["build_summary", "render_summary"]

_PANEL = 512
_TEXT_WIDTH = 420
_COLOURS = {"left": (40, 220, 40), "right": (60, 140, 255), "opacity": (255, 60, 60)}


def _window(hu: np.ndarray, low: float = -1350.0, high: float = 150.0) -> np.ndarray:
    return (np.clip((hu.astype(np.float32) - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def _overlay(grey: np.ndarray, layers: list[tuple[np.ndarray, tuple[int, int, int]]]) -> np.ndarray:
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for mask, colour in layers:
        edge = mask & ~ndi.binary_erosion(mask)
        rgb[mask] = (0.75 * rgb[mask] + 0.25 * np.array(colour)).astype(np.uint8)
        rgb[edge] = colour
    return rgb


def _fit(img: np.ndarray, aspect: float) -> Image.Image:
    """Resize to the panel, ``aspect`` = physical height/width of one pixel."""
    h, w = img.shape[:2]
    phys_h, phys_w = h * aspect, float(w)
    scale = _PANEL / max(phys_h, phys_w)
    size = (max(1, int(round(phys_w * scale))), max(1, int(round(phys_h * scale))))
    out = Image.new("RGB", (_PANEL, _PANEL))
    out.paste(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR),
              ((_PANEL - size[0]) // 2, (_PANEL - size[1]) // 2))
    return out


def render_summary(volume: CTVolume, masks: LungMasks, q: Quantification,
                   prediction: Prediction | None, algorithm: str) -> np.ndarray:
    """The RGB pixel array (rows, columns, 3) of the summary image."""
    both = masks.both
    z = int(np.argmax(both.sum(axis=(1, 2))))
    axial = _overlay(_window(volume.hu[z]), [(masks.left[z], _COLOURS["left"]),
                                            (masks.right[z], _COLOURS["right"]),
                                            (q.opacity_mask[z], _COLOURS["opacity"])])
    ys = np.nonzero(both.any(axis=(0, 2)))[0]
    y = int((ys.min() + ys.max()) // 2) if ys.size else volume.shape[1] // 2
    flip = slice(None, None, -1)  # superior at the top
    coronal = _overlay(_window(volume.hu[flip, y, :]), [
        (masks.left[flip, y, :], _COLOURS["left"]), (masks.right[flip, y, :], _COLOURS["right"]),
        (q.opacity_mask[flip, y, :], _COLOURS["opacity"])])
    panels = [_fit(axial, volume.spacing[1] / volume.spacing[2]),
              _fit(coronal, volume.spacing[0] / volume.spacing[2])]
    canvas = Image.new("RGB", (2 * _PANEL + _TEXT_WIDTH, _PANEL))
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (_PANEL, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    lines = [
        "lungnode lung report", "",
        f"{'':8}{'volume':>10}{'PO':>8}{'PHO':>8}",
        f"{'left':8}{q.left.volume_ml:8.0f}ml{q.left.percent_opacity:7.1f}%{q.left.percent_high_opacity:7.1f}%",
        f"{'right':8}{q.right.volume_ml:8.0f}ml{q.right.percent_opacity:7.1f}%{q.right.percent_high_opacity:7.1f}%",
        f"{'total':8}{q.total.volume_ml:8.0f}ml{q.total.percent_opacity:7.1f}%{q.total.percent_high_opacity:7.1f}%",
        "", f"category {q.severity_category} (MosMedData, HU threshold)",
        "whole lung and per lung; lobes not measured",
    ]
    if prediction is not None:
        lines += ["", f"CNN: {prediction.predicted_class}, P(COVID) {prediction.p_covid:.2f}",
                  f"model {prediction.model_name} {prediction.model_version}",
                  f"on {prediction.device}"]
    lines += [""] + [f"! {f[:60]}" for f in q.quality_flags]
    lines += ["", "green left, blue right, red opacity", algorithm,
              "NOT FOR DIAGNOSTIC USE WITHOUT REVIEW"]
    for i, text in enumerate(lines):
        draw.text((2 * _PANEL + 12, 14 + 15 * i), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def build_summary(ref: Dataset, volume: CTVolume, masks: LungMasks, q: Quantification,
                  prediction: Prediction | None, *, algorithm: str, series_number: int,
                  manufacturer: str) -> hd.sc.SCImage:
    """The Secondary Capture in the source's study (patient and study from ``ref``)."""
    pixels = render_summary(volume, masks, q, prediction, algorithm)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB, bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT, series_instance_uid=hd.UID(),
        series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=manufacturer, patient_orientation=("L", "P"),
        series_description="lungnode summary",
    )
    sc.BurnedInAnnotation = "YES"
    sc.Laterality = ""  # General Series type 2C: chest is not a paired body part
    return sc
