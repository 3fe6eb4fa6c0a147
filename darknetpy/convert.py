"""Weights conversion between Darknet ``.weights``, PyTorch ``.pt`` and ``.safetensors``.

>>> from darknetpy.convert import convert                                  # doctest: +SKIP
>>> convert("yolov4-tiny.weights", "yolov4-tiny.pt", cfg="yolov4-tiny.cfg")  # doctest: +SKIP
>>> convert("yolov4-tiny.pt", "back.weights", cfg="yolov4-tiny.cfg")         # doctest: +SKIP

Formats (chosen by the file extension):

* ``.weights``: Darknet's file (:mod:`darknetpy.weights`); reading or writing one needs
  the cfg, which fixes the parameter order.
* ``.pt``/``.pth``: ``torch.save`` of the model's ``state_dict()`` (keys like
  ``layers.12.conv.weight``), loadable with
  ``model.load_state_dict(torch.load(path, weights_only=True))``. The Darknet header is
  kept in the state dict's own metadata, ``state_dict._metadata["darknetpy"]`` (the
  attribute where PyTorch keeps per-module versions; ``torch.save``/``torch.load``
  preserve it and ``load_state_dict`` ignores keys that name no module), as
  ``{"format": "darknetpy.state_dict", "format_version": 1, "header": {"major",
  "minor", "revision", "seen", "seen_bytes"}, "profile", "cfg"}``.
* ``.safetensors``: the same tensors; the same dict, JSON-encoded, in the file's string
  metadata under ``"darknetpy"`` (plus ``"format": "pt"``).

The header: written ``.weights`` files keep the source's header when it is known, so
``.weights -> .pt -> .weights`` (or via ``.safetensors``) is byte-identical, 0.1.x files
(16-byte header, 32-bit ``seen``) included. Without a known header (a ``.pt`` from
elsewhere) 0.2.5 with a 64-bit ``seen`` of 0 is written (AlexeyAB's current format).
``header_version="0.2.5"`` (or any ``"MAJOR.MINOR.REVISION"``) rewrites the header
(``seen`` kept; its width follows Darknet's rule for that version); it applies to the
metadata of ``.pt``/``.safetensors`` outputs too.
"""
from __future__ import annotations

import io
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .errors import DarknetError
from .weights import DEFAULT_HEADER, WeightsHeader, atomic_write, seen_is_64bit

#: file extension -> format name
FORMATS = {".weights": "darknet", ".pt": "torch", ".pth": "torch", ".safetensors": "safetensors"}
META_KEY = "darknetpy"
META_FORMAT = "darknetpy.state_dict"
META_VERSION = 1

__all__ = ["convert", "ConvertReport", "ConvertError", "read_state", "write_state",
           "weights_format", "parse_header_version", "FORMATS"]


class ConvertError(DarknetError):
    """A conversion that cannot be done: unknown format, missing cfg, tensors that do
    not fit the cfg, an unreadable file, a header that cannot hold ``seen``."""

    def __init__(self, message: str, *, path: str | None = None):
        self.path, self.message = path, message
        super().__init__(f"{path}: {message}" if path else message)


@dataclass
class ConvertReport:
    """``src``/``dst`` paths and formats, the ``header`` written (None if unknown),
    ``tensors`` (state-dict entries), ``parameters`` (floats), ``bytes`` written and
    ``notes``."""

    src: str
    dst: str
    src_format: str
    dst_format: str
    header: WeightsHeader | None
    tensors: int
    parameters: int
    bytes: int
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        h = f"header {self.header.version} (seen {self.header.seen})" if self.header else \
            "no header"
        lines = [f"{self.src} ({self.src_format}) -> {self.dst} ({self.dst_format}): "
                 f"{self.tensors} tensors, {self.parameters} values, {self.bytes} bytes, {h}"]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def weights_format(path: str | os.PathLike) -> str:
    """``"darknet"``, ``"torch"`` or ``"safetensors"`` from the extension.

    Raises:
        ConvertError: another extension.
    """
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in FORMATS:
        raise ConvertError(f"unknown weights format {ext or '(no extension)'!r}; use one of "
                           f"{', '.join(FORMATS)}", path=os.fspath(path))
    return FORMATS[ext]


