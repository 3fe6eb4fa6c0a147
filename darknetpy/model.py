"""The graph: cfg sections -> layer specs with shapes -> ``Darknet(nn.Module)``.

Mirrors ``parser.c: parse_network_cfg`` (walk the sections, carry the shape
from layer to layer) and ``network.c: forward_network`` (run the layers in
order). Which Darknet's arithmetic to follow is the *profile*: ``"pjreddie"``
or ``"alexeyab"``; when not given it is chosen from the cfg (AlexeyAB-only
sections or options -> alexeyab, else pjreddie), with the reasons kept.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .cfg import Option, Section, parse_cfg, read_cfg, warn_unused
from .device import resolve_device
from .errors import CfgError, DarknetError
from .layers import (PROFILES, REGISTRY, BuildContext, HeadSpec, LayerSpec, NetSpec,
                     spec_for_section)
from .layers.activations import ALEXEYAB_ACTIVATIONS

#: cfg keys only AlexeyAB's Darknet reads (by section type); their presence
#: means the cfg was written for AlexeyAB.
ALEXEYAB_KEYS = {
    "net": {"letter_box", "mosaic", "cutmix", "mixup", "ema_alpha", "label_smooth_eps", "adam",
            "contrastive", "track", "augment_speed", "blur", "gaussian_noise", "max_epochs",
            "dynamic_minibatch", "optimized_memory", "sgdr_cycle", "sgdr_mult"},
    "yolo": {"scale_x_y", "new_coords", "nms_kind", "beta_nms", "iou_loss", "iou_normalizer",
             "cls_normalizer", "obj_normalizer", "max_delta", "objectness_smooth", "resize",
             "iou_thresh", "uc_normalizer", "counters_per_class", "label_smooth_eps"},
    "convolutional": {"stride_x", "stride_y", "dilation", "antialiasing", "share_index",
                      "assisted_excitation", "coordconv", "deform"},
    "maxpool": {"stride_x", "stride_y", "maxpool_depth", "out_channels", "antialiasing"},
    "route": {"groups", "group_id"},
    "shortcut": {"weights_type", "weights_normalization"},
}


class InputError(DarknetError):
    """A tensor given to ``Darknet.forward`` that does not fit the network."""


@dataclass
class Architecture:
    """A parsed cfg: ``[net]``, one spec per layer, the profile and why it was chosen.

    ``path``: cfg file (or None); ``sections``: the parsed sections (``[net]``
    first); ``specs[i]``: layer i's spec with input/output shapes (C, H, W).
    """

    path: str | None
    sections: list[Section]
    net: NetSpec
    specs: list[LayerSpec]
    profile: str
    profile_reasons: list[str] = field(default_factory=list)

    @property
    def heads(self) -> list[int]:
        """Indices of the detection heads ([yolo], [Gaussian_yolo], [region]) in cfg order."""
        return [s.index for s in self.specs if isinstance(s, HeadSpec)]

    @property
    def flops(self) -> float:
        return sum(s.flops for s in self.specs)


def parse_architecture(cfg: str | os.PathLike | list[Section], *, profile: str | None = None,
                       width: int | None = None, height: int | None = None,
                       tree: str | None = None, warn: bool = True) -> Architecture:
    """Build the layer specs of a cfg (no torch modules yet).

    Args:
        cfg: path to a ``.cfg`` file, or already-parsed sections.
        profile: ``"pjreddie"``, ``"alexeyab"`` or None (choose from the cfg).
        width, height: override ``[net]`` width/height (pixels).
        tree: path of the ``.tree`` file for ``tree=`` options (else looked up
            next to the cfg and in the current directory).
        warn: log unused cfg keys (Darknet's "Unused field").

    Raises:
        CfgError: any problem in the cfg, located by file, line, section and key.
        ValueError: unknown profile name.
    """
    if profile is not None and profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
    if isinstance(cfg, list):
        sections = cfg
        path = sections[0].path if sections else None
    else:
        path = os.fspath(cfg)
        sections = read_cfg(path)
    for sec in sections[1:]:
        # unknown/unsupported section types first: recurrent cfgs ([rnn], [gru], [lstm],
        # [crnn]) give no [net] width/height, and that error would hide the real reason
        spec_for_section(sec)
    net = NetSpec.from_section(sections[0], width=width, height=height)
    shape = (net.channels, net.height, net.width)
    specs: list[LayerSpec] = []
    for sec in sections[1:]:
        cls = spec_for_section(sec)
        ctx = BuildContext(index=sec.index, in_shape=shape, shapes=[s.out_shape for s in specs],
                           net=net, cfg_path=path, tree_override=tree)
        spec = cls.from_section(sec, ctx)
        specs.append(spec)
        shape = spec.out_shape
    if not specs:
        raise CfgError("the cfg has no layers after [net]", path=path, line=sections[0].line)
    if warn:
        warn_unused(sections)
    reasons = alexeyab_reasons(sections, specs)
    chosen = profile or ("alexeyab" if reasons else "pjreddie")
    return Architecture(path=path, sections=sections, net=net, specs=specs, profile=chosen,
                        profile_reasons=reasons)


def alexeyab_reasons(sections: list[Section], specs: list[LayerSpec]) -> list[str]:
    """Why a cfg needs AlexeyAB's Darknet: AlexeyAB-only sections, options
    (:data:`ALEXEYAB_KEYS`), activations, and shortcuts from several layers.
    One line per section, e.g. ``"layer 30 [yolo]: nms_kind, scale_x_y"``."""
    found: dict[str, set[str]] = {}
    for sec, spec in zip(sections, [None, *specs]):
        where = "[net]" if spec is None else f"layer {spec.index} [{sec.type}]"
        feats = set(ALEXEYAB_KEYS.get(_canonical(sec.type), set()) & set(sec.options))
        if spec is not None and spec.alexeyab_only:
            feats.add(f"section [{sec.type}]")
        act = sec.options.get("activation")
        if act is not None and act.value in ALEXEYAB_ACTIVATIONS:
            feats.add(f"activation={act.value}")
        if sec.type == "shortcut" and "," in sec.options.get("from", Option("", 0)).value:
            feats.add("from several layers")
        if feats:
            found[where] = feats
    return [f"{where}: {', '.join(sorted(feats))}" for where, feats in found.items()]


def _canonical(section_type: str) -> str:
    """The registry's main name of a section type (``conv`` -> ``convolutional``)."""
    if section_type in ("net", "network"):
        return "net"
    cls = REGISTRY.get(section_type)
    return cls.section_names[0] if cls is not None else section_type


class Darknet(nn.Module):
    """A Darknet network as a ``torch.nn.Module``.

    ``forward(x)``: ``x`` is ``(N, C, H, W)`` float RGB in 0..1 with C, H, W
    from ``[net]`` (``channels``, ``height``, ``width``). Returns the detection
    heads' outputs as a tuple in cfg order, each ``(N, A*E, h, w)`` exactly as
    Darknet's layer output holds it (after the heads' in-place activations);
    for a network without detection heads (a classifier), the last layer's
    output ``(N, C, H, W)``.

    ``forward_all(x)`` returns every layer's output in cfg order.

    Attributes: ``arch`` (:class:`Architecture`), ``layers``
    (``nn.ModuleList``, ``layers[i]`` is cfg layer i; state_dict keys read
    e.g. ``layers.12.conv.weight``), ``profile``, ``heads`` (indices),
    ``weights_header`` (after loading weights).
    """

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        self.profile = arch.profile
        self.layers = nn.ModuleList(spec.build(arch.profile) for spec in arch.specs)
        self._refs = [list(spec.refs) for spec in arch.specs]
        self.heads = arch.heads
        self._head_set = frozenset(self.heads)
        needed = {j for refs in self._refs for j in refs} | set(self.heads)
        self._keep = [i in needed for i in range(len(arch.specs))]
        self.weights_header = None

    @property
    def specs(self) -> list[LayerSpec]:
        return self.arch.specs

    @property
    def net(self) -> NetSpec:
        return self.arch.net

    @property
    def is_detector(self) -> bool:
        return bool(self.heads)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters (CPU for a model without any)."""
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def check_input(self, x: Tensor) -> None:
        """Raise :class:`InputError` unless ``x`` is (N, C, H, W) float matching ``[net]``."""
        net = self.arch.net
        want = (net.channels, net.height, net.width)
        if not isinstance(x, Tensor):
            raise InputError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise InputError(f"expected input of shape (N, {want[0]}, {want[1]}, {want[2]}) "
                             f"(N, C, H, W from [net]), got {tuple(x.shape)}; load the model "
                             "with width=/height= to run at another size")
        if not x.is_floating_point():
            raise InputError(f"expected a float tensor in 0..1, got {x.dtype}")

    def forward(self, x: Tensor):
        heads = {}
        for i, out in self.iter_layers(x):
            if i in self._head_set:
                heads[i] = out
        if self.heads:
            return tuple(heads[i] for i in self.heads)
        return out

    def forward_all(self, x: Tensor) -> list[Tensor]:
        """Every layer's output in cfg order, ``outs[i]`` of shape (N, *specs[i].out_shape)."""
        return [out for _, out in self.iter_layers(x)]

    def iter_layers(self, x: Tensor):
        """Yield ``(i, output_i)`` layer by layer, keeping only the outputs later
        layers need (memory stays low for layer-by-layer comparisons)."""
        self.check_input(x)
        saved: dict[int, Tensor] = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, [saved[j] for j in self._refs[i]])
            if self._keep[i]:
                saved[i] = x
            yield i, x

    def set_arithmetic(self, mode: str) -> "Darknet":
        """Choose how layers with a gemm ([convolutional], [connected]) compute it.

        ``"torch"`` (default): torch's conv/linear kernels — fast, equal to
        Darknet's results to float32 rounding. ``"darknet"``: Darknet's CPU gemm
        order (sequential float32 multiply-then-add over k, :mod:`darknetpy.gemm`)
        — much slower, matches Darknet mostly bit for bit. Returns ``self``.

        Raises:
            ValueError: unknown mode.
        """
        from .gemm import check_arithmetic
        check_arithmetic(mode)
        for layer in self.layers:
            if hasattr(layer, "arithmetic"):
                layer.arithmetic = mode
        return self

    def darknet_params(self):
        """(layer index, spec, name, tensor) for every parameter block, in ``.weights`` order."""
        for i, (spec, layer) in enumerate(zip(self.arch.specs, self.layers)):
            if hasattr(layer, "darknet_params"):
                for name, tensor in layer.darknet_params():
                    yield i, spec, name, tensor

    def load_weights(self, path: str | os.PathLike, *, allow_trailing_bytes: bool = False):
        """Load a Darknet ``.weights`` file (see :func:`darknetpy.weights.load_weights`)."""
        from .weights import load_weights
        self.weights_header = load_weights(self, path, allow_trailing_bytes=allow_trailing_bytes)
        return self.weights_header

    def save_weights(self, path: str | os.PathLike, **kwargs) -> None:
        """Write a Darknet ``.weights`` file (see :func:`darknetpy.weights.save_weights`)."""
        from .weights import save_weights
        save_weights(self, path, **kwargs)

    def summary(self) -> str:
        """Darknet-style layer table (see :func:`darknetpy.summary.summary`)."""
        from .summary import summary
        return summary(self.arch)

    def detect(self, image, *, thresh: float | None = None, hier: float = 0.5,
               nms: float = 0.45, letterbox: bool | None = None,
               names: list[str] | None = None) -> list:
        """Detect objects in one image like ``./darknet detect``.

        ``image``: a path, PIL image or uint8 HWC RGB array. ``thresh`` defaults
        to the profile's (pjreddie 0.5, alexeyab 0.25); ``letterbox`` to the
        profile's. Returns :class:`darknetpy.detect.Detection` rows (class id,
        name, prob, objectness, box relative (cx, cy, w, h) and in pixels) in
        Darknet's print order.

        Raises:
            ImageError: unreadable image. DarknetError: not a detector.
        """
        from .detect import Detector
        detector = Detector(self, names=names, thresh=thresh, hier=hier, nms=nms,
                            letterbox=letterbox)
        return detector.detect(image)[0].detections

    def classify(self, image, top: int = 5, *, names: list[str] | None = None,
                 letterbox: bool | None = None) -> list[tuple[int, str, float]]:
        """Top-``top`` classes like ``./darknet classifier predict``:
        ``[(class_id, name, prob 0..1)]`` best first (see :func:`darknetpy.classify.classify`)."""
        from .classify import classify
        return classify(self, image, top, names, letterbox)


