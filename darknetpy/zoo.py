"""Official Darknet models by name: their cfg, and their weights downloaded once into a cache.

>>> from darknetpy.zoo import resolve_model                    # doctest: +SKIP
>>> cfg, weights = resolve_model("yolov3")                     # doctest: +SKIP

``MODELS`` maps a name to a :class:`ModelInfo` (cfg file name, weights file name, URL, size in
bytes, sha256 or None, class-names key). The facts come from ``weights/README.md``; sizes
are in bytes, sha256 is given only where a source publishes it.

Cache: ``$DARKNETPY_HOME`` if set, else ``~/.cache/darknetpy``; weights live in
``<cache>/weights/<file>``. A machine without internet access can use the zoo by putting the
file there by hand (the error message of a failed download names the exact path).
"""
from __future__ import annotations

import difflib
import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

from .errors import DarknetError

__all__ = ["ModelInfo", "MODELS", "SIZE_COMPUTED", "DownloadError", "UnknownModelError",
           "cache_dir", "weights_path", "cfg_path", "model_info", "download", "resolve_model",
           "acceptable_sizes"]

log = logging.getLogger(__name__)

HOME_ENV = "DARKNETPY_HOME"
CHUNK = 1 << 20          # bytes per read
MAX_ATTEMPTS = 3         # attempts per download; a retry happens only after bytes arrived


class ModelInfo(NamedTuple):
    """One official model. ``size`` in bytes (None: unknown); ``sha256`` lowercase hex or None;
    ``classes``: which class-names list it predicts (``coco``, ``voc``, ``9k``, ``imagenet``)."""

    cfg: str
    weights: str
    url: str
    size: int | None
    sha256: str | None
    classes: str


_PJ = "https://pjreddie.com/media/files/"
_AB = "https://github.com/AlexeyAB/darknet/releases/download/"

# From weights/README.md, "Official weights for the cfgs in cfg/".
MODELS: dict[str, ModelInfo] = {
    "yolov3": ModelInfo("yolov3.cfg", "yolov3.weights", _PJ + "yolov3.weights", 248007048,
                        "523e4e69e1d015393a1b0a441cef1d9c7659e3eb2d7e15f793f060a21b32f297", "coco"),
    "yolov3-tiny": ModelInfo("yolov3-tiny.cfg", "yolov3-tiny.weights", _PJ + "yolov3-tiny.weights",
                             35434956,
                             "dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c",
                             "coco"),
    "yolov3-spp": ModelInfo("yolov3-spp.cfg", "yolov3-spp.weights", _PJ + "yolov3-spp.weights",
                            252209544, None, "coco"),
    "yolov2": ModelInfo("yolov2.cfg", "yolov2.weights", _PJ + "yolov2.weights", 203934260,
                        "d9945162ed6f54ce1a901e3ec537bdba4d572ecae7873087bd730e5a7942df3f", "coco"),
    "yolov2-tiny": ModelInfo("yolov2-tiny.cfg", "yolov2-tiny.weights", _PJ + "yolov2-tiny.weights",
                             44948600,
                             "16f4e870f1aed83f0089cb69bfda6b53cb7b2a4a01721be56eaf5c899dfac45f",
                             "coco"),
    "yolov2-voc": ModelInfo("yolov2-voc.cfg", "yolov2-voc.weights", _PJ + "yolov2-voc.weights",
                            202704264, None, "voc"),
    "yolov2-tiny-voc": ModelInfo("yolov2-tiny-voc.cfg", "yolov2-tiny-voc.weights",
                                 _PJ + "yolov2-tiny-voc.weights", 63471560, None, "voc"),
    "yolo9000": ModelInfo("yolo9000.cfg", "yolo9000.weights", _PJ + "yolo9000.weights",
                          195230024, None, "9k"),
    "yolov4": ModelInfo("yolov4.cfg", "yolov4.weights",
                        _AB + "darknet_yolo_v3_optimal/yolov4.weights", 257717640,
                        "e8a4f6c62188738d86dc6898d82724ec0964d0eb9d2ae0f0a9d53d65d108d562", "coco"),
    "yolov4-tiny": ModelInfo("yolov4-tiny.cfg", "yolov4-tiny.weights",
                             _AB + "darknet_yolo_v4_pre/yolov4-tiny.weights", 24251276,
                             "cf9fbfd0f6d4869b35762f56100f50ed05268084078805f0e7989efe5bb8ca87",
                             "coco"),
    "yolov4-csp": ModelInfo("yolov4-csp.cfg", "yolov4-csp.weights",
                            _AB + "darknet_yolo_v4_pre/yolov4-csp.weights", 211944840, None,
                            "coco"),
    "yolov7-tiny": ModelInfo("yolov7-tiny.cfg", "yolov7-tiny.weights",
                             _AB + "yolov4/yolov7-tiny.weights", 24967560, None, "coco"),
    "yolov7": ModelInfo("yolov7.cfg", "yolov7.weights", _AB + "yolov4/yolov7.weights", 147898248,
                        None, "coco"),
    "darknet53": ModelInfo("darknet53.cfg", "darknet53.weights", _PJ + "darknet53.weights",
                           166582580, None, "imagenet"),
    "darknet19": ModelInfo("darknet19.cfg", "darknet19.weights", _PJ + "darknet19.weights",
                           83427124, None, "imagenet"),
    "tiny": ModelInfo("tiny.cfg", "tiny.weights", _PJ + "tiny.weights", 4185968, None, "imagenet"),
}

