"""Detection end to end, as ``./darknet detect`` / ``detector test`` do it.

image -> resize or letterbox (:mod:`darknetpy.image`) -> forward -> decode and
correct boxes -> NMS (:mod:`darknetpy.boxes`) -> :class:`Detection` objects,
printed lines, JSON and a drawn picture.

Defaults follow the profile: pjreddie's ``detect`` (thresh 0.5, letterbox),
AlexeyAB's ``detector test`` (thresh 0.25, stretched unless the cfg's ``[net]``
says ``letter_box=1``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .boxes import detector_nms, get_network_boxes
from .image import load_image, prepare_input

DEFAULT_THRESH = {"pjreddie": 0.5, "alexeyab": 0.25}
DEFAULT_HIER = 0.5
DEFAULT_NMS = 0.45

_DATA = os.path.join(os.path.dirname(__file__), "data")


@dataclass(frozen=True)
class Detection:
    """One box and class above the threshold.

    ``class_id``/``name``; ``prob``: the class probability Darknet prints
    (objectness × class probability for YOLO heads), 0..1; ``objectness``;
    ``box``: (cx, cy, w, h) relative to the original image (0..1, may extend
    past it as in Darknet); ``box_pixels``: (left, top, width, height) in
    original-image pixels, rounded as AlexeyAB's ``-ext_output`` prints them;
    ``best``: whether this is the box's highest class (AlexeyAB prints it first);
    ``box_index``: which box of the image it belongs to (rows of one box share it).
    """

    class_id: int
    name: str
    prob: float
    objectness: float
    box: tuple
    box_pixels: tuple
    best: bool = True
    box_index: int = 0


@dataclass
class ImageResult:
    """Detections for one image: ``path`` (or None), ``size`` (width, height) in
    pixels, ``detections`` in the order Darknet prints them for ``profile``."""

    path: str | None
    size: tuple
    detections: list
    profile: str


def default_letterbox(profile: str, net_letter_box: int) -> bool:
    """pjreddie's ``detect`` letterboxes; AlexeyAB only with ``letter_box=1`` in ``[net]``."""
    return profile == "pjreddie" or bool(net_letter_box)


def load_names(path: str | None = None, data: str | None = None, classes: int | None = None
               ) -> list[str]:
    """Class names: from a names file (one per line), a Darknet ``.data`` file's
    ``names=`` entry (resolved next to the .data file, then the current
    directory), or by class count: 80 -> COCO, 20 -> VOC (Darknet's lists),
    else ``class_N``.

    Raises:
        DarknetError: a file that cannot be read or a .data file without names=.
    """
    from .errors import DarknetError
    if data is not None:
        names = None
        try:
            with open(data) as f:
                for line in f:
                    key, _, value = "".join(line.split()).partition("=")
                    if key == "names":
                        names = value
        except OSError as e:
            raise DarknetError(f"{data}: cannot read .data file: {e.strerror}") from None
        if names is None:
            raise DarknetError(f"{data}: no names= entry")
        here = os.path.join(os.path.dirname(os.path.abspath(data)), names)
        path = names if os.path.isfile(names) else here if os.path.isfile(here) else \
            os.path.join(os.path.dirname(os.path.abspath(data)), os.path.basename(names))
    if path is None:
        builtin = {80: "coco.names", 20: "voc.names"}.get(classes)
        if builtin is None:
            return [f"class_{i}" for i in range(classes or 0)]
        path = os.path.join(_DATA, builtin)
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f if line.strip()]
    except OSError as e:
        raise DarknetError(f"{path}: cannot read names file: {e.strerror}") from None


def class_name(names: list[str], j: int) -> str:
    """``names[j]``, or ``class_j`` past the end of the list."""
    return names[j] if j < len(names) else f"class_{j}"


def detections_for_image(dets, names: list[str], im_w: int, im_h: int, thresh: float,
                         profile: str) -> list[Detection]:
    """Turn NMS'd boxes into :class:`Detection` rows in Darknet's print order.

    pjreddie (``image.c: draw_detections``): for each box in order, each class
    with prob > thresh. AlexeyAB (``draw_detections_v3``): boxes with some class
    above thresh, sorted by their left edge; per box its best class first, then
    the others in class order.
    """
    kept = dets.above(thresh)
    b = kept.boxes.to(torch.float32)  # (B, 4) cxcywh, image-relative
    # C float arithmetic: left = x - w/2 (compare_by_lefts), then * im.w, C round()
    left, top = b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2
    pixels = torch.stack([left * im_w, top * im_h, b[:, 2] * im_w, b[:, 3] * im_h], dim=1)
    pixels = (torch.sign(pixels) * torch.floor(pixels.abs() + 0.5)).to(torch.int64).tolist()
    boxes = kept.boxes.tolist()
    probs = kept.prob.tolist()
    above_mask = (kept.prob > torch.tensor(thresh, dtype=kept.prob.dtype)).tolist()
    order = range(len(boxes))
    if profile == "alexeyab":
        lefts = left.tolist()
        order = sorted(order, key=lambda i: lefts[i])
    rows = []
    for i in order:
        p = probs[i]
        above = [j for j, a in enumerate(above_mask[i]) if a]
        best = max(above, key=lambda j: (p[j], -j))
        classes = [best] + [j for j in above if j != best] if profile == "alexeyab" else above
        for j in classes:
            rows.append(Detection(class_id=j, name=class_name(names, j), prob=p[j],
                                  objectness=float(kept.objectness[i]), box=tuple(boxes[i]),
                                  box_pixels=tuple(pixels[i]), best=j == best, box_index=i))
    return rows


