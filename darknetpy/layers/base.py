"""What every layer type shares: the spec base class, the build context, the registry.

Data flow: a cfg :class:`~darknetpy.cfg.Section` plus a :class:`BuildContext`
(input shape, earlier layers' shapes, ``[net]`` values, profile) become a
frozen :class:`LayerSpec` (``from_section``, mirroring Darknet's ``parse_*``
functions and ``size_params``); the spec then builds its ``nn.Module``
(``build``). Shapes and layer indices are resolved here, at build time, never
in ``forward``.

Modules take ``forward(x, refs)``: ``x`` the previous layer's output
``(N, C, H, W)``, ``refs`` the outputs of the layers named in ``spec.refs`` (for
route, shortcut, scale_channels, sam), in that order.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, ClassVar

from torch import Tensor, nn

from ..cfg import Section
from ..errors import CfgError

Shape = tuple  # (C, H, W)

PROFILES = ("pjreddie", "alexeyab")


@dataclass(frozen=True)
class NetSpec:
    """The ``[net]`` section: network input size and options used at inference.

    ``width``/``height`` in pixels, ``channels`` of the input image,
    ``letter_box`` (AlexeyAB: 1 = letterbox at detection time).
    """

    width: int
    height: int
    channels: int
    letter_box: int = 0

    @classmethod
    def from_section(cls, sec: Section, width: int | None = None,
                     height: int | None = None) -> "NetSpec":
        """Read ``[net]``; ``width``/``height`` override the file's values."""
        w = sec.int("width", 0)
        h = sec.int("height", 0)
        c = sec.int("channels", 0)
        w, h = width or w, height or h
        if w <= 0 or h <= 0 or c <= 0:
            raise sec.error("width, height and channels must be set and positive "
                            f"(got width={w} height={h} channels={c})")
        return cls(width=w, height=h, channels=c, letter_box=sec.int("letter_box", 0))


@dataclass
class BuildContext:
    """What a section needs to know while its spec is built (Darknet's ``size_params``).

    ``index``: this layer's index; ``in_shape``: the previous layer's output
    (C, H, W) (the network input for layer 0); ``shapes``: every earlier
    layer's output shape; ``net``; ``cfg_path`` and ``tree_override`` (for
    ``tree=`` files).
    """

    index: int
    in_shape: Shape
    shapes: list
    net: NetSpec
    cfg_path: str | None = None
    tree_override: str | None = None

    def load_tree(self, sec: Section, entries: int):
        """Read the section's ``tree=`` file, if any: ``(path, Tree)`` or ``(None, None)``.

        The path is looked up as given, next to the cfg file (also by its base
        name, since cfgs say ``data/9k.tree``), then in the current directory;
        ``tree_override`` (``load(tree=...)``, CLI ``--tree``) wins over all.

        Raises:
            CfgError: the file is not found or its size does not match ``entries``.
        """
        value = sec.str("tree", None)
        if value is None:
            return None, None
        from ..tree import read_tree
        if self.tree_override:
            candidates = [self.tree_override]
        else:
            base = os.path.dirname(os.path.abspath(self.cfg_path)) if self.cfg_path else os.getcwd()
            candidates = [value, os.path.join(base, value),
                          os.path.join(base, os.path.basename(value))]
        found = next((p for p in candidates if os.path.isfile(p)), None)
        if found is None:
            raise sec.error(f"tree file {value!r} not found (looked at: {', '.join(candidates)}); "
                            "pass its path with tree=... (CLI: --tree FILE)", "tree")
        tree = read_tree(found)
        if tree.n != entries:
            raise sec.error(f"tree file {found} has {tree.n} entries but the layer has "
                            f"{entries} classes", "tree")
        return found, tree

    def resolve(self, sec: Section, key: str, value: int) -> int:
        """Absolute index of a layer named in ``layers=``/``from=``.

        Negative values are relative to this layer, others absolute (Darknet).

        Raises:
            CfgError: the index does not name an earlier layer.
        """
        absolute = self.index + value if value < 0 else value
        if not 0 <= absolute < self.index:
            raise sec.error(f"refers to layer {value} (absolute {absolute}), which is not an "
                            f"earlier layer (this is layer {self.index})", key)
        return absolute


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """Base of every layer spec: where it came from and its shapes.

    Subclasses add their own options (with Darknet's defaults) and implement
    :meth:`from_section` and :meth:`build`.
    """

    index: int
    type: str
    line: int
    in_shape: Shape
    out_shape: Shape
    refs: tuple = ()

    section_names: ClassVar[tuple[str, ...]] = ()
    alexeyab_only: ClassVar[bool] = False

    @classmethod
    def from_section(cls, sec: Section, ctx: BuildContext) -> "LayerSpec":
        raise NotImplementedError

    def build(self, profile: str) -> nn.Module:
        raise NotImplementedError

    @property
    def flops(self) -> float:
        """Floating-point operations of one forward pass (Darknet's BFLOPs × 1e9)."""
        return 0.0

    @property
    def has_weights(self) -> bool:
        return False

    def describe(self) -> tuple[str, str]:
        """(filters column, size/stride column) for the ``info`` table."""
        return "", ""


    @staticmethod
    def base_fields(sec: Section, ctx: BuildContext, out_shape: Shape, refs=()) -> dict:
        return dict(index=ctx.index, type=sec.type, line=sec.line, in_shape=ctx.in_shape,
                    out_shape=tuple(out_shape), refs=tuple(refs))

    def replace(self, **changes) -> "LayerSpec":
        return dataclasses.replace(self, **changes)


