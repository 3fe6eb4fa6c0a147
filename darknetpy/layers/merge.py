"""Layers that read other layers' outputs: [route], [shortcut], [scale_channels], [sam].

Mirror ``route_layer.c``, ``shortcut_layer.c`` (pjreddie ``shortcut_cpu``,
AlexeyAB ``shortcut_multilayer_cpu``), ``scale_channels_layer.c`` and
``sam_layer.c``. The layers they read are resolved to absolute indices at
build time (``spec.refs``); ``forward`` receives their outputs in that order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import Activation
from .base import BuildContext, LayerModule, LayerSpec, activation_name, check, positive, register
from ..cfg import Section


# ---------------------------------------------------------------------------
# [route]
# ---------------------------------------------------------------------------
@register("route")
@dataclass(frozen=True, kw_only=True)
class RouteSpec(LayerSpec):
    """``[route] layers=a,b,...`` channel concat in listed order.

    AlexeyAB ``groups=g group_id=i``: take the i-th of g equal channel chunks
    of EACH input, then concat. All inputs must share H and W.
    """

    groups: int
    group_id: int

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext) -> "RouteSpec":
        refs = [ctx.resolve(sec, "layers", v) for v in sec.ints("layers")]
        groups = positive(sec, "groups", sec.int("groups", 1))
        group_id = sec.int("group_id", 0)
        check(0 <= group_id < groups, sec, f"must be in 0..{groups - 1}", "group_id")
        shapes = [ctx.shapes[r] for r in refs]
        h, w = shapes[0][1:]
        for r, (c, hh, ww) in zip(refs, shapes):
            check((hh, ww) == (h, w), sec, f"layer {r} is {hh}x{ww} but layer {refs[0]} is "
                  f"{h}x{w}; route needs equal sizes", "layers")
            check(c % groups == 0, sec, f"layer {r} has {c} channels, not divisible by "
                  f"groups={groups}", "groups")
        out_c = sum(s[0] // groups for s in shapes)
        return cls(**cls.base_fields(sec, ctx, (out_c, h, w), refs), groups=groups,
                   group_id=group_id)


    def describe(self) -> tuple[str, str]:
        g = f" /{self.groups}({self.group_id})" if self.groups > 1 else ""
        return "", " ".join(str(r) for r in self.refs) + g

    def build(self, profile: str) -> nn.Module:
        return Route(self)


class Route(LayerModule):
    """cat over refs of channel chunk ``group_id`` of ``groups``: (N, sum C_i/g, H, W)."""

    def __init__(self, spec: RouteSpec):
        super().__init__()
        self.groups, self.group_id = spec.groups, spec.group_id
        self.single = len(spec.refs) == 1 and spec.groups == 1

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        if self.single:
            return refs[0]
        if self.groups > 1:
            refs = [r.chunk(self.groups, dim=1)[self.group_id] for r in refs]
        return torch.cat(refs, dim=1)


# ---------------------------------------------------------------------------
# [shortcut]
# ---------------------------------------------------------------------------
WEIGHTS_TYPES = ("none", "per_feature", "per_channel")
WEIGHTS_NORMALIZATIONS = ("none", "relu", "softmax")


@register("shortcut")
@dataclass(frozen=True, kw_only=True)
class ShortcutSpec(LayerSpec):
    """``[shortcut] from=k activation=linear``: output has the previous layer's shape;
    each ``from`` layer is added elementwise, then the activation.

    Channel counts may differ: only the first min(C) channels are added.
    pjreddie also adds layers of integer-ratio spatial size (``shortcut_cpu``
    stride/sample) and has ``alpha``/``beta`` (out = alpha*out + beta*add where
    they overlap). AlexeyAB takes several ``from`` layers and
    ``weights_type=per_feature|per_channel`` with
    ``weights_normalization=none|relu|softmax``; it adds by flat index
    (``shortcut_multilayer_cpu``), which for equal H, W is the same channel rule.
    """

    activation: str
    weights_type: str
    weights_normalization: str
    alpha: float
    beta: float

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext) -> "ShortcutSpec":
        refs = [ctx.resolve(sec, "from", v) for v in sec.ints("from")]
        wt = sec.str("weights_type", "none")
        check(wt in WEIGHTS_TYPES, sec, f"must be one of {', '.join(WEIGHTS_TYPES)}",
              "weights_type")
        wn = sec.str("weights_normalization", "none")
        check(wn in WEIGHTS_NORMALIZATIONS, sec,
              f"must be one of {', '.join(WEIGHTS_NORMALIZATIONS)}", "weights_normalization")
        c, h, w = ctx.in_shape
        for r in refs:
            rc, rh, rw = ctx.shapes[r]
            if (rh, rw) != (h, w):
                check(wt == "none", sec, f"layer {r} is {rh}x{rw} but this layer is {h}x{w}: "
                      "weighted shortcuts need equal sizes", "from")
                ok = (rw >= w and rw % w == 0 and rh % h == 0 and rw // w == rh // h) or \
                     (w >= rw and w % rw == 0 and h % rh == 0 and w // rw == h // rh)
                check(ok, sec, f"layer {r} is {rh}x{rw}, not an integer ratio of {h}x{w}",
                      "from")
        return cls(**cls.base_fields(sec, ctx, ctx.in_shape, refs),
                   activation=activation_name(sec, "linear"), weights_type=wt,
                   weights_normalization=wn, alpha=sec.float("alpha", 1.0),
                   beta=sec.float("beta", 1.0))

    @property
    def nweights(self) -> int:
        n = len(self.refs) + 1
        return {"none": 0, "per_feature": n, "per_channel": n * self.in_shape[0]}[self.weights_type]

    @property
    def has_weights(self) -> bool:
        return self.nweights > 0


    @property
    def flops(self) -> float:
        c, h, w = self.out_shape
        return float(c * h * w * len(self.refs))

    def describe(self) -> tuple[str, str]:
        return "", " ".join(str(r) for r in self.refs)

    def build(self, profile: str) -> nn.Module:
        return Shortcut(self, profile)


class Shortcut(LayerModule):
    """(N, C, H, W) + from-layer outputs -> (N, C, H, W), then the activation."""

    def __init__(self, spec: ShortcutSpec, profile: str):
        super().__init__()
        self.profile = profile
        self.act = Activation(spec.activation)
        self.alpha, self.beta = spec.alpha, spec.beta
        n = len(spec.refs) + 1
        self.normalization = spec.weights_normalization
        if spec.nweights:
            self.weights = nn.Parameter(torch.ones(spec.nweights))
            self.weight_shape = (n, 1, 1, 1) if spec.weights_type == "per_feature" else \
                (n, spec.in_shape[0], 1, 1)
        else:
            self.weights = None
        # the usual case: one input of the same shape, no weights, alpha = beta = 1
        self.plain = spec.nweights == 0 and self.alpha == 1.0 and self.beta == 1.0

    def darknet_params(self) -> list[tuple[str, Tensor]]:
        """AlexeyAB ``load_shortcut_weights``: the ``nweights`` weights, if any."""
        return [("weights", self.weights)] if self.weights is not None else []

    def _normalized_weights(self) -> Tensor:
        """(n+1, C or 1, 1, 1) weights after Darknet's normalization (eps 1e-4 in the sum)."""
        w = self.weights.view(self.weight_shape)
        if self.normalization == "relu":
            w = F.relu(w)
            return w / (1e-4 + w.sum(dim=0, keepdim=True))
        if self.normalization == "softmax":
            e = torch.exp(w - w.max(dim=0, keepdim=True).values)
            return e / (1e-4 + e.sum(dim=0, keepdim=True))
        return w

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        if self.weights is not None:
            w = self._normalized_weights()
            out = x * w[0]
            for i, r in enumerate(refs):
                out = _add_overlap(out, r, w[i + 1], self.profile)
        else:
            out = x
            for r in refs:
                if self.plain and r.shape == out.shape:
                    out = out + r
                else:
                    out = _add_overlap(out, r, None, self.profile, self.alpha, self.beta)
        return self.act(out)


