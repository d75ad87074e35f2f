"""Losses of the severity network, as in Cov3d: focal loss plus the earth mover's
distance (EMD) between predicted and true class distributions.

The five classes are ordered (non-COVID < mild < moderate < severe < critical),
so calling a critical study mild is worse than calling it severe: the squared
EMD over the cumulative distributions (Hou et al., 2016) charges a mistake by
how many classes it is off, and the focal term (Lin et al., 2017) keeps the
easy studies from dominating the gradient.

Partial labels.  A ``covid-unknown`` study (target ``-1``, see
:func:`model.manifest.label_index`) says COVID is present but not how severe.
It contributes through the presence probability only,
``P(COVID) = 1 - p(non-COVID)``, with a binary focal term
``-(1 - P(COVID))^gamma log P(COVID)``; it has no EMD term (its severity is
unknown).  A batch may mix fully and partially labelled studies and **both**
contribute: the loss is the mean over the batch of the per-sample losses
(:func:`severity_loss_per_sample`).  The published Cov3d loss drops the fully
labelled studies of a batch that holds any partial label; we do not repeat
that, because it throws away most of the gradient of every mixed batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PARTIAL",
    "SeverityLoss",
    "emd_loss",
    "focal_loss",
    "presence_focal_loss",
    "severity_loss_per_sample",
]

PARTIAL = -1
"""Target of a covid-unknown study (COVID present, severity unknown)."""


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


def presence_focal_loss(logits: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per-sample binary focal loss ``-(1 - q)^gamma log q`` on ``q = P(COVID) = 1 - p(non-COVID)``.

    ``log q`` is computed stably as ``logsumexp(logits[:, 1:]) - logsumexp(logits)``.

    Parameters
    ----------
    logits:
        ``(N, C)`` network outputs; class 0 is non-COVID.
    gamma:
        Focusing parameter.

    Returns
    -------
    ``(N,)`` losses (no reduction): the study is known to have COVID.
    """
    z = logits.float()
    log_q = torch.logsumexp(z[:, 1:], dim=1) - torch.logsumexp(z, dim=1)
    return -((1.0 - log_q.exp()) ** gamma) * log_q


def severity_loss_per_sample(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
                             emd_weight: float = 1.0, alpha: torch.Tensor | None = None,
                             presence_weight: float = 1.0) -> torch.Tensor:
    """Per-sample loss with partial labels, ``(N,)``.

    A fully labelled study (``target >= 0``) gets ``focal + emd_weight * EMD``
    (the Cov3d loss); a covid-unknown one (``target == -1``) gets
    ``presence_weight * presence focal`` (:func:`presence_focal_loss`).

    Parameters
    ----------
    logits:
        ``(N, C)`` network outputs over ordered classes.
    target:
        ``(N,)`` class indices, ``-1`` for covid-unknown.
    gamma, emd_weight, alpha:
        As in :class:`SeverityLoss` (``alpha`` weighs the fully labelled focal term only).
    presence_weight:
        Weight of a partial label's presence term.
    """
    full = target >= 0
    safe = torch.where(full, target, torch.zeros_like(target))
    logp = F.log_softmax(logits.float(), dim=1)
    logp_t = logp.gather(1, safe[:, None])[:, 0]
    focal = -((1.0 - logp_t.exp()) ** gamma) * logp_t
    if alpha is not None:
        focal = focal * alpha.to(focal.device, focal.dtype)[safe]
    p = logp.exp()
    onehot = F.one_hot(safe, p.shape[1]).to(p.dtype)
    emd = ((p.cumsum(dim=1) - onehot.cumsum(dim=1)) ** 2).sum(dim=1)
    partial = presence_weight * presence_focal_loss(logits, gamma)
    return torch.where(full, focal + emd_weight * emd, partial)


class SeverityLoss(nn.Module):
    """``focal + emd_weight * EMD``, with partial labels (target ``-1``) through P(COVID).

    Reduction: the mean over the batch of :func:`severity_loss_per_sample`, so
    a batch of full labels gives exactly ``focal_loss + emd_weight * emd_loss``
    and every study, full or partial, weighs ``1/N``.

    Parameters
    ----------
    gamma:
        Focal loss focusing parameter.
    emd_weight:
        Weight of the EMD term.
    alpha:
        Optional per-class weights of the focal term.
    presence_weight:
        Weight of the presence term of a covid-unknown study.
    """

    def __init__(self, gamma: float = 2.0, emd_weight: float = 1.0,
                 alpha: torch.Tensor | None = None, presence_weight: float = 1.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.emd_weight = emd_weight
        self.alpha = alpha
        self.presence_weight = presence_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return severity_loss_per_sample(logits, target, self.gamma, self.emd_weight, self.alpha,
                                        self.presence_weight).mean()
