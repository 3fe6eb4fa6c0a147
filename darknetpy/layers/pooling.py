"""Spatial layers without weights: [maxpool], [avgpool], [local_avgpool], [upsample],
[reorg], [reorg3d].

Mirror ``maxpool_layer.c``, ``avgpool_layer.c``, ``upsample_layer.c``,
``reorg_layer.c`` and ``blas.c: reorg_cpu``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BuildContext, LayerModule, LayerSpec, check, positive, register
from ..cfg import Section


# ---------------------------------------------------------------------------
# [maxpool] and [local_avgpool]: Darknet's windowed pooling
# ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class _WindowSpec(LayerSpec):
    """Window geometry shared by [maxpool] and [local_avgpool] (``parse_maxpool``).

    ``stride`` defaults to 1, ``size`` to ``stride``, ``padding`` to ``size-1``;
    out = (in + padding - size) / stride + 1 (integer division); windows start
    at ``-padding/2``; cells outside the input are ignored (not zeros).
    """

    size: int
    stride_x: int
    stride_y: int
    padding: int

    @staticmethod
    def window(sec: Section, ctx: BuildContext) -> dict:
        stride = positive(sec, "stride", sec.int("stride", 1))
        stride_x = positive(sec, "stride_x", sec.int("stride_x", stride))
        stride_y = positive(sec, "stride_y", sec.int("stride_y", stride))
        size = positive(sec, "size", sec.int("size", stride))
        padding = sec.int("padding", size - 1)
        check(padding >= 0, sec, "must not be negative", "padding")
        return dict(size=size, stride_x=stride_x, stride_y=stride_y, padding=padding)

    def out_hw(self) -> tuple[int, int]:
        _, h, w = self.in_shape
        return ((h + self.padding - self.size) // self.stride_y + 1,
                (w + self.padding - self.size) // self.stride_x + 1)

    def pads(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) padding so that plain pooling gives Darknet's windows.

        Negative right/bottom values mean: crop that many cells.
        """
        _, h, w = self.in_shape
        out_h, out_w = self.out_shape[1:]
        left = top = self.padding // 2
        right = (out_w - 1) * self.stride_x + self.size - w - left
        bottom = (out_h - 1) * self.stride_y + self.size - h - top
        return left, right, top, bottom

    def describe(self) -> tuple[str, str]:
        s = f"{self.stride_x}" if self.stride_x == self.stride_y else \
            f"{self.stride_x}x{self.stride_y}"
        return "", f"{self.size} x {self.size}/{s:>2}"


def _window_sum(x: Tensor, kernel: int, stride) -> Tensor:
    """Sum over each pooling window, (N, C, H, W) -> (N, C, out_h, out_w):
    ``avg_pool2d(divisor_override=1)``. While exporting to ONNX (whose AveragePool has
    no divisor override; the TorchScript exporter silently drops it) the same sums as a
    depthwise convolution with a ones kernel."""
    if torch.onnx.is_in_onnx_export():
        c = int(x.shape[1])  # a constant in the graph (channels are fixed at build time)
        ones = torch.ones(c, 1, kernel, kernel, dtype=x.dtype, device=x.device)
        return F.conv2d(x, ones, stride=stride, groups=c)
    return F.avg_pool2d(x, kernel, stride, divisor_override=1)


def _pad_window(x: Tensor, pads: tuple[int, int, int, int], value: float) -> Tensor:
    """Pad (or crop, for negative amounts) the right/bottom and pad the left/top."""
    left, right, top, bottom = pads
    x = F.pad(x, (left, max(right, 0), top, max(bottom, 0)), value=value)
    if right < 0:
        x = x[..., :, :right]
    if bottom < 0:
        x = x[..., :bottom, :]
    return x


