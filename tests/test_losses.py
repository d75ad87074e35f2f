"""The severity loss with partial (covid-unknown) labels, on hand-computed cases."""

from __future__ import annotations

import math

import torch

from training.losses import (
    SeverityLoss,
    emd_loss,
    focal_loss,
    presence_focal_loss,
    severity_loss_per_sample,
)

LOGITS = torch.tensor([[2.0, 0.5, -1.0, 0.0, -2.0],
                       [-1.0, 1.5, 0.3, -0.2, 0.1],
                       [0.4, -0.3, 2.2, 0.9, -1.0],
                       [1.0, 1.0, 1.0, 1.0, 1.0]])


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _full_by_hand(row: list[float], t: int, gamma: float = 2.0, w: float = 1.0) -> float:
    p = _softmax(row)
    focal = -((1 - p[t]) ** gamma) * math.log(p[t])
    cdf_p = [sum(p[:k + 1]) for k in range(5)]
    cdf_t = [1.0 if k >= t else 0.0 for k in range(5)]
    emd = sum((a - b) ** 2 for a, b in zip(cdf_p, cdf_t, strict=True))
    return focal + w * emd


def _partial_by_hand(row: list[float], gamma: float = 2.0) -> float:
    q = 1.0 - _softmax(row)[0]
    return -((1 - q) ** gamma) * math.log(q)


def test_all_full_labels_equal_the_cov3d_loss() -> None:
    target = torch.tensor([0, 1, 2, 4])
    for gamma, w in ((2.0, 1.0), (0.0, 0.5)):
        expected = focal_loss(LOGITS, target, gamma) + w * emd_loss(LOGITS, target)
        got = SeverityLoss(gamma=gamma, emd_weight=w)(LOGITS, target)
        assert torch.allclose(got, expected, atol=1e-6)
        rows = zip(LOGITS.tolist(), target.tolist(), strict=True)
        by_hand = sum(_full_by_hand(r, t, gamma, w) for r, t in rows)
        assert math.isclose(float(got), by_hand / 4, rel_tol=1e-5)


def test_all_partial_labels_use_the_presence_probability_only() -> None:
    target = torch.full((4,), -1)
    got = SeverityLoss()(LOGITS, target)
    by_hand = sum(_partial_by_hand(r) for r in LOGITS.tolist()) / 4
    assert math.isclose(float(got), by_hand, rel_tol=1e-5)
    # moving mass among the COVID classes changes nothing; moving it to non-COVID does
    shuffled = LOGITS[:, [0, 4, 3, 2, 1]]
    assert torch.allclose(presence_focal_loss(shuffled), presence_focal_loss(LOGITS), atol=1e-6)


def test_a_mixed_batch_is_the_mean_of_both_kinds() -> None:
    target = torch.tensor([0, -1, 2, -1])
    rows = LOGITS.tolist()
    by_hand = (_full_by_hand(rows[0], 0) + _partial_by_hand(rows[1]) + _full_by_hand(rows[2], 2)
               + _partial_by_hand(rows[3])) / 4
    got = SeverityLoss()(LOGITS, target)
    assert math.isclose(float(got), by_hand, rel_tol=1e-5)
    per = severity_loss_per_sample(LOGITS, target, presence_weight=0.5)
    assert math.isclose(float(per[1]), 0.5 * _partial_by_hand(rows[1]), rel_tol=1e-5)
    assert math.isclose(float(per[0]), _full_by_hand(rows[0], 0), rel_tol=1e-5)


def test_gradients_flow_from_full_and_partial_labels() -> None:
    logits = LOGITS.clone().requires_grad_(True)
    target = torch.tensor([3, -1, 2, -1])
    SeverityLoss()(logits, target).backward()
    assert logits.grad is not None
    grad = logits.grad
    assert torch.isfinite(grad).all()
    for i in range(4):
        assert grad[i].abs().sum() > 1e-4, f"no gradient from sample {i}"
    # a partial label pushes non-COVID down and leaves the split among the COVID classes alone
    # up to the softmax coupling: its gradient on logit 0 is positive (the loss grows with it)
    assert grad[1, 0] > 0 and grad[3, 0] > 0
