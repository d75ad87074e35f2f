"""The summary image: a Secondary Capture any viewer can show.

An axial slice through the largest lung area and a coronal reformat through
the middle of the lungs, in a lung window, with the left lung (green), right
lung (blue) and opacity (red) tinted and outlined, beside the numbers as
burned-in text: volume, PO and PHO per lung and in total, the MosMedData
category, the CNN's class and P(COVID) when a model ran, every quality flag,
the algorithm and its version, and "NOT FOR DIAGNOSTIC USE WITHOUT REVIEW".
With lobes (a lobe model made the masks), the CT severity score CTSS 0-25
and per lobe its PO, PHO and score 0-5.  Under the CNN's class, in yellow,
the model card's validity statement (what the model was trained on, whether
it was validated on patients).
Text is drawn with Pillow's built-in default font (nothing is downloaded).
"""

from __future__ import annotations

import textwrap

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage as ndi

from model.lungs import LungMasks
from model.prediction import Prediction
from model.quantify import Quantification
from model.volume import CTVolume
from node.stages.reports.seg import SEGMENT_COLOURS

__all__ = ["DISCLAIMER", "build_summary", "render_summary", "summary_lines"]

DISCLAIMER = "NOT FOR DIAGNOSTIC USE WITHOUT REVIEW"

_PANEL = 512
_TEXT_WIDTH = 470
_LINE = 17
_TABLE_END = 62 + 5 * _LINE  # first line below the table of numbers
_WHITE = (255, 255, 255)
_YELLOW = (255, 220, 60)
_LEFT, _RIGHT, _OPACITY = SEGMENT_COLOURS


