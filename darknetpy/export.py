"""ONNX export of a Darknet network, checked by ONNX Runtime.

>>> from darknetpy import load                                         # doctest: +SKIP
>>> from darknetpy.export import export_onnx, verify_onnx              # doctest: +SKIP
>>> model = load("yolov4-tiny.cfg", "yolov4-tiny.weights")              # doctest: +SKIP
>>> report = export_onnx(model, "yolov4-tiny.onnx", decode=True)        # doctest: +SKIP
>>> print(report.table())                                             # doctest: +SKIP

Exporter: PyTorch's TorchScript-based exporter, ``torch.onnx.export(..., dynamo=False)``
(the dynamo exporter needs ``onnxscript`` and is not used). Default opset
:data:`DEFAULT_OPSET` = 17 (opsets 13..20 are accepted; 20 is the TorchScript
exporter's maximum; ONNX Runtime runs all of them).

The graph
---------
* Input ``images``: ``(N, C, H, W)`` float32 (float16 with ``half=True``), RGB in 0..1,
  planar, already resized or letterboxed to the network size as Darknet does it
  (:func:`darknetpy.image.prepare_input`). ``N`` is ``batch`` (static) or the
  symbolic ``batch`` axis with ``dynamic_batch=True``.
* Default outputs: one per detection head in cfg order, named ``head_<index>_<type>``
  (e.g. ``head_106_yolo``), each ``(N, A*E, h, w)`` exactly what the Darknet head layer
  holds after forward (what :mod:`darknetpy.verify` compares); a network without heads
  (a classifier) has one output ``output_<index>_<type>``: its last layer's output.
* ``decode=True`` adds ``boxes`` ``(N, B, 4)`` and ``scores`` ``(N, B, classes)``, float32,
  computed in the graph by :class:`HeadDecoder` from every head (B = the sum over the
  heads of anchors × h × w). Boxes are ``(x, y, w, h)`` = centre and size (cxcywh),
  **relative to the network input** (0..1; multiply by the network width/height for
  pixels; undo a letterbox with :func:`darknetpy.boxes.correct_boxes`). Box order is
  Darknet's: heads in cfg order; ``[yolo]``/``[Gaussian_yolo]``/AlexeyAB ``[region]``
  cell-major (box ``cell*A + anchor``, cell = row*w + col), pjreddie ``[region]``
  anchor-major (``anchor*h*w + cell``). No box is dropped. ``scores[..., c]`` is the
  value Darknet thresholds into ``detection.prob[c]``: a box has class ``c`` in Darknet's
  output iff ``scores[..., c] > thresh``, and then ``prob[c] == scores[..., c]`` to
  float32 rounding (the graph runs :class:`darknetpy.boxes.DenseDecoder`, as
  :func:`darknetpy.boxes.get_network_boxes` does, in Darknet's float/double mix, so
  only ONNX Runtime's double ``exp`` may differ in the last bit; checked against
  ``get_network_boxes`` before NMS):

  - ``[yolo]``: objectness × class probability (``new_coords``, ``scale_x_y``, anchors
    by ``mask`` handled; anchors in network pixels);
  - ``[Gaussian_yolo]``: objectness × class × (1 − mean of the four sigmas);
  - ``[region]`` (anchors in grid cells): objectness × class probability; AlexeyAB's
    layer leaves x, y raw, so the logistic is applied here, as its ``get_region_box``
    does; ``tree=`` (YOLO9000): AlexeyAB: the highest-index node whose absolute
    (hierarchical) probability is > 0.5, with that probability, if the objectness is
    > ``thresh`` (``thresh`` is therefore baked into the graph); pjreddie: the node
    chosen by ``hierarchy_top_prediction`` (``hier_thresh`` baked in), with the
    objectness as its score. A ``map=`` class map is not applied (Darknet's CLI does
    not pass one).
* ``nms=True`` (implies ``decode``) adds ONNX ``NonMaxSuppression`` (center_point_box=1,
  per class, IoU > ``nms_thresh`` suppresses, score > ``thresh`` kept,
  ``max_det`` = ``max_output_boxes_per_class``, i.e. per image and class) and outputs
  ``selected_indices`` ``(K, 3)`` int64 rows ``(image, class, box)``, ``det_boxes``
  ``(K, 4)`` (cxcywh, network-relative) and ``det_scores`` ``(K,)``. The nodes are
  appended to the exported graph with ``onnx.helper``. How it differs from Darknet's
  ``do_nms_sort`` (:func:`darknetpy.boxes.do_nms_sort`): both are greedy per class with
  a strict ``IoU > nms`` test and keep only scores > thresh, so the selected (box,
  class) pairs are the same, except that (1) ties in score are broken by box index
  (ONNX Runtime) instead of the order left by the previous class's stable sort; (2)
  ONNX returns a list of (image, class, box) triples sorted by image, class and score,
  where Darknet keeps every box in a permuted array with suppressed probabilities
  zeroed; (3) ``max_det`` caps each class (Darknet has no cap); (4) AlexeyAB's
  ``nms_kind=greedynms|diounms`` (DIoU-NMS, ``diounms_sort``) is NOT available: plain
  IoU is used, which suppresses at least as much (DIoU <= IoU); the report notes it.

Every file is written atomically: exported to a temporary file in the destination
folder, checked (``onnx.checker``, then ONNX Runtime against the torch model), and only
then renamed over ``path``; on any failure the temporary file is removed and an existing
``path`` is left untouched. Metadata (``metadata_props``) records the outputs' layer
indices, the profile, the box format and the thresholds (:func:`onnx_metadata`).

Limits: a layer the exporter rejects raises :class:`ExportError` naming it (found by
exporting the layers one by one; PyTorch also prints its IR graph to stdout then).
``half=True`` with a ``tree=`` softmax is refused (Darknet's ``-FLT_MAX`` does not fit
float16). Layers running ``arithmetic="darknet"`` export as ordinary Conv/Gemm nodes
(ONNX Runtime's summation order). Graphs over 2 GB (protobuf's limit, external data)
are not supported.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from .boxes import DenseDecoder
from .detect import DEFAULT_THRESH
from .errors import DarknetError, ReferenceDataError
from .verify import (DEFAULT_ATOL, DEFAULT_RTOL, Reference, VerifyReport,
                     layer_row, max_abs_diff)
from .weights import atomic_target

#: default ONNX opset (ONNX Runtime supports it fully; Resize, Split, NMS all settled).
DEFAULT_OPSET = 17
#: accepted opsets: 13 (Split/Squeeze with inputs) .. 20 (the TorchScript exporter's max).
MIN_OPSET, MAX_OPSET = 13, 20
#: which exporter writes the graph.
EXPORTER = "torch.onnx.export(dynamo=False), the TorchScript-based exporter"
INPUT_NAME = "images"
#: default relative tolerance of the ORT-vs-torch check (float32 / float16 graphs).
CHECK_RTOL = 1e-3
CHECK_RTOL_HALF = 2e-2
#: metadata_props keys written into every exported model.
META_KEY = "darknetpy"

__all__ = ["export_onnx", "verify_onnx", "onnx_metadata", "ExportReport", "OutputInfo",
           "ExportError", "ExportCheckError", "HeadDecoder", "onnx_nms_reference",
           "DEFAULT_OPSET", "EXPORTER"]


class ExportError(DarknetError):
    """A network (or an option) that cannot be exported, or an export that failed.

    Attributes: ``layer`` (index of the layer at fault, or None), ``layer_type``.
    """

    def __init__(self, message: str, *, layer: int | None = None, layer_type: str | None = None):
        self.layer, self.layer_type, self.message = layer, layer_type, message
        where = f"layer {layer} [{layer_type}]: " if layer is not None else ""
        super().__init__(where + message)


class ExportCheckError(ExportError):
    """The exported graph, run by ONNX Runtime, differs from the torch model by more than
    the tolerance (or the ONNX checker rejected it). ``report`` holds the differences;
    the destination file was not written."""

    def __init__(self, message: str, report: "ExportReport", **kw):
        super().__init__(message, **kw)
        self.report = report


@dataclass
class OutputInfo:
    """One graph output: ``name``, the Darknet ``layer`` it holds (None for decode/NMS
    outputs), the layer ``type``, ``shape`` (``"batch"``/``"K"`` for symbolic axes) and
    ``dtype``."""

    name: str
    layer: int | None
    type: str
    shape: list
    dtype: str


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how it checked.

    ``path``, ``opset``, ``bytes`` (file size), ``export_seconds`` (tracing + writing),
    ``check_seconds`` (None without a check), ``outputs`` (:class:`OutputInfo`),
    ``max_abs[name]``/``tolerance[name]``: ONNX Runtime vs torch per output (empty
    without a check), ``ok``, ``exporter``, ``notes`` (approximations, e.g. NMS kind).
    """

    path: str
    opset: int
    bytes: int = 0
    export_seconds: float = 0.0
    check_seconds: float | None = None
    outputs: list = field(default_factory=list)
    max_abs: dict = field(default_factory=dict)
    tolerance: dict = field(default_factory=dict)
    ok: bool = True
    exporter: str = EXPORTER
    notes: list = field(default_factory=list)
    check_batch: int | None = None

    def table(self) -> str:
        """The report as text: one line per output and a summary line."""
        lines = [f"{'output':<22} {'layer':>5} {'shape':<24} {'ORT max abs':>12} {'tol':>10}  ok"]
        for o in self.outputs:
            shape = "x".join(str(d) for d in o.shape)
            layer = "-" if o.layer is None else str(o.layer)
            if o.name in self.max_abs:
                d, t = self.max_abs[o.name], self.tolerance[o.name]
                lines.append(f"{o.name:<22} {layer:>5} {shape:<24} {d:>12.3g} {t:>10.3g}  "
                             f"{'ok' if d <= t else 'FAIL'}")
            else:
                lines.append(f"{o.name:<22} {layer:>5} {shape:<24} {'-':>12} {'-':>10}")
        for n in self.notes:
            lines.append(f"note: {n}")
        checked = ("not checked" if self.check_seconds is None else
                   f"checked with ONNX Runtime at batch {self.check_batch} in "
                   f"{self.check_seconds:.2f} s")
        lines.append(f"{self.path}: opset {self.opset}, {self.bytes / 1e6:.1f} MB, exported in "
                     f"{self.export_seconds:.2f} s, {checked}: {'OK' if self.ok else 'FAILED'}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- decode
class HeadDecoder(nn.Module):
    """Detection-head outputs -> ``boxes`` (N, B, 4) and ``scores`` (N, B, classes), in
    exportable torch ops (float32): one :class:`darknetpy.boxes.DenseDecoder` per head
    (tree heads: a :class:`darknetpy.tree.TreeIndex` submodule), concatenated in cfg order.

    ``forward(outputs)``: the heads' outputs in cfg order, each ``(N, A*E, h, w)`` (any
    float dtype). ``boxes``: cxcywh relative to the network input (0..1); ``scores``:
    what Darknet thresholds into ``detection.prob``; order and formulas as in the module
    docstring, the same operations as :func:`darknetpy.boxes.decode_yolo`/
    ``decode_region`` before the objectness filter, the thresholds and the letterbox
    correction (``yolo_layer.c: get_yolo_box``, ``region_layer.c: get_region_box``, ...).
    ``thresh`` only matters for AlexeyAB ``[region] tree=`` heads, ``hier_thresh`` for
    pjreddie ones.

    Raises:
        ExportError: no heads, or heads with different numbers of classes.
    """

    def __init__(self, model, thresh: float = 0.25, hier_thresh: float = 0.5):
        super().__init__()
        specs = [model.specs[i] for i in model.heads]
        if not specs:
            raise ExportError("decode needs detection heads; this network has none "
                              "(a classifier)")
        classes = {s.classes for s in specs}
        if len(classes) != 1:
            raise ExportError("detection heads have different numbers of classes: " +
                              ", ".join(f"layer {s.index}: {s.classes}" for s in specs),
                              layer=specs[-1].index, layer_type=specs[-1].type)
        net = model.net
        self.parts = nn.ModuleList(
            DenseDecoder(s, s.out_shape[1], s.out_shape[2], net.width, net.height, model.profile,
                         thresh, hier_thresh) for s in specs)

    def forward(self, outputs) -> tuple[Tensor, Tensor]:
        dense = [part(o) for part, o in zip(self.parts, outputs)]
        return (torch.cat([d.boxes for d in dense], dim=1),
                torch.cat([d.scores for d in dense], dim=1))


class _Exported(nn.Module):
    """What is traced: the network, then (optionally) the decoder."""

    def __init__(self, model, decoder: HeadDecoder | None):
        super().__init__()
        self.model, self.decoder = model, decoder

    def forward(self, x: Tensor):
        out = self.model(x)
        outs = list(out) if isinstance(out, tuple) else [out]
        if self.decoder is not None:
            outs.extend(self.decoder(outs))
        return tuple(outs)


class _LayerProbe(nn.Module):
    """One layer module alone, ``forward(x, *refs)``: to find a layer that will not export."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, *refs):
        return self.layer(x, list(refs))


# ---------------------------------------------------------------------- exporter fixes
@contextlib.contextmanager
def _exporter_context(opset: int):
    """Silence the tracer's warnings while exporting."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _torch_arithmetic(model):
    """Layers with ``arithmetic="darknet"`` (a Python gemm loop) export as plain Conv/Gemm:
    switch them to torch's kernels while tracing, then restore."""
    saved = [(layer, layer.arithmetic) for layer in model.layers if hasattr(layer, "arithmetic")]
    try:
        for layer, _ in saved:
            layer.arithmetic = "torch"
        yield
    finally:
        for layer, mode in saved:
            layer.arithmetic = mode


def _locate_failure(model, x: Tensor, opset: int):
    """Export layer by layer on ``x`` to find the first layer the exporter rejects.
    Returns ``(index, exception)`` or ``(None, None)``."""
    saved: dict[int, Tensor] = {}
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            refs = [saved[j] for j in model._refs[i]]
            try:
                torch.onnx.export(_LayerProbe(layer), (x, *refs), io.BytesIO(),
                                  opset_version=opset, dynamo=False)
            except Exception as e:  # noqa: BLE001 - any exporter failure locates the layer
                return i, e
            x = layer(x, refs)
            if model._keep[i]:
                saved[i] = x
    return None, None


_NODE_LAYER = re.compile(r"/(?:model/)?layers\.(\d+)/")


def _layer_in_message(model, text: str) -> tuple[int | None, str | None]:
    m = _NODE_LAYER.search(text)
    if m and int(m.group(1)) < len(model.specs):
        i = int(m.group(1))
        return i, model.specs[i].type
    return None, None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:500]


