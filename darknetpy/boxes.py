"""From detection-head outputs to Darknet's boxes: decode, undo the letterbox, NMS.

Mirrors, function by function:

* ``yolo_layer.c``: ``get_yolo_box``, ``get_yolo_detections``, ``correct_yolo_boxes``
  (pjreddie and AlexeyAB; AlexeyAB adds ``new_coords`` and the ``letter`` argument);
* ``gaussian_yolo_layer.c`` (AlexeyAB): ``get_gaussian_yolo_box``,
  ``get_gaussian_yolo_detections``;
* ``region_layer.c``: pjreddie ``get_region_box``/``get_region_detections``/
  ``correct_region_boxes``; AlexeyAB ``get_region_boxes`` as called by ``network.c:
  custom_get_region_detections``;
* ``network.c``: ``get_network_boxes``/``fill_network_boxes`` (heads in cfg order);
* ``box.c``: ``box_iou``, ``box_diou``, ``box_diounms``, ``do_nms_sort``, ``diounms_sort``;
* ``detector.c: test_detector``: which NMS the CLI applies (:func:`detector_nms`).

The box and score formulas are written once, in :class:`DenseDecoder` (every box of a
head as dense tensors, in torch ops that trace to ONNX; :func:`dense_boxes` runs it on
one output): :func:`decode_yolo`/:func:`decode_region` add the thresholds and build
:class:`Detections`, and :class:`darknetpy.export.HeadDecoder` exports the same module.

Box format everywhere: ``(x, y, w, h)`` = centre and size (cxcywh). Units are named at
each function: *network-relative* (fractions of the network input, what the decoders
produce) or *image-relative* (fractions of the original image, 0..1 inside it, after
:func:`correct_boxes`; what Darknet prints and draws). Arithmetic follows Darknet's
float32/float64 mix (e.g. ``exp`` in double, products in float, thresholds compared
as float32), so boxes and probabilities usually agree with Darknet to the last bit.

Darknet's box order is reproduced exactly:

* ``[yolo]``/``[Gaussian_yolo]`` (both code bases) and AlexeyAB's ``[region]``: cell-major,
  ``for i in cells (row-major): for n in anchors`` (box ``i*A + n``); YOLO heads keep only
  boxes with objectness > thresh.
* pjreddie's ``[region]``: anchor-major, box ``n*H*W + i``; every box is kept.
* Heads concatenated in cfg order; NMS then permutes the boxes (see :func:`do_nms_sort`).

>>> import torch
>>> from darknetpy.boxes import Detections, do_nms_sort
>>> d = Detections(boxes=torch.tensor([[.5, .5, .2, .2], [.51, .5, .2, .2]]),
...                objectness=torch.tensor([.9, .8]), prob=torch.tensor([[.9], [.8]]))
>>> do_nms_sort(d, 1, .45).prob.flatten().tolist()
[0.8999999761581421, 0.0]
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .image import letterbox_dims
from .layers.heads import NMS_KINDS, GaussianYoloSpec, HeadSpec, RegionSpec, YoloSpec
from .tree import TreeError, TreeIndex

__all__ = [
    "Detections",
    "DenseBoxes",
    "DenseDecoder",
    "dense_boxes",
    "decode_yolo",
    "decode_region",
    "correct_boxes",
    "get_network_boxes",
    "box_iou",
    "box_diou",
    "do_nms_sort",
    "diounms_sort",
    "detector_nms",
    "NMS_KINDS",
]

_F32 = torch.float32


@dataclass
class Detections:
    """Darknet's ``detection`` array for one image: B boxes.

    Fields (``B`` boxes, ``C`` classes):

    * ``boxes``: float32 ``(B, 4)``, ``(x, y, w, h)`` = centre and size. Relative to the
      network input straight out of a decoder, relative to the original image (0..1)
      after :func:`correct_boxes` / from :func:`get_network_boxes`. Boxes may extend
      past 0..1 (Darknet does not clip them).
    * ``objectness``: float32 ``(B,)``; Darknet's ``detection.objectness``. ``0`` marks
      a box NMS moves to the end (pjreddie ``[region]``: objectness <= thresh);
      AlexeyAB ``[region]`` sets it to 1 for every box.
    * ``prob``: float32 ``(B, C)``, Darknet's ``detection.prob``: per-class probability
      (usually objectness × class probability) if above thresh, else 0. NMS zeroes
      entries; boxes are never deleted.
    * ``uc``: float32 ``(B, 4)`` or None; ``[Gaussian_yolo]`` only: the box
      uncertainties (sigma of x, y, w, h after logistic), Darknet's ``detection.uc``.
    * ``source``: int64 ``(B, 3)``: where the box came from: (head number in cfg order
      among the detection heads, anchor n within the head, cell i = row*w + col).
      Not part of Darknet's struct; kept for inspection and moved along by NMS.
    """

    boxes: Tensor
    objectness: Tensor
    prob: Tensor
    uc: Tensor | None = None
    source: Tensor | None = None

    def __post_init__(self):
        b = self.boxes.shape[0]
        if self.boxes.dim() != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"boxes must be (B, 4), got {tuple(self.boxes.shape)}")
        if tuple(self.objectness.shape) != (b,):
            raise ValueError(f"objectness must be ({b},), got {tuple(self.objectness.shape)}")
        if self.prob.dim() != 2 or self.prob.shape[0] != b:
            raise ValueError(f"prob must be ({b}, classes), got {tuple(self.prob.shape)}")
        if self.uc is not None and tuple(self.uc.shape) != (b, 4):
            raise ValueError(f"uc must be ({b}, 4), got {tuple(self.uc.shape)}")
        if self.source is None:
            self.source = torch.full((b, 3), -1, dtype=torch.int64, device=self.boxes.device)
        elif tuple(self.source.shape) != (b, 3):
            raise ValueError(f"source must be ({b}, 3), got {tuple(self.source.shape)}")

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @property
    def classes(self) -> int:
        return self.prob.shape[1]

    def select(self, index) -> "Detections":
        """The boxes picked by ``index`` (bool mask or int indices along B), in that order."""
        return Detections(**{f.name: (None if getattr(self, f.name) is None
                                      else getattr(self, f.name)[index]) for f in fields(self)})

    def above(self, thresh: float) -> "Detections":
        """The boxes with some class prob > ``thresh``, in order: what Darknet prints and
        draws (``image.c: draw_detections``, AlexeyAB ``get_actual_detections``)."""
        t = torch.tensor(thresh, dtype=self.prob.dtype, device=self.prob.device)
        return self.select((self.prob > t).any(dim=1))

    def to(self, device) -> "Detections":
        return Detections(**{f.name: (None if getattr(self, f.name) is None
                                      else getattr(self, f.name).to(device)) for f in fields(self)})

    @staticmethod
    def cat(parts: Sequence["Detections"]) -> "Detections":
        """Concatenate along B (heads in order, as ``fill_network_boxes`` does)."""
        if not parts:
            raise ValueError("Detections.cat needs at least one part")
        classes = {p.classes for p in parts}
        if len(classes) != 1:
            raise ValueError(f"detection heads have different numbers of classes: {sorted(classes)}")
        has_uc = any(p.uc is not None for p in parts)
        uc = None
        if has_uc:
            uc = torch.cat([p.uc if p.uc is not None else torch.zeros(len(p), 4, dtype=_F32,
                                                                       device=p.boxes.device)
                            for p in parts])
        return Detections(boxes=torch.cat([p.boxes for p in parts]),
                          objectness=torch.cat([p.objectness for p in parts]),
                          prob=torch.cat([p.prob for p in parts]), uc=uc,
                          source=torch.cat([p.source for p in parts]))


# ----------------------------------------------------------------------------- helpers
def _f32(value: float, device) -> Tensor:
    """A C ``float`` parameter (``float thresh``): the value rounded to float32."""
    return torch.tensor(value, dtype=_F32, device=device)


def _check_output(output: Tensor, spec: HeadSpec) -> tuple[int, int, int]:
    if not isinstance(output, Tensor) or output.dim() != 4:
        raise ValueError(f"layer {spec.index} [{spec.type}]: expected a (N, A*E, H, W) tensor, got "
                         f"{getattr(output, 'shape', type(output).__name__)}")
    n, c, h, w = output.shape
    want = spec.num_anchors * spec.entries
    if c != want:
        raise ValueError(f"layer {spec.index} [{spec.type}]: output has {c} channels, expected "
                         f"{spec.num_anchors} anchors x {spec.entries} entries = {want}")
    return n, h, w


def _anchors(spec: HeadSpec, device) -> tuple[Tensor, Tensor]:
    """Darknet's ``biases`` of the used anchors: float32 (then exact in float64)."""
    a = torch.tensor(spec.anchors, dtype=torch.float64).to(_F32).to(device)  # (A, 2)
    return a[:, 0], a[:, 1]