def _window(hu: np.ndarray, low: float = -1350.0, high: float = 150.0) -> np.ndarray:
    """Lung window (centre -600 HU, width 1500 HU) to 8 bits."""
    return (np.clip((hu.astype(np.float32) - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def _overlay(grey: np.ndarray, layers: list[tuple[np.ndarray, tuple[int, int, int]]]) -> np.ndarray:
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for mask, colour in layers:
        edge = mask & ~ndi.binary_erosion(mask)
        rgb[mask] = (0.7 * rgb[mask] + 0.3 * np.array(colour)).astype(np.uint8)
        rgb[edge] = colour
    return rgb


def _fit(img: np.ndarray, aspect: float) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Resize into a square panel; ``aspect`` = physical height/width of one pixel.

    Returns the panel and the box (left, top, right, bottom) the image fills.
    """
    h, w = img.shape[:2]
    phys_h, phys_w = h * aspect, float(w)
    scale = _PANEL / max(phys_h, phys_w)
    size = (max(1, int(round(phys_w * scale))), max(1, int(round(phys_h * scale))))
    out = Image.new("RGB", (_PANEL, _PANEL))
    left, top = (_PANEL - size[0]) // 2, (_PANEL - size[1]) // 2
    out.paste(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR), (left, top))
    return out, (left, top, left + size[0], top + size[1])


def summary_lines(q: Quantification, prediction: Prediction | None, algorithm: str
                  ) -> list[tuple[str, tuple[int, int, int]]]:
    """The burned-in text below the table, line by line, with its colour."""
    t = q.thresholds
    lines = [
        (f"PO: % of lung volume from {t.opacity_low:g} to {t.high_opacity_high:g} HU", _WHITE),
        (f"PHO: % of lung volume from {t.opacity_high:g} to {t.high_opacity_high:g} HU", _WHITE),
        ("", _WHITE),
        (f"Severity category {q.severity_category} (MosMedData)", _WHITE),
        ("  by quantitative HU threshold", _WHITE),
    ]
    if q.lobes:
        lines += [("Whole lung, per lung and per lobe", _WHITE),
                  (f"CTSS {q.ctss} of 25 (Pan et al.; lobe score 0-5)", _WHITE)]
        lines += [(f"  {lobe.name:<18} PO {lobe.measurement.percent_opacity:5.1f} %  "
                   f"PHO {lobe.measurement.percent_high_opacity:5.1f} %  score {lobe.score}", _WHITE)
                  for lobe in q.lobes]
    else:
        lines.append(("Whole lung and per lung; lobes are not measured", _WHITE))
    if prediction is not None:
        lines += [
            ("", _WHITE),
            (f"CNN class: {prediction.predicted_class}   P(COVID) {prediction.p_covid:.2f}", _WHITE),
            *(("  " + part, _YELLOW) for part in textwrap.wrap(prediction.model_validity, width=60)),
            ("  " + ", ".join(f"{k} {v:.2f}" for k, v in prediction.probabilities.items()), _WHITE),
            (f"  model {prediction.model_name} {prediction.model_version} "
             f"sha256 {prediction.model_sha256[:12]}", _WHITE),
            (f"  ran on {prediction.device}"[:70], _WHITE),
        ]
    else:
        lines += [("", _WHITE), ("No severity model ran", _WHITE)]
    if q.quality_flags:
        lines += [("", _WHITE), ("Quality flags:", _YELLOW)]
        for flag in q.quality_flags:
            wrapped = textwrap.wrap(flag, width=60) or [""]
            lines += [(("! " if i == 0 else "  ") + part, _YELLOW) for i, part in enumerate(wrapped)]
    lines += [("", _WHITE), ("green: left lung, blue: right lung", _WHITE),
              ("red: opacity (counted in PO)", _OPACITY),
              ("", _WHITE),
              # the algorithm, then the lung segmenter with its model and weights' sha256
              *((part, _WHITE) for line in algorithm.split("\n") for part in textwrap.wrap(line, width=60)),
              (DISCLAIMER, _YELLOW)]
    return lines


def _text_height(q: Quantification, prediction: Prediction | None, algorithm: str) -> int:
    return _TABLE_END + _LINE * len(summary_lines(q, prediction, algorithm)) + 10


def _draw_text(draw: ImageDraw.ImageDraw, q: Quantification, prediction: Prediction | None,
               algorithm: str, x0: int) -> None:
    font = ImageFont.load_default(size=14)
    bold = ImageFont.load_default(size=16)
    draw.text((x0, 10), "lungnode lung report", fill=_WHITE, font=bold)
    draw.text((x0, 30), DISCLAIMER, fill=_YELLOW, font=font)
    columns = (x0, x0 + 120, x0 + 230, x0 + 320)
    y = 62
    for text, x in zip(("", "volume", "PO", "PHO"), columns, strict=True):
        draw.text((x, y), text, fill=_WHITE, font=font)
    for name, m, colour in (("left lung", q.left, _LEFT), ("right lung", q.right, _RIGHT),
                            ("both lungs", q.total, _WHITE)):
        y += _LINE
        cells = (name, f"{m.volume_ml:.0f} ml", f"{m.percent_opacity:.1f} %",
                 f"{m.percent_high_opacity:.1f} %")
        for text, x in zip(cells, columns, strict=True):
            draw.text((x, y), text, fill=colour, font=font)
    y = _TABLE_END
    for text, colour in summary_lines(q, prediction, algorithm):
        draw.text((x0, y), text, fill=colour, font=font)
        y += _LINE


def render_summary(volume: CTVolume, masks: LungMasks, q: Quantification,
                   prediction: Prediction | None, algorithm: str) -> np.ndarray:
    """The RGB pixel array ``(rows, columns, 3)`` of the summary image.

    Parameters
    ----------
    volume, masks, q, prediction:
        The analysis to show.
    algorithm:
        Algorithm name and version, burned in.
    """
    both = masks.both
    z = int(np.argmax(both.sum(axis=(1, 2))))
    axial = _overlay(_window(volume.hu[z]), [(masks.left[z], _LEFT), (masks.right[z], _RIGHT),
                                            (q.opacity_mask[z], _OPACITY)])
    ys = np.nonzero(both.any(axis=(0, 2)))[0]
    y = int((ys.min() + ys.max()) // 2) if ys.size else volume.shape[1] // 2
    # superior at the top: slices run along the normal; flip when it points to the head (+z)
    flip = slice(None, None, -1) if volume.direction[2, 2] >= 0 else slice(None)
    coronal = _overlay(_window(volume.hu[flip, y, :]), [
        (masks.left[flip, y, :], _LEFT), (masks.right[flip, y, :], _RIGHT),
        (q.opacity_mask[flip, y, :], _OPACITY)])
    height = max(_PANEL, _text_height(q, prediction, algorithm))  # long flag lists grow it
    canvas = Image.new("RGB", (2 * _PANEL + _TEXT_WIDTH, height))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)
    # patient left is +x in LPS: the column direction tells which image side it is on
    right_side_text = ("L", "R") if volume.direction[0, 0] >= 0 else ("R", "L")
    for i, (img, aspect, title) in enumerate((
            (axial, volume.spacing[1] / volume.spacing[2], f"axial, slice {z + 1} of {volume.shape[0]}"),
            (coronal, volume.spacing[0] / volume.spacing[2], f"coronal, row {y + 1} of {volume.shape[1]}"))):
        panel, box = _fit(img, aspect)
        canvas.paste(panel, (i * _PANEL, 0))
        x_off = i * _PANEL
        draw.text((x_off + 6, 4), title, fill=_WHITE, font=font)
        middle = (box[1] + box[3]) // 2
        draw.text((x_off + box[0] + 4, middle), right_side_text[1], fill=_YELLOW, font=font)
        draw.text((x_off + box[2] - 14, middle), right_side_text[0], fill=_YELLOW, font=font)
    _draw_text(draw, q, prediction, algorithm, 2 * _PANEL + 14)
    return np.asarray(canvas, dtype=np.uint8)


def build_summary(ref: Dataset, volume: CTVolume, masks: LungMasks, q: Quantification,
                  prediction: Prediction | None, *, algorithm: str, series_number: int,
                  manufacturer: str, institution_name: str | None = None) -> hd.sc.SCImage:
    """The Secondary Capture in the source's study.

    Parameters
    ----------
    ref:
        A cleaned source header: patient and study attributes are copied from it.
    volume, masks, q, prediction, algorithm:
        What :func:`render_summary` shows.
    series_number, manufacturer, institution_name:
        Series and equipment attributes of the new object.
    """
    pixels = render_summary(volume, masks, q, prediction, algorithm)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB, bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT, series_instance_uid=hd.UID(),
        series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=manufacturer, patient_orientation=("L", "P"),
        series_description=f"{algorithm.split()[0]} summary",
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = DISCLAIMER
    # General Series: Laterality is Type 2C (paired body parts); naming the unpaired part
    # examined tells validators that no laterality applies
    sc.BodyPartExamined = "CHEST"
    if institution_name:
        sc.InstitutionName = institution_name
    return sc
