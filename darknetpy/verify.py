"""Layer-by-layer comparison with reference Darknet outputs.

A reference is either

* a *case directory* in darknetpy's reference format: ``case.json`` (``impl``
  = pjreddie|alexeyab, per-layer ``stored`` = full|sampled with ``stride``) and
  ``outputs.npz`` (``input``, ``layer_NNN``), or
* a *plain directory* of ``input.npy`` and ``layer_NNN.npy`` files (C x H x W
  float32, as written by ``darknetpy dump`` or by a patched Darknet).

A layer matches when ``max |ours - ref| <= atol + rtol * max(1, max |ref|)``
(defaults atol 0, rtol 1e-3: the tolerance of the reference README).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ReferenceDataError

DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 0.0


@dataclass
class Reference:
    """Reference data: network ``input`` (C, H, W) and per-layer outputs.

    ``layers[i]`` = (array, stride): ``stride`` None for a full C x H x W (or
    flat) array, else the flat output was sampled every ``stride``-th value.
    ``impl``: the Darknet that computed it, if known. ``stats[i]``: statistics
    of Darknet's FULL output of layer i (``min``, ``max``, ``sum``, ``outputs``),
    when the case recorded them; they let sampled layers be checked whole.
    """

    path: str
    input: np.ndarray
    layers: dict
    impl: str | None = None
    meta: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


def load_reference(path: str | os.PathLike) -> Reference:
    """Read a case directory or a plain ``layer_NNN.npy`` directory.

    Raises:
        ReferenceDataError: the directory is missing or holds neither format.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ReferenceDataError(f"{path}: reference directory not found")
    case_json = os.path.join(path, "case.json")
    if os.path.isfile(case_json):
        with open(case_json) as f:
            meta = json.load(f)
        npz_path = os.path.join(path, "outputs.npz")
        if not os.path.isfile(npz_path):
            raise ReferenceDataError(f"{path}: case.json without outputs.npz")
        npz = np.load(npz_path)
        layers, stats = {}, {}
        for rec in meta.get("layers", []):
            key = f"layer_{rec['index']:03d}"
            if key in npz.files:
                stride = rec.get("stride") if rec.get("stored") == "sampled" else None
                layers[rec["index"]] = (npz[key], stride)
            if rec.get("finite") and all(k in rec for k in ("min", "max", "sum", "outputs")):
                stats[rec["index"]] = {k: rec[k] for k in ("min", "max", "sum", "outputs")}
        return Reference(path=path, input=npz["input"], layers=layers, impl=meta.get("impl"),
                         meta=meta, stats=stats)
    input_path = os.path.join(path, "input.npy")
    if not os.path.isfile(input_path):
        raise ReferenceDataError(f"{path}: neither case.json nor input.npy found")
    layers = {}
    for name in sorted(os.listdir(path)):
        m = re.fullmatch(r"layer_(\d+)\.npy", name)
        if m:
            layers[int(m.group(1))] = (np.load(os.path.join(path, name)), None)
    if not layers:
        raise ReferenceDataError(f"{path}: no layer_NNN.npy files")
    return Reference(path=path, input=np.load(input_path), layers=layers)


@dataclass
class LayerDiff:
    """One row of a comparison: layer ``index``/``type``, our output ``shape`` (C, H, W),
    ``max_abs`` and ``max_rel`` (= max_abs / max(1, max|ref|)) differences, the
    ``tolerance`` used, ``ok``, and how the reference stored it (full/sampled/missing)."""

    index: int
    type: str
    shape: tuple
    max_abs: float
    max_rel: float
    tolerance: float
    ok: bool
    stored: str


@dataclass
class VerifyReport:
    """All rows plus the input difference; ``ok`` when every compared layer matched."""

    rows: list
    compared: int

    @property
    def ok(self) -> bool:
        return self.compared > 0 and all(r.ok for r in self.rows if r.stored != "missing")

    @property
    def worst(self) -> LayerDiff | None:
        rows = [r for r in self.rows if r.stored != "missing"]
        return max(rows, key=lambda r: r.max_rel) if rows else None

    def table(self) -> str:
        """The report as text: one line per layer and a summary line."""
        lines = [f"{'layer':>5} {'type':<15} {'shape':<18} {'max abs':>10} {'max rel':>10}  ok"]
        for r in self.rows:
            shape = "x".join(str(d) for d in r.shape)
            if r.stored == "missing":
                lines.append(f"{r.index:>5} {r.type:<15} {shape:<18} {'-':>10} {'-':>10}  "
                             "(no reference)")
                continue
            tag = "" if r.stored == "full" else f" ({r.stored})"
            lines.append(f"{r.index:>5} {r.type:<15} {shape:<18} {r.max_abs:>10.3g} "
                         f"{r.max_rel:>10.3g}  {'ok' if r.ok else 'FAIL'}{tag}")
        bad = [r for r in self.rows if r.stored != "missing" and not r.ok]
        worst = self.worst
        lines.append(f"{self.compared} layers compared, {len(bad)} failed"
                     + (f"; worst layer {worst.index} [{worst.type}] max rel {worst.max_rel:.3g}"
                        if worst else "")
                     + (": OK" if self.ok else ": FAILED"))
        return "\n".join(lines)


