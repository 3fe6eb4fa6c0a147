"""`darknetpy detect` prints what `./darknet detect` / `detector test` printed (real weights)."""
from __future__ import annotations

import json
import re

import pytest

from darknetpy.cli import main
from darknetpy.detect import format_lines, load_names

LINE = re.compile(r"^(?P<name>[^:\t]+): (?P<pct>\d+)%(?:\t\(left_x:\s*(?P<l>-?\d+)\s+top_y:\s*"
                  r"(?P<t>-?\d+)\s+width:\s*(?P<w>-?\d+)\s+height:\s*(?P<h>-?\d+)\))?$")


def _parse(text: str) -> list[dict]:
    return [m.groupdict() for m in map(LINE.match, text.splitlines()) if m]


def _case(reference_dir, name):
    case_dir = reference_dir / "cases" / name
    meta = json.loads((case_dir / "case.json").read_text())
    if not (case_dir / "darknet_stdout.txt").exists() or meta.get("classify"):
        pytest.skip(f"{name}: not a real-weights detection case (no darknet_stdout.txt)")
    return case_dir, meta


def _names_file(reference_dir, meta):
    return reference_dir / "names" / meta.get("names", "face.names")


def _cli_letterbox(meta: dict) -> bool:
    """Whether the recorded Darknet command letterboxed: pjreddie's detector always does;
    AlexeyAB's only with -letter_box (or letter_box=1 in [net], which these cfgs lack).
    (A case's outputs.npz may use another setting than its recorded CLI run.)"""
    return meta["impl"] == "pjreddie" or "-letter_box" in meta.get("cli", "")


def test_detect_prints_darknets_lines(reference_dir, reference_case, capsys, tmp_path):
    case_dir, meta = _case(reference_dir, reference_case)
    args = ["detect", str(case_dir / "model.cfg"), str(reference_dir / "weights" /
            meta["weights"]["file"]), str(reference_dir / "images" / meta["image"]),
            "--thresh", str(meta["thresh"]), "--profile", meta["impl"],
            "--names", str(_names_file(reference_dir, meta)),
            "--letterbox" if _cli_letterbox(meta) else "--no-letterbox",
            "--ext-output", "--out", str(tmp_path / "predictions.jpg"),
            "--json", str(tmp_path / "result.json")]
    assert main(args) == 0
    ours = _parse(capsys.readouterr().out)
    theirs = _parse((case_dir / "darknet_stdout.txt").read_text())
    assert [d["name"] for d in ours] == [d["name"] for d in theirs]
    for a, b in zip(ours, theirs):
        assert abs(int(a["pct"]) - int(b["pct"])) <= 1, (a, b)
        if b["l"] is not None:
            for k in "ltwh":
                assert abs(int(a[k]) - int(b[k])) <= 2, (k, a, b)
    assert (tmp_path / "predictions.jpg").stat().st_size > 0
    frames = json.loads((tmp_path / "result.json").read_text())
    assert len(frames) == 1 and len(frames[0]["objects"]) == len(ours)
    for obj in frames[0]["objects"]:
        assert set(obj["relative_coordinates"]) == {"center_x", "center_y", "width", "height"}


def test_names_builtin_lists_are_darknets(reference_dir):
    for classes, name in ((80, "coco.names"), (20, "voc.names")):
        official = (reference_dir / "names" / name).read_text().split("\n")
        assert load_names(classes=classes) == [n.strip() for n in official if n.strip()]


def test_data_file_names_resolved_next_to_data_file(tmp_path):
    (tmp_path / "my.names").write_text("a\nb\n")
    (tmp_path / "my.data").write_text("classes = 2\nnames = data/my.names\n")
    assert load_names(data=str(tmp_path / "my.data")) == ["a", "b"]


def test_format_lines_rounding():
    from darknetpy.detect import Detection, ImageResult
    rows = [Detection(0, "dog", 0.985, 0.99, (0.5, 0.5, 0.2, 0.2), (10, 20, 30, 40)),
            Detection(1, "cat", 0.125, 0.5, (0.5, 0.5, 0.2, 0.2), (-3, 0, 7, 8))]
    r = ImageResult("x.jpg", (100, 100), rows, "alexeyab")
    assert format_lines(r) == ["dog: 98%", "cat: 12%"]  # %.0f of float32(p)*100, half-even
    assert format_lines(r, True)[1] == \
        "cat: 12%\t(left_x:   -3   top_y:    0   width:    7   height:    8)"


def test_bad_image_is_reported_and_skipped(reference_dir, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    weights = reference_dir / "weights" / "yolo-fastest-1.1.weights"
    cfg = reference_dir / "cfg" / "real" / "yolo-fastest-1.1.cfg"
    rc = main(["detect", str(cfg), str(weights), str(bad), str(reference_dir / "images" /
               "dog.jpg"), "--out", str(tmp_path / "p.jpg"), "--names",
               str(reference_dir / "names" / "coco.names")])
    captured = capsys.readouterr()
    assert rc == 1
    assert "broken.jpg" in captured.err
    assert "dog: " in captured.out  # the good image still ran


def test_ext_output_pixels_round_like_c():
    """AlexeyAB: round((x - w/2) * im.w) in float32 with C's round-half-away-from-zero
    (the reviewer's case: double arithmetic and Python's round give 568)."""
    import torch

    from darknetpy.boxes import Detections
    from darknetpy.detect import detections_for_image
    d = Detections(boxes=torch.tensor([[0.9034947, 0.5, 0.0304269, 0.2]]),
                   objectness=torch.tensor([0.9]), prob=torch.tensor([[0.9]]))
    (row,) = detections_for_image(d, ["x"], 640, 480, 0.5, "alexeyab")
    assert row.box_pixels[0] == 569


def test_identical_boxes_are_drawn_separately():
    import torch
    from PIL import Image

    from darknetpy.boxes import Detections
    from darknetpy.detect import ImageResult, detections_for_image
    from darknetpy.draw import class_color, draw_detections
    d = Detections(boxes=torch.tensor([[0.5, 0.5, 0.4, 0.4]] * 2),
                   objectness=torch.tensor([0.9, 0.9]), prob=torch.tensor([[0.9, 0], [0, 0.8]]))
    rows = detections_for_image(d, ["a", "b"], 100, 100, 0.5, "pjreddie")
    assert [r.box_index for r in rows] == [0, 1]
    out = draw_detections(Image.new("RGB", (100, 100)), ImageResult(None, (100, 100), rows,
                                                                     "pjreddie"), 2)
    # the second box (class 1) is drawn too, over the first: its colour is on the outline
    assert class_color(0, 2) != class_color(1, 2)
    assert class_color(1, 2) in {out.getpixel((x, 60)) for x in range(25, 35)}
