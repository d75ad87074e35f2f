"""Volume-sized arrays reused from one study to the next.

An analysis makes four arrays the size of the series (the HU volume, the two
lung masks, the opacity mask: 375 MB for 300 slices of 512 x 512).  Memory
fresh from the operating system costs a page fault per page on first touch;
on the development VM that is about 1 GB/s (0.3-0.4 s per 300-slice study,
a third of load + segment + quantify), where writing into memory already
mapped runs at over 10 GB/s.  A node worker analyses study after study, so
:func:`take` hands out the memory of arrays that are no longer used instead.

An array is reused only when nothing refers to it any more: the pool holds
the owning array and hands out views of it; every view, and every view of a
view, holds a reference to the owner, so the owner's reference count says
whether any is alive (checked under a lock).  The pool keeps at most
:data:`POOL_BYTES` of arrays between studies (:func:`set_limit`; the node sets it from
``[analysis] buffer_pool_mb``; 0 turns the pool off).
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np

__all__ = ["POOL_BYTES", "clear", "pooled_bytes", "set_limit", "take"]

POOL_BYTES = 1536 * 2**20
"""Most bytes the pool keeps between studies (default 1.5 GB: the four arrays of a 600-slice study
of 512 x 512 take 750 MB)."""

_lock = threading.Lock()
_pool: list[np.ndarray] = []  # owning 1-D uint8 arrays, most recently used last


def _refs(owner: np.ndarray) -> int:
    return sys.getrefcount(owner)


def _idle(owner: np.ndarray) -> bool:
    """Whether nothing but the pool refers to ``owner`` (called as ``_idle(_pool[i])``)."""
    return _refs(owner) <= _IDLE_REFS


def _idle_refs() -> int:
    """What :func:`_refs` counts for an owner only a list holds, called at _idle's depth."""
    probe = [np.empty(1, np.uint8)]
    return (lambda owner: _refs(owner))(probe[0])


_IDLE_REFS = _idle_refs()  # measured, not assumed (the count depends on how the call is made)


def take(shape: tuple[int, ...], dtype: np.dtype | type, *, zero: bool = False) -> np.ndarray:
    """An array of ``shape`` and ``dtype``, made from pooled memory when an idle owner is big enough.

    Its contents are undefined unless ``zero`` (as :func:`numpy.empty` and
    :func:`numpy.zeros`).
    """
    dt = np.dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize
    if nbytes == 0 or POOL_BYTES <= 0:
        return np.zeros(shape, dt) if zero else np.empty(shape, dt)
    with _lock:
        # the smallest idle owner that fits; owners are not split, so a small request does not
        # pin a big owner (a 2x bigger one is left for a later, bigger request)
        best = None
        for i in range(len(_pool)):
            if nbytes <= _pool[i].nbytes <= 2 * nbytes and _idle(_pool[i]) and (
                    best is None or _pool[i].nbytes < _pool[best].nbytes):
                best = i
        if best is None:
            # np.zeros: the kernel's zero pages, touched lazily (only where written)
            owner = np.zeros(nbytes, np.uint8) if zero else np.empty(nbytes, np.uint8)
            _pool.append(owner)
            _trim()
        else:
            owner = _pool.pop(best)
            _pool.append(owner)
        out = owner[:nbytes].view(dt).reshape(shape)
    if zero and best is not None:
        out.fill(0)
    return out


def _trim() -> None:
    """Drop idle owners, least recently used first, while the pool holds more than POOL_BYTES."""
    total = sum(o.nbytes for o in _pool)
    i = 0
    while total > POOL_BYTES and i < len(_pool):
        if _idle(_pool[i]):
            total -= _pool.pop(i).nbytes
        else:
            i += 1


def set_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` between studies (0: no pool; arrays are made fresh each time)."""
    global POOL_BYTES
    with _lock:
        POOL_BYTES = max(0, int(nbytes))
        _trim()


def pooled_bytes() -> int:
    """Bytes the pool holds (in use or idle)."""
    with _lock:
        return sum(o.nbytes for o in _pool)


def clear() -> None:
    """Forget every pooled array (arrays in use stay valid: their views keep the memory)."""
    with _lock:
        _pool.clear()
