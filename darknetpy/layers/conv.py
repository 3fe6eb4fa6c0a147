"""Parameterised layers: [convolutional], [connected], [batchnorm].

Mirror ``convolutional_layer.c``, ``connected_layer.c`` and ``batchnorm_layer.c``
(``forward_*``, ``parse_*`` in ``parser.c``). Each module lists its parameters
in ``.weights`` file order in :meth:`darknet_params` (``parser.c:
load_convolutional_weights``/``load_connected_weights``/``load_batchnorm_weights``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import gemm
from .activations import Activation
from .base import (BuildContext, LayerModule, LayerSpec, activation_name, check, positive,
                   register)
from ..cfg import Section

#: batch-norm epsilon handling per profile: pjreddie CPU ``normalize_cpu`` adds
#: 1e-6 to the standard deviation; AlexeyAB (and pjreddie's GPU/cuDNN) add 1e-5
#: to the variance. :func:`bn_std` computes it.
BN_FORMULAS = {"pjreddie": "sqrt_var_plus_1e-6", "alexeyab": "var_plus_1e-5"}
#: the epsilon of :data:`BN_FORMULAS` (C's ``.000001f`` / ``.00001f``).
BN_EPS = {"pjreddie": 1e-6, "alexeyab": 1e-5}


def bn_std(var: Tensor, profile: str, *, sqrt_dtype: torch.dtype | None = None,
           c_float_eps: bool = False) -> Tensor:
    """The per-channel divisor of Darknet's batch norm, shape of ``var`` (C,).

    pjreddie: ``sqrt(var) + eps``; alexeyab: ``sqrt(var + eps)`` (eps: :data:`BN_EPS`).
    ``var + eps`` is computed in ``var``'s dtype; the square root (and pjreddie's
    ``+ eps`` after it) in ``sqrt_dtype`` (default: ``var``'s dtype). ``c_float_eps``:
    eps is the C ``float`` literal (the decimal rounded to float32, as ``normalize_cpu``
    uses it), else the Python float.
    """
    eps = BN_EPS[profile]
    if c_float_eps:
        eps = float(torch.tensor(eps, dtype=torch.float32))

    def sqrt(t: Tensor) -> Tensor:
        return torch.sqrt(t if sqrt_dtype is None else t.to(sqrt_dtype))

    if profile == "pjreddie":
        return sqrt(var) + eps
    return sqrt(var + eps)


class DarknetBatchNorm(nn.Module):
    """Inference batch norm with Darknet's formula for the profile.

    ``weight`` = Darknet's ``scales``, ``bias`` = ``biases``; buffers
    ``running_mean``/``running_var`` = ``rolling_mean``/``rolling_variance``.
    Input (N, C, H, W) -> same shape:
    pjreddie: ``(x - mean) / (sqrt(var) + 1e-6) * scale + bias``;
    alexeyab: ``(x - mean) / sqrt(var + 1e-5) * scale + bias``.
    """

    def __init__(self, channels: int, profile: str):
        super().__init__()
        self.profile = profile
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def std(self, *, sqrt_dtype: torch.dtype | None = None, c_float_eps: bool = False) -> Tensor:
        """The per-channel divisor of the profile's formula, shape (C,): :func:`bn_std`
        of ``running_var`` with these options."""
        return bn_std(self.running_var, self.profile, sqrt_dtype=sqrt_dtype,
                      c_float_eps=c_float_eps)

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)  # (C,) -> (1, C, 1, 1)
        x = (x - self.running_mean.view(shape)) / self.std().view(shape)
        return x * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, formula={BN_FORMULAS[self.profile]}"


def _bn_params(bn: DarknetBatchNorm) -> list[tuple[str, Tensor]]:
    return [("bn.weight", bn.weight), ("bn.running_mean", bn.running_mean),
            ("bn.running_var", bn.running_var)]


# ---------------------------------------------------------------------------
# [convolutional]
# ---------------------------------------------------------------------------
@register("convolutional", "conv")
@dataclass(frozen=True, kw_only=True)
class ConvolutionalSpec(LayerSpec):
    """``[convolutional]`` (``parse_convolutional``).

    Defaults as Darknet: filters=1 size=1 stride=1 pad=0 padding=0 groups=1
    dilation=1 activation=logistic batch_normalize=0 antialiasing=0. ``pad=1``
    means padding = size/2. AlexeyAB: ``stride_x``/``stride_y`` override
    ``stride``; the effective padding is padding*dilation; ``antialiasing=1|2``
    convolves with stride 1 and then blurs with a fixed depthwise 3x3 (or 2x2)
    kernel at the layer's stride.
    """

    filters: int
    size: int
    stride_x: int
    stride_y: int
    padding: int
    groups: int
    dilation: int
    activation: str
    batch_normalize: bool
    antialiasing: int

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext) -> "ConvolutionalSpec":
        c, h, w = ctx.in_shape
        filters = positive(sec, "filters", sec.int("filters", 1))
        size = positive(sec, "size", sec.int("size", 1))
        stride = positive(sec, "stride", sec.int("stride", 1))
        stride_x = positive(sec, "stride_x", sec.int("stride_x", stride))
        stride_y = positive(sec, "stride_y", sec.int("stride_y", stride))
        pad = sec.int("pad", 0)
        padding = sec.int("padding", 0)
        if pad:
            padding = size // 2
        groups = positive(sec, "groups", sec.int("groups", 1))
        dilation = positive(sec, "dilation", sec.int("dilation", 1))
        if size == 1:  # parser.c parse_convolutional: `if (size == 1) dilation = 1;`
            dilation = 1
        antialiasing = sec.int("antialiasing", 0)
        check(antialiasing in (0, 1, 2), sec, "must be 0, 1 or 2", "antialiasing")
        check(c % groups == 0, sec, f"input channels {c} not divisible by groups {groups}",
              "groups")
        check(filters % groups == 0, sec, f"filters {filters} not divisible by groups {groups}",
              "groups")
        if sec.int("flipped", 0):
            raise sec.error("flipped=1 (weights stored transposed) is not supported by "
                            "darknetpy", "flipped")
        if sec.int("xnor", 0) or sec.int("binary", 0):
            raise sec.error("XNOR/binary convolutions are not supported by darknetpy", "xnor")
        activation = activation_name(sec, "logistic")
        bn = bool(sec.int("batch_normalize", 0))
        eff_pad = padding * dilation
        out_w = (w + 2 * eff_pad - dilation * (size - 1) - 1) // stride_x + 1
        out_h = (h + 2 * eff_pad - dilation * (size - 1) - 1) // stride_y + 1
        if antialiasing:
            # the convolution itself runs at stride 1; the blur applies the stride
            conv_w = (w + 2 * eff_pad - dilation * (size - 1) - 1) + 1
            conv_h = (h + 2 * eff_pad - dilation * (size - 1) - 1) + 1
            blur = 3 if antialiasing == 1 else 2
            blur_pad = blur // 2 if antialiasing == 1 else 0
            out_w = (conv_w + 2 * blur_pad - blur) // stride_x + 1
            out_h = (conv_h + 2 * blur_pad - blur) // stride_y + 1
        check(out_w > 0 and out_h > 0, sec,
              f"output size {out_h}x{out_w} is empty for input {h}x{w}", "size")
        return cls(**cls.base_fields(sec, ctx, (filters, out_h, out_w)),
                   filters=filters, size=size, stride_x=stride_x, stride_y=stride_y,
                   padding=padding, groups=groups, dilation=dilation, activation=activation,
                   batch_normalize=bn, antialiasing=antialiasing)

    @property
    def has_weights(self) -> bool:
        return True

    @property
    def flops(self) -> float:
        c = self.in_shape[0]
        n, out_h, out_w = self.out_shape
        return 2.0 * n * (c // self.groups) * self.size * self.size * out_h * out_w

    def describe(self) -> tuple[str, str]:
        s = f"{self.stride_x}" if self.stride_x == self.stride_y else \
            f"{self.stride_x}x{self.stride_y}"
        d = f"({self.dilation})" if self.dilation > 1 else ""
        g = f" g{self.groups}" if self.groups > 1 else ""
        return f"{self.filters}{g}", f"{self.size} x {self.size}/{s:>2}{d}"


    def build(self, profile: str) -> nn.Module:
        return Convolutional(self, profile)


class Convolutional(LayerModule):
    """Conv2d (+ Darknet batch norm, else bias) + activation (+ AlexeyAB blur).

    (N, C, H, W) -> (N, filters, out_h, out_w). Mirrors
    ``forward_convolutional_layer``: convolution, then ``normalize`` with the
    rolling statistics, ``scale_bias``, ``add_bias``, ``activate_array``.
    """

    def __init__(self, spec: ConvolutionalSpec, profile: str):
        super().__init__()
        c = spec.in_shape[0]
        stride = (1, 1) if spec.antialiasing else (spec.stride_y, spec.stride_x)
        self.conv = nn.Conv2d(c, spec.filters, spec.size, stride=stride,
                              padding=spec.padding * spec.dilation, dilation=spec.dilation,
                              groups=spec.groups, bias=not spec.batch_normalize)
        self.bn = DarknetBatchNorm(spec.filters, profile) if spec.batch_normalize else None
        self.act = Activation(spec.activation)
        self.blur = _blur(spec) if spec.antialiasing else None
        self.profile = profile
        #: "torch" (torch's conv) or "darknet" (Darknet's gemm order, darknetpy.gemm)
        self.arithmetic = "torch"

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        darknet = self.arithmetic == "darknet"
        x = gemm.conv2d_module(self.conv, x) if darknet else self.conv(x)
        if self.bn is not None:
            x = gemm.batchnorm(x, self.bn) if darknet else self.bn(x)
        x = gemm.activation(x, self.act, self.profile) if darknet else self.act(x)
        if self.blur is not None:
            # Darknet's blur is itself a convolutional layer (gemm, zero biases)
            x = gemm.conv2d_module(self.blur, x) if darknet else self.blur(x)
        return x

    def darknet_params(self) -> list[tuple[str, Tensor]]:
        """Parameters in ``.weights`` order: biases, [scales, mean, variance], weights (OIHW)."""
        if self.bn is None:
            return [("conv.bias", self.conv.bias), ("conv.weight", self.conv.weight)]
        return [("bn.bias", self.bn.bias), *_bn_params(self.bn), ("conv.weight", self.conv.weight)]


def _blur(spec: ConvolutionalSpec) -> nn.Conv2d:
    """AlexeyAB's antialiasing blur: fixed depthwise kernel, not in the weights file."""
    n = spec.filters
    if spec.antialiasing == 1:
        k = torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]) / 16
        pad = 1
    else:
        k = torch.full((2, 2), 0.25)
        pad = 0
    blur = nn.Conv2d(n, n, k.shape[0], stride=(spec.stride_y, spec.stride_x), padding=pad,
                     groups=n, bias=False)
    blur.weight.data.copy_(k.expand(n, 1, *k.shape))
    blur.weight.requires_grad_(False)
    return blur