_VERSION = re.compile(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?\s*$")


def parse_header_version(version, seen: int = 0, profile: str = "alexeyab") -> WeightsHeader:
    """A header for ``version`` (``"0.2.5"``, ``"0.1.0"``, a ``(major, minor, revision)``
    tuple, or a :class:`WeightsHeader`, returned as is) carrying ``seen``.

    Raises:
        ConvertError: unparsable version, or ``seen`` too large for a 32-bit header.
    """
    if isinstance(version, WeightsHeader):
        return version
    if isinstance(version, str):
        m = _VERSION.match(version)
        if not m:
            raise ConvertError(f"header version {version!r} is not MAJOR.MINOR.REVISION "
                               "(e.g. 0.2.5)")
        major, minor, revision = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    else:
        try:
            major, minor, revision = (int(v) for v in version)
        except (TypeError, ValueError):
            raise ConvertError(f"header version {version!r} is not MAJOR.MINOR.REVISION") \
                from None
    if not all(0 <= v < 2 ** 31 for v in (major, minor, revision)):
        raise ConvertError(f"header version {major}.{minor}.{revision} out of range")
    wide = seen_is_64bit(major, minor, profile)
    limit = 2 ** 64 if wide else 2 ** 31
    if not 0 <= seen < limit:
        raise ConvertError(f"seen={seen} does not fit the {'64' if wide else '32'}-bit field of "
                           f"a {major}.{minor}.{revision} header")
    return WeightsHeader(major, minor, revision, int(seen), 8 if wide else 4)


def _header_meta(header: WeightsHeader | None, profile: str | None, cfg) -> dict:
    return {"format": META_FORMAT, "format_version": META_VERSION,
            "header": None if header is None else {
                "major": header.major, "minor": header.minor, "revision": header.revision,
                "seen": header.seen, "seen_bytes": header.seen_bytes},
            "profile": profile, "cfg": os.path.basename(os.fspath(cfg)) if cfg else None}


def _header_from_meta(meta, path: str) -> WeightsHeader | None:
    if not isinstance(meta, dict) or meta.get("header") is None:
        return None
    h = meta["header"]
    try:
        return WeightsHeader(int(h["major"]), int(h["minor"]), int(h["revision"]),
                             int(h["seen"]), int(h["seen_bytes"]))
    except (KeyError, TypeError, ValueError):
        raise ConvertError(f"malformed darknetpy header metadata: {h!r}", path=path) from None


def _build(cfg, profile, tree):
    from .model import Darknet, parse_architecture
    return Darknet(parse_architecture(cfg, profile=profile, tree=tree, warn=False)).eval()


def read_state(path: str | os.PathLike, cfg=None, *, profile: str | None = None,
               allow_trailing_bytes: bool = False, tree: str | None = None):
    """Read any supported weights file.

    Returns ``(state_dict, header, meta)``: an ``OrderedDict`` of CPU tensors (keys as
    ``Darknet.state_dict()``), the Darknet :class:`WeightsHeader` (None when the file
    does not record one), and the darknetpy metadata dict (``{}`` if none).

    Raises:
        ConvertError: unknown format, ``.weights`` without a cfg, unreadable file.
        WeightsError, CfgError: a ``.weights`` file that does not fit the cfg.
    """
    return _read(os.fspath(path), cfg, profile, allow_trailing_bytes, tree)[:3]


def _read(path: str, cfg, profile: str | None, allow_trailing_bytes: bool, tree: str | None):
    """:func:`read_state`'s ``(state_dict, header, meta)`` plus the model the state dict
    belongs to (a ``.weights`` source, loaded into the cfg's model), else None."""
    fmt = weights_format(path)
    if not os.path.isfile(path):
        raise ConvertError("file not found", path=path)
    if fmt == "darknet":
        if cfg is None:
            raise ConvertError("reading a .weights file needs its cfg (cfg=...)", path=path)
        model = _build(cfg, profile, tree)
        header = model.load_weights(path, allow_trailing_bytes=allow_trailing_bytes)
        # the model's own (detached) tensors, in a plain OrderedDict: no copies
        sd = OrderedDict(model.state_dict())
        return sd, header, _header_meta(header, model.profile, cfg), model
    if fmt == "torch":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure
            raise ConvertError(f"cannot read as a PyTorch state dict: {e}", path=path) from None
        meta = getattr(obj, "_metadata", None) or {}
        meta = meta.get(META_KEY, {}) if isinstance(meta, dict) else {}
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            outer = obj
            obj = obj["state_dict"]
            inner = getattr(obj, "_metadata", None) or {}
            meta = inner.get(META_KEY) or outer.get(META_KEY) or meta
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ConvertError("not a state dict (a mapping of names to tensors)", path=path)
        return OrderedDict(obj), _header_from_meta(meta, path), dict(meta), None
    try:
        from safetensors import safe_open
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            raw = f.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise ConvertError(f"cannot read as safetensors: {e}", path=path) from None
    meta = {}
    if META_KEY in raw:
        try:
            meta = json.loads(raw[META_KEY])
        except ValueError:
            raise ConvertError("malformed darknetpy metadata", path=path) from None
    return OrderedDict(tensors), _header_from_meta(meta, path), meta, None


def _fit(sd: "OrderedDict[str, torch.Tensor]", model, path: str) -> None:
    """Load ``sd`` into ``model`` strictly; a located ConvertError on any mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} (cfg: {tuple(own[k].shape)})" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:5])}"
                         f"{', ...' if len(unexpected) > 5 else ''})")
        if shapes:
            parts.append(f"wrong shape: {'; '.join(shapes[:5])}"
                         f"{'; ...' if len(shapes) > 5 else ''}")
        raise ConvertError("tensors do not fit the cfg: " + ", ".join(parts), path=path)
    with torch.no_grad():
        model.load_state_dict(sd, strict=True)


def write_state(path: str | os.PathLike, sd, header: WeightsHeader | None, *, cfg=None,
                profile: str | None = None, tree: str | None = None) -> int:
    """Write ``sd`` (a state dict) to ``path`` in the format of its extension, atomically;
    returns the bytes written. ``header``: the Darknet header (``.weights``: written,
    default 0.2.5; ``.pt``/``.safetensors``: recorded in the metadata).

    Raises:
        ConvertError: unknown format, ``.weights`` without a cfg, tensors that do not
            fit the cfg.
    """
    path = os.fspath(path)
    fmt = weights_format(path)
    return _write(path, fmt, sd, header, _model_for(path, fmt, sd, cfg, profile, tree), cfg,
                  profile)


def _model_for(path: str, fmt: str, sd, cfg, profile: str | None, tree: str | None):
    """The cfg's model holding ``sd`` (checked by :func:`_fit`) when writing ``fmt`` needs one
    or a cfg is given to check against; else None."""
    if fmt != "darknet" and cfg is None:
        return None
    if cfg is None:
        raise ConvertError("writing a .weights file needs its cfg (cfg=...)", path=path)
    model = _build(cfg, profile, tree)
    _fit(sd, model, path)
    return model


def _write(path: str, fmt: str, sd, header: WeightsHeader | None, model, cfg,
           profile: str | None) -> int:
    """:func:`write_state` once ``model`` (from :func:`_model_for`, or the one ``sd`` was read
    from) is known."""
    if model is not None:
        profile = model.profile
    if fmt == "darknet":
        from .weights import save_weights
        save_weights(model, path, header=header or DEFAULT_HEADER)
        return os.path.getsize(path)
    meta = _header_meta(header, profile, cfg)
    if fmt == "torch":
        out = OrderedDict((k, v.detach().cpu()) for k, v in sd.items())
        base = getattr(sd, "_metadata", None)
        extra = OrderedDict(base) if isinstance(base, dict) else OrderedDict()
        extra[META_KEY] = meta
        out._metadata = extra  # type: ignore[attr-defined]
        buf = io.BytesIO()
        torch.save(out, buf)
        data = buf.getvalue()
    else:
        from safetensors.torch import save
        tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
        data = save(tensors, metadata={"format": "pt", META_KEY: json.dumps(meta)})
    atomic_write(path, data)
    return len(data)


def convert(src: str | os.PathLike, dst: str | os.PathLike, cfg: str | os.PathLike | None = None,
            *, header_version=None, profile: str | None = None,
            allow_trailing_bytes: bool = False, tree: str | None = None) -> ConvertReport:
    """Convert weights between ``.weights``, ``.pt`` and ``.safetensors`` (by extension).

    Args:
        src, dst: input and output files (``dst`` is written atomically, replacing it).
        cfg: the Darknet cfg; needed when either side is ``.weights`` (it fixes the
            parameter order); when given for ``.pt``/``.safetensors`` the tensors are
            checked against it.
        header_version: None keeps the source's header (0.2.5, ``seen`` 0 when it has
            none); ``"0.2.5"`` (any ``"MAJOR.MINOR.REVISION"``) rewrites it, keeping
            ``seen``; e.g. an old 0.1 file becomes a 0.2.5 one (20-byte header).
        profile: ``"pjreddie"``/``"alexeyab"`` (only affects the width of ``seen`` for
            majors/minors >= 1000); None chooses from the cfg.
        allow_trailing_bytes: accept a ``.weights`` source longer than the cfg needs
            (the extra bytes are not carried over).
        tree: ``.tree`` file for cfgs with ``tree=`` options.

    Returns:
        A :class:`ConvertReport`.

    Raises:
        ConvertError, WeightsError, CfgError.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    src_fmt, dst_fmt = weights_format(src), weights_format(dst)
    if dst_fmt == "darknet" and cfg is None:
        raise ConvertError("writing a .weights file needs its cfg (cfg=...)", path=dst)
    sd, header, meta, model = _read(src, cfg, profile, allow_trailing_bytes, tree)
    profile = profile or meta.get("profile")
    notes = []
    if header_version is not None:
        seen = header.seen if header is not None else 0
        new = parse_header_version(header_version, seen, profile or "alexeyab")
        if header is not None and new != header:
            notes.append(f"header rewritten: {header.version} ({header.size} bytes) -> "
                         f"{new.version} ({new.size} bytes), seen {seen}")
        header = new
    elif header is None:
        notes.append(f"{src} records no Darknet header" + (
            f"; writing {DEFAULT_HEADER.version} with seen 0" if dst_fmt == "darknet" else ""))
        if dst_fmt == "darknet":
            header = DEFAULT_HEADER
    elif header.seen_bytes == 4 and dst_fmt == "darknet":
        notes.append(f"old {header.version} header kept (16 bytes, 32-bit seen); pass "
                     "header_version='0.2.5' to rewrite it")
    if model is None:  # a .weights source is already in its cfg's model
        model = _model_for(dst, dst_fmt, sd, cfg, profile, tree)
    nbytes = _write(dst, dst_fmt, sd, header, model, cfg, profile)
    return ConvertReport(src=src, dst=dst, src_format=src_fmt, dst_format=dst_fmt, header=header,
                         tensors=len(sd), parameters=sum(v.numel() for v in sd.values()),
                         bytes=nbytes, notes=notes)