def max_abs_diff(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |ours - ref|, max(1, max |ref| over its finite values)).

    Equal values (also equal infinities) and pairs of NaNs count as 0; a NaN or an
    infinity against anything else counts as infinite. Different shapes: (inf, 1).
    """
    a = np.asarray(ours, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if a.shape != r.shape:
        return float("inf"), 1.0
    same = (a == r) | (np.isnan(a) & np.isnan(r))
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(a - r))
    finite = r[np.isfinite(r)]
    scale = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    d = float(diff.max()) if diff.size else 0.0
    return (float("inf") if np.isnan(d) else d), scale


def compare(ours: np.ndarray, ref: np.ndarray, stride: int | None, atol: float, rtol: float,
            stats: dict | None = None) -> tuple[float, float, float, bool]:
    """(max_abs, max_rel, tolerance, ok) of ``ours`` (full layer output) against ``ref``
    (full, or every ``stride``-th value of the flat output).

    With ``stats`` (Darknet's full-output min, max, sum, outputs), the
    differences of our min, max and mean count too, so a sampled layer is
    checked over all its values, not only the samples.
    """
    flat = ours.reshape(-1)
    if stride is not None:
        flat = flat[::stride]
    max_abs, scale = max_abs_diff(flat, ref.reshape(-1))
    full = ours.reshape(-1)
    if stats is not None and full.size == stats["outputs"] and full.size:
        full64 = full.astype(np.float64)
        scale = max(scale, abs(stats["min"]), abs(stats["max"]))
        max_abs = max(max_abs, abs(float(full64.min()) - stats["min"]),
                      abs(float(full64.max()) - stats["max"]),
                      abs(float(full64.mean()) - stats["sum"] / stats["outputs"]))
    if np.isnan(max_abs):
        max_abs = float("inf")
    tol = atol + rtol * scale
    return max_abs, max_abs / scale, tol, bool(max_abs <= tol)


def layer_row(index: int, layer_type: str, ours: np.ndarray, reference: Reference,
              atol: float, rtol: float) -> LayerDiff:
    """One report row: layer ``index``'s output ``ours`` (C, H, W) against the reference
    (full or sampled, with its recorded statistics); ``stored == "missing"`` if the
    reference has no such layer."""
    shape = tuple(ours.shape)
    if index not in reference.layers:
        return LayerDiff(index, layer_type, shape, 0.0, 0.0, 0.0, True, "missing")
    ref, stride = reference.layers[index]
    max_abs, max_rel, tol, ok = compare(ours, ref, stride, atol, rtol, reference.stats.get(index))
    return LayerDiff(index, layer_type, shape, max_abs, max_rel, tol, ok,
                     "sampled" if stride else "full")


def verify_model(model, reference: Reference, *, atol: float = DEFAULT_ATOL,
                 rtol: float = DEFAULT_RTOL, device=None) -> VerifyReport:
    """Run ``model`` on the reference input and compare every layer.

    Args:
        model: a :class:`darknetpy.model.Darknet`.
        reference: from :func:`load_reference`.

    Returns:
        A :class:`VerifyReport` with one row per layer of the model.

    Raises:
        ReferenceDataError: the reference input does not fit the model.
    """
    x = torch.from_numpy(np.ascontiguousarray(reference.input, dtype=np.float32))
    net = model.net
    if tuple(x.shape) != (net.channels, net.height, net.width):
        raise ReferenceDataError(f"{reference.path}: reference input has shape "
                                 f"{tuple(x.shape)}, the model expects "
                                 f"{(net.channels, net.height, net.width)}")
    x = x[None].to(device or model.device)
    rows = []
    with torch.inference_mode():
        for i, out in model.iter_layers(x):
            ours = out[0].float().cpu().numpy()
            rows.append(layer_row(i, model.specs[i].type, ours, reference, atol, rtol))
    compared = sum(r.stored != "missing" for r in rows)
    return VerifyReport(rows=rows, compared=compared)


def verify(cfg, weights, reference_dir, *, profile: str | None = None,
           atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, device="cpu",
           tree: str | None = None, arithmetic: str = "torch") -> VerifyReport:
    """Load ``cfg`` + ``weights`` and compare every layer with ``reference_dir``.

    The profile defaults to the case's ``impl`` (for a case directory), else
    is chosen from the cfg. The model is built at the reference input's size.
    ``arithmetic="darknet"`` computes convolutions in Darknet's gemm order
    (see :meth:`darknetpy.model.Darknet.set_arithmetic`): slower, closer.

    >>> report = verify("model.cfg", "model.weights", "cases/yolov3_dog")  # doctest: +SKIP
    >>> report.ok                                                         # doctest: +SKIP
    True
    """
    from .model import load
    ref = load_reference(reference_dir)
    c, h, w = ref.input.shape
    model = load(cfg, weights, profile=profile or ref.impl, width=w, height=h, device=device,
                 tree=tree, arithmetic=arithmetic)
    return verify_model(model, ref, atol=atol, rtol=rtol)


def dump(model, x: torch.Tensor, out_dir: str | os.PathLike) -> list[str]:
    """Write ``input.npy`` and every layer's output ``layer_NNN.npy`` (float32, C x H x W).

    ``x``: one network input (C, H, W) or (1, C, H, W). Returns the file paths.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if x.dim() == 3:
        x = x[None]
    paths = [os.path.join(out_dir, "input.npy")]
    np.save(paths[0], x[0].float().cpu().numpy())
    with torch.inference_mode():
        for i, out in model.iter_layers(x):
            p = os.path.join(out_dir, f"layer_{i:03d}.npy")
            np.save(p, out[0].float().cpu().numpy())
            paths.append(p)
    return paths