@register("maxpool", "max")
@dataclass(frozen=True, kw_only=True)
class MaxpoolSpec(_WindowSpec):
    """``[maxpool]`` (``forward_maxpool_layer``), with AlexeyAB's ``stride_x``/``stride_y``,
    ``maxpool_depth``/``out_channels`` (max over channel groups, spatial size kept)
    and ``antialiasing``.
    """

    maxpool_depth: bool
    out_channels: int
    antialiasing: int

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext) -> "MaxpoolSpec":
        c, h, w = ctx.in_shape
        geom = cls.window(sec, ctx)
        depth = bool(sec.int("maxpool_depth", 0))
        out_channels = positive(sec, "out_channels", sec.int("out_channels", 1))
        anti = sec.int("antialiasing", 0)
        if anti:
            raise sec.error("antialiasing in [maxpool] is not supported by darknetpy",
                            "antialiasing")
        if depth:
            out_shape = (out_channels, h, w)
        else:
            out_shape = (c, (h + geom["padding"] - geom["size"]) // geom["stride_y"] + 1,
                         (w + geom["padding"] - geom["size"]) // geom["stride_x"] + 1)
        check(out_shape[1] > 0 and out_shape[2] > 0, sec,
              f"output size {out_shape[1]}x{out_shape[2]} is empty", "size")
        return cls(**cls.base_fields(sec, ctx, out_shape), **geom, maxpool_depth=depth,
                   out_channels=out_channels, antialiasing=anti)


    @property
    def flops(self) -> float:
        c, h, w = self.out_shape
        return float(c * h * w * self.size * self.size)

    def build(self, profile: str) -> nn.Module:
        return MaxpoolDepth(self) if self.maxpool_depth else Maxpool(self)


class Maxpool(LayerModule):
    """(N, C, H, W) -> (N, C, out_h, out_w): max over Darknet's windows (-inf outside)."""

    def __init__(self, spec: MaxpoolSpec):
        super().__init__()
        self.pads = spec.pads()
        self.kernel = spec.size
        self.stride = (spec.stride_y, spec.stride_x)
        self.identity = spec.size == 1 and self.stride == (1, 1)

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        if self.identity:
            return x
        x = _pad_window(x, self.pads, float("-inf"))
        return F.max_pool2d(x, self.kernel, self.stride)


class MaxpoolDepth(LayerModule):
    """AlexeyAB ``maxpool_depth``: out[g] = max over channels g, g+G, g+2G, ... (G=out_channels).

    (N, C, H, W) -> (N, G, H, W).
    """

    def __init__(self, spec: MaxpoolSpec):
        super().__init__()
        self.groups = spec.out_channels

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        n, c, h, w = x.shape
        g = self.groups
        extra = (-c) % g
        if extra:  # channels past C do not exist: pad with -inf
            x = F.pad(x, (0, 0, 0, 0, 0, extra), value=float("-inf"))
        return x.view(n, -1, g, h, w).amax(dim=1)  # (N, C/G, G, H, W) -> (N, G, H, W)


@register("local_avgpool")
@dataclass(frozen=True, kw_only=True)
class LocalAvgpoolSpec(_WindowSpec):
    """AlexeyAB ``[local_avgpool]``: windows as [maxpool], average over the cells inside
    the input (``forward_local_avgpool_layer``)."""

    alexeyab_only = True

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext) -> "LocalAvgpoolSpec":
        c, h, w = ctx.in_shape
        geom = cls.window(sec, ctx)
        out_shape = (c, (h + geom["padding"] - geom["size"]) // geom["stride_y"] + 1,
                     (w + geom["padding"] - geom["size"]) // geom["stride_x"] + 1)
        check(out_shape[1] > 0 and out_shape[2] > 0, sec, "output size is empty", "size")
        return cls(**cls.base_fields(sec, ctx, out_shape), **geom)

    def build(self, profile: str) -> nn.Module:
        return LocalAvgpool(self)


class LocalAvgpool(LayerModule):
    """(N, C, H, W) -> (N, C, out_h, out_w): mean of the valid cells of each window."""

    def __init__(self, spec: LocalAvgpoolSpec):
        super().__init__()
        self.pads = spec.pads()
        self.kernel = spec.size
        self.stride = (spec.stride_y, spec.stride_x)
        ones = torch.ones(1, 1, *spec.in_shape[1:])
        count = F.avg_pool2d(_pad_window(ones, self.pads, 0.0), self.kernel, self.stride,
                             divisor_override=1)
        self.register_buffer("count", count, persistent=False)  # (1, 1, out_h, out_w)

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        total = _window_sum(_pad_window(x, self.pads, 0.0), self.kernel, self.stride)
        return total / self.count


# ---------------------------------------------------------------------------
# [avgpool]
# ---------------------------------------------------------------------------
@register("avgpool", "avg")
@dataclass(frozen=True, kw_only=True)
class AvgpoolSpec(LayerSpec):
    """``[avgpool]``: global average, (C, H, W) -> (C, 1, 1) (``forward_avgpool_layer``)."""

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext) -> "AvgpoolSpec":
        return cls(**cls.base_fields(sec, ctx, (ctx.in_shape[0], 1, 1)))

    def build(self, profile: str) -> nn.Module:
        return Avgpool()


