"""Darknet's class hierarchy ("softmax tree", YOLO9000 / ``9k.tree``).

Mirrors ``src/tree.c`` (``read_tree``, ``hierarchy_predictions``,
``hierarchy_top_prediction``) and ``src/blas.c`` (``softmax_tree`` built on
``softmax``/``softmax_cpu``) of pjreddie/darknet and AlexeyAB/darknet.

A tree file has one node per line, ``"<name> <parent_index>"``, parent ``-1`` for
a root. Nodes are numbered by line (0-based). Consecutive lines with the same
parent form a *group* (the siblings over which one softmax is taken); a new group
starts every time the parent differs from the previous line's parent.

Where Darknet uses this:

* ``[softmax] tree=FILE`` (``softmax_layer.c: forward_softmax_layer``): for each
  batch item, a separate softmax over each group of the flat input, groups laid
  out back to back from offset 0 (``softmax_cpu(input + count, group_size, ...)``).
  ``parse_network_cfg`` also sets ``net->hierarchy`` to that tree; the classifier
  then calls ``hierarchy_predictions`` on the network output (pjreddie
  ``predict_classifier``: ``only_leaves=1``; AlexeyAB ``predict_classifier``:
  ``only_leaves=0``) before ``top_k``.
* ``[region] tree=FILE`` (YOLO9000): the same per-group softmax over each anchor's
  class scores; see :func:`softmax_tree` for the layouts of the two code bases and
  :func:`alexeyab_region_tree_probs` / :func:`hierarchy_top_prediction` for how
  detections get their class.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from darknetpy.errors import DarknetError

__all__ = [
    "TreeError",
    "Tree",
    "read_tree",
    "softmax_tree",
    "hierarchy_predictions",
    "hierarchy_top_prediction",
    "alexeyab_region_tree_probs",
]

_FLT_MAX = float(np.finfo(np.float32).max)
_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
# read_tree: ``char *id = calloc(256, 1); sscanf(line, "%s %d", id, &parent)``
_MAX_NAME = 255


class TreeError(DarknetError):
    """A tree file (``tree=`` of ``[softmax]``/``[region]``) that cannot be used.

    Attributes: ``path`` (file or None), ``line`` (1-based line or None),
    ``message`` (the problem without the location).
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None):
        self.path, self.line, self.message = path, line, message
        if path is not None or line is not None:
            where = f"{path or '<tree>'}:{line}" if line is not None else f"{path}"
            super().__init__(f"{where}: {message}")
        else:
            super().__init__(message)