def format_lines(result: ImageResult, ext_output: bool = False) -> list[str]:
    """Darknet's printed lines: ``name: NN%`` (``%.0f`` of prob*100 in float), with
    ``ext_output`` AlexeyAB's ``\\t(left_x: ... height: ...)`` in pixels."""
    lines = []
    for d in result.detections:
        pct = float(torch.tensor(d.prob, dtype=torch.float32) * 100)
        line = f"{d.name}: {pct:.0f}%"
        if ext_output:
            l, t, w, h = d.box_pixels
            line += f"\t(left_x: {l:4.0f}   top_y: {t:4.0f}   width: {w:4.0f}   height: {h:4.0f})"
        lines.append(line)
    return lines


def to_json(results: list[ImageResult]) -> str:
    """AlexeyAB's ``-out result.json`` format: a list of frames with ``frame_id``,
    ``filename`` and ``objects`` (class_id, name, relative_coordinates center_x,
    center_y, width, height, confidence)."""
    frames = []
    for k, r in enumerate(results, start=1):
        objects = [{"class_id": d.class_id, "name": d.name,
                    "relative_coordinates": {"center_x": d.box[0], "center_y": d.box[1],
                                             "width": d.box[2], "height": d.box[3]},
                    "confidence": d.prob} for d in r.detections]
        frames.append({"frame_id": k, "filename": r.path, "objects": objects})
    return json.dumps(frames, indent=1)


class Detector:
    """A loaded model plus Darknet's detection settings.

    >>> det = Detector(darknetpy.load("cfg/yolov3.cfg", "yolov3.weights"))  # doctest: +SKIP
    >>> det.detect("dog.jpg")[0].detections[0].name                          # doctest: +SKIP
    'bicycle'

    ``thresh``, ``hier`` and ``nms`` default to the profile's CLI defaults;
    ``letterbox`` to :func:`default_letterbox`.
    """

    def __init__(self, model, *, names: list[str] | None = None, thresh: float | None = None,
                 hier: float = DEFAULT_HIER, nms: float = DEFAULT_NMS,
                 letterbox: bool | None = None):
        from .errors import DarknetError
        if not model.is_detector:
            raise DarknetError("this network has no detection heads ([yolo]/[region]); "
                               "use classify for a classifier")
        self.model = model
        self.profile = model.profile
        self.specs = [model.specs[i] for i in model.heads]
        self.classes = self.specs[-1].classes
        self.names = names if names is not None else load_names(classes=self.classes)
        # the layer whose classes/nms_kind the CLI's NMS reads: pjreddie the network's
        # last layer; AlexeyAB's test_detector the last detection layer
        self.nms_layer = model.specs[-1] if self.profile == "pjreddie" else self.specs[-1]
        self.thresh = DEFAULT_THRESH[self.profile] if thresh is None else thresh
        self.hier, self.nms = hier, nms
        self.letterbox = default_letterbox(self.profile, model.net.letter_box) \
            if letterbox is None else letterbox

    @property
    def device(self):
        return self.model.device

    def detect_tensors(self, images: list[torch.Tensor], paths: list | None = None
                       ) -> list[ImageResult]:
        """Detect on decoded images, each (3, H, W) float RGB 0..1 (one batch)."""
        net = self.model.net
        x = torch.stack([prepare_input(im, net.width, net.height, self.letterbox)
                         for im in images]).to(self.device)
        with torch.inference_mode():
            heads = self.model(x)
        sizes = [(im.shape[2], im.shape[1]) for im in images]
        dets = get_network_boxes([h.float().cpu() for h in heads], self.specs,
                                 [s[0] for s in sizes], [s[1] for s in sizes], net.width,
                                 net.height, self.thresh, self.hier, self.letterbox,
                                 self.profile)
        results = []
        for k, d in enumerate(dets):
            d = detector_nms(d, self.nms_layer, self.profile, self.nms)
            rows = detections_for_image(d, self.names, sizes[k][0], sizes[k][1], self.thresh,
                                        self.profile)
            results.append(ImageResult(path=paths[k] if paths else None, size=sizes[k],
                                       detections=rows, profile=self.profile))
        return results

    def detect(self, *images) -> list[ImageResult]:
        """Detect on image paths, PIL images or uint8 HWC arrays (one batch).

        Raises:
            ImageError: an image that cannot be read (names the file).
        """
        decoded = [load_image(im) for im in images]
        paths = [os.fspath(im) if isinstance(im, (str, os.PathLike)) else None for im in images]
        return self.detect_tensors(decoded, paths)
