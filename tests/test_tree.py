"""Tests of darknetpy.tree against hand-computed values and loop ports of Darknet's C."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from darknetpy.errors import DarknetError
from darknetpy.tree import (Tree, TreeError, alexeyab_region_tree_probs, hierarchy_predictions,
                            hierarchy_top_prediction, read_tree, softmax_tree)

F32 = np.float32

# 7 nodes, 3 groups, 2 levels.
SMALL = """animal -1
plant -1
cat 0
dog 0
fish 0
oak 1
rose 1
"""

# 3 levels, and a parent (node 0) whose children come in two separate runs,
# which Darknet turns into two groups (child[0] = the later one).
SPLIT = """a -1
b -1
a1 0
a2 0
b1 1
a3 0
a1x 2
a1y 2
b1x 4
"""


def write(tmp_path: Path, text: str, name: str = "t.tree") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------ loop ports of the C code
def c_softmax(inp: list, temp: float) -> list:
    """blas.c: softmax(input, n, temp, output, 1) in float32 (exp in double)."""
    t = F32(temp)
    largest = F32(-np.finfo(np.float32).max)
    for v in inp:
        if v > largest:
            largest = v
    s = F32(0.0)
    out = []
    for v in inp:
        arg = F32(F32(v / t) - F32(largest / t))
        e = F32(math.exp(float(arg)))
        s = F32(s + e)
        out.append(e)
    return [F32(e / s) for e in out]


def c_softmax_tree(row: np.ndarray, tree: Tree, temp: float = 1.0) -> np.ndarray:
    """blas.c: softmax_tree for one batch item."""
    row = row.astype(np.float32)
    out = np.zeros_like(row)
    count = 0
    for g in range(tree.groups):
        size = tree.group_size[g]
        out[count:count + size] = c_softmax(list(row[count:count + size]), temp)
        count += size
    return out


def c_hierarchy_predictions(row: np.ndarray, tree: Tree, only_leaves: bool) -> np.ndarray:
    p = row.astype(np.float32).copy()
    for j in range(tree.n):
        if tree.parent[j] >= 0:
            p[j] = F32(p[j] * p[tree.parent[j]])
    if only_leaves:
        for j in range(tree.n):
            if not tree.leaf[j]:
                p[j] = 0
    return p


# ------------------------------------------------------------ read_tree
def test_read_tree_small(tmp_path):
    t = read_tree(write(tmp_path, SMALL))
    assert t.n == 7
    assert t.name == ("animal", "plant", "cat", "dog", "fish", "oak", "rose")
    assert t.parent == (-1, -1, 0, 0, 0, 1, 1)
    assert t.groups == 3
    assert t.group_offset == (0, 2, 5)
    assert t.group_size == (2, 3, 2)
    assert t.group == (0, 0, 1, 1, 1, 2, 2)
    assert t.child == (1, 2, -1, -1, -1, -1, -1)
    assert t.leaf == (False, False, True, True, True, True, True)
    assert t.path == str(tmp_path / "t.tree")


def test_read_tree_split_groups(tmp_path):
    t = read_tree(write(tmp_path, SPLIT))
    assert t.n == 9
    assert t.groups == 6
    assert t.group_offset == (0, 2, 4, 5, 6, 8)
    assert t.group_size == (2, 2, 1, 1, 2, 1)
    assert t.group == (0, 0, 1, 1, 2, 3, 4, 4, 5)
    # node 0's children are in groups 1 and 3; Darknet keeps the last one.
    assert t.child == (3, 2, 4, -1, 5, -1, -1, -1, -1)
    assert t.leaf == (False, False, False, True, False, True, True, True, True)


def test_read_tree_no_trailing_newline_and_name_only(tmp_path):
    t = read_tree(write(tmp_path, "x\ny 0\nz 0"))
    assert t.n == 3 and t.parent == (-1, 0, 0)
    assert t.group_size == (1, 2) and t.groups == 2


def test_read_tree_roots_split(tmp_path):
    # A root after non-root lines starts a new group (parent -1 != last_parent).
    t = read_tree(write(tmp_path, "a -1\nb 0\nc -1\n"))
    assert t.groups == 3 and t.group_offset == (0, 1, 2) and t.group == (0, 1, 2)


@pytest.mark.parametrize("text,line,needle", [
    ("a -1\n\nb 0\n", 2, "blank line"),
    ("a -1\nb zero\n", 2, "not an integer"),
    ("a -1\nb 0 extra\n", 2, "fields"),
    ("a -1\nb 1\n", 2, "earlier line"),
    ("a 0\n", 1, "earlier line"),
    ("a -1\nb -2\n", 2, "earlier line"),
    ("a -1\nb 5\n", 2, "earlier line"),
    ("a" * 256 + " -1\n", 1, "longer than"),
])
def test_read_tree_bad_lines(tmp_path, text, line, needle):
    p = write(tmp_path, text)
    with pytest.raises(TreeError) as ei:
        read_tree(p)
    err = ei.value
    assert isinstance(err, DarknetError)
    assert err.line == line and err.path == str(p)
    assert needle in str(err) and f"{p}:{line}" in str(err)


def test_read_tree_missing_and_empty(tmp_path):
    with pytest.raises(TreeError, match="not found") as ei:
        read_tree(tmp_path / "nope.tree")
    assert ei.value.path == str(tmp_path / "nope.tree")
    with pytest.raises(TreeError, match="empty"):
        read_tree(write(tmp_path, ""))


def test_tree_is_frozen(tmp_path):
    t = read_tree(write(tmp_path, SMALL))
    with pytest.raises(Exception):
        t.n = 3  # type: ignore[misc]


# ------------------------------------------------------------ softmax_tree
@pytest.mark.parametrize("temp", [1.0, 0.7, 2.5])
def test_softmax_tree_matches_c_loop(tmp_path, temp):
    t = read_tree(write(tmp_path, SPLIT))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, t.n, 2, 4, generator=g) * 4
    y = softmax_tree(x, t, temperature=temp)
    assert y.shape == x.shape and y.dtype == torch.float32
    xn = x.numpy()
    for b in range(3):
        for i in range(2):
            for j in range(4):
                want = c_softmax_tree(xn[b, :, i, j], t, temp)
                assert np.array_equal(y[b, :, i, j].numpy(), want), (b, i, j)


def test_softmax_tree_2d_and_extremes(tmp_path):
    t = read_tree(write(tmp_path, SMALL))
    x = torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0, 100.0, -100.0],
                      [float("nan"), 0.0, 1e30, -1e30, 3.0, 0.5, 0.5]])
    y = softmax_tree(x, t)
    for r in range(2):
        want = c_softmax_tree(x[r].numpy(), t)
        np.testing.assert_array_equal(y[r].numpy(), want)  # NaN positions equal too
    # group sums are 1 where finite
    assert torch.allclose(y[0, 2:5].sum(), torch.tensor(1.0))
    assert torch.isnan(y[1, 0:2]).all()   # a NaN poisons its own group only, as in C
    assert torch.equal(y[1, 2:5], torch.tensor([1.0, 0.0, 0.0]))


def test_softmax_tree_shape_error(tmp_path):
    t = read_tree(write(tmp_path, SMALL))
    with pytest.raises(TreeError):
        softmax_tree(torch.zeros(1, 6), t)
    with pytest.raises(TypeError):
        softmax_tree(torch.zeros(1, 7, dtype=torch.long), t)


# ------------------------------------------------------------ hierarchy_predictions
@pytest.mark.parametrize("only_leaves", [False, True])
def test_hierarchy_predictions_matches_c_loop(tmp_path, only_leaves):
    t = read_tree(write(tmp_path, SPLIT))
    g = torch.Generator().manual_seed(1)
    probs = softmax_tree(torch.randn(5, t.n, generator=g) * 3, t)
    got = hierarchy_predictions(probs, t, only_leaves)
    for r in range(5):
        want = c_hierarchy_predictions(probs[r].numpy(), t, only_leaves)
        assert np.array_equal(got[r].numpy(), want)
    assert not torch.equal(got, probs)
    # class axis elsewhere (Darknet's stride): (N, n, H, W) along dim 1
    x4 = probs.view(5, t.n, 1, 1).expand(5, t.n, 2, 3).contiguous()
    got4 = hierarchy_predictions(x4, t, only_leaves, dim=1)
    assert torch.equal(got4[:, :, 1, 2], got)


def test_hierarchy_predictions_hand_values(tmp_path):
    t = read_tree(write(tmp_path, SMALL))
    p = torch.tensor([0.7, 0.3, 0.2, 0.6, 0.2, 0.5, 0.5])
    got = hierarchy_predictions(p, t, False)
    want = torch.tensor([0.7, 0.3, 0.2 * 0.7, 0.6 * 0.7, 0.2 * 0.7, 0.5 * 0.3, 0.5 * 0.3])
    assert torch.allclose(got, want)
    got_l = hierarchy_predictions(p, t, True)
    assert got_l[0] == 0 and got_l[1] == 0 and torch.allclose(got_l[2:], want[2:])
    with pytest.raises(TreeError):
        hierarchy_predictions(torch.zeros(6), t, False)


# ------------------------------------------------------------ hierarchy_top_prediction
def test_hierarchy_top_prediction_hand_values(tmp_path):
    t = read_tree(write(tmp_path, SMALL))
    p = [0.7, 0.3, 0.2, 0.6, 0.2, 0.5, 0.5]
    # group 0: max 0.7 (animal), 1*0.7 > 0.5 -> go to group 1; max 0.6 (dog):
    # 0.7*0.6 = 0.42 <= 0.5 -> return parent of group 1 = animal (0)
    assert hierarchy_top_prediction(p, t, 0.5) == 0
    # with thresh 0.3: 0.42 > 0.3 and dog is a leaf -> dog
    assert hierarchy_top_prediction(p, t, 0.3) == 3
    # not confident at the top: group == 0 returns the max of group 0
    assert hierarchy_top_prediction([0.4, 0.45, 0, 0, 0, 0, 0], t, 0.5) == 1
    # nothing positive in group 0: max_i stays 0
    assert hierarchy_top_prediction([0, 0, 0.9, 0.9, 0.9, 0.9, 0.9], t, 0.5) == 0
    # ties: first maximum wins (strict >)
    assert hierarchy_top_prediction([0.9, 0.9, 0.3, 0.3, 0.3, 0.9, 0.1], t, 0.1) == 2
    # NaN never wins
    assert hierarchy_top_prediction([float("nan"), 0.9, 0, 0, 0, 0.2, 0.8], t, 0.5) == 6
    # exactly at the threshold is not above it (float32 product: 0.5*1.0)
    assert hierarchy_top_prediction([0.5, 0.1, 0, 0, 0, 0, 0], t, 0.5) == 0
    # torch input and stride: node j at j*stride
    flat = torch.zeros(7 * 3)
    flat[torch.arange(7) * 3] = torch.tensor(p)
    flat[torch.arange(7) * 3 + 1] = 5.0  # junk between entries is never read
    assert hierarchy_top_prediction(flat, t, 0.3, stride=3) == 3


def test_hierarchy_top_prediction_errors(tmp_path):
    t = read_tree(write(tmp_path, SMALL))
    with pytest.raises(TreeError):
        hierarchy_top_prediction([0.1] * 6, t, 0.5)
    with pytest.raises(TreeError):
        hierarchy_top_prediction([0.1] * 7, t, 0.5, stride=2)
    # thresh < 0 with a group of zeros: Darknet loops forever; we raise.
    with pytest.raises(TreeError, match="loop forever"):
        hierarchy_top_prediction([0.0] * 7, t, -1.0)


def test_hierarchy_top_prediction_three_levels(tmp_path):
    t = read_tree(write(tmp_path, SPLIT))
    #        a    b   a1   a2   b1   a3  a1x  a1y  b1x
    p = [0.9, 0.1, 0.8, 0.1, 1.0, 0.1, 0.3, 0.7, 1.0]
    # group0 -> a (0.9); child[a] = group 3 = {a3}: 0.9*0.1 <= 0.5 -> parent(a3) = a
    assert hierarchy_top_prediction(p, t, 0.5) == 0
    p2 = [0.1, 0.9, 0, 0, 0.8, 0, 0, 0, 0.9]
    # b (0.9) -> group 2 {b1}: 0.72 -> group 5 {b1x}: 0.648 > 0.5, leaf
    assert hierarchy_top_prediction(p2, t, 0.5) == 8
    # thresh 0.7: b (0.9) -> b1 (0.72 > 0.7) -> group 5 {b1x}: 0.648 <= 0.7, so the
    # result is parent[group_offset[5]] = b1 (4)
    assert hierarchy_top_prediction(p2, t, 0.7) == 4


# ------------------------------------------------------------ AlexeyAB region helper
def test_alexeyab_region_tree_probs():
    p = torch.tensor([[0.9, 0.1, 0.6, 0.55, 0.1, 0.05, 0.05],
                      [0.4, 0.6, 0.1, 0.1, 0.1, 0.2, 0.4],
                      [0.9, 0.1, 0.6, 0.55, 0.1, 0.05, 0.05]])
    obj = torch.tensor([0.8, 0.8, 0.1])
    out = alexeyab_region_tree_probs(p, obj, 0.25)
    # row 0: highest index with p > .5 is 3 (dog), not multiplied by objectness
    assert torch.equal(out[0], torch.tensor([0, 0, 0, 0.55, 0, 0, 0]))
    assert torch.equal(out[1], torch.tensor([0, 0.6, 0, 0, 0, 0, 0]))
    assert torch.equal(out[2], torch.zeros(7))   # objectness <= thresh


# ------------------------------------------------------------ the real 9k.tree
@pytest.fixture
def nine_k_tree_path(reference_dir) -> Path:
    """reference/names/9k.tree (skipped locally / failing in CI without the reference)."""
    path = reference_dir / "names" / "9k.tree"
    assert path.is_file(), f"{path} missing from the reference data"
    return path


def test_9k_tree(nine_k_tree_path):
    path = nine_k_tree_path
    t = read_tree(path)
    with open(path) as fh:
        nlines = sum(1 for _ in fh)
    assert t.n == nlines == 9418
    assert t.groups == 1846
    assert sum(t.group_size) == t.n
    assert t.group_offset[0] == 0 and t.group_size[0] == 4    # four roots
    assert max(t.group_size) == 149
    assert all(t.parent[i] < i for i in range(t.n))

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, t.n, 3, 2, generator=g) * 3
    y = softmax_tree(x, t)
    sums = torch.zeros(2, t.groups, 3, 2)
    sums.index_add_(1, torch.tensor(t.group), y)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    want = c_softmax_tree(x[1, :, 2, 1].numpy(), t)
    assert np.array_equal(y[1, :, 2, 1].numpy(), want)

    h = hierarchy_predictions(y, t, False, dim=1)
    assert np.array_equal(h[0, :, 0, 0].numpy(), c_hierarchy_predictions(y[0, :, 0, 0].numpy(), t, False))
    j = hierarchy_top_prediction(h[0, :, 0, 0], t, 0.5)
    assert 0 <= j < t.n