def _box_entries(output: Tensor, a: int, e: int, h: int, w: int, cell_major: bool) -> Tensor:
    """``(N, A*E, H, W) -> (N, B, E)`` float32 in Darknet's box order: cell-major, box
    ``i*A + n`` (cell i = row*W + col, anchor n), or anchor-major, box ``n*H*W + i``
    (pjreddie ``[region]``). N is read from ``output`` (traced, so an exported graph
    keeps a symbolic batch); ``a, e, h, w`` are constants."""
    n = output.shape[0]
    o = output.to(_F32).reshape(n, a, e, h, w)                      # (N, A, E, H, W)
    if cell_major:
        return o.permute(0, 3, 4, 1, 2).reshape(n, h * w * a, e)    # (N, H, W, A, E)
    return o.permute(0, 1, 3, 4, 2).reshape(n, a * h * w, e)        # (N, A, H, W, E)


def _exp_anchor(t: Tensor, anchor: Tensor, denom: int) -> Tensor:
    """``exp(t) * anchor / denom`` as C evaluates it: double ``exp`` and arithmetic, one
    rounding to float (``b.w = exp(x[..]) * biases[2*n] / w``)."""
    return (torch.exp(t.to(torch.float64)) * anchor.to(torch.float64) / denom).to(_F32)


def _split_images(keep: Tensor, parts: dict[str, Tensor | None]) -> list[Detections]:
    out = []
    for b in range(keep.shape[0]):
        k = keep[b]
        out.append(Detections(**{name: (None if v is None else v[b][k]) for name, v in parts.items()}))
    return out


# ------------------------------------------------------------------------- dense core
@dataclass
class DenseBoxes:
    """Every box of one detection head, before any threshold (:class:`DenseDecoder`).

    ``B`` = anchors × H × W boxes in Darknet's order (see the module docstring),
    ``C`` classes:

    * ``boxes``: float32 ``(N, B, 4)``, cxcywh relative to the network input (0..1).
    * ``objectness``: float32 ``(N, B)``, the head's objectness entry as it is (Darknet's
      ``objectness``/``scale``), not thresholded.
    * ``scores``: float32 ``(N, B, C)``, what Darknet thresholds into
      ``detection.prob`` (a box has class c iff ``scores[..., c] > thresh``, then
      ``prob[c] == scores[..., c]``), with the head's extra conditions noted at
      :class:`DenseDecoder`.
    * ``uc``: float32 ``(N, B, 4)``, the sigmas of x, y, w, h (``[Gaussian_yolo]``), else None.
    * ``node``: int64 ``(N, B)``, the node ``hierarchy_top_prediction`` chose (pjreddie
      ``[region] tree=`` without a class map; -1 where Darknet's walk never ends), else None.
    * ``anchor``, ``cell``: int64 ``(B,)``: anchor n and cell i = row*W + col of each box.
    """

    boxes: Tensor
    objectness: Tensor
    scores: Tensor
    uc: Tensor | None
    node: Tensor | None
    anchor: Tensor
    cell: Tensor


