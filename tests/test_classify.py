"""Classification like `darknet classifier predict` (Tiny Darknet on eagle.jpg)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from darknetpy import load
from darknetpy.classify import format_top, top_k
from darknetpy.cli import main
from darknetpy.detect import load_names

CASE = "tiny_eagle_pjreddie"
TOP = re.compile(r"^\s*(\d+\.\d+)%: (.+)$")


def _darknet_top5(case_dir):
    rows = [TOP.match(line) for line in (case_dir / "darknet_stdout.txt").read_text().splitlines()]
    return [(m.group(2), float(m.group(1))) for m in rows if m]


@pytest.fixture(scope="module")
def tiny(reference_dir):
    case_dir = reference_dir / "cases" / CASE
    return case_dir, load(case_dir / "model.cfg", reference_dir / "weights" / "tiny.weights")


def test_top5_equals_darknet_on_darknets_decoded_pixels(reference_dir, tiny):
    """Fed the image exactly as Darknet decoded it, the printed lines are Darknet's."""
    case_dir, model = tiny
    names = load_names(str(reference_dir / "names" / "imagenet.shortnames.list"))
    u8 = np.load(reference_dir / "images" / "eagle.npz")["image_u8"].transpose(1, 2, 0)
    rows = model.classify(np.ascontiguousarray(u8), top=5, names=names)
    expected = _darknet_top5(case_dir)
    assert [name for _, name, _ in rows] == [name for name, _ in expected]
    for (_, _, p), (_, pct) in zip(rows, expected):
        assert abs(p * 100 - pct) <= 0.01
    assert [line.split(": ", 1)[0] for line in format_top(rows)] == \
        [f"{pct:5.2f}%" for _, pct in expected]


def test_cli_classify_on_the_jpeg(reference_dir, tiny, capsys):
    """From the JPEG (Pillow's decoder, up to 3 levels from stb's) the ranking is the same
    and the percentages within 0.5 points."""
    case_dir, _ = tiny
    assert main(["classify", str(case_dir / "model.cfg"), str(reference_dir / "weights" /
                 "tiny.weights"), str(reference_dir / "images" / "eagle.jpg"), "--names",
                 str(reference_dir / "names" / "imagenet.shortnames.list")]) == 0
    ours = [(m.group(2), float(m.group(1))) for m in
            map(TOP.match, capsys.readouterr().out.splitlines()) if m]
    theirs = _darknet_top5(case_dir)
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    assert all(abs(a - b) <= 0.5 for (_, a), (_, b) in zip(ours, theirs))


def test_top_k_ties_and_nan_like_darknet():
    assert top_k([0.1, 0.5, 0.5, float("nan"), 0.2], 3) == [1, 2, 4]
    assert top_k([1.0], 5) == [0]


def test_detect_on_a_classifier_is_a_clear_error(reference_dir):
    from darknetpy.errors import DarknetError
    case_dir = reference_dir / "cases" / CASE
    model = load(case_dir / "model.cfg", reference_dir / "weights" / "tiny.weights")
    with pytest.raises(DarknetError, match="no detection heads"):
        model.detect(reference_dir / "images" / "eagle.jpg")