def _add_overlap(out: Tensor, add: Tensor, weight: Tensor | None, profile: str,
                 alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    """Add ``add`` (times ``weight``) into ``out`` where Darknet's shortcut overlaps them.

    out (N, C1, H1, W1), add (N, C2, H2, W2); weight (1 or C1, 1, 1) or None;
    returns (N, C1, H1, W1).
    """
    n, c1, h1, w1 = out.shape
    _, c2, h2, w2 = add.shape
    c = min(c1, c2)
    if (h1, w1) == (h2, w2):
        a = add[:, :c]
        if weight is not None:
            a = a * weight[:c] if weight.shape[0] > 1 else a * weight
        head = out[:, :c] + a if alpha == 1.0 and beta == 1.0 else alpha * out[:, :c] + beta * a
        return head if c == c1 else torch.cat([head, out[:, c:]], dim=1)
    if profile == "alexeyab":
        # shortcut_multilayer_cpu: add by flat index where the source exists
        flat = out.reshape(n, -1)
        k = min(flat.shape[1], c2 * h2 * w2)
        head = flat[:, :k] + add.reshape(n, -1)[:, :k]
        return torch.cat([head, flat[:, k:]], dim=1).view_as(out)
    # pjreddie shortcut_cpu: stride over the larger `add`, or sample into the larger `out`
    stride = max(w2 // w1, 1)
    sample = max(w1 // w2, 1)
    mh, mw = min(h1, h2), min(w1, w2)
    src = add[:, :c, : mh * stride: stride, : mw * stride: stride]
    region = out[:, :c, : mh * sample: sample, : mw * sample: sample]
    res = out.clone()
    res[:, :c, : mh * sample: sample, : mw * sample: sample] = alpha * region + beta * src
    return res


# ---------------------------------------------------------------------------
# [scale_channels] and [sam]
# ---------------------------------------------------------------------------
@register("scale_channels")
@dataclass(frozen=True, kw_only=True)
class ScaleChannelsSpec(LayerSpec):
    """AlexeyAB ``[scale_channels] from=k``: out = from_output * prev, prev (C, 1, 1)
    broadcast over H, W; ``scale_wh=1``: prev (1, H, W) broadcast over channels.
    Output has the ``from`` layer's shape; then ``activation`` (default linear).
    """

    scale_wh: bool
    activation: str
    alexeyab_only = True

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext) -> "ScaleChannelsSpec":
        (ref,) = [ctx.resolve(sec, "from", v) for v in sec.ints("from")[:1]]
        scale_wh = bool(sec.int("scale_wh", 0))
        c, h, w = ctx.shapes[ref]
        pc, ph, pw = ctx.in_shape
        # make_scale_channels_layer: assert(w == 1 && h == 1) / scale_wh: assert(c == 1)
        if scale_wh:
            check(pc == 1, sec, f"previous layer has {pc} channels; scale_wh needs 1", "from")
            check((ph, pw) == (h, w), sec, f"previous layer is {ph}x{pw}, layer {ref} is "
                  f"{h}x{w}: scale_wh needs equal sizes", "from")
        else:
            check((ph, pw) == (1, 1), sec, f"previous layer is {ph}x{pw}; scale_channels "
                  "needs a 1x1 (C, 1, 1) scale", "from")
            check(pc == c, sec, f"previous layer has {pc} channels, layer {ref} has {c}", "from")
        return cls(**cls.base_fields(sec, ctx, (c, h, w), [ref]), scale_wh=scale_wh,
                   activation=activation_name(sec, "linear"))

    def describe(self) -> tuple[str, str]:
        return "", str(self.refs[0])

    def build(self, profile: str) -> nn.Module:
        return ScaleChannels(self)


class ScaleChannels(LayerModule):
    """(N, C, 1, 1) or (N, 1.., H, W) scale times ref (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, spec: ScaleChannelsSpec):
        super().__init__()
        self.scale_wh = spec.scale_wh
        self.act = Activation(spec.activation)

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        scale = x[:, :1] if self.scale_wh else x.flatten(1)[:, :, None, None]
        return self.act(refs[0] * scale)


@register("sam")
@dataclass(frozen=True, kw_only=True)
class SamSpec(LayerSpec):
    """AlexeyAB ``[sam] from=k``: out = prev * from_output elementwise (equal shapes),
    then ``activation`` (default linear)."""

    activation: str
    alexeyab_only = True

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext) -> "SamSpec":
        (ref,) = [ctx.resolve(sec, "from", v) for v in sec.ints("from")[:1]]
        check(tuple(ctx.shapes[ref]) == tuple(ctx.in_shape), sec,
              f"layer {ref} has shape {ctx.shapes[ref]}, previous layer {ctx.in_shape}", "from")
        return cls(**cls.base_fields(sec, ctx, ctx.shapes[ref], [ref]),
                   activation=activation_name(sec, "linear"))

    def describe(self) -> tuple[str, str]:
        return "", str(self.refs[0])

    def build(self, profile: str) -> nn.Module:
        return Sam(self)


class Sam(LayerModule):
    """(N, C, H, W) * ref (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, spec: SamSpec):
        super().__init__()
        self.act = Activation(spec.activation)

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        return self.act(x * refs[0])
