"""Detection heads: [yolo], [Gaussian_yolo], [region].

Their ``forward`` reproduces what Darknet's layer output holds after its
in-place activations (``yolo_layer.c: forward_yolo_layer``,
``gaussian_yolo_layer.c: forward_gaussian_yolo_layer``, ``region_layer.c:
forward_region_layer``); turning that into boxes is :mod:`darknetpy.boxes`'s
job. Channels are laid out per anchor: ``(N, A*E, H, W)`` with ``E`` entries
per anchor, viewed as ``(N, A, E, H, W)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import BuildContext, LayerModule, LayerSpec, check, positive, register
from ..cfg import Section

NMS_KINDS = ("default", "greedynms", "diounms", "cornersnms")


def _anchors(sec: Section, total: int, need: int) -> tuple[tuple[float, float], ...]:
    values = sec.floats("anchors", [0.5] * (2 * total))
    check(len(values) % 2 == 0, sec, f"odd number of values ({len(values)})", "anchors")
    check(len(values) // 2 >= need, sec,
          f"{len(values) // 2} anchors given, {need} needed", "anchors")
    return tuple((values[2 * i], values[2 * i + 1]) for i in range(len(values) // 2))


@dataclass(frozen=True, kw_only=True)
class HeadSpec(LayerSpec):
    """What every detection head has: ``classes``, anchors used by this layer
    (``anchors``, in the units of its type), and the number of entries per
    anchor ``entries``."""

    classes: int
    anchors: tuple
    entries: int

    @property
    def num_anchors(self) -> int:
        return len(self.anchors)

    def check_channels(self, sec: Section, ctx: BuildContext) -> None:
        c = ctx.in_shape[0]
        check(c == self.num_anchors * self.entries, sec,
              f"input has {c} channels but {self.num_anchors} anchors x {self.entries} entries "
              f"= {self.num_anchors * self.entries} are needed (check filters= of the layer "
              "before)", "classes")

    def describe(self) -> tuple[str, str]:
        return f"{self.classes} cls", f"{self.num_anchors} anc"


@dataclass(frozen=True, kw_only=True)
class YoloSpec(HeadSpec):
    """``[yolo]`` (v3+): entries x, y, w, h, objectness, classes (E = 5 + classes).

    ``mask`` picks anchors (default all ``num``); anchors are in network-input
    pixels. AlexeyAB: ``scale_x_y`` (x = s*logistic(tx) - (s-1)/2),
    ``new_coords=1`` (no activation here; w = (2*tw)^2 * anchor at decode),
    ``nms_kind``/``beta_nms`` (read from the last head by the detector).
    ``all_anchors``: every anchor of the cfg; ``mask``: indices into it.
    """

    mask: tuple
    all_anchors: tuple
    scale_x_y: float
    new_coords: bool
    nms_kind: str | None
    beta_nms: float

    entry_names = ("x", "y", "w", "h", "objectness")

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext) -> "YoloSpec":
        classes = positive(sec, "classes", sec.int("classes", 20))
        total = positive(sec, "num", sec.int("num", 1))
        mask = tuple(sec.ints("mask", list(range(total))))
        check(all(0 <= m < total for m in mask), sec, f"mask values must be in 0..{total - 1}",
              "mask")
        all_anchors = _anchors(sec, total, total)
        nms_kind = sec.str("nms_kind", None)
        check(nms_kind is None or nms_kind in NMS_KINDS, sec,
              f"must be one of {', '.join(NMS_KINDS)}", "nms_kind")
        spec = cls(**cls.base_fields(sec, ctx, ctx.in_shape), classes=classes,
                   anchors=tuple(all_anchors[m] for m in mask), entries=cls.extra_entries + 5 + classes,
                   mask=mask, all_anchors=all_anchors,
                   scale_x_y=sec.float("scale_x_y", 1.0), new_coords=bool(sec.int("new_coords", 0)),
                   nms_kind=nms_kind, beta_nms=sec.float("beta_nms", 0.6))
        spec.check_channels(sec, ctx)
        return spec

    extra_entries = 0


    def logistic_entries(self) -> list[int]:
        if self.new_coords:
            return []
        return [0, 1] + list(range(4, self.entries))

    def scaled_entries(self) -> list[int]:
        return [0, 1]

    def build(self, profile: str) -> nn.Module:
        return HeadActivation(self, self.logistic_entries(), self.scaled_entries(),
                              self.scale_x_y)


register("yolo")(YoloSpec)


@register("Gaussian_yolo")
@dataclass(frozen=True, kw_only=True)
class GaussianYoloSpec(YoloSpec):
    """AlexeyAB ``[Gaussian_yolo]``: per anchor x, σx, y, σy, w, σw, h, σh,
    objectness, classes (E = 9 + classes). Logistic on x, σx, y, σy, σw, σh,
    objectness and classes; scale_x_y on x and y (``forward_gaussian_yolo_layer``).
    """

    alexeyab_only = True
    extra_entries = 4
    entry_names = ("x", "sigma_x", "y", "sigma_y", "w", "sigma_w", "h", "sigma_h", "objectness")

    def logistic_entries(self) -> list[int]:
        return [0, 1, 2, 3, 5, 7] + list(range(8, self.entries))

    def scaled_entries(self) -> list[int]:
        return [0, 2]


@register("region")
@dataclass(frozen=True, kw_only=True)
class RegionSpec(HeadSpec):
    """``[region]`` (YOLOv2): entries x, y, w, h (``coords``), objectness, classes.

    Anchors are in grid cells. pjreddie: logistic on x, y, objectness; softmax
    (``softmax=1``), the tree softmax (``tree=``) or logistic on the classes.
    AlexeyAB (CPU): logistic on objectness only, x, y, w, h raw; softmax or
    tree on the classes. ``map=`` names a class map file (used at decode).
    """

    coords: int
    softmax: bool
    tree_file: str | None
    map_file: str | None
    tree: object = field(default=None, repr=False, compare=False)  # darknetpy.tree.Tree

    entry_names = ("x", "y", "w", "h", "objectness")

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext) -> "RegionSpec":
        classes = positive(sec, "classes", sec.int("classes", 20))
        coords = positive(sec, "coords", sec.int("coords", 4))
        check(coords == 4, sec, "only coords=4 is supported", "coords")
        num = positive(sec, "num", sec.int("num", 1))
        if sec.int("background", 0):
            raise sec.error("background=1 is not supported by darknetpy", "background")
        tree_file, tree = ctx.load_tree(sec, classes)
        spec = cls(**cls.base_fields(sec, ctx, ctx.in_shape), classes=classes,
                   anchors=_anchors(sec, num, num)[:num], entries=coords + 1 + classes,
                   coords=coords, softmax=bool(sec.int("softmax", 0)), tree_file=tree_file,
                   map_file=sec.str("map", None), tree=tree)
        spec.check_channels(sec, ctx)
        return spec

    def build(self, profile: str) -> nn.Module:
        c = self.coords
        if profile == "alexeyab":
            logistic = [c]
        else:
            logistic = [0, 1, c] + ([] if self.softmax or self.tree else
                                    list(range(c + 1, self.entries)))
        return HeadActivation(self, logistic, [], 1.0,
                              class_softmax=self.softmax or self.tree is not None,
                              tree=self.tree)


class HeadActivation(LayerModule):
    """Per-entry activations of a detection head; shape kept, (N, A*E, H, W).

    ``logistic``: entries passed through logistic; ``scaled``: entries then
    mapped to ``x*s - (s-1)/2``; ``class_softmax``: softmax (or the tree
    softmax) over the class entries (after objectness) of each anchor and cell.
    """

    def __init__(self, spec: HeadSpec, logistic: list[int], scaled: list[int], scale: float,
                 class_softmax: bool = False, tree=None):
        super().__init__()
        e = spec.entries
        self.a, self.e = spec.num_anchors, e
        self.first_class = e - spec.classes
        lmask = torch.zeros(e, dtype=torch.bool)
        lmask[logistic] = True
        self.all_logistic = bool(lmask.all())
        self.any_logistic = bool(lmask.any())
        self.register_buffer("logistic", lmask.view(1, 1, e, 1, 1), persistent=False)
        self.scale = float(scale)
        smask = torch.zeros(e, dtype=torch.bool)
        if self.scale != 1.0:
            smask[scaled] = True
        self.any_scaled = bool(smask.any())
        self.register_buffer("scaled", smask.view(1, 1, e, 1, 1), persistent=False)
        self.class_softmax = class_softmax
        self.tree = tree

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:
        n, _, h, w = x.shape
        y = x.view(n, self.a, self.e, h, w)  # (N, A*E, H, W) -> (N, A, E, H, W)
        if self.any_logistic:
            s = torch.sigmoid(y)
            y = s if self.all_logistic else torch.where(self.logistic, s, y)
        if self.any_scaled:
            y = torch.where(self.scaled, y * self.scale + (-0.5 * (self.scale - 1)), y)
        if self.class_softmax:
            k = self.first_class
            classes = x.view(n, self.a, self.e, h, w)[:, :, k:]  # softmax reads the raw input
            if self.tree is not None:
                from ..tree import softmax_tree
                probs = softmax_tree(classes.reshape(n * self.a, -1, h, w), self.tree)
                probs = probs.view_as(classes)
            else:
                probs = torch.softmax(classes, dim=2)
            y = torch.cat([y[:, :, :k], probs], dim=2)
        return y.reshape(n, self.a * self.e, h, w)