@dataclass(frozen=True)
class Tree:
    """Darknet's ``tree`` struct (``tree.h``), as read by :func:`read_tree`.

    All per-node fields are tuples of length ``n`` indexed by node (= line number
    in the tree file, 0-based); per-group fields are tuples of length ``groups``.

    * ``leaf[i]``: True when no node names ``i`` as its parent.
    * ``n``: number of nodes (lines).
    * ``parent[i]``: index of the parent node, ``-1`` for a root. Always ``< i``
      (a parent precedes its children; :func:`read_tree` enforces it, and Darknet's
      in-order ``hierarchy_predictions`` relies on it).
    * ``child[i]``: the group holding ``i``'s children, ``-1`` for a leaf. As in
      pjreddie's ``read_tree`` (``t.child[parent] = groups``) it is the group of the
      LAST line naming ``i`` as parent. (AlexeyAB's ``read_tree`` never fills
      ``child``; only ``hierarchy_top_prediction`` reads it.)
    * ``group[i]``: the group (softmax set) node ``i`` belongs to.
    * ``name[i]``: the first whitespace-separated token of line ``i`` (a WordNet id).
    * ``groups``: number of groups.
    * ``group_size[g]``, ``group_offset[g]``: group ``g`` is the nodes
      ``group_offset[g] .. group_offset[g] + group_size[g] - 1`` (groups are
      contiguous, back to back, in file order).
    * ``path``: the file read (not part of Darknet's struct; for messages only).
    """

    leaf: tuple[bool, ...]
    n: int
    parent: tuple[int, ...]
    child: tuple[int, ...]
    group: tuple[int, ...]
    name: tuple[str, ...]
    groups: int
    group_size: tuple[int, ...]
    group_offset: tuple[int, ...]
    path: str | None = field(default=None, compare=False)
    # Per-device index tensors built on first use (see _indices). Mutable contents only.
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        n = self.n
        if n < 1:
            raise TreeError("the tree has no nodes", path=self.path)
        for fname in ("leaf", "parent", "child", "group", "name"):
            if len(getattr(self, fname)) != n:
                raise TreeError(f"Tree.{fname} has {len(getattr(self, fname))} entries, expected n={n}",
                                path=self.path)
        if len(self.group_size) != self.groups or len(self.group_offset) != self.groups:
            raise TreeError("Tree.group_size/group_offset must have `groups` entries", path=self.path)
        for i, p in enumerate(self.parent):
            if not -1 <= p < i:
                raise TreeError(f"node {i} has parent {p}; a parent must be -1 or an earlier node",
                                path=self.path)
        off = 0
        for g, (o, s) in enumerate(zip(self.group_offset, self.group_size)):
            if o != off or s < 0:
                raise TreeError(f"group {g} (offset {o}, size {s}) is not contiguous with the previous "
                                f"groups", path=self.path)
            off += s
        if off != n:
            raise TreeError(f"group sizes add up to {off}, expected n={n}", path=self.path)

    # ---------------------------------------------------------------- helpers
    def _indices(self, device: torch.device) -> dict:
        """Index tensors for the vectorised functions, built once per device."""
        key = str(device)
        got = self._cache.get(key)
        if got is not None:
            return got
        n = self.n
        group_of = torch.tensor(self.group, dtype=torch.long)
        sizes = torch.tensor(self.group_size, dtype=torch.long)
        offsets = torch.tensor(self.group_offset, dtype=torch.long)
        # Groups sorted by size, largest first: at step k the groups with more than
        # k members are a prefix, so a loop over k (max group size steps) visits every
        # node exactly once and accumulates each group's sum in Darknet's order.
        order = torch.argsort(sizes, descending=True, stable=True)
        sizes_sorted = sizes[order]
        steps = []
        for k in range(int(sizes_sorted[0]) if len(sizes_sorted) else 0):
            active = int((sizes_sorted > k).sum())
            steps.append((active, offsets[order[:active]] + k))
        # Position of each group in `order` (to map per-node group ids to sorted slots).
        slot_of_group = torch.empty_like(order)
        slot_of_group[order] = torch.arange(len(order))
        slot_of_node = slot_of_group[group_of]
        # hierarchy_predictions: process nodes level by level (depth 1, 2, ...).
        depth = [0] * n
        for j, p in enumerate(self.parent):
            depth[j] = 0 if p < 0 else depth[p] + 1
        levels = []
        for d in range(1, max(depth) + 1):
            nodes = [j for j in range(n) if depth[j] == d]
            levels.append((torch.tensor(nodes, dtype=torch.long),
                           torch.tensor([self.parent[j] for j in nodes], dtype=torch.long)))
        got = {
            "ngroups": len(order),
            "slot_of_node": slot_of_node.to(device),
            "steps": [(a, idx.to(device)) for a, idx in steps],
            "levels": [(a.to(device), b.to(device)) for a, b in levels],
            "leaf": torch.tensor(self.leaf, dtype=torch.bool, device=device),
        }
        self._cache[key] = got
        return got


