"""model.morph gives scipy.ndimage's results (it only does the work faster)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from model import morph


def _blobs(shape: tuple[int, ...], seed: int, level: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sigma = (0, 2.5, 2.5) if len(shape) == 3 else 2.5
    return ndi.gaussian_filter(rng.random(shape).astype(np.float32), sigma) > level


def _disk(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy * yy + xx * xx) <= r * r + r // 2


FOOTPRINTS = [_disk(1), _disk(3), _disk(6), np.ones((3, 3), bool), np.ones((1, 5), bool),
              ndi.generate_binary_structure(2, 1)]


@pytest.mark.parametrize("fp", FOOTPRINTS, ids=lambda f: f"{f.shape}-{int(f.sum())}")
def test_binary_ops_match_scipy(fp: np.ndarray) -> None:
    stack = _blobs((6, 70, 90), seed=1)
    stack[:, 0, 10:30] = True  # objects touching the border
    stack[:, 40:60, -1] = True
    s3 = fp[None]
    assert np.array_equal(morph.dilate(stack, fp), ndi.binary_dilation(stack, structure=s3))
    assert np.array_equal(morph.erode(stack, fp), ndi.binary_erosion(stack, structure=s3))
    assert np.array_equal(morph.opening(stack, fp), ndi.binary_opening(stack, structure=s3))
    assert np.array_equal(morph.closing(stack, fp), ndi.binary_closing(stack, structure=s3))
    assert np.array_equal(morph.dilate(stack, fp, iterations=2),
                          ndi.binary_dilation(stack, structure=s3, iterations=2))
    # 2D input and a cropped (non-contiguous) view
    assert np.array_equal(morph.dilate(stack[2], fp), ndi.binary_dilation(stack[2], structure=fp))
    view = stack[:, 5:60, 7:80]
    assert np.array_equal(morph.erode(view, s3), ndi.binary_erosion(view, structure=s3))


@pytest.mark.parametrize("sigma,truncate", [(0.7, 2.5), (1.0, 2.0), (2.3, 2.5), (1.5, 4.0)])
def test_gaussian_matches_scipy(sigma: float, truncate: float) -> None:
    rng = np.random.default_rng(2)
    img = (rng.normal(-800, 60, (4, 50, 64))).astype(np.float32)
    img[:, 20:30, 20:40] = 40.0
    ours = morph.gaussian(img, sigma, truncate)
    ref = ndi.gaussian_filter(img, (0, sigma, sigma), truncate=truncate)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-2  # HU: float32 rounding only
    assert np.abs(morph.gaussian(img[1], sigma, truncate) - ref[1]).max() < 1e-2


def test_fill_holes_matches_scipy_per_slice() -> None:
    stack = _blobs((5, 60, 60), seed=3, level=0.45)
    stack[:, 10:50, 10:50] |= True
    stack[:, 20:30, 20:30] = False  # a hole
    stack[:, 0:5, 25:35] = False  # a notch open to the border: not a hole
    ours = morph.fill_holes(stack)
    ref = np.stack([ndi.binary_fill_holes(s) for s in stack])
    assert np.array_equal(ours, ref)
    assert ours[:, 25, 25].all()
    assert not morph.fill_holes(np.zeros((2, 8, 8), bool)).any()


def test_largest_per_slice() -> None:
    stack = np.zeros((3, 40, 40), bool)
    stack[0, 2:6, 2:6] = True  # 16
    stack[0, 10:20, 10:20] = True  # 100: kept
    stack[1, 30:39, 30:39] = True
    stack[1, 5:7, 5:7] = True
    stack[1, 7, 7] = True  # joins diagonally (8-connectivity)
    out = morph.largest_per_slice(stack)
    assert out[0].sum() == 100 and out[0, 15, 15]
    assert out[1].sum() == 81
    assert not out[2].any()
    lab, _ = ndi.label(stack[1], structure=np.ones((3, 3)))
    assert lab[5, 5] == lab[7, 7]


@pytest.mark.parametrize("f,fz", [(1, 3), (2, 1), (2, 2), (3, 3)])
def test_block_mean_is_the_mean_of_each_block(f: int, fz: int) -> None:
    from model.lungs import block_mean

    rng = np.random.default_rng(4)
    hu = rng.integers(-1024, 1500, (7, 50, 47)).astype(np.int16)  # remainders in every axis
    out = block_mean(hu, f, fz)
    y2, x2 = (50 // f) * f, (47 // f) * f
    nz = -(-7 // fz)
    assert out.shape == (nz, y2 // f, x2 // f) and out.dtype == np.float32
    for k in range(nz):
        slab = hu[k * fz:(k + 1) * fz, :y2, :x2].astype(np.float64)
        ref = slab.reshape(slab.shape[0], y2 // f, f, x2 // f, f).mean(axis=(0, 2, 4))
        assert np.abs(out[k] - ref).max() < 1e-3


@pytest.mark.parametrize("f,fz", [(1, 3), (2, 1), (2, 2), (3, 3), (4, 2)])
def test_block_counts_count_each_block(f: int, fz: int) -> None:
    from model.quantify import _block_counts

    mask = _blobs((7, 50, 47), seed=5)  # remainders in every axis
    counts, sizes = _block_counts(mask, f, fz)
    y2, x2 = (50 // f) * f, (47 // f) * f
    nz = -(-7 // fz)
    assert counts.shape == (nz, y2 // f, x2 // f) and counts.dtype == np.uint16
    for k in range(nz):
        slab = mask[k * fz:(k + 1) * fz, :y2, :x2]
        ref = slab.reshape(slab.shape[0], y2 // f, f, x2 // f, f).sum(axis=(0, 2, 4))
        assert np.array_equal(counts[k], ref)
        assert int(sizes[k].squeeze()) == slab.shape[0] * f * f