# Models whose size is computed from the cfg (weights/README.md, "C") assuming a 20-byte
# (version 0.2) header rather than published or measured. An older file with a 16-byte
# (version 0.1) header is 4 bytes smaller and just as valid, so for these a file of
# ``size - 4`` bytes is accepted when its own header says version 0.1.
SIZE_COMPUTED = frozenset({"yolov3-spp", "yolov2-voc", "yolov2-tiny-voc", "yolo9000",
                           "darknet53", "darknet19", "yolov4-csp", "yolov7-tiny", "yolov7"})


class DownloadError(DarknetError):
    """A weights download that failed or produced a wrong file.

    Attributes: ``name`` (model), ``url``, ``path`` (the final cache path), ``expected_size``
    and ``actual_size`` (bytes, or None), ``expected_sha256`` and ``actual_sha256`` (or None).
    """

    def __init__(self, message: str, *, name: str | None = None, url: str | None = None,
                 path: os.PathLike | str | None = None, expected_size: int | None = None,
                 actual_size: int | None = None, expected_sha256: str | None = None,
                 actual_sha256: str | None = None):
        self.name, self.url, self.path = name, url, path
        self.expected_size, self.actual_size = expected_size, actual_size
        self.expected_sha256, self.actual_sha256 = expected_sha256, actual_sha256
        self.message = message
        super().__init__(message)