def read_tree(path: str | os.PathLike) -> Tree:
    """Read a Darknet tree file; mirrors ``tree.c: read_tree``.

    Each line is ``"<name> <parent>"`` (``sscanf(line, "%s %d", ...)``). Groups are
    formed exactly as Darknet does: a running ``last_parent`` (starting at -1); when
    a line's parent differs, the previous run is closed as a group, and the last
    run is closed after the final line. ``child[parent]`` is set to the group of
    every line naming that parent (so the last such group wins); ``leaf`` is True
    for nodes no line names as parent.

    Returns a :class:`Tree`.

    Raises :class:`TreeError` (a ``DarknetError``), naming the file and 1-based
    line, for: a missing/unreadable file; an empty file; a blank line (Darknet would
    silently add a root node with an empty name, shifting every class index); a line
    with more than two fields or a parent that is not a decimal integer (Darknet's
    ``%d`` would silently read a prefix or keep -1); a name longer than 255 bytes
    (overflows Darknet's buffer); a parent that is not -1 or an earlier line (Darknet
    writes out of bounds and its in-order ``hierarchy_predictions`` would be wrong).
    A line with only a name is accepted as a root (parent -1), like Darknet.
    """
    spath = os.fspath(path)
    try:
        with open(spath, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise TreeError("tree file not found", path=spath) from None
    except IsADirectoryError:
        raise TreeError("is a directory, not a tree file", path=spath) from None
    except OSError as exc:
        raise TreeError(f"cannot read tree file: {exc.strerror or exc}", path=spath) from None

    # fgetl: lines end at '\n'; a final line without '\n' still counts; no extra
    # empty line after a trailing '\n'.
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    if not raw_lines:
        raise TreeError("tree file is empty", path=spath)

    names: list[str] = []
    parents: list[int] = []
    group: list[int] = []
    group_size_l: list[int] = []
    group_offset_l: list[int] = []
    last_parent = -1
    cur_size = 0
    groups = 0
    n = 0
    for lineno, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TreeError("line is not valid UTF-8 text", path=spath, line=lineno) from None
        fields = line.split()
        if not fields:
            raise TreeError("blank line (Darknet would read it as an extra root node with an empty "
                            "name, shifting every later class index)", path=spath, line=lineno)
        if len(fields) > 2:
            raise TreeError(f"expected '<name> <parent_index>', got {len(fields)} fields: {line.strip()!r}",
                            path=spath, line=lineno)
        name = fields[0]
        if len(name.encode("utf-8")) > _MAX_NAME:
            raise TreeError(f"name longer than {_MAX_NAME} bytes", path=spath, line=lineno)
        parent = -1
        if len(fields) == 2:
            if not _INT_RE.match(fields[1]):
                raise TreeError(f"parent index {fields[1]!r} is not an integer", path=spath, line=lineno)
            parent = int(fields[1])
        if not -1 <= parent < n:
            raise TreeError(f"parent index {parent} of node {n} ({name}) must be -1 or the index of an "
                            f"earlier line (0..{n - 1})", path=spath, line=lineno)
        names.append(name)
        parents.append(parent)
        if parent != last_parent:
            groups += 1
            group_offset_l.append(n - cur_size)
            group_size_l.append(cur_size)
            cur_size = 0
            last_parent = parent
        group.append(groups)
        n += 1
        cur_size += 1
    groups += 1
    group_offset_l.append(n - cur_size)
    group_size_l.append(cur_size)

    child = [-1] * n
    for i, p in enumerate(parents):
        if p >= 0:
            child[p] = group[i]
    leaf = [True] * n
    for p in parents:
        if p >= 0:
            leaf[p] = False
    return Tree(leaf=tuple(leaf), n=n, parent=tuple(parents), child=tuple(child), group=tuple(group),
                name=tuple(names), groups=groups, group_size=tuple(group_size_l),
                group_offset=tuple(group_offset_l), path=spath)


def softmax_tree(x: torch.Tensor, tree: Tree, temperature: float = 1.0) -> torch.Tensor:
    """Softmax separately within each group of ``tree``, along dim 1.

    Mirrors ``blas.c: softmax_tree`` / the tree branch of
    ``softmax_layer.c: forward_softmax_layer``: for ``g`` in ``0..groups-1``,
    ``softmax(input + group_offset[g], group_size[g], temp, ...)`` where Darknet's
    ``softmax`` computes, in float32: ``largest`` = max over the group starting from
    ``-FLT_MAX`` (NaNs never become the max); ``e_i = (float) exp(x_i/temp -
    largest/temp)`` (the argument in float, ``exp`` in double, rounded to float);
    ``sum`` accumulated in float in index order; ``out_i = e_i / sum``. This function
    reproduces that arithmetic (same order of the float32 sum), so float32 results
    match Darknet's CPU bit for bit except where ``torch.exp`` in double differs from
    libm's ``exp`` in the last bit of the double (practically never visible in float).

    Shapes: ``x`` is ``(N, n, *rest)`` with ``n == tree.n``; the softmax runs over
    dim 1 independently for every ``(N, *rest)`` position; returns a new tensor of
    the same shape, dtype and device. Values are probabilities (each group sums
    to 1). Other floating dtypes are computed in that dtype (``exp`` in double).

    Layouts: a ``[softmax] tree=`` layer applies it to the flat ``C*H*W`` input of
    each batch item (only the first ``n`` values; for YOLO9000 classifiers the input
    is ``1x1x9418``) — reshape to ``(N, C*H*W)`` first. A ``[region] tree=`` layer
    (YOLO9000) applies it per anchor and cell to the class scores:

    * AlexeyAB (CPU ``forward_region_layer``): input ``(N, A*(coords+1+classes),
      H, W)`` is transposed to ``(N, H*W, A, coords+1+classes)`` (``flatten``), then
      logistic on entry 4 only and ``softmax_tree(output + index + 5, 1, 0, 1, ...)``
      on entries ``5..5+classes-1`` (temperature 1; ``5`` assumes ``coords=4``).
      x, y, w, h stay raw. In tensor terms: ``x.view(N, A, 5+C, H, W)`` and this
      function on dim 2 (``softmax_tree(v.flatten(0,1)[:, 5:], tree)``).
    * pjreddie GPU (``forward_region_layer_gpu``): the same per anchor and cell on
      the ``(N, A, coords+1+classes, H, W)`` layout, ``temperature=`` of the layer.
      pjreddie's CPU path passes strides of an older layout and reads past the
      buffer (NaNs); do not reproduce that.

    Raises :class:`TreeError` when ``x.shape[1] != tree.n``; ``TypeError`` for a
    non-floating tensor; ``ValueError`` for ``temperature`` 0.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("softmax_tree needs a floating-point torch.Tensor")
    if x.dim() < 2 or x.shape[1] != tree.n:
        raise TreeError(f"softmax_tree: input has shape {tuple(x.shape)}, expected (N, {tree.n}, ...) "
                        f"for this tree", path=tree.path)
    if temperature == 0:
        raise ValueError("softmax_tree: temperature must not be 0")
    idx = tree._indices(x.device)
    dtype = x.dtype
    last = x.dim() - 1  # non-negative dims: they export to a valid ONNX Transpose
    xt = x.movedim(1, last)
    rest_shape = xt.shape
    rows = xt.reshape(-1, tree.n)
    temp = torch.tensor(temperature, dtype=dtype, device=x.device)

    # largest: C's `if (v > largest) largest = v` from -FLT_MAX. A max is
    # order-independent; NaN never wins in C, so it is mapped to -inf here.
    nonan = torch.where(torch.isnan(rows), torch.full((), -math.inf, dtype=dtype, device=x.device), rows)
    largest = torch.full((rows.shape[0], idx["ngroups"]), -_FLT_MAX, dtype=dtype, device=x.device)
    largest = largest.scatter_reduce(1, idx["slot_of_node"].expand(rows.shape[0], -1), nonan, "amax",
                                     include_self=True)
    big = largest[:, idx["slot_of_node"]]
    arg = rows / temp - big / temp                       # float arithmetic, like C
    e = torch.exp(arg.to(torch.float64)).to(dtype)       # double exp, stored to float
    total = torch.zeros((rows.shape[0], idx["ngroups"]), dtype=dtype, device=x.device)
    for active, cols in idx["steps"]:                    # sum += e, in index order
        total[:, :active] = total[:, :active] + e[:, cols]
    out = e / total[:, idx["slot_of_node"]]
    return out.reshape(rest_shape).movedim(last, 1)


def hierarchy_predictions(probs: torch.Tensor, tree: Tree, only_leaves: bool, *, dim: int = -1) -> torch.Tensor:
    """Turn per-group conditional probabilities into absolute ones.

    Mirrors ``tree.c: hierarchy_predictions(predictions, n, hier, only_leaves
    [, stride])``: ``for j in 0..n-1: if parent[j] >= 0: p[j] *= p[parent[j]]``
    (in index order, so the parent is already absolute: ``p[j]`` becomes the
    float32 product of the conditional probabilities along the path, accumulated
    from the root down exactly as Darknet does); then, if ``only_leaves``, every
    non-leaf is set to 0. Vectorised by tree depth with the same float operations,
    so results equal Darknet's bit for bit.

    Shapes: ``probs`` is ``(..., n, ...)`` with the class axis at ``dim`` (default
    last; Darknet's ``stride`` argument corresponds to choosing the axis) and
    ``n == tree.n``. Returns a new tensor of the same shape and dtype. Values:
    probabilities in [0, 1] (usually the output of :func:`softmax_tree`).

    Darknet callers: pjreddie ``predict_classifier``: ``only_leaves=1``; AlexeyAB
    ``predict_classifier``: ``only_leaves=0``; region-layer detection (both code
    bases): ``only_leaves=0`` per anchor and cell, before choosing the class.

    Raises :class:`TreeError` when the class axis does not have ``tree.n`` entries.
    """
    if probs.dim() == 0 or probs.shape[dim] != tree.n:
        raise TreeError(f"hierarchy_predictions: input has shape {tuple(probs.shape)}, expected {tree.n} "
                        f"entries along dim {dim}", path=tree.path)
    idx = tree._indices(probs.device)
    dim, last = dim % probs.dim(), probs.dim() - 1  # non-negative: valid ONNX Transpose
    p = probs.movedim(dim, last).clone()
    for nodes, parents in idx["levels"]:
        p[..., nodes] = p[..., nodes] * p[..., parents]
    if only_leaves:
        p = torch.where(idx["leaf"], p, torch.zeros((), dtype=p.dtype, device=p.device))
    return p.movedim(last, dim)


def hierarchy_top_prediction(probs: torch.Tensor | np.ndarray | Sequence[float], tree: Tree, thresh: float,
                             stride: int = 1) -> int:
    """Walk down the tree while the running probability stays above ``thresh``.

    Mirrors ``tree.c: hierarchy_top_prediction(predictions, hier, thresh, stride)``
    exactly (float32 arithmetic)::

        p = 1; group = 0
        loop:
            max = 0; max_i = 0                 # NOTE: max_i starts at node 0
            for i in group:                    # strict '>': first maximum wins,
                if pred[i*stride] > max:       # values <= 0 and NaN never win
                    max = pred[i*stride]; max_i = i
            if p*max > thresh:                 # float product
                p = p*max
                group = child[max_i]
                if child[max_i] < 0: return max_i      # reached a leaf
            elif group == 0: return max_i      # not confident even at the top
            else: return parent[group_offset[group]]   # the node whose children
                                                       # these are

    ``probs`` is normally the output of :func:`hierarchy_predictions` with
    ``only_leaves=0`` (absolute probabilities), so Darknet multiplies absolute
    probabilities along the path again (``p*max``); that is what it does, and so
    does this. Node ``j`` is read at flat position ``j*stride`` (pjreddie's region
    layer passes ``stride = l.w*l.h``).

    Used by pjreddie's ``region_layer.c: get_region_detections`` for ``tree=`` layers
    (no ``map``): ``j = hierarchy_top_prediction(..., tree_thresh=hier_thresh,
    l.w*l.h)`` and the box gets ``prob[j] = objectness > thresh ? objectness : 0``
    (objectness, not the class probability) and nothing for the other classes.
    AlexeyAB's detector does not call it (and its ``read_tree`` leaves ``child``
    unset); see :func:`alexeyab_region_tree_probs`.

    Args: ``probs``: 1-D tensor/array/sequence with at least ``(n-1)*stride+1``
    values; ``thresh``: float (Darknet's ``-hier`` threshold, default 0.5);
    ``stride``: int >= 1. Returns a node index in ``0..n-1``.

    Raises :class:`TreeError` if ``probs`` is too short, ``stride < 1``, or the
    walk revisits a group (possible only with ``thresh < 0`` and a group whose
    values are all <= 0, where Darknet loops forever).
    """
    if isinstance(probs, torch.Tensor):
        arr = probs.detach().to("cpu").reshape(-1).numpy().astype(np.float32)
    else:
        arr = np.asarray(probs, dtype=np.float32).reshape(-1)
    if stride < 1:
        raise TreeError(f"hierarchy_top_prediction: stride must be >= 1, got {stride}", path=tree.path)
    need = (tree.n - 1) * stride + 1
    if arr.size < need:
        raise TreeError(f"hierarchy_top_prediction: {arr.size} values given, need at least {need} "
                        f"(n={tree.n}, stride={stride})", path=tree.path)
    f32 = np.float32
    t = f32(thresh)
    p = f32(1.0)
    group = 0
    seen: set[int] = set()
    while True:
        if group in seen:
            raise TreeError(f"hierarchy_top_prediction: the walk returned to group {group} (thresh={thresh} "
                            f"with no positive value in a group); Darknet would loop forever",
                            path=tree.path)
        seen.add(group)
        mx = f32(0.0)
        max_i = 0
        off = tree.group_offset[group]
        for i in range(tree.group_size[group]):
            val = arr[(i + off) * stride]
            if val > mx:
                max_i = i + off
                mx = val
        prod = f32(p * mx)
        if prod > t:
            p = prod
            group = tree.child[max_i]
            if tree.child[max_i] < 0:
                return max_i
        elif group == 0:
            return max_i
        else:
            return tree.parent[tree.group_offset[group]]


def alexeyab_region_tree_probs(probs: torch.Tensor, objectness: torch.Tensor, thresh: float, *,
                               dim: int = -1) -> torch.Tensor:
    """Per-class detection probabilities of an AlexeyAB ``[region] tree=`` layer.

    Mirrors the ``l.softmax_tree`` branch (no ``map``) of AlexeyAB's
    ``region_layer.c: get_region_boxes``, which ``network.c:
    custom_get_region_detections`` uses for ``detector test``/``demo``::

        hierarchy_predictions(predictions + class_index, classes, tree, 0)  # caller
        found = 0
        for j = classes-1 .. 0:
            if !found && pred[j] > .5: found = 1     # keep only the highest-index
            else: pred[j] = 0                        # node whose absolute prob > 0.5
            probs[j] = (scale > thresh) ? pred[j] : 0

    where ``scale`` is the box's objectness (after logistic; the ``classfix == -1``
    branch is not modelled). The class probability is NOT multiplied by the
    objectness, the ``-hier`` threshold is not used (0.5 is hard-coded), and the
    caller then sets every box's ``objectness`` to 1.

    Shapes: ``probs`` ``(..., n, ...)`` with classes along ``dim`` = output of
    :func:`hierarchy_predictions` (``only_leaves=False``); ``objectness`` has
    ``probs``'s shape without ``dim``. Returns a tensor shaped like ``probs`` with at
    most one non-zero entry per box.
    """
    dim, end = dim % probs.dim(), probs.dim() - 1  # non-negative: valid ONNX Transpose
    p = probs.movedim(dim, end)
    if objectness.shape != p.shape[:-1]:
        raise ValueError(f"objectness has shape {tuple(objectness.shape)}, expected {tuple(p.shape[:-1])}")
    n = p.shape[-1]
    above = p > 0.5
    last = (n - 1) - torch.argmax(above.flip(-1).to(torch.uint8), dim=-1)
    keep = above.any(-1) & (objectness > torch.tensor(thresh, dtype=objectness.dtype))
    out = torch.zeros_like(p)
    val = torch.gather(p, -1, last.unsqueeze(-1))
    out.scatter_(-1, last.unsqueeze(-1), torch.where(keep.unsqueeze(-1), val, torch.zeros_like(val)))
    return out.movedim(end, dim)