class LayerModule(nn.Module):
    """Base of layer modules: ``forward(x, refs) -> Tensor`` (N, C, H, W)."""

    def forward(self, x: Tensor, refs: list[Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError


#: section name as written in cfg files -> spec class (Darknet's ``string_to_layer_type``).
REGISTRY: dict[str, type[LayerSpec]] = {}

#: layer types Darknet has but darknetpy does not implement (training-time or
#: recurrent layers); a cfg using one gets a clear error.
UNSUPPORTED = {"rnn", "gru", "lstm", "crnn", "conv_lstm", "history", "local", "detection",
               "normalization", "lrn", "contrastive", "implicit_add", "implicit_mul", "silence"}


def register(*names: str) -> Callable[[type[LayerSpec]], type[LayerSpec]]:
    """Class decorator: map section names (and aliases) to a spec class.

    Raises:
        ValueError: a name registered twice.
    """
    def deco(cls: type[LayerSpec]) -> type[LayerSpec]:
        for name in names:
            if name in REGISTRY:
                raise ValueError(f"section name [{name}] registered twice")
            REGISTRY[name] = cls
        cls.section_names = names
        return cls
    return deco


def spec_for_section(sec: Section) -> type[LayerSpec]:
    """The spec class for a section.

    Raises:
        CfgError: unknown or unsupported section type (names file, line, section).
    """
    cls = REGISTRY.get(sec.type)
    if cls is not None:
        return cls
    if sec.type.lower() in UNSUPPORTED:
        raise sec.error(f"Darknet layer type [{sec.type}] is not supported by darknetpy")
    raise sec.error(f"unknown section type [{sec.type}]; known: "
                    + ", ".join(f"[{n}]" for n in sorted(REGISTRY)))


def activation_name(sec: Section, default: str) -> str:
    """Read ``activation=`` and check it against the activation table.

    Raises:
        CfgError: unknown activation (Darknet would silently use relu).
    """
    from .activations import ACTIVATIONS
    name = sec.str("activation", default)
    if name not in ACTIVATIONS:
        raise sec.error(f"unknown activation {name!r} (Darknet would silently use relu); "
                        f"known: {', '.join(sorted(ACTIVATIONS))}", "activation")
    return name


def positive(sec: Section, key: str, value: int) -> int:
    """Check an option is > 0; returns it."""
    if value <= 0:
        raise sec.error(f"must be positive, got {value}", key)
    return value


def check(cond: bool, sec: Section, message: str, key: str | None = None) -> None:
    """Raise a located :class:`CfgError` unless ``cond``."""
    if not cond:
        raise sec.error(message, key)


__all__ = ["Shape", "NetSpec", "BuildContext", "LayerSpec", "LayerModule", "REGISTRY",
           "register", "spec_for_section", "activation_name", "positive", "check", "PROFILES",
           "CfgError"]
