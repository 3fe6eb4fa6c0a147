"""``predictions.jpg``: boxes and labels drawn like Darknet's ``image.c: draw_detections``,
with Pillow.

Per box with some class above thresh: the colour of its first class from
Darknet's ``get_color`` palette (offset ``class*123457 % classes``), an outline
``int(im.h * .006)`` pixels wide (AlexeyAB ``draw_detections_v3``: ``.002``), and a
label with the class names joined by ", " (AlexeyAB: ``name: 0.88``) on a filled
box of the same colour, text in black, height about ``im.h * .03``.
"""
from __future__ import annotations

import math
import os

import torch
from PIL import Image, ImageDraw, ImageFont

from .weights import atomic_write

_COLORS = ((1, 0, 1), (0, 0, 1), (0, 1, 1), (0, 1, 0), (1, 1, 0), (1, 0, 0))


def get_color(c: int, x: int, max_: int) -> float:
    """Darknet's ``get_color(c, x, max)``: channel ``c`` (0 blue .. 2 red) of palette
    entry ``x`` of ``max_``, 0..1."""
    ratio = (x / max_) * 5
    i, j = math.floor(ratio), math.ceil(ratio)
    ratio -= i
    return (1 - ratio) * _COLORS[i][c] + ratio * _COLORS[j][c]


def class_color(class_id: int, classes: int) -> tuple[int, int, int]:
    """RGB 0..255 of a class, as ``draw_detections`` picks it."""
    offset = class_id * 123457 % classes
    return tuple(int(255 * get_color(c, offset, classes)) for c in (2, 1, 0))


def draw_detections(image: Image.Image, result, classes: int) -> Image.Image:
    """A copy of ``image`` (the original, any size) with ``result``'s boxes drawn.

    ``result``: a :class:`darknetpy.detect.ImageResult` (boxes relative to the image).
    """
    im = image.convert("RGB")
    draw = ImageDraw.Draw(im)
    w, h = im.size
    width = max(int(h * (.006 if result.profile == "pjreddie" else .002)), 1)
    font = ImageFont.load_default(size=max(int(h * .03), 10))
    boxes: dict[int, list] = {}
    for d in result.detections:  # group the rows of one box (several classes)
        boxes.setdefault(d.box_index, []).append(d)
    for rows in boxes.values():
        first = rows[0]  # pjreddie: lowest class; AlexeyAB: best class
        color = class_color(first.class_id, classes)
        x, y, bw, bh = first.box
        left = min(max(int((x - bw / 2) * w), 0), w - 1)
        right = min(max(int((x + bw / 2) * w), 0), w - 1)
        top = min(max(int((y - bh / 2) * h), 0), h - 1)
        bot = min(max(int((y + bh / 2) * h), 0), h - 1)
        for i in range(width):
            draw.rectangle((left + i, top + i, max(right - i, left + i), max(bot - i, top + i)),
                           outline=color)
        if result.profile == "pjreddie":
            label = ", ".join(d.name for d in rows)
        else:
            label = ", ".join(f"{d.name}: {d.prob:.2f}" for d in rows)
        tl, tt, tr, tb = draw.textbbox((0, 0), label, font=font)
        th = tb - tt + 2 * width
        ty = top - th if top - th >= 0 else top + width
        draw.rectangle((left, ty, left + (tr - tl) + 2 * width, ty + th), fill=color)
        draw.text((left + width, ty + width - tt), label, fill=(0, 0, 0), font=font)
    return im


def to_pil(im: torch.Tensor) -> Image.Image:
    """A (3, H, W) float RGB 0..1 tensor (byte/255, as loaded) back to an RGB PIL image."""
    u8 = (im * 255).round().clamp(0, 255).to(torch.uint8)  # (3, H, W)
    return Image.fromarray(u8.permute(1, 2, 0).contiguous().numpy())  # (H, W, 3)


def save_jpeg(image: Image.Image, path: str) -> None:
    """Save as JPEG (or by extension) atomically: temp file + rename."""
    import io
    buf = io.BytesIO()
    fmt = {".png": "PNG", ".bmp": "BMP"}.get(os.path.splitext(path)[1].lower(), "JPEG")
    image.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    atomic_write(path, buf.getvalue())
