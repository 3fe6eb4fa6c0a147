"""darknetpy.zoo: the official-model table, and weights downloads against a local HTTP server.

Nothing here contacts the internet: every download goes to a ``http.server`` on 127.0.0.1
(ephemeral port) serving a generated file, through handlers that honour Range requests,
ignore them, cut the connection short, omit Content-Length, or answer 404.
"""
from __future__ import annotations

import hashlib
import http.server
import random
import re
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from darknetpy import zoo
from darknetpy.errors import DarknetError
from darknetpy.zoo import DownloadError, ModelInfo, UnknownModelError

REPO = Path(__file__).resolve().parents[1]


def make_weights(header_bytes: int = 20, floats: int = 75_000) -> bytes:
    """A weights-like file: a version 0.2.5 (20-byte) or 0.1.0 (16-byte) header + random floats."""
    rng = random.Random(1234)
    header = struct.pack("<3iQ", 0, 2, 5, 64000) if header_bytes == 20 else \
        struct.pack("<3ii", 0, 1, 0, 64000)
    return header + rng.randbytes(4 * floats)


DATA = make_weights()                          # 300,020 bytes
SHA = hashlib.sha256(DATA).hexdigest()


# --------------------------------------------------------------------------------------
# Local HTTP server
# --------------------------------------------------------------------------------------

class Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.data`` at any path, honouring ``Range: bytes=a-`` / ``bytes=a-b``."""

    def log_message(self, *args):              # keep pytest output clean
        pass

    def do_GET(self):
        self.server.requests.append(dict(self.headers))
        self.respond(self.server.data)

    def send_body(self, status: int, body: bytes, headers: dict, length: int | None):
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if length is not None:
            self.send_header("Content-Length", str(length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.server.bytes_sent += len(body)

    def respond(self, data: bytes):
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if not m:
            return self.send_body(200, data, {"Accept-Ranges": "bytes"}, len(data))
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else len(data) - 1
        if first >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = data[first:last + 1]
        self.send_body(206, body, {"Content-Range": f"bytes {first}-{last}/{len(data)}"},
                       len(body))


class IgnoreRangeHandler(Handler):
    """Always answers 200 with the whole file."""

    def respond(self, data):
        self.send_body(200, data, {}, len(data))


class CutHandler(Handler):
    """Ignores Range; announces the whole file but sends only its first ``CUT`` bytes."""

    CUT = 120_000

    def respond(self, data):
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:self.CUT])
        self.server.bytes_sent += self.CUT
        self.wfile.flush()
        self.close_connection = True


class CutRangeHandler(Handler):
    """Honours Range, but every response stops after ``CUT`` bytes of its body."""

    CUT = 110_000

    def send_body(self, status, body, headers, length):
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body[:self.CUT])
        self.server.bytes_sent += min(len(body), self.CUT)
        self.wfile.flush()
        self.close_connection = True


class NoLengthHandler(Handler):
    """200 without Content-Length (the body ends when the connection closes)."""

    def respond(self, data):
        self.send_body(200, data, {}, None)
        self.close_connection = True


class NotFoundHandler(Handler):
    def respond(self, data):
        self.send_error(404, "Not Found")


class MovedHandler(Handler):
    """Redirects the file to an HTML home page (what pjreddie.com's links were reported to do)."""

    def respond(self, data):
        if self.path.endswith(".weights"):
            self.send_response(302)
            self.send_header("Location", "/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        page = b"<html><body>home</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)


class Server:
    def __init__(self, handler, data: bytes):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.data = data
        self.httpd.requests = []
        self.httpd.bytes_sent = 0
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files/fake.weights"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.running = True

    @property
    def requests(self):
        return self.httpd.requests

    @property
    def bytes_sent(self):
        return self.httpd.bytes_sent

    def stop(self):
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(5)
            self.running = False


@pytest.fixture
def serve():
    servers = []

    def start(handler=Handler, data: bytes = DATA) -> Server:
        s = Server(handler, data)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def free_port() -> int:
    """A port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """DARKNETPY_HOME -> tmp_path, and a fake model 'fake' whose weights are DATA."""
    monkeypatch.setenv("DARKNETPY_HOME", str(tmp_path))
    monkeypatch.setitem(zoo.MODELS, "fake", ModelInfo("yolov3-tiny.cfg", "fake.weights",
                                                      "http://127.0.0.1:9/unused", len(DATA), SHA,
                                                      "coco"))
    return tmp_path


def set_fake(monkeypatch, **changes):
    monkeypatch.setitem(zoo.MODELS, "fake", zoo.MODELS["fake"]._replace(**changes))


def final(home: Path) -> Path:
    return home / "weights" / "fake.weights"


def part(home: Path) -> Path:
    return home / "weights" / "fake.weights.part"


# --------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------

def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DARKNETPY_HOME", str(tmp_path / "x"))
    assert zoo.cache_dir() == tmp_path / "x"
    assert zoo.weights_path("yolov3") == tmp_path / "x" / "weights" / "yolov3.weights"
    monkeypatch.delenv("DARKNETPY_HOME")
    assert zoo.cache_dir() == Path.home() / ".cache" / "darknetpy"


def test_fresh_download(home, serve):
    server = serve()
    path = zoo.download("fake", progress=False, url=server.url)
    assert path == final(home)
    assert path.read_bytes() == DATA
    assert not part(home).exists()
    assert len(server.requests) == 1 and "Range" not in server.requests[0]
    assert server.requests[0]["User-Agent"].startswith("darknetpy/")


def test_second_call_uses_cache_without_network(home, serve):
    server = serve()
    zoo.download("fake", progress=False, url=server.url)
    server.stop()
    path = zoo.download("fake", progress=False, url=server.url)
    assert path.read_bytes() == DATA
    # even with an unreachable official URL
    assert zoo.download("fake", progress=False) == path


def test_resume_partial(home, serve):
    server = serve()
    part(home).parent.mkdir(parents=True)
    part(home).write_bytes(DATA[:100_000])
    path = zoo.download("fake", progress=False, url=server.url)
    assert server.requests[0]["Range"] == "bytes=100000-"
    assert server.bytes_sent == len(DATA) - 100_000
    assert path.read_bytes() == DATA
    assert not part(home).exists()


def test_complete_part(home, serve):
    """A .part that already holds the whole file is finished without a request."""
    server = serve()
    part(home).parent.mkdir(parents=True)
    part(home).write_bytes(DATA)
    assert zoo.download("fake", progress=False, url=server.url).read_bytes() == DATA
    assert server.requests == []


def test_complete_part_unknown_size_gets_416(home, serve, monkeypatch):
    """Size unknown: the resume request gets 416 with the total, which says it is complete."""
    set_fake(monkeypatch, size=None)
    server = serve()
    part(home).parent.mkdir(parents=True)
    part(home).write_bytes(DATA)
    assert zoo.download("fake", progress=False, url=server.url).read_bytes() == DATA
    assert server.requests[0]["Range"] == f"bytes={len(DATA)}-"
    assert server.bytes_sent == 0


def test_corrupt_complete_part_restarts(home, serve):
    server = serve()
    part(home).parent.mkdir(parents=True)
    part(home).write_bytes(b"\0" * len(DATA))
    assert zoo.download("fake", progress=False, url=server.url).read_bytes() == DATA
    assert "Range" not in server.requests[0]


def test_server_ignoring_range_restarts(home, serve):
    server = serve(IgnoreRangeHandler)
    part(home).parent.mkdir(parents=True)
    part(home).write_bytes(b"\xff" * 50_000)     # garbage: must not be kept in front
    path = zoo.download("fake", progress=False, url=server.url)
    assert server.requests[0]["Range"] == "bytes=50000-"
    assert path.read_bytes() == DATA


def test_interrupted_keeps_part_then_resumes(home, serve):
    cut = serve(CutHandler)
    with pytest.raises(DownloadError, match="interrupted") as info:
        zoo.download("fake", progress=False, url=cut.url)
    assert not final(home).exists()
    assert part(home).read_bytes() == DATA[:CutHandler.CUT]
    assert str(part(home)) in str(info.value)
    assert len(cut.requests) == zoo.MAX_ATTEMPTS
    cut.stop()
    server = serve()
    path = zoo.download("fake", progress=False, url=server.url)
    assert server.requests[0]["Range"] == f"bytes={CutHandler.CUT}-"
    assert path.read_bytes() == DATA


def test_interruptions_resume_automatically(home, serve):
    server = serve(CutRangeHandler)
    path = zoo.download("fake", progress=False, url=server.url)
    assert [r.get("Range") for r in server.requests] == [None, "bytes=110000-", "bytes=220000-"]
    assert path.read_bytes() == DATA


def test_size_mismatch_announced(home, serve, monkeypatch):
    set_fake(monkeypatch, size=len(DATA) + 100)
    server = serve()
    with pytest.raises(DownloadError) as info:
        zoo.download("fake", progress=False, url=server.url)
    e = info.value
    assert (e.expected_size, e.actual_size) == (len(DATA) + 100, len(DATA))
    assert str(len(DATA) + 100) in str(e) and str(len(DATA)) in str(e)
    assert not final(home).exists() and not part(home).exists()


def test_link_moved_to_web_page(home, serve):
    server = serve(MovedHandler)
    with pytest.raises(DownloadError, match="text/html") as info:
        zoo.download("fake", progress=False, url=server.url)
    assert str(final(home)) in str(info.value)
    assert not final(home).exists() and not part(home).exists()


def test_size_mismatch_after_download(home, serve, monkeypatch):
    """Without Content-Length the size is only known at the end."""
    set_fake(monkeypatch, size=len(DATA) + 100, sha256=None)
    server = serve(NoLengthHandler)
    with pytest.raises(DownloadError, match="not the expected file") as info:
        zoo.download("fake", progress=False, url=server.url)
    assert (info.value.expected_size, info.value.actual_size) == (len(DATA) + 100, len(DATA))
    assert not final(home).exists() and not part(home).exists()


def test_no_content_length_ok(home, serve):
    server = serve(NoLengthHandler)
    assert zoo.download("fake", progress=False, url=server.url).read_bytes() == DATA


def test_sha256_mismatch(home, serve, monkeypatch):
    set_fake(monkeypatch, sha256="0" * 64)
    server = serve()
    with pytest.raises(DownloadError) as info:
        zoo.download("fake", progress=False, url=server.url)
    e = info.value
    assert (e.expected_sha256, e.actual_sha256) == ("0" * 64, SHA)
    assert "0" * 64 in str(e) and SHA in str(e)
    assert not final(home).exists() and not part(home).exists()


def test_offline_fails_fast(home):
    url = f"http://127.0.0.1:{free_port()}/yolov3.weights"
    t = time.monotonic()
    with pytest.raises(DownloadError) as info:
        zoo.download("fake", progress=False, url=url, timeout=10)
    assert time.monotonic() - t < 5
    message = str(info.value)
    assert str(final(home)) in message and url in message
    assert str(len(DATA)) in message and SHA in message
    assert not final(home).exists()


def test_http_error(home, serve):
    server = serve(NotFoundHandler)
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        zoo.download("fake", progress=False, url=server.url)
    assert str(final(home)) in str(info.value)


def test_wrong_cached_file_is_replaced(home, serve):
    final(home).parent.mkdir(parents=True)
    final(home).write_bytes(DATA[:-1] + b"\x00")   # right size, wrong sha256
    server = serve()
    assert zoo.download("fake", progress=False, url=server.url).read_bytes() == DATA
    assert len(server.requests) == 1


@pytest.mark.parametrize("header, ok", [(16, True), (20, False)])
def test_computed_size_accepts_old_header(home, serve, monkeypatch, header, ok):
    """For a size computed with a 20-byte header, a file 4 bytes shorter is valid only if its
    own header is version 0.1 (16 bytes)."""
    data = make_weights(header)
    monkeypatch.setattr(zoo, "SIZE_COMPUTED", zoo.SIZE_COMPUTED | {"fake"})
    set_fake(monkeypatch, size=len(make_weights(20)) + (0 if header == 16 else 4), sha256=None)
    assert zoo.acceptable_sizes("fake") == {zoo.MODELS["fake"].size, zoo.MODELS["fake"].size - 4}
    server = serve(data=data)
    if ok:
        assert zoo.download("fake", progress=False, url=server.url).read_bytes() == data
    else:
        with pytest.raises(DownloadError, match="version 0.1"):
            zoo.download("fake", progress=False, url=server.url)
        assert not final(home).exists()


def test_progress_bar(home, serve, capsys):
    server = serve()
    zoo.download("fake", progress=True, url=server.url)
    assert "fake.weights" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Names, cfgs, resolve_model
# --------------------------------------------------------------------------------------

def test_unknown_model():
    with pytest.raises(UnknownModelError) as info:
        zoo.download("yolov3x", progress=False)
    message = str(info.value)
    assert "yolov3x" in message and "did you mean" in message
    for name in zoo.MODELS:
        assert name in message
    assert isinstance(info.value, DarknetError)
    with pytest.raises(UnknownModelError):
        zoo.resolve_model("nosuchmodel")
    with pytest.raises(UnknownModelError):
        zoo.cfg_path("nosuchmodel")


def test_resolve_model(home, serve, monkeypatch, tmp_path):
    server = serve()
    set_fake(monkeypatch, url=server.url)
    cfg, weights = zoo.resolve_model("fake", progress=False)
    assert cfg == REPO / "cfg" / "yolov3-tiny.cfg"
    assert weights == final(home) and weights.read_bytes() == DATA
    # weights given: no download
    other = tmp_path / "mine.weights"
    assert zoo.resolve_model("yolov3", other) == (REPO / "cfg" / "yolov3.cfg", other)
    # an existing file wins over a model name
    mycfg = tmp_path / "yolov3"
    mycfg.write_text("[net]\n")
    monkeypatch.chdir(tmp_path)
    assert zoo.resolve_model("yolov3") == (Path("yolov3"), None)
    with pytest.raises(DarknetError, match="not found"):
        zoo.resolve_model("missing.cfg")
    assert len(server.requests) == 1


def test_cfg_path_prefers_package_data(tmp_path, monkeypatch):
    pkg = tmp_path / "pkgcfg"
    pkg.mkdir()
    (pkg / "yolov3.cfg").write_text("[net]\n")
    monkeypatch.setattr(zoo, "_cfg_dirs", lambda: [pkg, REPO / "cfg"])
    assert zoo.cfg_path("yolov3") == pkg / "yolov3.cfg"
    assert zoo.cfg_path("yolov4") == REPO / "cfg" / "yolov4.cfg"
    assert zoo.cfg_path("yolov3-voc.cfg") == REPO / "cfg" / "yolov3-voc.cfg"
    monkeypatch.setattr(zoo, "_cfg_dirs", lambda: [pkg])
    with pytest.raises(DarknetError, match="yolov4.cfg"):
        zoo.cfg_path("yolov4")


# --------------------------------------------------------------------------------------
# The real table
# --------------------------------------------------------------------------------------

EXPECTED_NAMES = {"yolov3", "yolov3-tiny", "yolov3-spp", "yolov2", "yolov2-tiny", "yolov2-voc",
                  "yolov2-tiny-voc", "yolo9000", "yolov4", "yolov4-tiny", "yolov4-csp",
                  "yolov7-tiny", "yolov7", "darknet53", "darknet19", "tiny"}
OLD_HEADER = {"yolov2", "tiny"}   # weights/README.md: these files have a 16-byte (0.1) header


def test_table_entries():
    assert set(zoo.MODELS) == EXPECTED_NAMES
    for name, info in zoo.MODELS.items():
        assert info.url.startswith("https://") and info.url.endswith("/" + info.weights), name
        assert info.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", info.sha256), name
        assert info.classes in {"coco", "voc", "9k", "imagenet"}, name
    assert zoo.SIZE_COMPUTED <= set(zoo.MODELS)
    assert not zoo.SIZE_COMPUTED & OLD_HEADER


def tree_for(name: str):
    if name != "yolo9000":
        return None
    from conftest import reference_path, require_reference
    return str(require_reference(reference_path() / "names" / "9k.tree"))


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_table_matches_cfg(name):
    from darknetpy import parse_architecture
    from darknetpy.model import Darknet
    from darknetpy.weights import expected_bytes

    info = zoo.MODELS[name]
    cfg = zoo.cfg_path(name)
    assert cfg == REPO / "cfg" / info.cfg
    arch = parse_architecture(cfg, tree=tree_for(name), warn=False)
    if info.size is None:
        return
    header = 16 if name in OLD_HEADER else 20
    model = Darknet(arch)
    assert info.size == expected_bytes(model, header)