# ---------------------------------------------------------------------------- NMS
def _add_nms(model_proto, *, thresh: float, nms_thresh: float, max_det: int) -> list:
    """Append ONNX NonMaxSuppression over ``boxes``/``scores`` to the graph; returns the
    new OutputInfo entries."""
    import onnx
    from onnx import TensorProto, helper
    g = model_proto.graph
    f32 = TensorProto.FLOAT
    types = {o.name: o.type.tensor_type.elem_type for o in g.output}
    boxes, scores = "boxes", "scores"
    nodes = []
    if types.get(boxes) != f32:
        nodes.append(helper.make_node("Cast", [boxes], ["nms/boxes_f32"], to=f32))
        boxes = "nms/boxes_f32"
    if types.get(scores) != f32:
        nodes.append(helper.make_node("Cast", [scores], ["nms/scores_f32"], to=f32))
        scores = "nms/scores_f32"
    g.initializer.extend([
        onnx.numpy_helper.from_array(np.array([max_det], dtype=np.int64), "nms/max_per_class"),
        onnx.numpy_helper.from_array(np.array([nms_thresh], dtype=np.float32), "nms/iou"),
        onnx.numpy_helper.from_array(np.array([thresh], dtype=np.float32), "nms/score"),
        onnx.numpy_helper.from_array(np.array([0, 2], dtype=np.int64), "nms/cols_ib"),
        onnx.numpy_helper.from_array(np.array([0, 2, 1], dtype=np.int64), "nms/cols_ibc"),
    ])
    nodes += [
        helper.make_node("Transpose", [scores], ["nms/scores_ncb"], perm=[0, 2, 1]),
        helper.make_node("NonMaxSuppression", [boxes, "nms/scores_ncb", "nms/max_per_class",
                                               "nms/iou", "nms/score"],
                         ["selected_indices"], center_point_box=1, name="nms/NonMaxSuppression"),
        helper.make_node("Gather", ["selected_indices", "nms/cols_ib"], ["nms/ib"], axis=1),
        helper.make_node("GatherND", [boxes, "nms/ib"], ["det_boxes"]),
        helper.make_node("Gather", ["selected_indices", "nms/cols_ibc"], ["nms/ibc"], axis=1),
        helper.make_node("GatherND", [scores, "nms/ibc"], ["det_scores"]),
    ]
    g.node.extend(nodes)
    g.output.extend([
        helper.make_tensor_value_info("selected_indices", TensorProto.INT64, ["K", 3]),
        helper.make_tensor_value_info("det_boxes", f32, ["K", 4]),
        helper.make_tensor_value_info("det_scores", f32, ["K"]),
    ])
    return [OutputInfo("selected_indices", None, "nms", ["K", 3], "int64"),
            OutputInfo("det_boxes", None, "nms", ["K", 4], "float32"),
            OutputInfo("det_scores", None, "nms", ["K"], "float32")]