def load(cfg: str | os.PathLike, weights: str | os.PathLike | None = None, *,
         profile: str | None = None, width: int | None = None, height: int | None = None,
         device: str | torch.device = "cpu", tree: str | None = None,
         allow_trailing_bytes: bool = False, arithmetic: str = "torch") -> Darknet:
    """Build a Darknet network from a cfg and optionally load its ``.weights``.

    >>> model = load("cfg/yolov3-tiny.cfg", width=224, height=224)   # doctest: +SKIP
    >>> heads = model(torch.rand(1, 3, 224, 224))                    # doctest: +SKIP
    >>> [tuple(h.shape) for h in heads]                              # doctest: +SKIP
    [(1, 255, 7, 7), (1, 255, 14, 14)]

    Args:
        cfg: Darknet ``.cfg`` path.
        weights: Darknet ``.weights`` path, or None for unloaded (zero-bias,
            default-initialised) parameters.
        profile: ``"pjreddie"`` or ``"alexeyab"``; None chooses from the cfg.
        width, height: override ``[net]`` input size (pixels).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        tree: path of a ``.tree`` file for ``tree=`` options.
        allow_trailing_bytes: accept a weights file longer than the cfg needs.
        arithmetic: ``"torch"`` or ``"darknet"`` (see :meth:`Darknet.set_arithmetic`).

    Returns:
        A :class:`Darknet` module in eval mode on ``device``.

    Raises:
        CfgError, WeightsError, DeviceError: bad cfg, weights or device.
    """
    from .gemm import check_arithmetic
    check_arithmetic(arithmetic)
    dev = resolve_device(device)
    arch = parse_architecture(cfg, profile=profile, width=width, height=height, tree=tree)
    model = Darknet(arch).set_arithmetic(arithmetic)
    if weights is not None:
        model.load_weights(weights, allow_trailing_bytes=allow_trailing_bytes)
    return model.eval().requires_grad_(False).to(dev)


__all__ = ["Architecture", "Darknet", "InputError", "load", "parse_architecture",
           "alexeyab_reasons", "parse_cfg"]
