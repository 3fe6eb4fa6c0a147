"""Typed errors of darknetpy.

Every error that bad user input can cause is one of these, carrying where the
problem is (cfg file and line, weights layer and byte counts, image file), so
that the CLI can print one clear line instead of a traceback.
"""
from __future__ import annotations


class DarknetError(Exception):
    """Base class of every error darknetpy raises on bad input."""


class CfgError(DarknetError):
    """A problem in a Darknet ``.cfg`` file.

    Attributes: ``path`` (file), ``line`` (1-based source line or None),
    ``section`` (section type, e.g. ``"route"``), ``index`` (layer index after
    ``[net]``, or None), ``key`` (option name or None).
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 section: str | None = None, index: int | None = None, key: str | None = None):
        self.path, self.line, self.section, self.index, self.key = path, line, section, index, key
        self.message = message
        where = []
        if line is not None:
            where.append(f"{path or '<cfg>'}:{line}")
        elif path is not None:
            where.append(path)
        if section is not None:
            where.append(f"layer {index} [{section}]" if index is not None else f"[{section}]")
        if key is not None:
            where.append(f"key '{key}'")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class WeightsError(DarknetError):
    """A ``.weights`` file that does not fit its cfg.

    Attributes: ``path``, ``layer`` (index or None), ``layer_type``,
    ``expected`` and ``available`` (bytes, or None).
    """

    def __init__(self, message: str, *, path: str | None = None, layer: int | None = None,
                 layer_type: str | None = None, expected: int | None = None,
                 available: int | None = None):
        self.path, self.layer, self.layer_type = path, layer, layer_type
        self.expected, self.available = expected, available
        self.message = message
        where = path or "<weights>"
        if layer is not None:
            where += f": layer {layer} [{layer_type}]"
        super().__init__(f"{where}: {message}")


class ImageError(DarknetError):
    """An image that cannot be read or decoded. Attribute ``path``."""

    def __init__(self, message: str, *, path: str | None = None):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class ReferenceDataError(DarknetError):
    """A reference directory (for ``verify``) that is missing or malformed."""


class OutputError(DarknetError):
    """An output file that cannot be written (missing folder, a directory in the way,
    no permission). Attribute ``path``."""

    def __init__(self, message: str, *, path: str | None = None):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class DeviceError(DarknetError):
    """A requested torch device that is not available (e.g. ``cuda`` without a GPU)."""