class UnknownModelError(DarknetError):
    """A model name that is not in :data:`MODELS`. Attributes ``name``, ``known``."""

    def __init__(self, name: str):
        self.name = name
        self.known = sorted(MODELS)
        close = difflib.get_close_matches(name, self.known, n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        self.message = (f"unknown model {name!r}{hint}; known models: {', '.join(self.known)}. "
                        "To use your own model, give a .cfg file and a .weights file")
        super().__init__(self.message)


def model_info(name: str) -> ModelInfo:
    """The :data:`MODELS` entry of ``name``.

    Raises:
        UnknownModelError: ``name`` is not a known model (the message lists the known ones).
    """
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise UnknownModelError(str(name)) from None


def cache_dir() -> Path:
    """The cache root: ``$DARKNETPY_HOME`` (``~`` expanded) if set and non-empty, else
    ``~/.cache/darknetpy``. Not created here."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "darknetpy"


def weights_path(name: str) -> Path:
    """Where the weights of model ``name`` are (or will be) cached: ``<cache>/weights/<file>``.

    Raises:
        UnknownModelError: unknown ``name``.
    """
    return cache_dir() / "weights" / model_info(name).weights


def _cfg_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [here / "cfg", here.parent / "cfg"]


def cfg_path(name: str) -> Path:
    """The cfg file of model ``name`` (or a cfg file name such as ``"yolov3-voc.cfg"``).

    Looked up in the package data folder ``darknetpy/cfg/`` first, then in the repository's
    ``cfg/`` next to the package (a source checkout).

    Raises:
        UnknownModelError: ``name`` is neither a known model nor a ``.cfg`` file name.
        DarknetError: the cfg file is in neither folder.
    """
    if name in MODELS:
        filename = MODELS[name].cfg
    elif isinstance(name, str) and name.endswith(".cfg") and os.path.basename(name) == name:
        filename = name
    else:
        raise UnknownModelError(str(name))
    dirs = _cfg_dirs()
    for d in dirs:
        path = d / filename
        if path.is_file():
            return path
    raise DarknetError(f"cfg file {filename} of model {name!r} not found (looked in "
                       f"{', '.join(str(d) for d in dirs)}); the darknetpy installation is "
                       "incomplete: reinstall it, or pass a .cfg file path instead of a model name")


def acceptable_sizes(name: str) -> set[int]:
    """The file sizes (bytes) accepted for model ``name``'s weights: ``{size}``, plus
    ``size - 4`` for :data:`SIZE_COMPUTED` models (a version-0.1 header); empty if unknown."""
    info = model_info(name)
    if info.size is None:
        return set()
    return {info.size, info.size - 4} if name in SIZE_COMPUTED else {info.size}


def _header_bytes(path: Path) -> int | None:
    """20 or 16: the header size the file's own version implies (None: too short)."""
    from .weights import parse_header
    with open(path, "rb") as f:
        head = f.read(20)
    try:
        return parse_header(head, "pjreddie", str(path)).size
    except DarknetError:
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _problem(name: str, path: Path) -> tuple[str, int, str | None] | None:
    """Why ``path`` is not a valid copy of ``name``'s weights, or None if it is.

    Returns ``(reason, actual_size, actual_sha256 or None)``.
    """
    info = MODELS[name]
    size = path.stat().st_size
    sizes = acceptable_sizes(name)
    if sizes and size not in sizes:
        return f"size {size} bytes, expected {info.size}", size, None
    if info.size is not None and size == info.size - 4 and name in SIZE_COMPUTED \
            and _header_bytes(path) != 16:
        return (f"size {size} bytes, expected {info.size} (or {size} only with a version 0.1 "
                "header, which this file does not have)"), size, None
    if info.sha256:
        digest = _sha256(path)
        if digest != info.sha256.lower():
            return f"sha256 {digest}, expected {info.sha256}", size, digest
    return None


def _manual_hint(name: str, url: str, path: Path) -> str:
    info = MODELS[name]
    facts = []
    if info.size is not None:
        facts.append(f"{info.size} bytes")
    if info.sha256:
        facts.append(f"sha256 {info.sha256}")
    extra = f" ({', '.join(facts)})" if facts else ""
    if url != info.url:
        url = f"{url} (or the official {info.url})"
    return (f"To install it by hand, fetch {url} on a machine with internet access and put it "
            f"at {path}{extra}; or set {HOME_ENV} to a folder whose weights/ subfolder holds it")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) of a ``Content-Range: bytes a-b/total`` header."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    return (int(m.group(1)) if m.group(1) else None,
            int(m.group(2)) if m.group(2) != "*" else None)


def _user_agent() -> str:
    from . import __version__
    return f"darknetpy/{__version__} (+python urllib)"