class DenseDecoder(nn.Module):
    """One head's output ``(N, A*E, H, W)`` -> :class:`DenseBoxes`, in torch ops that
    trace to ONNX (no loop over data, no ``.item()``, no data-dependent shape; the box
    grid and anchors are buffers). The one implementation of the box and score
    formulas: :func:`decode_yolo`/:func:`decode_region` (through :func:`dense_boxes`)
    and :class:`darknetpy.export.HeadDecoder` run it.

    Mirrors, with Darknet's float32/float64 arithmetic in C's order (boxes are bit for
    bit Darknet's):

    * ``[yolo]``: ``yolo_layer.c: get_yolo_box`` (``x = (col + tx)/W``, ``y = (row +
      ty)/H``, ``w = exp(tw) * anchor_w / net_w`` in double, or with ``new_coords=1``
      ``w = tw*tw*4 * anchor_w / net_w`` in float; anchors in network pixels) and the
      probability of ``get_yolo_detections``: ``scores[c] = objectness * class_c``.
    * ``[Gaussian_yolo]``: ``gaussian_yolo_layer.c: get_gaussian_yolo_box`` /
      ``get_gaussian_yolo_detections``: entries ``x, σx, y, σy, w, σw, h, σh, objectness,
      classes``; ``scores[c] = objectness * class_c * (1 - mean(σ))`` (the factor in
      double, as in C); ``uc`` = the sigmas.
    * ``[region]``: ``region_layer.c: get_region_box`` (anchors in grid cells: ``w =
      exp(tw) * anchor_w / W``; AlexeyAB applies the logistic to x, y here). Scores:
      ``objectness * class_c`` (pjreddie ``get_region_detections``, AlexeyAB
      ``get_region_boxes``); with ``tree=``, on the absolute probabilities
      (``tree.c: hierarchy_predictions``, :class:`darknetpy.tree.TreeIndex`): with
      ``class_map``, ``scores[j] = objectness * absolute[class_map[j]]`` (0 past the
      map); else AlexeyAB: :func:`darknetpy.tree.alexeyab_region_tree_probs` (already
      0 unless objectness > ``thresh``); else pjreddie: ``objectness`` at the node
      ``hierarchy_top_prediction(absolute, hier_thresh)`` chose, 0 elsewhere (Darknet
      keeps it only if objectness > thresh).

    Box order: cell-major (``i*A + n``) except pjreddie ``[region]`` (anchor-major,
    ``n*H*W + i``). Not applied here (not exportable or caller's choice): the
    objectness filter of YOLO heads, the thresholds on the scores, pjreddie
    ``[region]``'s zeroing of boxes with objectness <= thresh, the letterbox correction.

    Args:
        spec: the head's spec (``YoloSpec``, ``GaussianYoloSpec`` or ``RegionSpec``).
        h, w: the head's output grid (rows, columns).
        net_w, net_h: network input size in pixels.
        profile: ``"pjreddie"`` or ``"alexeyab"`` (only ``[region]`` differs).
        thresh: AlexeyAB ``[region] tree=`` only: the objectness threshold baked in.
        hier_thresh: pjreddie ``[region] tree=`` only: ``hierarchy_top_prediction``'s.
        class_map: Darknet's ``map`` (``[region] tree=`` only; None in the CLI).
        tree_index: the :class:`~darknetpy.tree.TreeIndex` of ``spec.tree`` to use
            (default: a new one, owned by this module).

    ``forward`` does not check its input (it must be ``(N, A*E, h, w)``, any float
    dtype; :func:`dense_boxes` checks). Raises ``ValueError`` for an unknown profile or
    a class map longer than ``classes``; ``TypeError`` for a spec that is not a head.
    """

    def __init__(self, spec: HeadSpec, h: int, w: int, net_w: int, net_h: int,
                 profile: str = "pjreddie", thresh: float = 0.5, hier_thresh: float = 0.5,
                 class_map: Sequence[int] | None = None, tree_index: TreeIndex | None = None):
        super().__init__()
        if profile not in ("pjreddie", "alexeyab"):
            raise ValueError(f"unknown profile {profile!r}; use 'pjreddie' or 'alexeyab'")
        if not isinstance(spec, (YoloSpec, RegionSpec)):
            raise TypeError(f"layer {spec.index}: [{spec.type}] is not a detection head")
        a = spec.num_anchors
        self.a, self.e, self.h, self.w = a, spec.entries, int(h), int(w)
        region = isinstance(spec, RegionSpec)
        self.gaussian = isinstance(spec, GaussianYoloSpec)
        self.alexeyab = profile == "alexeyab"
        self.logistic_xy = region and self.alexeyab          # AlexeyAB get_region_box
        self.new_coords = bool(getattr(spec, "new_coords", False)) and not self.gaussian
        self.cell_major = not region or self.alexeyab
        # anchors in grid cells ([region]) or network pixels ([yolo])
        self.den_w, self.den_h = (self.w, self.h) if region else (int(net_w), int(net_h))
        if self.gaussian:
            self.ix, self.iy, self.iw, self.ih, self.iobj = 0, 2, 4, 6, 8
        else:
            self.ix, self.iy, self.iw, self.ih = 0, 1, 2, 3
            self.iobj = spec.coords if region else 4
        self.thresh, self.hier_thresh = float(thresh), float(hier_thresh)
        flat = torch.arange(a * self.h * self.w)
        if self.cell_major:
            cell, anchor = flat // a, flat % a
        else:
            anchor, cell = flat // (self.h * self.w), flat % (self.h * self.w)
        aw, ah = _anchors(spec, "cpu")
        for name, value in (("anchor", anchor), ("cell", cell), ("col", (cell % self.w).to(_F32)),
                            ("row", (cell // self.w).to(_F32)), ("aw", aw[anchor]),
                            ("ah", ah[anchor])):
            self.register_buffer(name, value, persistent=False)      # (B,) each
        tree = getattr(spec, "tree", None) if region else None
        cmap = None
        if tree is not None and class_map is not None:
            cmap = torch.as_tensor(list(class_map), dtype=torch.int64)
            if cmap.numel() > spec.classes:
                raise ValueError(f"layer {spec.index} [{spec.type}]: class map has "
                                 f"{cmap.numel()} entries for {spec.classes} classes")
        self.register_buffer("class_map", cmap, persistent=False)   # None: no map
        self.tree = None if tree is None else TreeIndex(tree) if tree_index is None else tree_index

    def forward(self, output: Tensor) -> DenseBoxes:
        o = _box_entries(output, self.a, self.e, self.h, self.w, self.cell_major)  # (N, B, E)
        tx, ty = o[..., self.ix], o[..., self.iy]
        if self.logistic_xy:
            tx, ty = torch.sigmoid(tx), torch.sigmoid(ty)
        x = (self.col + tx) / self.w
        y = (self.row + ty) / self.h
        tw, th = o[..., self.iw], o[..., self.ih]
        if self.new_coords:                                     # float arithmetic, C order
            bw = tw * tw * 4 * self.aw / self.den_w
            bh = th * th * 4 * self.ah / self.den_h
        else:
            bw = _exp_anchor(tw, self.aw, self.den_w)
            bh = _exp_anchor(th, self.ah, self.den_h)
        boxes = torch.stack([x, y, bw, bh], dim=-1)             # (N, B, 4)
        obj = o[..., self.iobj]                                 # (N, B)
        cls = o[..., self.iobj + 1:]                            # (N, B, C)
        uc = node = None
        zero = torch.zeros((), dtype=_F32, device=o.device)
        if self.tree is None:
            scores = obj.unsqueeze(-1) * cls                    # float product
            if self.gaussian:
                uc = o[..., [1, 3, 5, 7]]                       # (N, B, 4) sigma x, y, w, h
                # float uc_aver = (uc0 + uc1 + uc2 + uc3) / 4.0; prob = obj*cls * (1.0 - uc_aver)
                uc_aver = (((uc[..., 0] + uc[..., 1]) + uc[..., 2]) + uc[..., 3]).to(torch.float64) / 4.0
                uc_aver = uc_aver.to(_F32).to(torch.float64)
                scores = (scores.to(torch.float64) * (1.0 - uc_aver).unsqueeze(-1)).to(_F32)
        else:
            absolute = self.tree.absolute(cls)                  # (N, B, C)
            if self.class_map is not None:
                mapped = obj.unsqueeze(-1) * absolute[..., self.class_map]
                k = self.class_map.shape[0]
                scores = torch.cat([mapped, torch.zeros_like(absolute[..., k:])], dim=-1)
            elif self.alexeyab:
                scores = self.tree.alexeyab_probs(absolute, obj, self.thresh)
            else:
                node = self.tree.top_prediction(absolute, self.hier_thresh)      # (N, B)
                scores = torch.where(self.tree.arange == node.unsqueeze(-1), obj.unsqueeze(-1), zero)
        return DenseBoxes(boxes=boxes, objectness=obj, scores=scores, uc=uc, node=node,
                          anchor=self.anchor, cell=self.cell)


def dense_boxes(output: Tensor, spec: HeadSpec, net_w: int, net_h: int, profile: str = "pjreddie", *,
                thresh: float = 0.5, hier_thresh: float = 0.5,
                class_map: Sequence[int] | None = None) -> DenseBoxes:
    """Every box of one head, dense (:class:`DenseDecoder` built for ``output``'s grid and
    device; a ``tree=`` head uses the tree's cached :meth:`~darknetpy.tree.TreeIndex.of`).

    ``output``: the head's output ``(N, A*E, H, W)`` after its activations;
    ``net_w``/``net_h``: network input in pixels; other arguments as
    :class:`DenseDecoder`. Boxes are network-relative (0..1).

    Raises ``ValueError`` when ``output`` is not ``(N, A*E, H, W)`` for ``spec`` or the
    profile is unknown; ``TypeError`` when ``spec`` is not a detection head.
    """
    _, h, w = _check_output(output, spec)
    tree = getattr(spec, "tree", None) if isinstance(spec, RegionSpec) else None
    index = None if tree is None else TreeIndex.of(tree, output.device)
    dec = DenseDecoder(spec, h, w, net_w, net_h, profile, thresh, hier_thresh, class_map,
                       tree_index=index).to(output.device)
    return dec(output)


# ----------------------------------------------------------------------------- decoding
def decode_yolo(output: Tensor, spec: YoloSpec, net_w: int, net_h: int,
                thresh: float) -> list[Detections]:
    """Boxes of a ``[yolo]`` or ``[Gaussian_yolo]`` head, network-relative.

    Mirrors ``yolo_layer.c: get_yolo_detections`` (``gaussian_yolo_layer.c:
    get_gaussian_yolo_detections``) before ``correct_yolo_boxes``. ``output``:
    ``(N, A*E, H, W)``, the head's output after its activations
    (:meth:`darknetpy.Darknet.forward`, or a reference ``layer_NNN``).
    ``net_w``/``net_h``: network input size in pixels; ``thresh``: objectness and
    class threshold (a C float).

    For every cell i (row-major) and anchor n (that order), a box is kept iff
    objectness > thresh, with ``x = (col + tx)/W``, ``y = (row + ty)/H``,
    ``w = exp(tw) * anchor_w / net_w`` (``new_coords=1``: ``w = tw*tw*4 * anchor_w /
    net_w`` in float), ``h`` likewise, anchors in network pixels; ``prob[c] =
    objectness * class_c`` if > thresh else 0 (formulas: :class:`DenseDecoder`).

    ``[Gaussian_yolo]`` entries are ``x, σx, y, σy, w, σw, h, σh, objectness, classes``;
    ``prob[c] = objectness * class_c * (1 - mean(σx, σy, σw, σh))`` (if > thresh), the
    objectness itself is NOT scaled; the sigmas are returned in ``Detections.uc``.
    Only ``yolo_point=center`` (the default) is modelled.

    Returns one :class:`Detections` per image (boxes network-relative). Raises
    ``ValueError`` when ``output`` is not ``(N, A*E, H, W)`` for ``spec``.
    """
    n = _check_output(output, spec)[0]
    d = dense_boxes(output, spec, net_w, net_h)
    thr = _f32(thresh, output.device)
    zero = torch.zeros((), dtype=_F32, device=output.device)
    keep = d.objectness > thr                   # NaN objectness: dropped (AlexeyAB's test)
    prob = torch.where(d.scores > thr, d.scores, zero)
    source = torch.stack([torch.zeros_like(d.cell), d.anchor, d.cell], dim=-1).expand(n, -1, -1)
    return _split_images(keep, {"boxes": d.boxes, "objectness": d.objectness, "prob": prob,
                                "uc": d.uc, "source": source})


def decode_region(output: Tensor, spec: RegionSpec, net_w: int, net_h: int, thresh: float,
                  hier_thresh: float = 0.5, profile: str = "pjreddie",
                  class_map: Sequence[int] | None = None) -> list[Detections]:
    """Boxes of a ``[region]`` head (YOLOv2, YOLO9000), network-relative; every box kept.

    Mirrors ``region_layer.c``: pjreddie ``get_region_detections``, AlexeyAB
    ``get_region_boxes`` (as ``network.c: custom_get_region_detections`` calls it),
    before ``correct_region_boxes``.

    ``output``: ``(N, A*E, H, W)`` as the layer holds it after forward (the AlexeyAB
    layout transposed back to (C, H, W), like :class:`darknetpy.Darknet` returns it).
    Anchors are in grid cells: ``w = exp(tw) * anchor_w / W``. ``net_w``/``net_h`` are
    accepted for symmetry (Darknet passes them; the region box does not use them).

    ``profile="pjreddie"`` (``get_region_detections``): x, y already logistic in the
    output; boxes anchor-major (``n*H*W + i``); ``objectness = scale if scale > thresh
    else 0``; without a tree, ``prob[c] = scale * class_c`` if > thresh (all 0 when the
    objectness is 0); with ``tree=`` the class probabilities are made absolute
    (:func:`darknetpy.tree.hierarchy_predictions`, ``only_leaves=0``), one class
    ``j = hierarchy_top_prediction(.., hier_thresh)`` is chosen and ``prob[j] = scale``
    if scale > thresh; with ``class_map`` (Darknet's ``map`` argument, None for the CLI),
    ``prob[j] = scale * absolute_prob[class_map[j]]`` if > thresh for each j of the map.

    ``profile="alexeyab"`` (``custom_get_region_detections`` → ``get_region_boxes``):
    x, y raw in the output, logistic applied here; boxes cell-major (``i*A + n``);
    ``objectness = 1`` for every box; without a tree ``prob[c] = scale * class_c`` if
    > thresh; with a tree :func:`darknetpy.tree.alexeyab_region_tree_probs` (the
    highest-index node with absolute probability > 0.5, not multiplied by the
    objectness, kept if objectness > thresh; ``hier_thresh`` is not used).
    ``classfix`` (a training option) is not modelled. Formulas: :class:`DenseDecoder`.

    Returns one :class:`Detections` per image (boxes network-relative). Raises
    ``ValueError`` for an unknown profile, an ``output`` that is not ``(N, A*E, H, W)``
    for ``spec`` or a ``class_map`` longer than ``classes``;
    :class:`darknetpy.tree.TreeError` when a pjreddie tree walk of a box above
    ``thresh`` never ends (``hier_thresh < 0``; Darknet loops forever).
    """
    if profile not in ("pjreddie", "alexeyab"):
        raise ValueError(f"unknown profile {profile!r}; use 'pjreddie' or 'alexeyab'")
    n = _check_output(output, spec)[0]
    d = dense_boxes(output, spec, net_w, net_h, profile, thresh=thresh, hier_thresh=hier_thresh,
                    class_map=class_map)
    dev = output.device
    thr = _f32(thresh, dev)
    zero = torch.zeros((), dtype=_F32, device=dev)
    scale = d.objectness                                        # (N, B)
    if d.node is not None:                                      # pjreddie tree: one class j
        above = scale > thr
        if ((d.node < 0) & above).any():
            raise TreeError(f"layer {spec.index} [{spec.type}]: hierarchy_top_prediction never ends "
                            f"(hier_thresh={hier_thresh} with no positive value in a group); Darknet "
                            f"would loop forever", path=spec.tree.path)
        prob = torch.where(above.unsqueeze(-1), d.scores, zero)  # prob[j] = scale if > thresh
    elif spec.tree is not None and class_map is None and profile == "alexeyab":
        prob = d.scores                                         # thresholded by the tree rule
    else:
        prob = torch.where(d.scores > thr, d.scores, zero)
    if profile == "alexeyab":
        objectness = torch.ones_like(scale)
    else:
        objectness = torch.where(scale > thr, scale, zero)
        if spec.tree is None:
            prob = torch.where((objectness != 0).unsqueeze(-1), prob, zero)
    keep = torch.ones(scale.shape, dtype=torch.bool, device=dev)
    source = torch.stack([torch.zeros_like(d.cell), d.anchor, d.cell], dim=-1).expand(n, -1, -1)
    return _split_images(keep, {"boxes": d.boxes, "objectness": objectness, "prob": prob, "uc": None,
                                "source": source})


# ------------------------------------------------------------------ letterbox correction
def correct_boxes(dets: Detections, im_w: int, im_h: int, net_w: int, net_h: int,
                  letterbox: bool) -> Detections:
    """Network-relative boxes -> image-relative boxes (0..1 of the original image).

    Mirrors ``correct_yolo_boxes``/``correct_region_boxes`` (``relative=1``). With a
    letterbox, ``(new_w, new_h) = letterbox_dims(im_w, im_h, net_w, net_h)`` (the same
    integer sizes ``letterbox_image`` used) and::

        x = (x - (net_w - new_w)/2./net_w) / ((float)new_w/net_w)     # in double
        w *= (float)net_w/new_w                                         # in float

    The image was placed at the integer offset ``(net_w - new_w)/2`` but this subtracts
    the exact half, so with odd padding boxes shift by half a network pixel; that is
    Darknet's behaviour and it is kept. Without a letterbox (stretched input, AlexeyAB's
    ``letter=0``) Darknet's formula is the identity and the boxes are returned as they
    are. pjreddie's functions always assume a letterbox (its CLI always letterboxes).
    AlexeyAB's newer ``correct_yolo_boxes`` computes ``w *= 1/ratiow``: within one
    float32 rounding of this.

    ``im_w``/``im_h``: original image size in pixels; ``net_w``/``net_h``: network input.
    Returns a new :class:`Detections`; other fields are shared, not copied.
    """
    if not letterbox:
        return Detections(boxes=dets.boxes, objectness=dets.objectness, prob=dets.prob,
                          uc=dets.uc, source=dets.source)
    new_w, new_h = letterbox_dims(im_w, im_h, net_w, net_h)
    b = dets.boxes
    f64 = torch.float64
    ratio_w = float(np.float32(new_w) / np.float32(net_w))      # (float)new_w/netw
    ratio_h = float(np.float32(new_h) / np.float32(net_h))
    x = ((b[:, 0].to(f64) - (net_w - new_w) / 2. / net_w) / ratio_w).to(_F32)
    y = ((b[:, 1].to(f64) - (net_h - new_h) / 2. / net_h) / ratio_h).to(_F32)
    bw = b[:, 2] * torch.tensor(np.float32(net_w) / np.float32(new_w), dtype=_F32, device=b.device)
    bh = b[:, 3] * torch.tensor(np.float32(net_h) / np.float32(new_h), dtype=_F32, device=b.device)
    return Detections(boxes=torch.stack([x, y, bw, bh], dim=1), objectness=dets.objectness,
                      prob=dets.prob, uc=dets.uc, source=dets.source)


def get_network_boxes(head_outputs: Sequence[Tensor], specs: Sequence[HeadSpec],
                      im_w: int | Sequence[int], im_h: int | Sequence[int], net_w: int, net_h: int,
                      thresh: float, hier_thresh: float = 0.5, letterbox: bool = True,
                      profile: str = "pjreddie",
                      class_map: Sequence[int] | None = None) -> list[Detections]:
    """Every head's boxes, image-relative, in Darknet's order (``network.c:
    get_network_boxes`` with ``relative=1``).

    ``head_outputs``: the heads' outputs in cfg order (what :meth:`darknetpy.Darknet.forward`
    returns), each ``(N, A*E, H, W)``; ``specs``: their specs (``[arch.specs[i] for i in
    arch.heads]``); ``im_w``/``im_h``: the original image size in pixels (one int for
    the batch, or one per image); ``net_w``/``net_h``: network input size;
    ``thresh``/``hier_thresh``: Darknet's ``-thresh``/``-hier``; ``letterbox``: whether
    the input was letterboxed (pjreddie's CLI: always; AlexeyAB: ``-letter_box`` or
    ``letter_box=1`` in ``[net]``); ``profile``: ``"pjreddie"`` or ``"alexeyab"`` (only
    changes ``[region]``); ``class_map``: Darknet's ``map`` argument (None in the CLI).

    Returns one :class:`Detections` per image: boxes of head 0, then head 1, ...; each
    head's boxes in its loop order. All heads must have the same number of classes.
    """
    if len(head_outputs) != len(specs):
        raise ValueError(f"{len(head_outputs)} head outputs for {len(specs)} head specs")
    if not specs:
        raise ValueError("the network has no detection heads")
    n = head_outputs[0].shape[0]
    ims_w = [int(im_w)] * n if isinstance(im_w, (int, np.integer)) else [int(v) for v in im_w]
    ims_h = [int(im_h)] * n if isinstance(im_h, (int, np.integer)) else [int(v) for v in im_h]
    if len(ims_w) != n or len(ims_h) != n:
        raise ValueError(f"{n} images in the batch but {len(ims_w)} widths and {len(ims_h)} heights")
    per_head = []
    for k, (out, spec) in enumerate(zip(head_outputs, specs)):
        if isinstance(spec, RegionSpec):
            dets = decode_region(out, spec, net_w, net_h, thresh, hier_thresh, profile, class_map)
        elif isinstance(spec, YoloSpec):
            dets = decode_yolo(out, spec, net_w, net_h, thresh)
        else:
            raise TypeError(f"layer {spec.index}: [{spec.type}] is not a detection head")
        for d in dets:
            d.source = d.source.clone()
            d.source[:, 0] = k
        per_head.append(dets)
    result = []
    for b in range(n):
        parts = [correct_boxes(dets[b], ims_w[b], ims_h[b], net_w, net_h, letterbox)
                 for dets in per_head]
        result.append(Detections.cat(parts))
    return result


# ---------------------------------------------------------------------- box similarity
def _corners(b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x - w/2, x + w/2, y - h/2, y + h/2)`` in float, as ``overlap``/``box_c`` do."""
    return b[:, 0] - b[:, 2] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 1] + b[:, 3] / 2


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU, ``box.c: box_iou`` (AlexeyAB form; pjreddie's differs only by
    giving NaN instead of 0 when the union is 0, which compares the same).

    ``a``: ``(M, 4)``, ``b``: ``(K, 4)``, both cxcywh in the same units; float32 out
    ``(M, K)``. Intersection: ``overlap`` widths/heights, 0 if either is negative;
    union ``a.w*a.h + b.w*b.h - I``; IoU 0 if I or U is 0. Float32 arithmetic in C's
    order, so the values equal Darknet's (symmetric bit for bit).
    """
    a, b = a.to(_F32), b.to(_F32)
    al, ar, at, ab = (v[:, None] for v in _corners(a))          # (M, 1)
    bl, br, bt, bb = (v[None, :] for v in _corners(b))          # (1, K)
    ow = torch.minimum(ar, br) - torch.maximum(al, bl)          # (M, K)
    oh = torch.minimum(ab, bb) - torch.maximum(at, bt)
    zero = torch.zeros((), dtype=_F32, device=a.device)
    inter = torch.where((ow < 0) | (oh < 0), zero, ow * oh)
    union = ((a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :]) - inter
    bad = (inter == 0) | (union == 0)
    return torch.where(bad, zero, inter / torch.where(bad, torch.ones_like(union), union))


def box_diou(a: Tensor, b: Tensor, beta: float = 0.6) -> Tensor:
    """Pairwise ``IoU - (d/c)^beta``: ``box.c: box_diou`` (beta 0.6, used by
    ``greedynms``) and ``box_diounms`` (beta = ``beta_nms``, used by ``diounms``).

    ``d`` = squared distance of the centres, ``c`` = squared diagonal of the smallest
    box enclosing both (float32); ``pow`` in double on the float ratio; returns the IoU
    alone where ``c == 0``. Shapes and units as :func:`box_iou`; float32 ``(M, K)``.
    ``beta`` is rounded to float32 first (``float beta1``) except for the literal 0.6
    of ``box_diou`` (pass ``beta=None`` for that).
    """
    a, b = a.to(_F32), b.to(_F32)
    iou = box_iou(a, b)
    al, ar, at, ab = (v[:, None] for v in _corners(a))
    bl, br, bt, bb = (v[None, :] for v in _corners(b))
    cw = torch.maximum(ar, br) - torch.minimum(al, bl)          # (M, K) enclosing box
    ch = torch.maximum(ab, bb) - torch.minimum(at, bt)
    c = cw * cw + ch * ch
    dx = a[:, 0][:, None] - b[:, 0][None, :]
    dy = a[:, 1][:, None] - b[:, 1][None, :]
    d = dx * dx + dy * dy
    p = 0.6 if beta is None else float(np.float32(beta))
    safe_c = torch.where(c == 0, torch.ones_like(c), c)
    u = torch.pow((d / safe_c).to(torch.float64), p).to(_F32)
    return torch.where(c == 0, iou, iou - u)


# ------------------------------------------------------------------------------- NMS
def _partition(objectness: Tensor) -> tuple[list[int], int]:
    """The swap loop at the top of ``do_nms_sort``/``diounms_sort``: zero-objectness
    boxes are swapped with the last unexamined box. Returns the resulting order
    (indices into the input) and ``total``, the number of non-zero boxes in front."""
    zero = (objectness == 0).tolist()
    order = list(range(len(zero)))
    k = len(order) - 1
    i = 0
    while i <= k:
        if zero[order[i]]:
            order[i], order[k] = order[k], order[i]
            k -= 1
        else:
            i += 1
    return order, k + 1


#: Rows per chunk when computing the metric between boxes (bounds temporary memory).
_CHUNK = 1024


def _neighbours(boxes: Tensor, metric: Callable[[Tensor, Tensor], Tensor], thresh: Tensor
                ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs with ``metric(i, j) > thresh`` (i != j) as CSR arrays ``(indptr, cols)``.

    ``boxes``: (U, 4) cxcywh. Only the upper triangle is computed, chunk by chunk, and
    mirrored: the metrics here are symmetric bit for bit (tested). Memory is
    O(chunk × U + pairs), never a (U, U) matrix.
    """
    u = boxes.shape[0]
    rows, cols = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for r in range(0, u, _CHUNK):
        over = (metric(boxes[r:r + _CHUNK], boxes[r:]) > thresh).numpy()  # (chunk, U - r)
        rr, cc = np.nonzero(over)
        rr, cc = rr + r, cc + r
        upper = rr < cc
        rows.append(rr[upper])
        cols.append(cc[upper])
    r_, c_ = np.concatenate(rows), np.concatenate(cols)
    src, dst = np.concatenate([r_, c_]), np.concatenate([c_, r_])
    indptr = np.zeros(u + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=u), out=indptr[1:])
    return indptr, dst[np.argsort(src, kind="stable")]


def _nms(dets: Detections, classes: int | None, metric: Callable[[Tensor, Tensor], Tensor] | None,
         thresh: float, on_class: Callable | None) -> Detections:
    """Darknet's class-by-class sort-and-suppress loop (``do_nms_sort``/``diounms_sort``).

    For k in 0..classes-1: a stable sort (glibc's ``qsort`` is a merge sort) of the
    first ``total`` boxes by prob[k] descending, starting from the order the previous
    class left; then greedy suppression among the boxes with prob[k] != 0 in that
    order: box i (if its prob[k] is still non-zero) zeroes prob[k] of every later box j
    with ``metric(i, j) > thresh``. A class with no non-zero prob leaves the order as
    it is and is skipped. ``metric=None``: sort only, no suppression.

    The metric does not depend on the class, so its over-threshold pairs are found once
    (sparse, :func:`_neighbours`) for all boxes that are candidates of some class. A
    surviving box then marks all its neighbours: marking an earlier one changes nothing
    (an earlier survivor would already have suppressed this box, by symmetry), so the
    result is exactly Darknet's greedy loop.
    """
    c = dets.classes if classes is None else int(classes)
    if c > dets.classes:
        raise ValueError(f"classes={c} but the detections have {dets.classes} class columns")
    order_list, total = _partition(dets.objectness)
    order = np.asarray(order_list, dtype=np.int64)
    prob = dets.prob.detach().to("cpu", _F32).numpy().copy()       # (B, C)
    boxes = dets.boxes.detach().to("cpu", _F32)                      # (B, 4)
    head = order[:total]
    nonzero = prob[head, :c] != 0                                    # (total, c)
    active = np.flatnonzero(nonzero.any(axis=0)).tolist()
    if metric is not None and active:
        union = head[nonzero[:, active].any(axis=1)]                 # candidates of some class
        slot = np.full(len(prob), -1, dtype=np.int64)
        slot[union] = np.arange(len(union))
        indptr, cols = _neighbours(boxes[torch.from_numpy(union)], metric,
                                   torch.tensor(np.float32(thresh)))
        nbrs: list = [None] * len(union)                             # built lazily
    for k in active:
        keys = prob[head, k]
        head = head[np.argsort(-keys, kind="stable")]
        m = int(np.count_nonzero(keys))
        cand = head[:m]                                              # sorted by prob[k] desc
        removed = np.zeros(m, dtype=bool)
        if metric is not None and m > 1:
            s = slot[cand]
            marked = bytearray(len(union))
            for x in s.tolist():                                     # Darknet's i loop
                if not marked[x]:                                    # still non-zero: suppresses
                    if nbrs[x] is None:
                        nbrs[x] = cols[indptr[x]:indptr[x + 1]].tolist()
                    for y in nbrs[x]:
                        marked[y] = 1
            removed = np.frombuffer(bytes(marked), dtype=bool)[s]
            prob[cand[removed], k] = 0
        if on_class is not None:
            on_class(k, torch.from_numpy(cand.copy()), torch.from_numpy(removed.copy()))
    order = torch.from_numpy(np.concatenate([head, order[total:]]))
    out = Detections(boxes=dets.boxes, objectness=dets.objectness,
                     prob=torch.from_numpy(prob).to(dets.prob.device, dets.prob.dtype),
                     uc=dets.uc, source=dets.source)
    return out.select(order.to(dets.boxes.device))


def do_nms_sort(dets: Detections, classes: int | None, nms: float, *,
                on_class: Callable | None = None) -> Detections:
    """``box.c: do_nms_sort(dets, total, classes, nms)`` (pjreddie and AlexeyAB).

    1. Boxes with objectness == 0 are moved to the end by Darknet's swap loop (which
       scrambles the order; reproduced exactly).
    2. For each class k: stable sort of the other boxes by prob[k] descending (glibc's
       ``qsort`` is a stable merge sort; ties keep the order the previous class left),
       then each box with prob[k] != 0, in that order, zeroes prob[k] of every later
       box whose IoU with it is > nms.

    Boxes are never removed; the result holds all B boxes in Darknet's final array
    order (the order it prints), with suppressed probabilities set to 0. ``classes``:
    the number of classes to process (Darknet passes the last layer's ``classes``;
    None = all columns); ``nms``: IoU threshold (a C float, e.g. 0.45). ``on_class``:
    optional ``f(k, candidates, suppressed)`` called for each class that has a non-zero
    prob, for diagnostics: ``candidates`` (int64 (m,), indices into ``dets`` of the
    boxes with prob[k] != 0, in the order Darknet walks them) and ``suppressed``
    (bool (m,), which of them got prob[k] zeroed). NaN probabilities are not modelled.
    """
    return _nms(dets, classes, box_iou, nms, on_class)


def diounms_sort(dets: Detections, classes: int | None, nms: float, nms_kind: str | None,
                 beta_nms: float = 0.6, *, on_class: Callable | None = None) -> Detections:
    """AlexeyAB ``box.c: diounms_sort(dets, total, classes, nms, nms_kind, beta_nms)``.

    The loop of :func:`do_nms_sort` with the suppression test chosen by ``nms_kind``:

    * ``"greedynms"``: :func:`box_diou` with the fixed exponent 0.6 (``box_diou``),
      i.e. ``IoU - (d/c)^0.6 > nms`` (``beta_nms`` is NOT used);
    * ``"diounms"``: ``IoU - (d/c)^beta_nms > nms`` (``box_diounms``);
    * ``"cornersnms"``: plain ``IoU > nms`` (the box merging is commented out in C);
    * ``"default"``/None: nothing is suppressed, but the boxes are still sorted
      (Darknet's CLI calls :func:`do_nms_sort` for the default kind instead).

    Returns all boxes in Darknet's final order with suppressed probabilities zeroed.
    """
    kind = "default" if nms_kind is None else nms_kind
    if kind not in NMS_KINDS:
        raise ValueError(f"unknown nms_kind {nms_kind!r}; use one of {', '.join(NMS_KINDS)}")
    metric = {
        "greedynms": lambda a, b: box_diou(a, b, None),
        "diounms": lambda a, b: box_diou(a, b, beta_nms),
        "cornersnms": box_iou,
        "default": None,
    }[kind]
    return _nms(dets, classes, metric, nms, on_class)


def detector_nms(dets: Detections, last_layer, profile: str, nms: float = 0.45) -> Detections:
    """The NMS Darknet's ``detector test`` applies (``detector.c: test_detector``).

    ``last_layer``: the spec of the network's LAST layer (``arch.specs[-1]``), whose
    ``classes``, ``nms_kind`` and ``beta_nms`` Darknet reads. pjreddie:
    ``do_nms_sort(dets, classes, nms)``. AlexeyAB: ``diounms_sort`` with the layer's
    ``nms_kind``/``beta_nms`` when the kind is not ``default``, else ``do_nms_sort``.
    A last layer that is not a detection head has no ``nms_kind`` (default) and all
    class columns are processed. ``nms``: Darknet's ``-nms`` (0.45; 0 disables NMS and
    returns ``dets`` unchanged).
    """
    if profile not in ("pjreddie", "alexeyab"):
        raise ValueError(f"unknown profile {profile!r}; use 'pjreddie' or 'alexeyab'")
    if not nms:
        return dets
    classes = getattr(last_layer, "classes", None)
    kind = getattr(last_layer, "nms_kind", None) or "default"
    if profile == "alexeyab" and kind != "default":
        return diounms_sort(dets, classes, nms, kind, getattr(last_layer, "beta_nms", 0.6))
    return do_nms_sort(dets, classes, nms)
