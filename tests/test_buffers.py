"""model.buffers hands out memory again only when nothing uses it any more."""

from __future__ import annotations

import numpy as np
import pytest

from model import buffers


@pytest.fixture(autouse=True)
def _empty_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    buffers.clear()
    monkeypatch.setattr(buffers, "POOL_BYTES", 10 * 2**20)
    yield
    buffers.clear()


def _owner(a: np.ndarray) -> np.ndarray:
    while a.base is not None:
        a = a.base
    return a


def test_memory_of_a_dropped_array_is_reused() -> None:
    a = buffers.take((4, 100, 100), np.int16)
    owner = id(_owner(a))
    a[...] = 7
    del a
    b = buffers.take((4, 100, 100), np.int16)
    assert id(_owner(b)) == owner
    assert b.shape == (4, 100, 100) and b.dtype == np.int16


@pytest.mark.parametrize("keep", ["array", "slice", "view of a view", "other dtype"])
def test_memory_in_use_is_not_handed_out(keep: str) -> None:
    a = buffers.take((4, 100, 100), np.int16)
    a[...] = 7
    if keep == "array":
        kept = a
    elif keep == "slice":
        kept = a[1]
    elif keep == "view of a view":
        kept = a[1:][1:, 5:]
    else:
        kept = a.view(np.uint8)
    del a
    b = buffers.take((4, 100, 100), np.int16)
    b[...] = -1
    assert (kept.view(np.int16) if keep == "other dtype" else kept).min() == 7
    assert _owner(b) is not _owner(kept)


def test_zero_clears_reused_memory_and_sizes_match() -> None:
    a = buffers.take((3, 50, 50), bool)
    a[...] = True
    del a
    m = buffers.take((3, 50, 50), bool, zero=True)
    assert not m.any()
    # a much smaller request does not take (and pin) a big owner
    small = buffers.take((10,), np.float32)
    assert _owner(small).nbytes < _owner(m).nbytes
    del m
    big = buffers.take((3, 60, 60), bool)  # larger than every owner: fresh memory
    assert _owner(big).nbytes == big.nbytes


def test_pool_keeps_at_most_its_limit_of_idle_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buffers, "POOL_BYTES", 3 * 2**20)
    held = [buffers.take((2**20,), np.uint8) for _ in range(5)]  # all in use: all kept
    assert buffers.pooled_bytes() == 5 * 2**20
    del held
    buffers.take((2 * 2**20,), np.uint8)  # a new owner; the idle ones over the limit go
    assert buffers.pooled_bytes() <= 3 * 2**20


def test_pool_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buffers, "POOL_BYTES", 0)
    a = buffers.take((10, 10), np.int16, zero=True)
    assert not a.any() and buffers.pooled_bytes() == 0
