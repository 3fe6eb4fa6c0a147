"""Darknet ``.cfg`` files: text -> sections with line numbers, typed option access.

Mirrors ``parser.c: read_cfg`` and ``option_list.c`` of Darknet:

* every whitespace character of a line is removed (``utils.c: strip``), not only
  at the ends, so ``filters = 32`` and ``filters=32`` are the same;
* lines starting with ``#`` or ``;`` are comments; ``[name]`` opens a section;
  other lines are ``key=value``;
* sections repeat, which is why Python's ``configparser`` cannot read these files.

Where Darknet is lenient we are strict but say where: a ``#`` later in a line is
not a comment for Darknet (``atoi`` just stops early); we strip it and warn. A
key given twice keeps its first value as ``option_find`` does, with a warning.
Keys nobody read are reported (Darknet's "Unused field") by
:func:`warn_unused`, except the training-only keys in :data:`TRAINING_KEYS`.

This module has no torch dependency.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, TypeVar

from .errors import CfgError

log = logging.getLogger("darknetpy")

T = TypeVar("T")

#: Keys Darknet reads only for training (or data augmentation, or the training
#: loss); darknetpy accepts them silently. Keyed by section type; ``"*"`` applies
#: to every section.
TRAINING_KEYS: dict[str, frozenset[str]] = {
    "*": frozenset({"stopbackward", "dontload", "dontloadscales", "learning_rate_scale",
                    "train_only_bn", "onlyforward"}),
    "net": frozenset({
        "batch", "subdivisions", "time_steps", "max_batches", "learning_rate", "momentum",
        "decay", "angle", "saturation", "exposure", "hue", "burn_in", "policy", "steps",
        "scales", "step", "scale", "power", "gamma", "max_crop", "min_crop", "aspect",
        "mosaic", "mosaic_bound", "cutmix", "mixup", "blur", "gaussian_noise", "flip",
        "ema_alpha", "label_smooth_eps", "sgdr_cycle", "sgdr_mult", "track",
        "augment_speed", "max_epochs", "seen", "contrastive", "contrastive_jit_flip",
        "contrastive_color", "adam", "B1", "B2", "eps", "try_fix_nan", "loss_scale",
        "dynamic_minibatch", "optimized_memory", "workspace_size_limit_MB", "burnin_update",
        "random", "letter_box_training", "unsupervised", "rank_normalize", "sequential_subdivisions",
        "attention", "adversarial_lr", "resize_step", "num_sigmas_reject_badlabels",
        "badlabels_rejection_percentage", "equidistant_point", "inputs", "notruth",
        "max_chart_loss", "wait_stream", "center", "clip", "policy_steps", "hue_jitter",
    }),
    "convolutional": frozenset({"assisted_excitation", "stretch", "stretch_sway",
                                "rotate", "sway", "deform", "coordconv", "bin_output",
                                "share_index"}),
    "connected": frozenset(),
    "yolo": frozenset({
        "jitter", "ignore_thresh", "truth_thresh", "iou_thresh", "random", "resize",
        "iou_loss", "iou_normalizer", "cls_normalizer", "obj_normalizer", "delta_normalizer",
        "max_delta", "objectness_smooth", "label_smooth_eps", "focal_loss", "counters_per_class",
        "uc_normalizer", "beta1", "embedding_layer", "track_history_size", "sim_thresh",
        "dets_for_show", "dets_for_track", "track_ciou_norm", "max", "map", "show_details",
        "rescore",
    }),
    "gaussian_yolo": frozenset({
        "jitter", "ignore_thresh", "truth_thresh", "iou_thresh", "random", "resize",
        "iou_loss", "iou_normalizer", "cls_normalizer", "uc_normalizer", "max_delta",
        "yolo_point", "max", "map", "obj_normalizer", "delta_normalizer",
    }),
    "region": frozenset({
        "jitter", "rescore", "object_scale", "noobject_scale", "class_scale", "coord_scale",
        "bias_match", "absolute", "thresh", "random", "map", "max", "focal_loss",
    }),
    "detection": frozenset({"jitter", "rescore", "object_scale", "noobject_scale",
                            "class_scale", "coord_scale", "forced", "random", "reorg"}),
    "cost": frozenset({"type", "scale", "ratio", "noobject_scale", "thresh"}),
    "dropout": frozenset({"probability", "dropblock", "dropblock_size_rel",
                          "dropblock_size_abs"}),
    "softmax": frozenset({"spatial", "noloss"}),
    "crop": frozenset({"flip", "angle", "saturation", "exposure", "shift"}),
    "contrastive": frozenset({"classes", "temperature", "yolo_layer", "cls_normalizer",
                              "max_delta", "contrastive_neg_max"}),
}


@dataclass
class Option:
    """One ``key=value`` line: its raw value text, source line, and whether it was read."""

    value: str
    line: int
    read: bool = False


@dataclass
class Section:
    """One ``[type]`` section of a cfg file.

    ``type`` is the name as written (e.g. ``"convolutional"``, ``"Gaussian_yolo"``);
    ``line`` the 1-based line of its header; ``index`` the layer index (``-1`` for
    ``[net]``); ``options`` maps key -> :class:`Option` in file order.

    The typed getters (:meth:`int`, :meth:`float`, :meth:`str`, :meth:`ints`,
    :meth:`floats`) mark a key as read and raise :class:`CfgError` naming the
    file, line, section and key on a bad or missing value. Omitting ``default``
    makes the key required.
    """

    type: str
    line: int
    path: str | None = None
    index: int = -1
    options: dict[str, Option] = field(default_factory=dict)

    _MISSING = object()

    # -- errors -------------------------------------------------------------
    def error(self, message: str, key: str | None = None) -> CfgError:
        """A :class:`CfgError` located at this section (and at ``key``'s line if given)."""
        line = self.options[key].line if key in self.options else self.line
        return CfgError(message, path=self.path, line=line, section=self.type,
                        index=self.index if self.index >= 0 else None, key=key)

    # -- typed access ---------------------------------------------------------
    def has(self, key: str) -> bool:
        """Whether ``key`` is present (does not mark it read)."""
        return key in self.options

    def _get(self, key: str, default, convert: Callable[[str], T], kind: str) -> T:
        opt = self.options.get(key)
        if opt is None:
            if default is Section._MISSING:
                raise self.error(f"missing required value ({kind})", key)
            return default
        opt.read = True
        try:
            return convert(opt.value)
        except (ValueError, TypeError):
            raise self.error(f"bad value {opt.value!r}: expected {kind}", key) from None

    def int(self, key: str, default=_MISSING) -> int:
        """Integer option (Darknet ``option_find_int``)."""
        return self._get(key, default, _to_int, "an integer")

    def float(self, key: str, default=_MISSING) -> float:
        """Float option (Darknet ``option_find_float``)."""
        return self._get(key, default, _to_float, "a number")

    def str(self, key: str, default=_MISSING) -> str:
        """String option (Darknet ``option_find_str``)."""
        return self._get(key, default, str, "a string")

    def ints(self, key: str, default=_MISSING) -> list[int]:
        """Comma-separated integers, e.g. ``layers=-1,61``."""
        return self._get(key, default, lambda v: [_to_int(x) for x in _split(v)],
                         "comma-separated integers")

    def floats(self, key: str, default=_MISSING) -> list[float]:
        """Comma-separated numbers, e.g. ``anchors=10,13, 16,30``."""
        return self._get(key, default, lambda v: [_to_float(x) for x in _split(v)],
                         "comma-separated numbers")

    def unused_keys(self) -> list[str]:
        """Keys that were never read and are not known training-only keys."""
        known = TRAINING_KEYS["*"] | TRAINING_KEYS.get(_canonical_training_type(self.type),
                                                       frozenset())
        return [k for k, o in self.options.items() if not o.read and k not in known]

    def to_text(self) -> str:
        """The section as cfg text (header plus ``key=value`` lines in file order)."""
        lines = [f"[{self.type}]"] + [f"{k}={o.value}" for k, o in self.options.items()]
        return "\n".join(lines) + "\n"


def _split(value: str) -> list[str]:
    parts = [p for p in value.split(",")]
    if parts and parts[-1] == "":  # Darknet tolerates a trailing comma
        parts.pop()
    if not parts or any(p == "" for p in parts):
        raise ValueError(value)
    return parts


def _to_int(text: str) -> int:
    return int(text, 10)


def _to_float(text: str) -> float:
    value = float(text)
    return value


def _canonical_training_type(section_type: str) -> str:
    aliases = {"network": "net", "conv": "convolutional", "conn": "connected",
               "Gaussian_yolo": "gaussian_yolo", "soft": "softmax"}
    return aliases.get(section_type, section_type)


def parse_cfg(text: str, path: str | None = None) -> list[Section]:
    """Parse cfg text into sections.

    Args:
        text: the whole cfg file.
        path: file name used in error messages.

    Returns:
        The sections in file order; ``[net]``/``[network]`` first with index -1,
        the layers after it numbered from 0 (Darknet's layer indices).

    Raises:
        CfgError: a line outside any section, a malformed line, no ``[net]``
        section first, or no sections at all.
    """
    sections: list[Section] = []
    warned_inline = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = "".join(raw.split())  # Darknet's strip(): drop every whitespace char
        if not line or line[0] in "#;":
            continue
        if "#" in line:
            line = line.split("#", 1)[0]
            if not warned_inline:
                log.warning("%s:%d: text after '#' treated as a comment "
                            "(Darknet would read it as part of the value)", path or "<cfg>", lineno)
                warned_inline = True
        if line[0] == "[":
            if not line.endswith("]") or len(line) < 3:
                raise CfgError(f"malformed section header {raw.strip()!r}", path=path, line=lineno)
            sections.append(Section(type=line[1:-1], line=lineno, path=path))
            continue
        if not sections:
            raise CfgError(f"option outside any section: {raw.strip()!r}", path=path, line=lineno)
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise CfgError(f"expected key=value, got {raw.strip()!r}", path=path, line=lineno,
                           section=sections[-1].type)
        sec = sections[-1]
        if key in sec.options:
            log.warning("%s:%d: [%s] key '%s' given twice; Darknet uses the first value (line %d)",
                        path or "<cfg>", lineno, sec.type, key, sec.options[key].line)
            continue
        sec.options[key] = Option(value=value, line=lineno)
    if not sections:
        raise CfgError("no sections found", path=path, line=None)
    if sections[0].type not in ("net", "network"):
        raise CfgError("the first section must be [net] or [network]", path=path,
                       line=sections[0].line, section=sections[0].type)
    for i, sec in enumerate(sections[1:]):
        sec.index = i
        if sec.type in ("net", "network"):
            raise CfgError("[net] may only appear once, as the first section", path=path,
                           line=sec.line, section=sec.type, index=i)
    return sections


def read_cfg(path: str | os.PathLike) -> list[Section]:
    """Read and parse a cfg file (see :func:`parse_cfg`).

    Raises:
        CfgError: the file cannot be read, or any parse error.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise CfgError(f"cannot read cfg file: {e.strerror}", path=path) from None
    return parse_cfg(text, path=path)


def sections_to_text(sections: Iterable[Section]) -> str:
    """Write sections back to cfg text, one blank line between sections."""
    return "\n".join(s.to_text() for s in sections)


def warn_unused(sections: Iterable[Section]) -> list[tuple[Section, list[str]]]:
    """Log one warning per section with keys nobody read (Darknet's "Unused field").

    Returns the (section, keys) pairs that were reported.
    """
    reported = []
    for sec in sections:
        keys = sec.unused_keys()
        if keys:
            where = f"{sec.path or '<cfg>'}:{sec.line}"
            label = f"layer {sec.index} [{sec.type}]" if sec.index >= 0 else f"[{sec.type}]"
            log.warning("%s: %s: unused field(s): %s", where, label, ", ".join(keys))
            reported.append((sec, keys))
    return reported