def download(name: str, *, progress: bool = True, url: str | None = None,
             timeout: float = 30) -> Path:
    """Download (once) the official weights of model ``name``; return their cache path.

    If ``<cache>/weights/<file>`` already exists with the right size (and sha256, when one is
    published) it is returned without any network access. Otherwise the file is fetched into
    ``<file>.part`` next to it: an existing ``.part`` is resumed with an HTTP ``Range`` request
    (a server that ignores Range, answering 200, makes it start again from byte 0); a transfer
    cut off after some bytes arrived is retried (resuming) up to 3 attempts in all, and the
    ``.part`` is kept for the next call if that does not suffice. The finished file is checked
    (size, sha256 when known) and then atomically renamed into place. Two processes must not
    download the same model into the same cache at the same time.

    Args:
        name: a key of :data:`MODELS`.
        progress: show a tqdm progress bar (bytes) on stderr.
        url: download from here instead of the official URL (a mirror; tests).
        timeout: seconds to wait for the connection and for each read.

    Raises:
        UnknownModelError: ``name`` is not in :data:`MODELS`.
        DownloadError: the server cannot be reached (offline, refused, timed out, HTTP error)
            — the message names the URL and the exact path where the file can be put by hand;
            the transfer stopped early; or the file has the wrong size or sha256 (the ``.part``
            is then deleted and the message gives expected and actual values).
    """
    info = model_info(name)
    url = url or info.url
    final = weights_path(name)
    if final.is_file():
        problem = _problem(name, final)
        if problem is None:
            return final
        log.warning("%s: %s; downloading it again", final, problem[0])
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    sizes = acceptable_sizes(name)

    for attempt in range(1, MAX_ATTEMPTS + 1):
        if _complete_part(name, part, sizes):   # checked (hashed) once, here
            os.replace(part, final)
            return final
        received = _fetch(name, url, part, final, sizes, progress, timeout)
        if received is None:           # complete
            break
        if received == 0 or attempt == MAX_ATTEMPTS:
            have = part.stat().st_size if part.exists() else 0
            raise DownloadError(
                f"download of {info.weights} from {url} was interrupted after {have} of "
                f"{info.size if info.size is not None else '?'} bytes ({received.reason}); "
                f"the partial file {part} is kept and the next download resumes it. "
                + _manual_hint(name, url, final),
                name=name, url=url, path=final, expected_size=info.size, actual_size=have)
        log.info("download of %s interrupted (%s); resuming (attempt %d of %d)", info.weights,
                 received.reason, attempt + 1, MAX_ATTEMPTS)

    problem = _problem(name, part)
    if problem is not None:
        reason, actual_size, actual_sha = problem
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"downloaded {info.weights} from {url} is not the expected file: {reason}; the "
            "download was deleted. If the server is a mirror, check it; "
            + _manual_hint(name, url, final),
            name=name, url=url, path=final, expected_size=info.size, actual_size=actual_size,
            expected_sha256=info.sha256, actual_sha256=actual_sha)
    os.replace(part, final)
    return final


def _complete_part(name: str, part: Path, sizes: set[int]) -> bool:
    """Whether an earlier attempt (or call) already left the whole, valid file in ``part``;
    a ``part`` of a valid size that fails the checks is deleted."""
    if not (part.is_file() and part.stat().st_size in sizes):
        return False
    if _problem(name, part) is None:
        return True
    part.unlink()
    return False


class _Interrupted(int):
    """Bytes received by an attempt that ended early, with the reason."""

    reason: str

    def __new__(cls, n: int, reason: str):
        obj = super().__new__(cls, n)
        obj.reason = reason
        return obj


