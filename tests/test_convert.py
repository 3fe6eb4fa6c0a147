"""Weights conversion: .weights <-> .pt <-> .safetensors, byte-identical round trips."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from darknetpy import load
from darknetpy.convert import ConvertError, convert, parse_header_version, read_state
from darknetpy.errors import DarknetError
from darknetpy.weights import WeightsHeader

from conftest import missing_reference, require_reference


def pytest_generate_tests(metafunc):
    """``real_weights`` runs once per ``reference/weights/<stem>.weights`` that has
    ``reference/cfg/real/<stem>.cfg`` (once as ``no-weights`` when there are none)."""
    if "real_weights" in metafunc.fixturenames:
        from conftest import reference_path
        root = reference_path()
        stems = sorted(p.stem for p in (root / "weights").glob("*.weights")
                       if (root / "cfg" / "real" / f"{p.stem}.cfg").is_file()) \
            if (root / "weights").is_dir() else []
        metafunc.parametrize("real_weights", stems or ["no-weights"])


@pytest.fixture
def real(reference_dir, real_weights):
    """(weights path, cfg path) of one real model."""
    w = require_reference(reference_dir / "weights" / f"{real_weights}.weights")
    return w, reference_dir / "cfg" / "real" / f"{real_weights}.cfg"


def _header(path) -> tuple:
    data = open(path, "rb").read(20)
    major, minor, revision = struct.unpack_from("<3i", data)
    return major, minor, revision


@pytest.mark.parametrize("via", [".pt", ".safetensors"])
def test_round_trip_is_byte_identical(real, via, tmp_path):
    weights, cfg = real
    mid = tmp_path / f"model{via}"
    back = tmp_path / "back.weights"
    r1 = convert(weights, mid, cfg)
    assert r1.header is not None and r1.dst_format in ("torch", "safetensors")
    r2 = convert(mid, back, cfg)
    assert r2.header == r1.header
    assert back.read_bytes() == weights.read_bytes()


def test_pt_to_safetensors_without_cfg_keeps_everything(real, tmp_path):
    weights, cfg = real
    pt, st, back = tmp_path / "m.pt", tmp_path / "m.safetensors", tmp_path / "back.weights"
    convert(weights, pt, cfg)
    convert(pt, st)                     # no cfg needed between tensor formats
    convert(st, back, cfg)
    assert back.read_bytes() == weights.read_bytes()


def test_state_dict_keys_are_readable(real, tmp_path):
    weights, cfg = real
    model = load(cfg, weights)
    pt, st = tmp_path / "m.pt", tmp_path / "m.safetensors"
    convert(weights, pt, cfg)
    convert(weights, st, cfg)
    sd = torch.load(pt, weights_only=True)
    assert list(sd.keys()) == list(model.state_dict().keys())
    assert all(k.startswith("layers.") for k in sd)
    meta = sd._metadata["darknetpy"]
    h = model.weights_header
    assert meta["header"] == {"major": h.major, "minor": h.minor, "revision": h.revision,
                              "seen": h.seen, "seen_bytes": h.seen_bytes}
    fresh = load(cfg)
    fresh.load_state_dict(sd, strict=True)          # plain torch loading works
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k

    from safetensors import safe_open
    with safe_open(st, framework="pt") as f:
        assert sorted(f.keys()) == sorted(model.state_dict().keys())
        assert json.loads(f.metadata()["darknetpy"])["header"]["seen"] == h.seen
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), model.state_dict()[k]), k


def test_real_model_runs_the_same_from_every_format(reference_dir, tmp_path):
    w = require_reference(reference_dir / "weights" / "yolo-fastest-1.1.weights")
    cfg = reference_dir / "cfg" / "real" / "yolo-fastest-1.1.cfg"
    model = load(cfg, w)
    x = torch.rand(1, 3, model.net.height, model.net.width,
                   generator=torch.Generator().manual_seed(1))
    want = model(x)
    for ext in (".pt", ".safetensors"):
        convert(w, tmp_path / f"m{ext}", cfg)
        sd, header, _ = read_state(tmp_path / f"m{ext}")
        other = load(cfg)
        other.load_state_dict(sd)
        assert header == model.weights_header
        for a, b in zip(want, other(x)):
            assert torch.equal(a, b)


# -------------------------------------------------------------- 0.1 header files
def _old_weights(reference_dir):
    for stem in ("tiny", "tiny-yolov2-trial3", "tiny-yolov2-trial4"):
        w = reference_dir / "weights" / f"{stem}.weights"
        if w.is_file() and _header(w)[:2] == (0, 1):
            return w, reference_dir / "cfg" / "real" / f"{stem}.cfg"
    missing_reference("no 0.1-header weights in the reference data")


def test_old_header_kept_by_default(reference_dir, tmp_path):
    w, cfg = _old_weights(reference_dir)
    r = convert(w, tmp_path / "m.pt", cfg)
    assert r.header.seen_bytes == 4 and r.header.size == 16
    r2 = convert(tmp_path / "m.pt", tmp_path / "back.weights", cfg)
    assert any("header_version='0.2.5'" in n for n in r2.notes)
    assert (tmp_path / "back.weights").read_bytes() == w.read_bytes()


@pytest.mark.parametrize("via", [None, ".pt", ".safetensors"])
def test_old_header_rewritten_when_asked(reference_dir, tmp_path, via):
    w, cfg = _old_weights(reference_dir)
    src = w
    if via:
        src = tmp_path / f"m{via}"
        convert(w, src, cfg)
    out = tmp_path / "new.weights"
    r = convert(src, out, cfg, header_version="0.2.5")
    old, new = w.read_bytes(), out.read_bytes()
    seen = struct.unpack_from("<i", old, 12)[0]
    assert struct.unpack_from("<3iQ", new) == (0, 2, 5, seen)
    assert len(new) == len(old) + 4 and new[20:] == old[16:]
    assert r.header == WeightsHeader(0, 2, 5, seen, 8)
    a, b = load(cfg, w), load(cfg, out)
    assert b.weights_header.version == "0.2.5"
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_header_version_to_old_format_and_overflow(reference_dir, tmp_path):
    w = require_reference(reference_dir / "weights" / "yoloface-50k.weights")
    cfg = reference_dir / "cfg" / "real" / "yoloface-50k.cfg"
    out = tmp_path / "old.weights"
    convert(w, out, cfg, header_version="0.1.0")
    old, new = w.read_bytes(), out.read_bytes()
    assert struct.unpack_from("<3ii", new)[:3] == (0, 1, 0)
    assert new[16:] == old[20:]
    with pytest.raises(ConvertError, match="does not fit the 32-bit"):
        parse_header_version("0.1.0", seen=2 ** 40)
    with pytest.raises(ConvertError, match="MAJOR.MINOR.REVISION"):
        convert(w, tmp_path / "x.weights", cfg, header_version="two")


def test_pt_without_header_gets_0_2_5(reference_dir, tmp_path):
    w = require_reference(reference_dir / "weights" / "yoloface-50k.weights")
    cfg = reference_dir / "cfg" / "real" / "yoloface-50k.cfg"
    model = load(cfg, w)
    torch.save(dict(model.state_dict()), tmp_path / "plain.pt")   # no metadata
    r = convert(tmp_path / "plain.pt", tmp_path / "out.weights", cfg)
    assert r.header == WeightsHeader(0, 2, 5, 0, 8)
    data = (tmp_path / "out.weights").read_bytes()
    assert struct.unpack_from("<3iQ", data) == (0, 2, 5, 0)
    assert data[20:] == w.read_bytes()[20:]


# -------------------------------------------------------------------- errors
def test_errors_are_clear(reference_dir, tmp_path):
    w = require_reference(reference_dir / "weights" / "yoloface-50k.weights")
    cfg = reference_dir / "cfg" / "real" / "yoloface-50k.cfg"
    other_cfg = reference_dir / "cfg" / "real" / "yolo-fastest-1.1.cfg"
    with pytest.raises(ConvertError, match="needs its cfg"):
        convert(w, tmp_path / "m.pt")
    convert(w, tmp_path / "m.pt", cfg)
    with pytest.raises(ConvertError, match="needs its cfg"):
        convert(tmp_path / "m.pt", tmp_path / "m.weights")
    with pytest.raises(ConvertError, match="unknown weights format"):
        convert(w, tmp_path / "m.onnx", cfg)
    with pytest.raises(ConvertError, match="do not fit the cfg"):
        convert(tmp_path / "m.pt", tmp_path / "m.weights", other_cfg)
    assert not (tmp_path / "m.weights").exists()
    with pytest.raises(DarknetError):            # a .weights file for another cfg
        convert(w, tmp_path / "n.pt", other_cfg)
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ConvertError, match="cannot read"):
        convert(tmp_path / "junk.pt", tmp_path / "j.safetensors")
    with pytest.raises(ConvertError, match="not found"):
        convert(tmp_path / "missing.pt", tmp_path / "j.safetensors")


def test_connected_weights_transposed_header_round_trips(tmp_path):
    """A header with major > 1000 stores [connected] weights transposed (and, for pjreddie,
    a 32-bit seen); the round trip
    through .pt keeps the file byte-identical."""
    cfg = tmp_path / "fc.cfg"
    cfg.write_text("[net]\nwidth=4\nheight=4\nchannels=2\n\n[connected]\noutput=3\n"
                   "activation=linear\n\n[connected]\noutput=2\nbatch_normalize=1\n"
                   "activation=linear\n")
    model = load(cfg)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for _, _, _, t in model.darknet_params():
            t.copy_(torch.from_numpy(rng.random(tuple(t.shape), dtype=np.float32) + 0.5))
    w = tmp_path / "fc.weights"
    model.save_weights(w, header=WeightsHeader(1001, 0, 0, 7, 4))  # pjreddie: 32-bit seen
    convert(w, tmp_path / "fc.pt", cfg)
    convert(tmp_path / "fc.pt", tmp_path / "back.weights", cfg)
    assert (tmp_path / "back.weights").read_bytes() == w.read_bytes()