def _iou_over(box: np.ndarray, others: np.ndarray, thresh: np.float32) -> np.ndarray:
    """ONNX Runtime's ``SuppressByIOU`` (center_point_box=1) in float32: one box (4,)
    against others (M, 4) -> bool (M,), IoU > thresh."""
    f = np.float32
    half = f(2)
    x1a, x2a = box[0] - box[2] / half, box[0] + box[2] / half
    y1a, y2a = box[1] - box[3] / half, box[1] + box[3] / half
    x1b, x2b = others[:, 0] - others[:, 2] / half, others[:, 0] + others[:, 2] / half
    y1b, y2b = others[:, 1] - others[:, 3] / half, others[:, 1] + others[:, 3] / half
    # ORT orders the corners (min/max) before intersecting
    x1a, x2a = min(x1a, x2a), max(x1a, x2a)
    y1a, y2a = min(y1a, y2a), max(y1a, y2a)
    x1b, x2b = np.minimum(x1b, x2b), np.maximum(x1b, x2b)
    y1b, y2b = np.minimum(y1b, y2b), np.maximum(y1b, y2b)
    iw = np.minimum(x2a, x2b) - np.maximum(x1a, x1b)
    ih = np.minimum(y2a, y2b) - np.maximum(y1a, y1b)
    inter = np.maximum(iw, f(0)) * np.maximum(ih, f(0))
    area_a = (x2a - x1a) * (y2a - y1a)
    area_b = (x2b - x1b) * (y2b - y1b)
    union = area_a + area_b - inter
    ok = (inter > 0) & (area_a > 0) & (area_b > 0) & (union > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(ok, inter / np.where(union > 0, union, f(1)), f(0))
    return ok & (iou > thresh)


def onnx_nms_reference(boxes: np.ndarray, scores: np.ndarray, iou_thresh: float,
                       score_thresh: float, max_per_class: int) -> np.ndarray:
    """A plain-numpy port of ONNX Runtime's ``NonMaxSuppression`` (center_point_box=1).

    ``boxes`` (N, B, 4) cxcywh, ``scores`` (N, B, C). For each image and class: the
    boxes with score > ``score_thresh`` in descending score order (ties: lower box
    index first), each kept unless a kept box has IoU > ``iou_thresh`` with it, at most
    ``max_per_class``. Returns int64 (K, 3) rows (image, class, box) in ORT's order.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    thr = np.float32(score_thresh)
    iou = np.float32(iou_thresh)
    rows = []
    for b in range(scores.shape[0]):
        for c in range(scores.shape[2]):
            s = scores[b, :, c]
            cand = np.flatnonzero(s > thr)
            if cand.size == 0:
                continue
            cand = cand[np.lexsort((cand, -s[cand]))]       # score desc, index asc
            alive = np.ones(cand.size, dtype=bool)
            kept = 0
            for k in range(cand.size):
                if not alive[k]:
                    continue
                rows.append((b, c, int(cand[k])))
                kept += 1
                if kept >= max_per_class:
                    break
                rest = k + 1 + np.flatnonzero(alive[k + 1:])
                if rest.size:
                    alive[rest[_iou_over(boxes[b, cand[k]], boxes[b, cand[rest]], iou)]] = False
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


# ------------------------------------------------------------------------- checking
def _session(path: str):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _sample_input(model, sample, n: int, dtype: torch.dtype, device) -> Tensor:
    net = model.net
    if sample is None:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand((n, net.channels, net.height, net.width), generator=gen)
    else:
        x = torch.as_tensor(np.asarray(sample) if not isinstance(sample, Tensor) else sample)
        if x.dim() == 3:
            x = x[None].expand(n, -1, -1, -1)
    return x.to(device=device, dtype=dtype).contiguous()


# --------------------------------------------------------------------------- export
def export_onnx(model, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, batch: int = 1,
                dynamic_batch: bool = False, half: bool = False, decode: bool = False,
                nms: bool = False, thresh: float | None = None, hier_thresh: float = 0.5,
                nms_thresh: float = 0.45, max_det: int = 300, check: bool = True,
                sample=None, atol: float | None = None, rtol: float | None = None
                ) -> ExportReport:
    """Export a :class:`darknetpy.model.Darknet` to ONNX and check it with ONNX Runtime.

    Args:
        model: the network (its current size; load with ``width=/height=`` for another).
        path: destination ``.onnx`` file; replaced only after every check passed.
        opset: ONNX opset, 13..20 (default 17).
        batch: the batch size traced (and the static N without ``dynamic_batch``).
        dynamic_batch: make N a symbolic ``batch`` axis (checked at batch ``batch + 1``).
        half: float16 weights, input and head outputs (decode outputs stay float32);
            checked against the torch model in float16 (default rtol 2e-2).
        decode: add ``boxes`` and ``scores`` (see the module docstring).
        nms: add ONNX NonMaxSuppression and its outputs (implies ``decode``).
        thresh: score threshold of the NMS (and of AlexeyAB tree heads); default
            Darknet's for the profile (pjreddie 0.5, AlexeyAB 0.25).
        hier_thresh: pjreddie ``[region] tree=`` heads' ``-hier`` threshold.
        nms_thresh: IoU threshold (Darknet's ``-nms``, 0.45).
        max_det: ``max_output_boxes_per_class`` of the NMS (per image and class).
        check: run ``onnx.checker`` and ONNX Runtime on ``sample`` (default: uniform
            random input, seed 0) and compare every output with the torch model:
            ``max |ort - torch| <= atol + rtol * max(1, max |torch|)`` (defaults 0 and
            1e-3, 2e-2 with ``half``); NMS outputs must equal
            :func:`onnx_nms_reference` run on the graph's own boxes and scores.
        sample: (C, H, W) or (N, C, H, W) input for the check.

    Returns:
        An :class:`ExportReport`.

    Raises:
        ExportError: bad options; an option the network cannot have (decode without
            heads); a layer the exporter rejects (named: index and type).
        ExportCheckError: the checker or ONNX Runtime rejected the graph, or its results
            differ beyond the tolerance; ``path`` is left as it was.
    """
    import onnx

    path = os.fspath(path)
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise ExportError(f"opset {opset} not supported; use {MIN_OPSET}..{MAX_OPSET} "
                          f"(default {DEFAULT_OPSET})")
    if int(batch) < 1:
        raise ExportError(f"batch must be >= 1, got {batch}")
    if max_det < 1:
        raise ExportError(f"max_det must be >= 1, got {max_det}")
    opset, batch = int(opset), int(batch)
    decode = decode or nms
    profile = model.profile
    thresh = DEFAULT_THRESH[profile] if thresh is None else float(thresh)
    report = ExportReport(path=path, opset=opset)

    # -- the module to trace
    net_model = copy.deepcopy(model).half() if half else model
    dtype = torch.float16 if half else torch.float32
    device = model.device
    decoder = HeadDecoder(net_model, thresh, hier_thresh).to(device) if decode else None
    wrapper = _Exported(net_model, decoder).eval()

    heads = list(model.heads) or [len(model.specs) - 1]
    prefix = "head" if model.heads else "output"
    names = [f"{prefix}_{i}_{model.specs[i].type}" for i in heads]
    sym = "batch" if dynamic_batch else batch
    dt = "float16" if half else "float32"
    report.outputs = [OutputInfo(n, i, model.specs[i].type, [sym, *model.specs[i].out_shape], dt)
                      for n, i in zip(names, heads)]
    if decode:
        b = sum(s.num_anchors * s.out_shape[1] * s.out_shape[2]
                for s in (model.specs[i] for i in model.heads))
        classes = model.specs[model.heads[0]].classes
        names += ["boxes", "scores"]
        report.outputs += [OutputInfo("boxes", None, "decode", [sym, b, 4], "float32"),
                           OutputInfo("scores", None, "decode", [sym, b, classes], "float32")]
    last = model.specs[-1]
    if nms:
        kind = getattr(last, "nms_kind", None) or "default"
        if profile == "alexeyab" and kind not in ("default", "cornersnms"):
            report.notes.append(
                f"layer {last.index} [{last.type}] has nms_kind={kind} (DIoU-NMS in Darknet); "
                "ONNX NonMaxSuppression uses plain IoU, which suppresses at least as much")

    if half:
        for spec in model.specs:
            if getattr(spec, "tree", None) is not None:
                raise ExportError("half=True is not supported with a tree= softmax (Darknet's "
                                  "softmax_tree starts its maximum at -FLT_MAX, which float16 "
                                  "cannot hold); export in float32", layer=spec.index,
                                  layer_type=spec.type)
    x = _sample_input(model, None, batch, dtype, device)
    with atomic_target(path) as tmp:
        t0 = time.perf_counter()
        dynamic_axes = None
        if dynamic_batch:
            dynamic_axes = {INPUT_NAME: {0: "batch"}}
            for n in names:
                dynamic_axes[n] = {0: "batch"}
        with _exporter_context(opset), _torch_arithmetic(net_model), torch.no_grad():
            try:
                torch.onnx.export(wrapper, (x,), tmp, input_names=[INPUT_NAME],
                                  output_names=names, opset_version=opset, dynamo=False,
                                  dynamic_axes=dynamic_axes, do_constant_folding=True)
            except Exception as e:  # noqa: BLE001 - turned into a located ExportError
                i, err = _locate_failure(net_model, x, opset)
                if i is not None:
                    raise ExportError(f"cannot be exported to ONNX opset {opset}: "
                                      f"{_first_line(err)}", layer=i,
                                      layer_type=model.specs[i].type) from e
                where = " (in the box decoder)" if decode else ""
                raise ExportError(f"ONNX export failed{where}: {_first_line(e)}") from e
        proto = onnx.load(tmp)
        if nms:
            report.outputs += _add_nms(proto, thresh=thresh, nms_thresh=nms_thresh,
                                       max_det=max_det)
        meta = {
            "darknetpy_version": _version(),
            "profile": profile,
            "cfg": os.path.basename(model.arch.path) if model.arch.path else None,
            "input": {"name": INPUT_NAME, "shape": [sym, model.net.channels, model.net.height,
                                                    model.net.width], "dtype": dt,
                      "format": "RGB, 0..1, planar (N, C, H, W), resized/letterboxed as Darknet"},
            "outputs": [o.__dict__ for o in report.outputs],
            "decode": None if not decode else {
                "box_format": "cxcywh relative to the network input (0..1)",
                "order": "heads in cfg order; yolo/AlexeyAB region cell-major, "
                         "pjreddie region anchor-major",
                "thresh": thresh, "hier_thresh": hier_thresh},
            "nms": None if not nms else {
                "op": "NonMaxSuppression", "center_point_box": 1, "iou_threshold": nms_thresh,
                "score_threshold": thresh, "max_output_boxes_per_class": max_det},
            "notes": report.notes,
        }
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(meta)
        proto.producer_name = "darknetpy"
        proto.producer_version = _version()
        proto.doc_string = (f"Darknet network {meta['cfg'] or ''} exported by darknetpy "
                            f"({profile} profile) with {EXPORTER}")
        onnx.save(proto, tmp)
        report.export_seconds = time.perf_counter() - t0
        try:
            onnx.checker.check_model(tmp)
        except Exception as e:  # noqa: BLE001
            i, t = _layer_in_message(model, str(e))
            report.ok = False
            raise ExportCheckError(f"onnx.checker rejected the graph: {_first_line(e)}", report,
                                   layer=i, layer_type=t) from e
        del proto
        if check:
            _check(report, wrapper, model, tmp, _CheckOptions(
                sample=sample, batch=batch, dynamic_batch=dynamic_batch, dtype=dtype,
                device=device, thresh=thresh, nms_thresh=nms_thresh, max_det=max_det, nms=nms,
                half=half, atol=atol, rtol=rtol))
        report.bytes = os.path.getsize(tmp)
    return report


@dataclass
class _CheckOptions:
    """:func:`export_onnx`'s arguments that :func:`_check` uses (same meanings); ``dtype``
    and ``device``: the traced input's."""

    sample: object
    batch: int
    dynamic_batch: bool
    dtype: torch.dtype
    device: torch.device
    thresh: float
    nms_thresh: float
    max_det: int
    nms: bool
    half: bool
    atol: float | None
    rtol: float | None


def _check(report: ExportReport, wrapper, model, tmp: str, opts: _CheckOptions) -> None:
    """Run ``tmp`` with ONNX Runtime and compare with ``wrapper`` (fills ``report``)."""
    t0 = time.perf_counter()
    atol = 0.0 if opts.atol is None else float(opts.atol)
    rtol = ((CHECK_RTOL_HALF if opts.half else CHECK_RTOL) if opts.rtol is None
            else float(opts.rtol))
    batch, device = opts.batch, opts.device
    n = batch + 1 if opts.dynamic_batch else batch
    x = _sample_input(model, opts.sample, n, opts.dtype, device)
    if not opts.dynamic_batch and x.shape[0] != batch:
        raise ExportError(f"sample has batch {x.shape[0]}, the graph has a static batch of "
                          f"{batch}")
    report.check_batch = int(x.shape[0])
    try:
        sess = _session(tmp)
        got = sess.run(None, {INPUT_NAME: x.cpu().numpy()})
    except Exception as e:  # noqa: BLE001
        i, t = _layer_in_message(model, str(e))
        report.ok = False
        raise ExportCheckError(f"ONNX Runtime could not run the graph: {_first_line(e)}",
                               report, layer=i, layer_type=t) from e
    names = [o.name for o in sess.get_outputs()]
    by_name = dict(zip(names, got))
    with _torch_arithmetic(wrapper.model), torch.no_grad():
        want = [t.float().cpu().numpy() for t in wrapper(x)]
        if wrapper.decoder is not None:
            # the decoder is checked on ORT's own head outputs: network rounding, which
            # exp() amplifies in w and h, is already checked on the heads themselves
            heads = [torch.from_numpy(by_name[o.name]).to(device) for o in report.outputs
                     if o.layer is not None]
            want[len(heads):len(heads) + 2] = [t.float().cpu().numpy()
                                               for t in wrapper.decoder(heads)]
    bad = []
    for info, ref in zip(report.outputs, want):
        d, scale = max_abs_diff(by_name[info.name], ref)
        report.max_abs[info.name] = d
        report.tolerance[info.name] = atol + rtol * scale
        if not d <= report.tolerance[info.name]:
            bad.append(info)
    if opts.nms:
        sel = by_name["selected_indices"]
        expect = onnx_nms_reference(by_name["boxes"], by_name["scores"], opts.nms_thresh,
                                    opts.thresh, opts.max_det)
        same = sel.shape == expect.shape and bool(np.array_equal(sel, expect))
        report.max_abs["selected_indices"] = 0.0 if same else float("inf")
        report.tolerance["selected_indices"] = 0.0
        gb = by_name["boxes"][sel[:, 0], sel[:, 2]] if sel.size else np.zeros((0, 4))
        gs = by_name["scores"][sel[:, 0], sel[:, 2], sel[:, 1]] if sel.size else np.zeros(0)
        for name, ref in (("det_boxes", gb), ("det_scores", gs)):
            d, _ = max_abs_diff(by_name[name], ref)
            report.max_abs[name], report.tolerance[name] = d, 0.0
        if not same:
            bad.append(next(o for o in report.outputs if o.name == "selected_indices"))
        bad += [o for o in report.outputs if o.name in ("det_boxes", "det_scores")
                and report.max_abs[o.name] > 0]
    report.check_seconds = time.perf_counter() - t0
    if bad:
        report.ok = False
        worst = bad[0]
        raise ExportCheckError(
            "ONNX Runtime results differ from the torch model: " + ", ".join(
                f"{o.name} max abs {report.max_abs[o.name]:.3g} > {report.tolerance[o.name]:.3g}"
                for o in bad) + "; the destination file was not written",
            report, layer=worst.layer, layer_type=worst.type if worst.layer is not None else None)


def _version() -> str:
    try:
        from . import __version__
        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


# ---------------------------------------------------------------------- read back
def onnx_metadata(path: str | os.PathLike) -> dict:
    """The darknetpy metadata of an exported model (``{}`` for other ONNX files).

    Keys: ``profile``, ``cfg``, ``input``, ``outputs`` (list of dicts with ``name``,
    ``layer``, ``type``, ``shape``, ``dtype``), ``decode``, ``nms``, ``notes``.
    """
    import onnx
    proto = onnx.load(os.fspath(path), load_external_data=False)
    for p in proto.metadata_props:
        if p.key == META_KEY:
            return json.loads(p.value)
    return {}


_OUTPUT_NAME = re.compile(r"^(?:head|output)_(\d+)_(.+)$")


def verify_onnx(onnx_path: str | os.PathLike, reference: Reference | str | os.PathLike, *,
                atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> VerifyReport:
    """Run an exported model with ONNX Runtime on a reference input and compare its head
    (or classifier) outputs with the reference layers.

    ``reference``: a :class:`darknetpy.verify.Reference` or its directory. Outputs are
    matched to layers by the model's metadata (else by their names ``head_<i>_<type>``/
    ``output_<i>_<type>``). Tolerance as :func:`darknetpy.verify.compare`.

    >>> verify_onnx("yolov3.onnx", "cases/yolov3_dog").ok            # doctest: +SKIP
    True

    Raises:
        ReferenceDataError: the reference input does not fit the model, or the model
            has no output that names a layer.
        DarknetError: the ONNX file is missing or cannot be loaded.
    """
    from .verify import load_reference
    if not isinstance(reference, Reference):
        reference = load_reference(reference)
    onnx_path = os.fspath(onnx_path)
    if not os.path.isfile(onnx_path):
        raise DarknetError(f"{onnx_path}: ONNX model not found")
    try:
        sess = _session(onnx_path)
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own exception types
        raise DarknetError(f"{onnx_path}: cannot load ONNX model: {_first_line(e)}") from None
    meta_json = sess.get_modelmeta().custom_metadata_map.get(META_KEY)
    meta = json.loads(meta_json) if meta_json else {}
    inp = sess.get_inputs()[0]
    x = np.ascontiguousarray(reference.input, dtype=np.float32)
    want = tuple(inp.shape[1:])
    if all(isinstance(d, int) for d in want) and tuple(x.shape) != want:
        raise ReferenceDataError(f"{reference.path}: reference input has shape {tuple(x.shape)}, "
                                 f"the ONNX model expects {want}")
    n = inp.shape[0] if isinstance(inp.shape[0], int) else 1
    feed = np.repeat(x[None], n, axis=0)
    if inp.type == "tensor(float16)":
        feed = feed.astype(np.float16)
    layer_of: dict[str, tuple[int, str]] = {}
    for o in meta.get("outputs", []):
        if o.get("layer") is not None:
            layer_of[o["name"]] = (int(o["layer"]), o["type"])
    names = [o.name for o in sess.get_outputs()]
    if not layer_of:
        for name in names:
            m = _OUTPUT_NAME.match(name)
            if m:
                layer_of[name] = (int(m.group(1)), m.group(2))
    wanted = [nm for nm in names if nm in layer_of]
    if not wanted:
        raise ReferenceDataError(f"{onnx_path}: no output names a Darknet layer (expected "
                                 "head_<index>_<type> outputs from darknetpy export)")
    outs = sess.run(wanted, {inp.name: feed})
    rows = [layer_row(*layer_of[name], np.asarray(out[0], dtype=np.float32), reference, atol,
                      rtol) for name, out in zip(wanted, outs)]
    compared = sum(r.stored != "missing" for r in rows)
    return VerifyReport(rows=rows, compared=compared)
