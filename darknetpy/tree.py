"""Darknet's class hierarchy ("softmax tree", YOLO9000 / ``9k.tree``).

Mirrors ``src/tree.c`` (``read_tree``, ``hierarchy_predictions``,
``hierarchy_top_prediction``) and ``src/blas.c`` (``softmax_tree`` built on
``softmax``/``softmax_cpu``) of pjreddie/darknet and AlexeyAB/darknet. The
arithmetic is implemented once, in :class:`TreeIndex` (index tensors of a tree and
vectorised operations that trace to ONNX); the functions below run it, and so do
:class:`darknetpy.boxes.DenseDecoder` and :class:`darknetpy.export.HeadDecoder`.

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
from torch import nn

from darknetpy.errors import DarknetError

__all__ = [
    "TreeError",
    "Tree",
    "TreeIndex",
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
    # Per-device TreeIndex modules built on first use (TreeIndex.of). Mutable contents only.
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


class TreeIndex(nn.Module):
    """The index tensors of a :class:`Tree` and the vectorised tree operations on them.

    The one implementation of Darknet's tree arithmetic: the public functions of this
    module run it (with a cached instance per device, :meth:`of`), and so do
    :class:`darknetpy.boxes.DenseDecoder` and the ONNX export (which hold their own
    instance as a submodule, so ``.to(device)`` moves it). Every method works along
    the LAST axis (the ``n = tree.n`` classes); the only Python loops run over the
    tree's depth or group size (constants), there is no ``.item()`` and no shape that
    depends on the data, so all of it traces to ONNX.

    Buffers (int64 unless noted; not part of a state dict):

    * ``by_depth`` (n,): the nodes ordered by depth (file order within a depth),
      ``from_depth`` (n,) its inverse permutation; ``parent_local`` (n,): for the node
      at position k of ``by_depth`` (depth d >= 1) the position of its parent within
      the block of depth d-1 (0 for roots).
    * ``leaf`` (n,) bool, ``child`` (n,) (``Tree.child``), ``arange`` (n,).
    * ``table`` (groups, S): the nodes of group g, padded with ``n`` (an index past the
      classes, read as 0), S = the largest group; ``group_parent`` (groups,): the parent
      of the group's first node (0 for roots).
    * ``slot_of_node`` (n,): slot of the node's group when the groups are sorted by
      size, largest first (stable); ``sum_cols`` (n,): the column read at each step of
      the softmax sum, step k holding the k-th member of every group larger than k.

    Python ints: ``n``, ``groups``, ``depth`` (the deepest node's depth; roots are 0),
    ``level_ends`` (end of each depth's block in ``by_depth``), ``sum_steps`` (start
    and length of each step's slice of ``sum_cols``).
    """

    def __init__(self, tree: Tree):
        super().__init__()
        n, groups = tree.n, tree.groups
        depth = [0] * n
        for j, p in enumerate(tree.parent):
            depth[j] = 0 if p < 0 else depth[p] + 1
        self.n, self.groups, self.depth = n, groups, max(depth)
        by_depth = sorted(range(n), key=lambda j: depth[j])            # stable: file order
        position = [0] * n
        for k, j in enumerate(by_depth):
            position[j] = k
        self.level_ends = [sum(1 for d in depth if d <= level) for level in range(self.depth + 1)]
        starts = [0] + self.level_ends[:-1]
        parent_local = [0 if tree.parent[j] < 0 else position[tree.parent[j]] - starts[depth[j] - 1]
                        for j in by_depth]
        size = max(tree.group_size) if groups else 0
        table = torch.full((groups, size), n, dtype=torch.long)
        for g, (o, s) in enumerate(zip(tree.group_offset, tree.group_size)):
            table[g, :s] = torch.arange(o, o + s)
        # softmax sums: groups sorted by size, largest first; at step k the groups with
        # more than k members are a prefix, so summing step by step visits every node
        # once and accumulates each group in Darknet's (index) order.
        sizes = torch.tensor(tree.group_size, dtype=torch.long)
        order = torch.argsort(sizes, descending=True, stable=True)
        slot_of_group = torch.empty_like(order)
        slot_of_group[order] = torch.arange(groups)
        cols, self.sum_steps = [], []
        for k in range(size):
            active = int((sizes > k).sum())
            self.sum_steps.append((sum(len(c) for c in cols), active))
            cols.append(table[order[:active], k])
        buffers = {
            "by_depth": torch.tensor(by_depth, dtype=torch.long),
            "from_depth": torch.tensor(position, dtype=torch.long),
            "parent_local": torch.tensor(parent_local, dtype=torch.long),
            "leaf": torch.tensor(tree.leaf, dtype=torch.bool),
            "child": torch.tensor(tree.child, dtype=torch.long),
            "arange": torch.arange(n),
            "table": table,
            "group_parent": torch.tensor([max(tree.parent[o], 0) if o < n else 0
                                          for o in tree.group_offset], dtype=torch.long),
            "slot_of_node": slot_of_group[torch.tensor(tree.group, dtype=torch.long)],
            "sum_cols": torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    @classmethod
    def of(cls, tree: Tree, device: torch.device | str) -> "TreeIndex":
        """The cached index of ``tree`` on ``device`` (built on first use). Shared: use
        it, do not move it (``.to``) or register it in a module that will be moved."""
        key = str(torch.device(device))
        got = tree._cache.get(key)
        if got is None:
            got = tree._cache[key] = cls(tree).to(device)
        return got

    def softmax(self, rows: torch.Tensor, temperature: float) -> torch.Tensor:
        """``blas.c: softmax_tree`` on ``rows`` ``(R, n)``: Darknet's ``softmax`` over each
        group (largest from ``-FLT_MAX``, NaN never the largest; ``exp`` in double of
        the float argument; the sum in float in index order). Returns ``(R, n)``,
        ``rows``'s dtype. No checks: see :func:`softmax_tree`."""
        dtype, dev = rows.dtype, rows.device
        temp = torch.tensor(temperature, dtype=dtype, device=dev)
        # largest: C's `if (v > largest) largest = v` from -FLT_MAX. A max is
        # order-independent; NaN never wins in C, so it is mapped to -inf here.
        nonan = torch.where(torch.isnan(rows), torch.full((), -math.inf, dtype=dtype, device=dev), rows)
        largest = torch.full((rows.shape[0], self.groups), -_FLT_MAX, dtype=dtype, device=dev)
        largest = largest.scatter_reduce(1, self.slot_of_node.expand(rows.shape[0], -1), nonan, "amax",
                                         include_self=True)
        big = largest[:, self.slot_of_node]
        arg = rows / temp - big / temp                       # float arithmetic, like C
        e = torch.exp(arg.to(torch.float64)).to(dtype)       # double exp, stored to float
        total = torch.zeros((rows.shape[0], self.groups), dtype=dtype, device=dev)
        for start, active in self.sum_steps:                 # sum += e, in index order
            cols = self.sum_cols[start:start + active]
            total[:, :active] = total[:, :active] + e[:, cols]
        return e / total[:, self.slot_of_node]

    def absolute(self, p: torch.Tensor) -> torch.Tensor:
        """``tree.c: hierarchy_predictions(p, n, tree, only_leaves=0)`` along the last
        axis: ``p[j] *= p[parent[j]]``, computed depth by depth (a parent is one level
        up and already absolute), so every value is the float product Darknet's
        in-order loop computes. ``p`` ``(..., n)`` -> a new ``(..., n)``, same dtype."""
        end = p.dim() - 1
        q = p[..., self.by_depth]
        levels = [q[..., :self.level_ends[0]]]
        for start, stop in zip(self.level_ends[:-1], self.level_ends[1:]):
            levels.append(q[..., start:stop] * levels[-1][..., self.parent_local[start:stop]])
        return torch.cat(levels, dim=end)[..., self.from_depth]

    def leaves_only(self, p: torch.Tensor) -> torch.Tensor:
        """``hierarchy_predictions``'s ``only_leaves``: every non-leaf set to 0 (last axis)."""
        return torch.where(self.leaf, p, torch.zeros((), dtype=p.dtype, device=p.device))

    def top_prediction(self, absolute: torch.Tensor, thresh: float) -> torch.Tensor:
        """``tree.c: hierarchy_top_prediction(pred, tree, thresh, 1)`` for every row of
        ``absolute`` ``(..., n)`` at once (float32, as in C): the walk of
        :func:`hierarchy_top_prediction` unrolled over the tree's depth. Returns int64
        ``(...)``: the node index, or -1 where Darknet's walk never ends (possible only
        with ``thresh < 0``; then the walk is unrolled ``2*depth + 1`` times, which
        every walk that ends needs at most)."""
        a = absolute.to(torch.float32)
        end = a.dim() - 1
        ext = torch.cat([a, torch.zeros_like(a[..., :1])], dim=end)       # (..., n+1), col n = 0
        thr = torch.tensor(thresh, dtype=torch.float32, device=a.device)
        zero = torch.zeros((), dtype=torch.float32, device=a.device)
        zero_i = torch.zeros((), dtype=torch.long, device=a.device)
        group = torch.zeros_like(a[..., 0], dtype=torch.long)               # (...)
        result = group - 1
        p = torch.ones_like(a[..., 0])
        done = torch.zeros_like(a[..., 0], dtype=torch.bool)
        for _ in range(2 * self.depth + 1 if thresh < 0 else self.depth + 1):
            idx = self.table[group]                                         # (..., S)
            vals = torch.gather(ext, end, idx)
            vals = torch.where(vals > 0, vals, zero)                        # NaN, <= 0 never win
            mx = vals.amax(dim=end)
            arg = vals.argmax(dim=end, keepdim=True)                        # first maximum
            node = torch.where(mx > 0, torch.gather(idx, end, arg).squeeze(end), zero_i)  # max_i = 0
            pm = p * mx                                                     # float product
            conf = pm > thr
            ch = self.child[node]
            stop = torch.where(conf | (group == 0), node, self.group_parent[group])
            finishing = ~done & (~conf | (ch < 0))
            result = torch.where(finishing, stop, result)
            cont = ~done & conf & (ch >= 0)
            p = torch.where(cont, pm, p)
            group = torch.where(cont, ch, group)
            done = done | finishing
        return result

    def alexeyab_probs(self, absolute: torch.Tensor, objectness: torch.Tensor, thresh: float
                       ) -> torch.Tensor:
        """:func:`alexeyab_region_tree_probs` along the last axis: ``absolute`` ``(..., n)``,
        ``objectness`` ``(...)`` -> ``(..., n)``."""
        return _highest_above_half(absolute, objectness, thresh, self.arange)


def _highest_above_half(p: torch.Tensor, objectness: torch.Tensor, thresh: float,
                        arange: torch.Tensor) -> torch.Tensor:
    """AlexeyAB ``get_region_boxes`` tree branch along the last axis of ``p`` (``arange``:
    ``0..n-1``): only the highest-index node with ``p > .5`` keeps its value, and only
    where ``objectness > thresh`` (compared in objectness's dtype)."""
    above = p > 0.5
    last = torch.where(above, arange, torch.full_like(arange, -1)).amax(dim=p.dim() - 1)
    keep = (last >= 0) & (objectness > torch.tensor(thresh, dtype=objectness.dtype,
                                                     device=objectness.device))
    pick = (arange == last.unsqueeze(-1)) & keep.unsqueeze(-1)
    return torch.where(pick, p, torch.zeros((), dtype=p.dtype, device=p.device))


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
    last = x.dim() - 1  # non-negative dims: they export to a valid ONNX Transpose
    xt = x.movedim(1, last)
    rest_shape = xt.shape
    out = TreeIndex.of(tree, x.device).softmax(xt.reshape(-1, tree.n), temperature)
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
    idx = TreeIndex.of(tree, probs.device)
    dim, last = dim % probs.dim(), probs.dim() - 1  # non-negative: valid ONNX Transpose
    p = idx.absolute(probs.movedim(dim, last))
    if only_leaves:
        p = idx.leaves_only(p)
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

    Runs :meth:`TreeIndex.top_prediction` (the same walk for many rows at once) on
    the one row.

    Raises :class:`TreeError` if ``probs`` is too short, ``stride < 1``, or the
    walk never ends: it revisits a group (possible only with ``thresh < 0`` and a
    group whose values are all <= 0), where Darknet loops forever.
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
    row = torch.from_numpy(np.array(arr[:need:stride], dtype=np.float32))   # node j at j*stride
    node = int(TreeIndex.of(tree, "cpu").top_prediction(row, thresh))
    if node < 0:
        raise TreeError(f"hierarchy_top_prediction: the walk returns to a group it visited (thresh={thresh} "
                        f"with no positive value in a group); Darknet would loop forever", path=tree.path)
    return node


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
    most one non-zero entry per box (``objectness > thresh`` is compared in
    objectness's dtype). Same computation as :meth:`TreeIndex.alexeyab_probs`.

    Raises ``ValueError`` when ``objectness`` does not have that shape.
    """
    dim, end = dim % probs.dim(), probs.dim() - 1  # non-negative: valid ONNX Transpose
    p = probs.movedim(dim, end)
    if objectness.shape != p.shape[:-1]:
        raise ValueError(f"objectness has shape {tuple(objectness.shape)}, expected {tuple(p.shape[:-1])}")
    out = _highest_above_half(p, objectness, thresh, torch.arange(p.shape[-1], device=p.device))
    return out.movedim(end, dim)
