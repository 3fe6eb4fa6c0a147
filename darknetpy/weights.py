"""Darknet ``.weights`` files: header versions, per-layer parameter order, read and write.

Mirrors ``parser.c: load_weights_upto`` / ``save_weights_upto``:

* header: int32 major, minor, revision, then ``seen`` as uint64 when
  ``major*10 + minor >= 2`` (pjreddie also requires major, minor < 1000),
  else int32 — so 0.1.x files have a 16-byte header, 0.2.x a 20-byte one;
* then little-endian float32 blocks, layer by layer in cfg order, each layer
  in its own order (``Darknet.darknet_params``);
* ``[connected]`` weights are stored transposed when major or minor > 1000.

Unlike Darknet (which only warns on a short file and ignores trailing bytes),
a short file is an error naming the layer where it ran out, and trailing
bytes are an error unless ``allow_trailing_bytes``.
"""
from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from .errors import OutputError, WeightsError


@dataclass(frozen=True)
class WeightsHeader:
    """``major.minor.revision`` and ``seen`` (images seen in training)."""

    major: int
    minor: int
    revision: int
    seen: int
    seen_bytes: int  # 8 (uint64) or 4 (int32)

    @property
    def size(self) -> int:
        """Header size in bytes: 20 (0.2+) or 16 (0.1.x)."""
        return 12 + self.seen_bytes

    @property
    def transpose(self) -> bool:
        """Whether ``[connected]`` weights are stored transposed."""
        return self.major > 1000 or self.minor > 1000

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}.{self.revision}"


#: What darknetpy writes when no header is known: AlexeyAB's current 0.2.5, 64-bit ``seen``.
DEFAULT_HEADER = WeightsHeader(0, 2, 5, 0, 8)


def seen_is_64bit(major: int, minor: int, profile: str) -> bool:
    """Darknet's rule for the width of ``seen`` (differs only for majors/minors >= 1000)."""
    if profile == "pjreddie":
        return major * 10 + minor >= 2 and major < 1000 and minor < 1000
    return major * 10 + minor >= 2


def parse_header(data: bytes, profile: str = "alexeyab", path: str | None = None) -> WeightsHeader:
    """Read the header from the start of ``data``.

    Raises:
        WeightsError: fewer bytes than the header needs.
    """
    if len(data) < 12:
        raise WeightsError("too short for a Darknet weights header", path=path, expected=12,
                           available=len(data))
    major, minor, revision = struct.unpack_from("<3i", data, 0)
    wide = seen_is_64bit(major, minor, profile)
    need = 20 if wide else 16
    if len(data) < need:
        raise WeightsError(f"too short for a version {major}.{minor}.{revision} header",
                           path=path, expected=need, available=len(data))
    seen = struct.unpack_from("<Q" if wide else "<i", data, 12)[0]
    return WeightsHeader(major, minor, revision, seen, 8 if wide else 4)


def expected_bytes(model, header_size: int = 20) -> int:
    """Bytes a weights file for ``model`` must have (header + 4 per parameter)."""
    return header_size + 4 * sum(t.numel() for *_, t in model.darknet_params())


def load_weights(model, path: str | os.PathLike, *, allow_trailing_bytes: bool = False
                 ) -> WeightsHeader:
    """Load Darknet weights into ``model`` (a :class:`darknetpy.model.Darknet`) in place.

    Returns:
        The file's :class:`WeightsHeader`.

    Raises:
        WeightsError: unreadable file; a file too short (names the layer and
        parameter where it ran out, expected vs available bytes); trailing
        bytes after the last layer (unless ``allow_trailing_bytes``).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise WeightsError(f"cannot read weights file: {e.strerror}", path=path) from None
    header = parse_header(data, model.profile, path)
    total = expected_bytes(model, header.size)
    offset = header.size
    values = np.frombuffer(data, dtype="<f4", offset=offset,
                           count=(len(data) - offset) // 4)
    pos = 0
    for i, spec, name, tensor in model.darknet_params():
        n = tensor.numel()
        if pos + n > values.size:
            raise WeightsError(
                f"file ends inside this layer's {name} ({tuple(tensor.shape)}, {n * 4} bytes "
                f"from byte {offset + pos * 4}; {len(data) - offset - pos * 4} available); "
                f"the cfg needs {total} bytes in all, the file has {len(data)} "
                "(wrong cfg for these weights, or a truncated download?)",
                path=path, layer=i, layer_type=spec.type, expected=total, available=len(data))
        block = torch.from_numpy(values[pos:pos + n].copy())
        if header.transpose and name == "fc.weight":
            out_f, in_f = tensor.shape
            block = block.view(in_f, out_f).t()  # stored (in, out) -> (out, in)
        with torch.no_grad():
            tensor.copy_(block.reshape(tensor.shape))
        pos += n
    used = offset + pos * 4
    if used != len(data) and not allow_trailing_bytes:
        raise WeightsError(
            f"{len(data) - used} bytes left after the last layer: the cfg needs {total} bytes, "
            f"the file has {len(data)} (wrong cfg for these weights? pass "
            "allow_trailing_bytes=True / --allow-trailing-bytes to ignore them)",
            path=path, expected=total, available=len(data))
    return header


def save_weights(model, path: str | os.PathLike, *, header: WeightsHeader | None = None) -> None:
    """Write ``model``'s parameters as a Darknet ``.weights`` file, atomically.

    Args:
        header: the header to write; default the model's loaded header, else
            0.2.5 with ``seen`` 0 (AlexeyAB's current format, 64-bit ``seen``).
            A header with the transpose flag writes ``[connected]`` weights
            transposed, as Darknet does.

    The file is written to a temporary file in the same folder and renamed.
    """
    path = os.fspath(path)
    header = header or getattr(model, "weights_header", None) or DEFAULT_HEADER
    parts = [struct.pack("<3i", header.major, header.minor, header.revision),
             struct.pack("<Q" if header.seen_bytes == 8 else "<i", header.seen)]
    for _, _, name, tensor in model.darknet_params():
        t = tensor.detach().to("cpu", torch.float32)
        if header.transpose and name == "fc.weight":
            t = t.t()
        parts.append(t.contiguous().numpy().astype("<f4").tobytes())
    atomic_write(path, b"".join(parts))


# The process's umask, read once at import (reading it means setting it, which is not
# thread-safe later on).
_UMASK = os.umask(0)
os.umask(_UMASK)


def publish(tmp: str, path: str) -> None:
    """Rename a finished temporary file onto ``path``, with the permissions a plain
    ``open(path, "w")`` would give (``mkstemp`` makes files private, mode 0600).

    Raises:
        OutputError: the rename failed (e.g. ``path`` is a directory).
    """
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write: {e.strerror}", path=path) from None


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike):
    """Context manager: a temporary file name in ``path``'s folder to write to; when
    the block ends normally it is renamed onto ``path`` (:func:`publish`), otherwise
    removed. Nothing the user had at ``path`` is touched unless everything succeeded.

    Raises:
        OutputError: the folder does not exist or is not writable, or the rename failed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path),
                                   dir=folder)
    except OSError as e:
        raise OutputError(f"cannot write in {folder}: {e.strerror}", path=path) from None
    os.close(fd)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename.

    Raises:
        OutputError: the file cannot be written.
    """
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
