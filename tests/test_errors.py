"""Bad input gives a clear, typed error that says where: cfg file/line/section/key,
weights layer and byte counts, input shape, device. Darknet itself warns and carries on
(or silently falls back to relu); darknetpy must not."""
from __future__ import annotations

import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import darknetpy
from darknetpy import (CfgError, DarknetError, DeviceError, InputError, WeightsError,
                       parse_architecture, parse_cfg)

REPO = Path(__file__).resolve().parents[1]

NET = "[net]\nwidth=8\nheight=8\nchannels=3\n\n"
CONVS = NET + """[convolutional]
batch_normalize=1
filters=4
size=3
pad=1
activation=leaky

[convolutional]
filters=6
size=1
activation=linear

[connected]
output=5
activation=linear
"""
# parameters: layer 0: 4 biases + 3*4 bn + 4*3*3*3 = 124; layer 1: 6 + 6*4 = 30;
# layer 2: 5 + 5*6*8*8 = 1925
N_PARAMS = (4 + 12 + 108, 6 + 24, 5 + 1920)


def write(tmp_path: Path, text: str, name: str = "t.cfg") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def line_of(text: str, needle: str, after: str | None = None) -> int:
    """1-based line number of the first line equal to ``needle`` (after the line ``after``)."""
    lines = textwrap.dedent(text).splitlines()
    start = lines.index(after) + 1 if after else 0
    return lines.index(needle, start) + 1


def build_error(tmp_path, text) -> CfgError:
    path = write(tmp_path, text)
    with pytest.raises(CfgError) as e:
        darknetpy.load(path)
    assert e.value.path == str(path)
    assert str(path) in str(e.value)
    return e.value


# --------------------------------------------------------------------------------------
# cfg errors
# --------------------------------------------------------------------------------------
def test_unknown_section_type(tmp_path):
    text = CONVS + "\n[frobnicate]\nsize=2\n"
    e = build_error(tmp_path, text)
    assert e.section == "frobnicate" and e.index == 3
    assert e.line == line_of(text, "[frobnicate]")
    assert "unknown section type" in e.message and "[maxpool]" in e.message  # lists known


@pytest.mark.parametrize("kind", ["lstm", "rnn", "gru", "crnn", "local", "detection"])
def test_unsupported_section_type(tmp_path, kind):
    text = CONVS + f"\n[{kind}]\noutput=4\n"
    e = build_error(tmp_path, text)
    assert e.section == kind and e.line == line_of(text, f"[{kind}]")
    assert "not supported" in e.message


@pytest.mark.parametrize("text,key,section", [
    (NET + "[convolutional]\nfilters=abc\n", "filters", "convolutional"),
    (NET + "[convolutional]\nfilters=8\nsize=3.5\n", "size", "convolutional"),
    (NET + "[maxpool]\nstride=x\n", "stride", "maxpool"),
    (NET + "[yolo]\nanchors=1,2,three,4\n", "anchors", "yolo"),
    (NET + "[upsample]\nscale=big\n", "scale", "upsample"),
    ("[net]\nwidth=eight\nheight=8\nchannels=3\n", "width", "net"),
])
def test_bad_value_names_the_key_and_line(tmp_path, text, key, section):
    e = build_error(tmp_path, text)
    assert e.key == key and e.section == section
    assert e.line == next(i for i, ln in enumerate(text.splitlines(), 1) if ln.startswith(key))
    assert f"'{key}'" in str(e)


def test_missing_required_value(tmp_path):
    text = CONVS + "\n[route]\n"
    e = build_error(tmp_path, text)
    assert e.section == "route" and e.key == "layers" and e.index == 3
    assert e.line == line_of(text, "[route]")
    assert "missing" in e.message


@pytest.mark.parametrize("section,key,value", [
    ("route", "layers", "-50"), ("route", "layers", "99"), ("route", "layers", "3"),
    ("route", "layers", "-1,7"), ("shortcut", "from", "-10"), ("shortcut", "from", "42"),
    ("sam", "from", "5"), ("scale_channels", "from", "-9"),
])
def test_dangling_layer_reference(tmp_path, section, key, value):
    text = CONVS + f"\n[{section}]\n{key}={value}\n"
    e = build_error(tmp_path, text)
    assert e.section == section and e.key == key and e.index == 3
    assert e.line == line_of(text, f"{key}={value}")
    assert "not an earlier layer" in e.message


@pytest.mark.parametrize("section", ["convolutional", "shortcut", "connected", "activation"])
def test_unknown_activation_is_an_error_never_relu(tmp_path, section):
    extra = "from=-1\n" if section == "shortcut" else ""
    text = CONVS + f"\n[{section}]\n{extra}activation=reluu\n"
    e = build_error(tmp_path, text)
    assert e.key == "activation" and e.section == section
    assert e.line == line_of(text, "activation=reluu")
    assert "reluu" in e.message and "leaky" in e.message  # lists the known names


