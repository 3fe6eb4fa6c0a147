"""Shape-keeping layers: [dropout], [cost], [softmax], [activation], [empty], [crop].

Mirror ``dropout_layer.c`` (identity at inference), ``cost_layer.c`` (no
output of its own at inference: passes its input on), ``softmax_layer.c``
(``softmax_cpu`` over groups, or ``softmax_tree``), AlexeyAB's
``activation_layer.c`` and ``[empty]``, and ``crop_layer.c`` at test time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .activations import Activation
from .base import BuildContext, LayerModule, LayerSpec, activation_name, check, positive, register
from ..cfg import Section


class Identity(LayerModule):
    """x -> x (Darknet layers that do nothing at inference)."""

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        return x


@dataclass(frozen=True, kw_only=True)
class _PassThroughSpec(LayerSpec):
    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext):
        return cls(**cls.base_fields(sec, ctx, ctx.in_shape))

    def build(self, profile: str) -> nn.Module:
        return Identity()


@register("dropout")
@dataclass(frozen=True, kw_only=True)
class DropoutSpec(_PassThroughSpec):
    """``[dropout]``: identity at inference (``probability`` is training-only)."""


@register("cost")
@dataclass(frozen=True, kw_only=True)
class CostSpec(_PassThroughSpec):
    """``[cost]``: computes a training loss only; passes its input on at inference."""


@register("empty")
@dataclass(frozen=True, kw_only=True)
class EmptySpec(_PassThroughSpec):
    """AlexeyAB ``[empty]``: identity."""

    alexeyab_only = True


@register("activation")
@dataclass(frozen=True, kw_only=True)
class ActivationSpec(LayerSpec):
    """AlexeyAB ``[activation] activation=...``: the activation alone, shape kept."""

    activation: str
    alexeyab_only = True

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext) -> "ActivationSpec":
        return cls(**cls.base_fields(sec, ctx, ctx.in_shape),
                   activation=activation_name(sec, "linear"))

    def build(self, profile: str) -> nn.Module:
        return ActivationLayer(self.activation)


class ActivationLayer(LayerModule):
    """(N, C, H, W) -> same shape."""

    def __init__(self, name: str):
        super().__init__()
        self.act = Activation(name)

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        return self.act(x)


@register("crop")
@dataclass(frozen=True, kw_only=True)
class CropSpec(LayerSpec):
    """``[crop] crop_height crop_width``: at test time a centre crop, then
    ``x*2 - 1`` unless ``noadjust=1`` (``forward_crop_layer``)."""

    noadjust: bool

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext) -> "CropSpec":
        c, h, w = ctx.in_shape
        ch = positive(sec, "crop_height", sec.int("crop_height", 1))
        cw = positive(sec, "crop_width", sec.int("crop_width", 1))
        check(ch <= h and cw <= w, sec, f"crop {ch}x{cw} larger than input {h}x{w}",
              "crop_height")
        return cls(**cls.base_fields(sec, ctx, (c, ch, cw)),
                   noadjust=bool(sec.int("noadjust", 0)))

    def build(self, profile: str) -> nn.Module:
        return Crop(self)


class Crop(LayerModule):
    """(N, C, H, W) -> (N, C, crop_h, crop_w), centre crop at (H-ch)/2, (W-cw)/2."""

    def __init__(self, spec: CropSpec):
        super().__init__()
        c, h, w = spec.in_shape
        _, self.ch, self.cw = spec.out_shape
        self.dy, self.dx = (h - self.ch) // 2, (w - self.cw) // 2
        self.noadjust = spec.noadjust

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        x = x[:, :, self.dy:self.dy + self.ch, self.dx:self.dx + self.cw]
        return x if self.noadjust else x * 2 - 1


# ---------------------------------------------------------------------------
# [softmax]
# ---------------------------------------------------------------------------
@register("softmax", "soft")
@dataclass(frozen=True, kw_only=True)
class SoftmaxSpec(LayerSpec):
    """``[softmax] groups=1 temperature=1 tree=``.

    The input, flattened per image to C*H*W values, is split into ``groups``
    equal consecutive chunks, each softmaxed with ``exp((x - max)/t)``. With
    ``tree=`` (a WordNet ``.tree`` file) the chunks are the tree's groups
    (``softmax_tree``). Output keeps the input shape.
    """

    groups: int
    temperature: float
    tree_file: str | None
    tree: object = field(default=None, repr=False, compare=False)  # darknetpy.tree.Tree

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext) -> "SoftmaxSpec":
        c, h, w = ctx.in_shape
        groups = positive(sec, "groups", sec.int("groups", 1))
        check((c * h * w) % groups == 0, sec, f"{c * h * w} inputs not divisible by groups",
              "groups")
        tree_file, tree = ctx.load_tree(sec, c * h * w)
        return cls(**cls.base_fields(sec, ctx, ctx.in_shape), groups=groups,
                   temperature=sec.float("temperature", 1.0), tree_file=tree_file, tree=tree)

    def describe(self) -> tuple[str, str]:
        return (f"tree {os.path.basename(self.tree_file)}" if self.tree_file else
                f"g{self.groups}" if self.groups > 1 else ""), ""

    def build(self, profile: str) -> nn.Module:
        return Softmax(self)


class Softmax(LayerModule):
    """(N, C, H, W) -> same shape; softmax over consecutive groups of the flat input."""

    def __init__(self, spec: SoftmaxSpec):
        super().__init__()
        self.groups = spec.groups
        self.temperature = spec.temperature
        self.tree = spec.tree

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        n = x.shape[0]
        flat = x.reshape(n, -1)
        if self.tree is not None:
            from ..tree import softmax_tree
            return softmax_tree(flat, self.tree, self.temperature).view_as(x)
        flat = flat.view(n, self.groups, -1)  # (N, G, inputs/G)
        if self.temperature != 1.0:
            flat = flat / self.temperature
        return torch.softmax(flat, dim=-1).view_as(x)