# ---------------------------------------------------------------------------
# [connected]
# ---------------------------------------------------------------------------
@register("connected", "conn")
@dataclass(frozen=True, kw_only=True)
class ConnectedSpec(LayerSpec):
    """``[connected] output=N activation=logistic batch_normalize=0``.

    Input (C, H, W) flattened in CHW order -> (output, 1, 1).
    """

    output: int
    activation: str
    batch_normalize: bool

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext) -> "ConnectedSpec":
        out = positive(sec, "output", sec.int("output", 1))
        return cls(**cls.base_fields(sec, ctx, (out, 1, 1)), output=out,
                   activation=activation_name(sec, "logistic"),
                   batch_normalize=bool(sec.int("batch_normalize", 0)))

    @property
    def has_weights(self) -> bool:
        return True

    @property
    def flops(self) -> float:
        c, h, w = self.in_shape
        return 2.0 * c * h * w * self.output

    def describe(self) -> tuple[str, str]:
        return f"{self.output}", ""

    def build(self, profile: str) -> nn.Module:
        return Connected(self, profile)


class Connected(LayerModule):
    """Fully connected layer: (N, C, H, W) -> (N, output, 1, 1) (``forward_connected_layer``)."""

    def __init__(self, spec: ConnectedSpec, profile: str):
        super().__init__()
        c, h, w = spec.in_shape
        self.fc = nn.Linear(c * h * w, spec.output, bias=not spec.batch_normalize)
        self.bn = DarknetBatchNorm(spec.output, profile) if spec.batch_normalize else None
        self.act = Activation(spec.activation)
        self.profile = profile
        #: "torch" (torch's linear) or "darknet" (Darknet's gemm_nt order, darknetpy.gemm)
        self.arithmetic = "torch"

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        x = x.flatten(1)  # (N, C*H*W)
        if self.arithmetic == "darknet":
            x = gemm.linear(x, self.fc.weight, self.fc.bias)  # -> (N, out)
        else:
            x = self.fc(x)  # -> (N, out)
        if self.bn is not None:
            x = gemm.batchnorm(x, self.bn) if self.arithmetic == "darknet" else self.bn(x)
        if self.arithmetic == "darknet":  # activate_array: no vector loop
            x = gemm.activation(x, self.act, self.profile, vector_loop=False)
        else:
            x = self.act(x)
        return x[:, :, None, None]  # (N, out) -> (N, out, 1, 1)

    def darknet_params(self) -> list[tuple[str, Tensor]]:
        """Parameters in ``.weights`` order: biases, weights (out x in), [scales, mean, var]."""
        if self.bn is None:
            return [("fc.bias", self.fc.bias), ("fc.weight", self.fc.weight)]
        return [("bn.bias", self.bn.bias), ("fc.weight", self.fc.weight), *_bn_params(self.bn)]


# ---------------------------------------------------------------------------
# [batchnorm]
# ---------------------------------------------------------------------------
@register("batchnorm")
@dataclass(frozen=True, kw_only=True)
class BatchnormSpec(LayerSpec):
    """Standalone ``[batchnorm]``: shape unchanged."""

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext) -> "BatchnormSpec":
        return cls(**cls.base_fields(sec, ctx, ctx.in_shape))

    @property
    def has_weights(self) -> bool:
        return True

    def build(self, profile: str) -> nn.Module:
        return Batchnorm(self, profile)


class Batchnorm(LayerModule):
    """(N, C, H, W) -> same shape, Darknet batch norm with the profile's formula."""

    def __init__(self, spec: BatchnormSpec, profile: str):
        super().__init__()
        self.bn = DarknetBatchNorm(spec.in_shape[0], profile)

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        return self.bn(x)

    def darknet_params(self) -> list[tuple[str, Tensor]]:
        """``load_batchnorm_weights``: scales, rolling_mean, rolling_variance (no biases)."""
        return _bn_params(self.bn)