@pytest.mark.parametrize("text,line", [
    ("[convolutional]\nfilters=1\n[net]\nwidth=8\nheight=8\nchannels=3\n", 1),
    (NET + "[convolutional]\nfilters=1\n[net]\nwidth=8\n", 8),
])
def test_net_must_come_first_and_once(tmp_path, text, line):
    e = build_error(tmp_path, text)
    assert e.line == line and "[net]" in e.message


def test_net_without_size(tmp_path):
    e = build_error(tmp_path, "[net]\nchannels=3\n[maxpool]\n")
    assert e.section == "net" and "width" in e.message


def test_no_layers(tmp_path):
    e = build_error(tmp_path, NET)
    assert "no layers" in e.message


def test_head_channels_must_match(tmp_path):
    text = NET + "[convolutional]\nfilters=20\nactivation=linear\n\n[yolo]\nmask=0,1,2\n" \
                 "anchors=1,1,2,2,3,3\nnum=3\nclasses=2\n"
    e = build_error(tmp_path, text)
    assert e.section == "yolo" and "21" in e.message and "filters" in e.message


def test_route_sizes_must_match(tmp_path):
    text = NET + "[convolutional]\nfilters=2\n\n[maxpool]\nsize=2\nstride=2\n\n[route]\n" \
                 "layers=0,1\n"
    e = build_error(tmp_path, text)
    assert e.section == "route" and e.key == "layers"


def test_cfg_errors_are_darknet_errors():
    assert issubclass(CfgError, DarknetError) and issubclass(WeightsError, DarknetError)
    assert issubclass(InputError, DarknetError) and issubclass(DeviceError, DarknetError)


# --------------------------------------------------------------------------------------
# weights errors
# --------------------------------------------------------------------------------------
def params_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).normal(size=n).astype("<f4").tobytes()


def header(major=0, minor=2, revision=0, seen=0, seen64=True) -> bytes:
    return struct.pack("<3i", major, minor, revision) + \
        struct.pack("<Q" if seen64 else "<i", seen)


@pytest.fixture
def convs_cfg(tmp_path) -> Path:
    return write(tmp_path, CONVS, "convs.cfg")


def test_exact_file_loads(tmp_path, convs_cfg):
    path = tmp_path / "ok.weights"
    path.write_bytes(header() + params_bytes(sum(N_PARAMS)))
    model = darknetpy.load(convs_cfg, path)
    assert model.weights_header.version == "0.2.0"


@pytest.mark.parametrize("keep,layer,layer_type", [
    (N_PARAMS[0] + 10, 1, "convolutional"),   # inside layer 1's weights
    (N_PARAMS[0] + N_PARAMS[1] + 100, 2, "connected"),
    (3, 0, "convolutional"),
    (sum(N_PARAMS) - 1, 2, "connected"),
])
def test_truncated_weights_name_layer_and_byte_counts(tmp_path, convs_cfg, keep, layer,
                                                      layer_type):
    path = tmp_path / "short.weights"
    path.write_bytes(header() + params_bytes(keep))
    with pytest.raises(WeightsError) as e:
        darknetpy.load(convs_cfg, path)
    err = e.value
    assert err.path == str(path)
    assert (err.layer, err.layer_type) == (layer, layer_type)
    assert err.expected == 20 + 4 * sum(N_PARAMS)
    assert err.available == 20 + 4 * keep
    assert f"layer {layer} [{layer_type}]" in str(err)
    assert str(err.expected) in str(err) and str(err.available) in str(err)


def test_file_shorter_than_a_header(tmp_path, convs_cfg):
    path = tmp_path / "tiny.weights"
    path.write_bytes(b"\0" * 7)
    with pytest.raises(WeightsError) as e:
        darknetpy.load(convs_cfg, path)
    assert e.value.available == 7


def test_missing_weights_file(tmp_path, convs_cfg):
    with pytest.raises(WeightsError) as e:
        darknetpy.load(convs_cfg, tmp_path / "nope.weights")
    assert "nope.weights" in str(e.value)


@pytest.mark.parametrize("extra", [1, 4, 400])
def test_trailing_bytes_are_an_error_unless_allowed(tmp_path, convs_cfg, extra):
    path = tmp_path / "long.weights"
    body = params_bytes(sum(N_PARAMS))
    path.write_bytes(header() + body + b"\x01" * extra)
    with pytest.raises(WeightsError) as e:
        darknetpy.load(convs_cfg, path)
    assert e.value.expected == 20 + 4 * sum(N_PARAMS)
    assert e.value.available == 20 + 4 * sum(N_PARAMS) + extra
    assert f"{extra} bytes left" in str(e.value) and "allow_trailing_bytes" in str(e.value)
    model = darknetpy.load(convs_cfg, path, allow_trailing_bytes=True)
    exact = darknetpy.load(convs_cfg)
    exact.load_weights(path, allow_trailing_bytes=True)
    for (_, _, _, a), (_, _, _, b) in zip(model.darknet_params(), exact.darknet_params()):
        assert torch.equal(a, b)
    got = torch.cat([t.flatten() for *_, t in model.darknet_params()]).numpy()
    assert got.tobytes() == body


