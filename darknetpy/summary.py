"""``darknetpy info``: a Darknet-style layer table (``parser.c`` prints one while parsing).

One row per layer: index, type, filters, size/stride, input -> output shape
(W x H x C, as Darknet prints it) and BFLOPs; then the total and the profile.
"""
from __future__ import annotations

from .model import Architecture

_SHORT = {"convolutional": "conv", "maxpool": "max", "avgpool": "avg", "upsample": "upsample",
          "route": "route", "shortcut": "shortcut", "connected": "connected",
          "softmax": "softmax", "local_avgpool": "avg_local", "scale_channels": "scale_ch"}


def _whc(shape) -> str:
    c, h, w = shape
    return f"{w:4d} x{h:4d} x{c:5d}"


def summary(arch: Architecture) -> str:
    """The layer table of ``arch`` as text (widths: Darknet's ``parser.c`` output)."""
    net = arch.net
    lines = [f"net: {net.width} x {net.height} x {net.channels}"
             + (", letter_box=1" if net.letter_box else ""),
             "   layer   type       filters  size/strd(dil)      input                output"]
    for spec in arch.specs:
        filters, size = spec.describe()
        name = _SHORT.get(spec.type, spec.type)
        flops = spec.flops
        bf = f" {flops / 1e9:6.3f} BF" if flops >= 5e5 else ""
        lines.append(f"{spec.index:5d} {name:<12} {filters:>9}  {size:<16} "
                     f"{_whc(spec.in_shape)} -> {_whc(spec.out_shape)}{bf}")
    lines.append(f"Total BFLOPS {arch.flops / 1e9:.3f}")
    heads = arch.heads
    lines.append("heads: " + (", ".join(f"{i} [{arch.specs[i].type}]" for i in heads)
                              if heads else "none (classifier: output is the last layer)"))
    why = "; ".join(arch.profile_reasons[:4]) + (" ..." if len(arch.profile_reasons) > 4 else "")
    lines.append(f"profile: {arch.profile}" + (f" (AlexeyAB features: {why})" if why else
                                               " (no AlexeyAB-only features)"))
    return "\n".join(lines)
