"""The severity networks: Cov3d (a 3D ResNet-18) and a compact 3D CNN.

Both take a batch of preprocessed crops ``(N, 1, D, H, W)`` (values 0..1, see
:mod:`model.preprocess`) and return logits ``(N, 5)`` over
:data:`model.prediction.CLASS_NAMES`.

- :class:`Cov3d` follows Turnbull et al. (Cov3d, 2022): torchvision's
  ``r3d_18`` with a one-channel stem, dropout after each of the four residual
  stages and a two-layer head.  :func:`build_cov3d` adapts Kinetics-400
  weights (RGB stem summed into one channel, new head); about 33 M parameters.
- :class:`Compact3d` is small enough to ship in the repository (under 1 M
  parameters, a few MB) and runs on a CPU in well under a second per study.

:func:`build_network` builds either from a model card's ``architecture`` and
``architecture_params``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from model.errors import ModelError
from model.prediction import CLASS_NAMES

__all__ = [
    "ARCHITECTURES",
    "Compact3d",
    "Cov3d",
    "adapt_kinetics_state_dict",
    "build_compact3d",
    "build_cov3d",
    "build_network",
]

logger = logging.getLogger(__name__)

NUM_CLASSES = len(CLASS_NAMES)


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    """Two 3x3x3 convolutions with a shortcut (projected when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, stride)
        self.conv2 = nn.Sequential(
            nn.Conv3d(cout, cout, kernel_size=3, padding=1, bias=False), nn.BatchNorm3d(cout))
        self.shortcut: nn.Module
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv3d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm3d(cout))
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class Compact3d(nn.Module):
    """A small residual 3D CNN for the five severity classes.

    A strided stem, three residual stages that halve the resolution and widen
    the features, then global average *and* max pooling (the share of diseased
    lung is an average; a few dense foci are a maximum), dropout and a linear
    layer.

    Parameters
    ----------
    widths:
        Channels of the stem and of each stage; the default gives about 0.5 M
        parameters (2 MB as float32).
    dropout:
        Dropout probability before the classifier.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 96), dropout: float = 0.3) -> None:
        super().__init__()
        if len(widths) < 2:
            raise ModelError(f"Compact3d needs a stem width and at least one stage width, not {widths}")
        self.widths = tuple(int(w) for w in widths)
        self.stem = _conv_bn(1, self.widths[0], stride=2)
        pairs = zip(self.widths[:-1], self.widths[1:], strict=True)
        self.stages = nn.Sequential(*[_Residual(cin, cout, stride=2) for cin, cout in pairs])
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * self.widths[-1], NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        pooled = torch.cat([x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))], dim=1)
        return self.fc(self.dropout(pooled))


class Cov3d(nn.Module):
    """Cov3d: a one-channel 3D ResNet-18 with dropout after each residual stage.

    Built from a torchvision ``VideoResNet`` (``r3d_18``); the module names of
    the backbone (``stem``, ``layer1`` ... ``layer4``) are kept so that
    torchvision state dicts map onto this model key for key.
    """

    def __init__(self, dropout: float = 0.5, head_dropout: float = 0.5) -> None:
        super().__init__()
        from torchvision.models.video import r3d_18

        base = r3d_18(weights=None)
        old = base.stem[0]
        base.stem[0] = nn.Conv3d(1, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                                 padding=old.padding, bias=False)
        self.stem = base.stem
        self.layer1, self.layer2 = base.layer1, base.layer2
        self.layer3, self.layer4 = base.layer3, base.layer4
        self.drop1, self.drop2, self.drop3, self.drop4 = (nn.Dropout(dropout) for _ in range(4))
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(head_dropout), nn.Linear(512, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.drop1(self.layer1(x))
        x = self.drop2(self.layer2(x))
        x = self.drop3(self.layer3(x))
        x = self.drop4(self.layer4(x))
        return self.head(torch.flatten(self.avgpool(x), 1))


def adapt_kinetics_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn a torchvision ``r3d_18`` state dict (RGB, 400 classes) into Cov3d backbone weights.

    The stem's RGB kernels are summed into one channel (a grey image is R = G = B,
    so the summed kernel gives the same response); the Kinetics classifier
    ``fc.*`` is dropped (Cov3d has a new head).

    Raises
    ------
    ModelError
        The state dict is not an ``r3d_18`` one.
    """
    if "stem.0.weight" not in state_dict or "layer4.1.conv2.0.weight" not in state_dict:
        raise ModelError("the pretrained state dict is not a torchvision r3d_18 one (no stem.0.weight "
                         "or layer4 keys); pass torchvision.models.video.r3d_18(weights=...).state_dict()")
    stem = state_dict["stem.0.weight"]
    if stem.ndim != 5 or stem.shape[1] != 3:
        raise ModelError(f"the pretrained stem has shape {tuple(stem.shape)}; an RGB r3d_18 stem "
                         "(64, 3, 3, 7, 7) was expected")
    out = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    out["stem.0.weight"] = stem.sum(dim=1, keepdim=True)
    return out