def test_wrong_model_weights(tmp_path):
    """Weights saved for one network do not fit another: a WeightsError, not garbage."""
    tiny3 = darknetpy.load(REPO / "cfg" / "yolov3-tiny.cfg", width=64, height=64)
    path = tmp_path / "yolov3-tiny-synthetic.weights"
    tiny3.save_weights(path)
    for other in ("yolov2-tiny.cfg", "yolov4-tiny.cfg", "yolov3-tiny-prn.cfg"):
        cfg = REPO / "cfg" / other
        if not cfg.exists():
            continue
        with pytest.raises(WeightsError) as e:
            darknetpy.load(cfg, path, width=64, height=64)
        assert e.value.expected != e.value.available


def test_wrong_model_real_weights(reference_dir):
    weights = reference_dir / "weights" / "yolo-fastest-1.1.weights"
    for cfg in ("yoloface-500k-v2.cfg", "tiny-yolov2-trial3.cfg", "tiny.cfg"):
        with pytest.raises(WeightsError) as e:
            darknetpy.load(reference_dir / "cfg" / "real" / cfg, weights)
        assert e.value.expected != e.value.available
        assert e.value.available == weights.stat().st_size


def test_old_0_1_header_has_a_32bit_seen(tmp_path, convs_cfg):
    body = params_bytes(sum(N_PARAMS), seed=5)
    path = tmp_path / "old.weights"
    path.write_bytes(header(0, 1, 0, seen=123456, seen64=False) + body)
    for profile in ("pjreddie", "alexeyab"):
        model = darknetpy.load(convs_cfg, path, profile=profile)
        h = model.weights_header
        assert (h.major, h.minor, h.revision, h.seen, h.seen_bytes, h.size) == \
            (0, 1, 0, 123456, 4, 16)
        got = torch.cat([t.flatten() for *_, t in model.darknet_params()]).numpy()
        assert got.tobytes() == body
    # the same body with a 0.2.0 header is 4 bytes longer (64-bit seen)
    new = tmp_path / "new.weights"
    new.write_bytes(header(0, 2, 0, seen=2 ** 40 + 7) + body)
    h = darknetpy.load(convs_cfg, new).weights_header
    assert (h.seen, h.seen_bytes, h.size) == (2 ** 40 + 7, 8, 20)


@pytest.mark.parametrize("profile,major,minor,seen64", [
    ("alexeyab", 1001, 0, True),    # AlexeyAB: (major*10 + minor) >= 2 -> uint64 seen
    ("pjreddie", 1001, 0, False),   # pjreddie also needs major, minor < 1000 for 64 bits
    ("alexeyab", 0, 1001, True),
    ("pjreddie", 0, 1001, False),
])
def test_transposed_connected_weights(tmp_path, profile, major, minor, seen64):
    text = NET + "[connected]\noutput=5\nactivation=linear\n"
    cfg = write(tmp_path, text)
    n_in, n_out = 3 * 8 * 8, 5
    rng = np.random.default_rng(1)
    biases = rng.normal(size=n_out).astype("<f4")
    w = rng.normal(size=(n_out, n_in)).astype("<f4")          # Darknet's (outputs, inputs)
    path = tmp_path / "t.weights"
    # load_connected_weights: transpose_matrix(weights, inputs, outputs) after reading, so
    # the file holds the (inputs, outputs) matrix
    path.write_bytes(header(major, minor, 0, 77, seen64) + biases.tobytes() +
                     np.ascontiguousarray(w.T).tobytes())
    model = darknetpy.load(cfg, path, profile=profile)
    assert model.weights_header.transpose and model.weights_header.seen == 77
    assert np.array_equal(model.layers[0].fc.weight.numpy(), w)
    assert np.array_equal(model.layers[0].fc.bias.numpy(), biases)


# --------------------------------------------------------------------------------------
# input and device errors
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model():
    arch = parse_architecture(parse_cfg(NET + "[convolutional]\nfilters=2\n"), warn=False)
    return darknetpy.Darknet(arch).eval()


@pytest.mark.parametrize("x", [
    torch.rand(1, 3, 8, 9), torch.rand(1, 1, 8, 8), torch.rand(3, 8, 8), torch.rand(2, 3, 16, 16),
    torch.zeros(1, 3, 8, 8, dtype=torch.uint8), np.zeros((1, 3, 8, 8), np.float32),
])
def test_wrong_input_is_an_input_error(small_model, x):
    with pytest.raises(InputError) as e:
        small_model(x)
    assert "(N, 3, 8, 8)" in str(e.value) or "float" in str(e.value) or "Tensor" in str(e.value)
    with pytest.raises(InputError):
        small_model.forward_all(x)


def test_right_input_runs(small_model):
    assert small_model(torch.rand(2, 3, 8, 8)).shape == (2, 2, 8, 8)


def test_cuda_when_unavailable_is_a_device_error(tmp_path):
    cfg = write(tmp_path, NET + "[convolutional]\nfilters=2\n")
    device = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(DeviceError) as e:
        darknetpy.load(cfg, device=device)
    assert device in str(e.value)
    with pytest.raises(DeviceError):
        darknetpy.load(cfg, device="quantum")
