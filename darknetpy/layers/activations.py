"""Darknet activations: one table, name -> elementwise function (and its in-place form).

Mirrors ``activations.c``/``activations.h`` (pjreddie and AlexeyAB). Every
function maps a tensor of any shape to one of the same shape. Darknet silently
falls back to relu on an unknown name (``get_activation``); we raise.

The formulas are Darknet's, with its constants (e.g. leaky's 0.1, gelu's tanh
form, mish's softplus threshold 20). Where PyTorch has the same function
(``leaky_relu``, ``sigmoid``, ``mish``, ``silu``) it is used: it computes the
same values to float32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ActivationFn = Callable[[Tensor], Tensor]


def _stair(x: Tensor) -> Tensor:
    n = torch.floor(x)
    half = torch.floor(x / 2)
    return torch.where(torch.remainder(n, 2) == 0, half, (x - n) + half)


def _hard_mish(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, torch.where(x > -2, x * x / 2 + x, torch.zeros_like(x)))


def _plse(x: Tensor) -> Tensor:
    return torch.where(x < -4, 0.01 * (x + 4),
                       torch.where(x > 4, 0.01 * (x - 4) + 1, 0.125 * x + 0.5))


def _lhtan(x: Tensor) -> Tensor:
    return torch.where(x < 0, 0.001 * x, torch.where(x > 1, 0.001 * (x - 1) + 1, x))


def _mish(x: Tensor) -> Tensor:
    # AlexeyAB: x * tanh(softplus(x)), softplus threshold 20 (same as torch's default)
    return F.mish(x)


def _selu(x: Tensor) -> Tensor:
    return torch.where(x >= 0, 1.0507 * x, 1.0507 * 1.6732 * (torch.exp(x) - 1))


def _gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(0.797885 * x + 0.035677 * x * x * x))


@dataclass(frozen=True)
class ActivationDef:
    """One Darknet activation: ``fn`` (out of place; calling the entry calls it), and for
    :mod:`darknetpy.optimize`: ``inplace``, a Python statement applying it in place to a
    fresh tensor ``{v}`` (None: none, or nothing to do for ``linear``), and ``onednn``,
    the ``(post-op name, scalars)`` fusing it into oneDNN's CPU convolution (None: none)."""

    fn: ActivationFn
    inplace: str | None = None
    onednn: tuple[str, tuple[float, ...]] | None = None

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)


#: name (as Darknet spells it in cfg files) -> :class:`ActivationDef`.
ACTIVATIONS: dict[str, ActivationDef] = {
    "linear": ActivationDef(lambda x: x, None, ("none", ())),
    "logistic": ActivationDef(torch.sigmoid, "{v}.sigmoid_()", ("sigmoid", ())),
    "loggy": ActivationDef(lambda x: 2 * torch.sigmoid(x) - 1),
    "relu": ActivationDef(F.relu, "{v}.relu_()", ("relu", ())),
    "relu6": ActivationDef(lambda x: torch.clamp(x, 0, 6), "{v}.clamp_(0, 6)",
                           ("hardtanh", (0.0, 6.0))),
    "elu": ActivationDef(lambda x: torch.where(x >= 0, x, torch.exp(x) - 1)),
    "selu": ActivationDef(_selu),
    "gelu": ActivationDef(_gelu),
    "relie": ActivationDef(lambda x: torch.where(x > 0, x, 0.01 * x)),
    "ramp": ActivationDef(lambda x: F.relu(x) + 0.1 * x),
    "leaky": ActivationDef(lambda x: F.leaky_relu(x, 0.1), "torch._C._nn.leaky_relu_({v}, 0.1)",
                           ("leaky_relu", (0.1,))),
    "tanh": ActivationDef(torch.tanh, "{v}.tanh_()", ("tanh", ())),
    "plse": ActivationDef(_plse),
    "stair": ActivationDef(_stair),
    "hardtan": ActivationDef(lambda x: torch.clamp(x, -1, 1), "{v}.clamp_(-1, 1)",
                             ("hardtanh", (-1.0, 1.0))),
    "lhtan": ActivationDef(_lhtan),
    "swish": ActivationDef(F.silu, "F.silu({v}, inplace=True)", ("swish", ())),
    "mish": ActivationDef(_mish, "F.mish({v}, inplace=True)"),
    "hard_mish": ActivationDef(_hard_mish),
}

#: Activations only AlexeyAB's Darknet knows (used to pick the profile).
ALEXEYAB_ACTIVATIONS = frozenset({"relu6", "gelu", "swish", "mish", "hard_mish",
                                  "normalize_channels", "normalize_channels_softmax",
                                  "normalize_channels_softmax_maxval"})


def get_activation(name: str) -> ActivationFn:
    """The activation function called ``name``.

    Raises:
        KeyError: unknown name; the message lists the known names. (Callers
        parsing a cfg turn it into a :class:`CfgError` with the location.)
    """
    try:
        return ACTIVATIONS[name].fn
    except KeyError:
        raise KeyError(f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}") \
            from None


class Activation(nn.Module):
    """An elementwise Darknet activation as a module; ``name`` is kept for export/printing."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = get_activation(name)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name