def build_cov3d(pretrained_state_dict: Mapping[str, torch.Tensor] | None = None, *, pretrained: bool = False,
                dropout: float = 0.5, head_dropout: float = 0.5) -> Cov3d:
    """Build :class:`Cov3d`, optionally from Kinetics-400 ``r3d_18`` weights.

    Parameters
    ----------
    pretrained_state_dict:
        A torchvision ``r3d_18`` state dict (3 input channels, any ``fc``); its
        backbone is adapted with :func:`adapt_kinetics_state_dict`.
    pretrained:
        Fetch torchvision's ``R3D_18_Weights.KINETICS400_V1`` (downloads about
        130 MB on first use, needs internet) and adapt them.  Ignored when
        ``pretrained_state_dict`` is given.
    dropout, head_dropout:
        Dropout after each residual stage and inside the head.

    Raises
    ------
    ModelError
        The given state dict does not fit ``r3d_18``.
    """
    model = Cov3d(dropout=dropout, head_dropout=head_dropout)
    if pretrained_state_dict is None and pretrained:
        from torchvision.models.video import R3D_18_Weights, r3d_18

        logger.info("fetching torchvision's Kinetics-400 r3d_18 weights")
        pretrained_state_dict = r3d_18(weights=R3D_18_Weights.KINETICS400_V1).state_dict()
    if pretrained_state_dict is not None:
        adapted = adapt_kinetics_state_dict(pretrained_state_dict)
        result = model.load_state_dict(adapted, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("head.")]
        if missing or result.unexpected_keys:
            raise ModelError(f"the pretrained r3d_18 state dict does not fit Cov3d: missing {missing[:5]}, "
                             f"unexpected {list(result.unexpected_keys)[:5]}")
    return model


def build_compact3d(widths: tuple[int, ...] = (16, 32, 64, 96), dropout: float = 0.3) -> Compact3d:
    """Build :class:`Compact3d` (randomly initialised)."""
    return Compact3d(widths=widths, dropout=dropout)


ARCHITECTURES: tuple[str, ...] = ("compact3d", "cov3d")
"""Names a model card's ``architecture`` may take."""


def build_network(architecture: str, params: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a randomly initialised network from a model card's description.

    Parameters
    ----------
    architecture:
        ``"compact3d"`` or ``"cov3d"``.
    params:
        Keyword arguments of the builder (``widths`` and ``dropout`` for
        compact3d; ``dropout`` and ``head_dropout`` for cov3d).

    Raises
    ------
    ModelError
        Unknown architecture or parameters.
    """
    kwargs = dict(params or {})
    try:
        if architecture == "compact3d":
            if "widths" in kwargs:
                kwargs["widths"] = tuple(int(w) for w in kwargs["widths"])
            return build_compact3d(**kwargs)
        if architecture == "cov3d":
            return build_cov3d(None, **kwargs)
    except TypeError as exc:
        raise ModelError(f"architecture {architecture!r} does not take parameters {sorted(kwargs)}: {exc}; "
                         "fix architecture_params in the model card") from exc
    raise ModelError(f"unknown architecture {architecture!r} in the model card; "
                     f"known: {', '.join(ARCHITECTURES)}")
