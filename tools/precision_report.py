#!/usr/bin/env python3
"""How reduced precision changes detections on the real-weights reference cases.

For every detection case with real weights, runs darknetpy's detector on the image exactly
as Darknet decoded it (``images/<name>.npz`` ``image_u8``) with the eager fp32 model, the
optimised fp32 module and the optimised bf16 module, and lists the printed lines that differ.

Usage: python tools/precision_report.py [--reference DIR] [--precision bf16] [--markdown F]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from darknetpy import load  # noqa: E402
from darknetpy.detect import Detector, format_lines, load_names  # noqa: E402
from darknetpy.optimize import optimize  # noqa: E402


def compare_rows(base: list, other: list) -> tuple[bool, int, int]:
    """(same detections, max |percent difference|, max |pixel difference|): each base
    detection paired with the unpaired one of the same class whose box is nearest."""
    left = list(other)
    max_pct = max_px = 0
    for d in base:
        same = [o for o in left if o.class_id == d.class_id]
        if not same:
            return False, max_pct, max_px
        o = min(same, key=lambda o: sum(abs(a - b) for a, b in zip(o.box_pixels, d.box_pixels)))
        left.remove(o)
        max_pct = max(max_pct, abs(round(o.prob * 100) - round(d.prob * 100)))
        max_px = max(max_px, max(abs(a - b) for a, b in zip(o.box_pixels, d.box_pixels)))
    return not left, max_pct, max_px


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", default=os.environ.get(
        "DARKNETPY_REFERENCE", str(Path(__file__).resolve().parents[2] / "shared" / "reference")))
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--markdown", help="write the table here")
    args = ap.parse_args()
    ref = Path(args.reference)
    p = args.precision
    rows = [f"| case | detections (fp32) | optimised fp32: same lines? | {p}: same detections? "
            f"| {p}: max Δ percent | {p}: max Δ box (px) |", "|---|---:|---|---|---:|---:|"]
    for case_dir in sorted((ref / "cases").iterdir()):
        meta = json.loads((case_dir / "case.json").read_text())
        if meta["weights"]["synthetic"] or meta.get("classify"):
            continue
        model = load(case_dir / "model.cfg", ref / "weights" / meta["weights"]["file"],
                     profile=meta["impl"])
        names = load_names(str(ref / "names" / meta.get("names", "face.names")))
        u8 = np.load(ref / "images" / (Path(meta["image"]).stem + ".npz"))["image_u8"]
        image = np.ascontiguousarray(u8.transpose(1, 2, 0))
        found = {}
        for label, m in (("eager", model), ("fp32", optimize(model)),
                         (p, optimize(model, precision=p))):
            det = Detector(m, names=names, thresh=meta["thresh"],
                           letterbox=bool(meta["letterbox"]))
            found[label] = det.detect(image)[0]
        same_fp32 = format_lines(found["fp32"], True) == format_lines(found["eager"], True)
        same, dpct, dpx = compare_rows(found["eager"].detections, found[p].detections)
        rows.append(f"| {case_dir.name} | {len(found['eager'].detections)} | "
                    f"{'yes' if same_fp32 else 'no'} | {'yes' if same else 'no'} | {dpct} | {dpx} |")
    text = "\n".join(rows)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
