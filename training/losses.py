"""Losses of the severity network, as in Cov3d: focal loss plus the earth mover's
distance (EMD) between predicted and true class distributions.

The five classes are ordered (non-COVID < mild < moderate < severe < critical),
so calling a critical study mild is worse than calling it severe: the squared
EMD over the cumulative distributions (Hou et al., 2016) charges a mistake by
how many classes it is off, and the focal term (Lin et al., 2017) keeps the
easy studies from dominating the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SeverityLoss", "emd_loss", "focal_loss"]


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: torch.Tensor | None = None) -> torch.Tensor:
    """Mean focal loss ``-alpha_t (1 - p_t)^gamma log p_t``.

    Parameters
    ----------
    logits:
        ``(N, C)`` network outputs.
    target:
        ``(N,)`` class indices.
    gamma:
        Focusing parameter; 0 gives the cross-entropy.
    alpha:
        Optional ``(C,)`` class weights.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    logp_t = logp.gather(1, target[:, None])[:, 0]
    loss = -((1.0 - logp_t.exp()) ** gamma) * logp_t
    if alpha is not None:
        loss = loss * alpha.to(loss.device, loss.dtype)[target]
    return loss.mean()


def emd_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared earth mover's distance between softmax and one-hot class CDFs.

    Parameters
    ----------
    logits:
        ``(N, C)`` network outputs over ordered classes.
    target:
        ``(N,)`` class indices.
    """
    p = F.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target, p.shape[1]).to(p.dtype)
    return ((p.cumsum(dim=1) - onehot.cumsum(dim=1)) ** 2).sum(dim=1).mean()


class SeverityLoss(nn.Module):
    """``focal + emd_weight * EMD``.

    Parameters
    ----------
    gamma:
        Focal loss focusing parameter.
    emd_weight:
        Weight of the EMD term.
    alpha:
        Optional per-class weights of the focal term.
    """

    def __init__(self, gamma: float = 2.0, emd_weight: float = 1.0,
                 alpha: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.emd_weight = emd_weight
        self.alpha = alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (focal_loss(logits, target, self.gamma, self.alpha)
                + self.emd_weight * emd_loss(logits, target))