def _fetch(name: str, url: str, part: Path, final: Path, sizes: set[int], progress: bool,
           timeout: float) -> _Interrupted | None:
    """One attempt: append to (or restart) ``part``. None when the server sent it all,
    else the bytes received this time (with ``.reason``). Raises DownloadError when the
    server cannot be reached or offers a file of the wrong size."""
    from tqdm import tqdm

    info = MODELS[name]
    start = part.stat().st_size if part.is_file() else 0
    if sizes and start > max(sizes):
        part.unlink()
        start = 0
    headers = {"User-Agent": _user_agent(), "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)

    def unreachable(reason: object) -> DownloadError:
        return DownloadError(
            f"could not download {info.weights} from {url}: {reason}. "
            + _manual_hint(name, url, final),
            name=name, url=url, path=final, expected_size=info.size,
            expected_sha256=info.sha256)

    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and start:
            _, total = _content_range(e.headers.get("Content-Range"))
            if total == start:         # the .part was already complete
                return None
            part.unlink(missing_ok=True)
            return _Interrupted(1, "server refused to resume the partial file; restarting")
        raise unreachable(f"HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise unreachable(e.reason) from e
    except (OSError, http.client.HTTPException) as e:   # timeouts, resets
        raise unreachable(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from e

    with response:
        status = getattr(response, "status", 200)
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        total = None
        if status == 206:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != start:         # not the range we asked for: start again
                part.unlink(missing_ok=True)
                return _Interrupted(1, "server answered a different byte range; restarting")
        else:                          # 200: server ignored Range; rewrite from byte 0
            start = 0
            total = length
        if sizes and total is not None and total not in sizes:
            part.unlink(missing_ok=True)
            kind = response.headers.get("Content-Type") or "unknown type"
            raise DownloadError(
                f"the server at {response.geturl()} offers {total} bytes ({kind}) for "
                f"{info.weights}, expected {info.size}; nothing was kept (a moved link that now "
                "points to a web page looks like this). " + _manual_hint(name, url, final),
                name=name, url=url, path=final, expected_size=info.size, actual_size=total)
        limit = max(sizes) if sizes else None
        received = 0
        bar = tqdm(total=total if total is not None else info.size, initial=start, unit="B",
                   unit_scale=True, unit_divisor=1024, desc=info.weights, disable=not progress,
                   leave=False)
        try:
            with open(part, "ab" if start else "wb") as f:
                try:
                    while True:
                        block = response.read(CHUNK)
                        if not block:
                            break
                        f.write(block)
                        received += len(block)
                        bar.update(len(block))
                        if limit is not None and start + received > limit:
                            break      # more than any valid file: the size check rejects it
                except (OSError, http.client.HTTPException) as e:
                    reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                    return _Interrupted(received, reason)
                finally:
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            bar.close()
        if total is not None and start + received < total:
            return _Interrupted(received, f"connection closed at byte {start + received} of "
                                          f"{total}")
    return None


def resolve_model(name_or_cfg: str | os.PathLike, weights: str | os.PathLike | None = None, *,
                  progress: bool = True) -> tuple[Path, Path | None]:
    """``(cfg path, weights path or None)`` for a model name or a cfg file.

    An existing file is a cfg and is returned with ``weights`` as given. Otherwise a name in
    :data:`MODELS` gives its cfg (:func:`cfg_path`) and, unless ``weights`` is given, its
    official weights, downloaded on first use (:func:`download`).

    Raises:
        UnknownModelError: neither an existing file nor a known model (lists the known names).
        DarknetError: a path-like argument (ending in ``.cfg`` or containing a directory) that
            does not exist; the model's cfg is missing from the installation.
        DownloadError: the weights cannot be downloaded (see :func:`download`).
    """
    text = os.fspath(name_or_cfg)
    given = Path(weights) if weights is not None else None
    if os.path.isfile(text):
        return Path(text), given
    if text in MODELS:
        return cfg_path(text), (given if given is not None else download(text, progress=progress))
    if text.endswith(".cfg") or os.sep in text or (os.altsep and os.altsep in text):
        raise DarknetError(f"cfg file {text} not found")
    raise UnknownModelError(text)