class Avgpool(LayerModule):
    """(N, C, H, W) -> (N, C, 1, 1)."""

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


# ---------------------------------------------------------------------------
# [upsample]
# ---------------------------------------------------------------------------
@register("upsample")
@dataclass(frozen=True, kw_only=True)
class UpsampleSpec(LayerSpec):
    """``[upsample] stride=2 scale=1`` (``upsample_layer.c``).

    Nearest: out[y][x] = scale * in[y/stride][x/stride]. A negative stride
    downsamples: out = scale * sum of each stride x stride block.
    """

    stride: int
    scale: float

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext) -> "UpsampleSpec":
        c, h, w = ctx.in_shape
        stride = sec.int("stride", 2)
        check(stride != 0, sec, "must not be 0", "stride")
        scale = sec.float("scale", 1.0)
        if stride > 0:
            out = (c, h * stride, w * stride)
        else:
            s = -stride
            check(h % s == 0 and w % s == 0, sec,
                  f"input {h}x{w} not divisible by downsampling stride {s}", "stride")
            out = (c, h // s, w // s)
        return cls(**cls.base_fields(sec, ctx, out), stride=stride, scale=scale)

    def describe(self) -> tuple[str, str]:
        return "", f"{abs(self.stride)}x" if self.stride > 0 else f"/{-self.stride}"

    def build(self, profile: str) -> nn.Module:
        return Upsample(self)


class Upsample(LayerModule):
    """(N, C, H, W) -> (N, C, H*s, W*s) nearest (or (H/s, W/s) block sums for stride < 0)."""

    def __init__(self, spec: UpsampleSpec):
        super().__init__()
        self.stride = spec.stride
        self.scale = spec.scale

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        if self.stride > 0:
            x = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        else:
            s = -self.stride
            x = _window_sum(x, s, s)
        return x * self.scale if self.scale != 1.0 else x


# ---------------------------------------------------------------------------
# [reorg] and [reorg3d]
# ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class _ReorgBase(LayerSpec):
    stride: int
    reverse: bool

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext):
        c, h, w = ctx.in_shape
        s = positive(sec, "stride", sec.int("stride", 1))
        reverse = bool(sec.int("reverse", 0))
        for key in ("extra", "flatten"):
            if sec.int(key, 0):
                raise sec.error(f"[{sec.type}] {key}=1 is not supported by darknetpy", key)
        if reverse:
            check(c % (s * s) == 0, sec, f"channels {c} not divisible by stride^2", "stride")
            if cls is Reorg3dSpec:  # AlexeyAB's reorg_cpu gets C/s^2 and divides by s^2 again
                check(c % (s ** 4) == 0, sec, f"channels {c} not divisible by stride^4 "
                      "(AlexeyAB's reverse [reorg3d]: Darknet would divide by zero or read "
                      "out of bounds)", "reverse")
            out = (c // (s * s), h * s, w * s)
        else:
            check(h % s == 0 and w % s == 0, sec,
                  f"input {h}x{w} not divisible by stride {s}", "stride")
            if cls is ReorgSpec:
                check(c % (s * s) == 0, sec,
                      f"channels {c} not divisible by stride^2 (Darknet's reorg_cpu)", "stride")
            out = (c * s * s, h // s, w // s)
        return cls(**cls.base_fields(sec, ctx, out), stride=s, reverse=reverse)

    def describe(self) -> tuple[str, str]:
        return "", f"/{self.stride}" if not self.reverse else f"{self.stride}x"


@register("reorg")
@dataclass(frozen=True, kw_only=True)
class ReorgSpec(_ReorgBase):
    """``[reorg] stride=s`` (YOLOv2 passthrough): ``blas.c: reorg_cpu`` called with the
    INPUT dims — not pixel_unshuffle, not space_to_depth::

        x.view(N, C/s², H, s, W, s).permute(0, 3, 5, 1, 2, 4).reshape(N, C*s², H/s, W/s)
    """

    def build(self, profile: str) -> nn.Module:
        return Reorg(self.stride, self.reverse, space_to_depth=False)


class Reorg(LayerModule):
    """Darknet's reorg family; (N, C, H, W) -> (N, C*s², H/s, W/s).

    ``space_to_depth=False``: pjreddie's ``reorg_cpu`` order ([reorg]);
    ``True``: AlexeyAB's [reorg3d]. ``reverse`` (both): depth-to-space,
    (N, C, H, W) -> (N, C/s², H*s, W*s), which is the same for both.
    """

    def __init__(self, stride: int, reverse: bool, space_to_depth: bool):
        super().__init__()
        self.s, self.reverse, self.space_to_depth = stride, reverse, space_to_depth

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        n, c, h, w = x.shape
        s = self.s
        if self.reverse and self.space_to_depth:
            # AlexeyAB reorg_cpu(input, out_w, out_h, out_c, ..., forward=1): the input is
            # read with the OUTPUT dims (C/s², H*s, W*s), then depth-to-space'd again
            x = _depth_to_space(x.reshape(n, c // (s * s), h * s, w * s), s)
            return x.reshape(n, c // (s * s), h * s, w * s)
        if self.reverse:
            return _depth_to_space(x, s)
        if self.space_to_depth:
            x = x.reshape(n, c, h // s, s, w // s, s)             # (N, C, H/s, dy, W/s, dx)
        else:
            x = x.reshape(n, c // (s * s), h, s, w, s)            # memory read as (C/s², H, s, W, s)
        x = x.permute(0, 3, 5, 1, 2, 4)                           # (N, s, s, C', H', W')
        return x.reshape(n, c * s * s, h // s, w // s)


def _depth_to_space(x: Tensor, s: int) -> Tensor:
    """reorg_cpu(forward=1) with x's dims: out[c2, j*s+dy, i*s+dx] = x[(dy*s+dx)*C'+c2, j, i];
    (N, C, H, W) -> (N, C/s², H*s, W*s)."""
    n, c, h, w = x.shape
    x = x.reshape(n, s, s, c // (s * s), h, w)                # (N, dy, dx, C', H, W)
    x = x.permute(0, 3, 4, 1, 5, 2)                           # (N, C', H, dy, W, dx)
    return x.reshape(n, c // (s * s), h * s, w * s)


@register("reorg3d")
@dataclass(frozen=True, kw_only=True)
class Reorg3dSpec(_ReorgBase):
    """AlexeyAB ``[reorg3d] stride=s``: true space-to-depth::

        x.view(N, C, H/s, s, W/s, s).permute(0, 3, 5, 1, 2, 4).reshape(N, C*s², H/s, W/s)
    """

    alexeyab_only = True

    def build(self, profile: str) -> nn.Module:
        return Reorg(self.stride, self.reverse, space_to_depth=True)
