"""Each layer type in isolation against hand-computed values and loop ports of Darknet's C.

Every test builds a tiny network from cfg text (``[net]`` sized so that the layer under
test sees a small input), fills its parameters with random values, runs ``forward_all``
and compares the layer's output with an independent implementation kept in this file:
numpy for the arithmetic layers, loop-for-loop ports of Darknet's C functions for the
ones whose indexing is the point (``reorg_cpu``, ``shortcut_cpu``,
``shortcut_multilayer_cpu``, ``forward_maxpool_layer``, ``upsample_cpu``, ...), as
torchvision keeps ``_reference_nms`` beside the fast version.

The ports follow the C source line by line (names included) so that a reader can check
them against ``src/*.c``; they are deliberately slow and only run on tiny tensors.
"""
from __future__ import annotations

import math
import struct
import textwrap

import numpy as np
import pytest
import torch

from darknetpy import CfgError, Darknet, parse_architecture, parse_cfg
from darknetpy.layers.activations import ACTIVATIONS

F32 = np.float32
FLT_MAX = float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------------------
# helpers: build a tiny network, fill its parameters, run it
# --------------------------------------------------------------------------------------
def net(c: int, h: int, w: int) -> str:
    return f"[net]\nwidth={w}\nheight={h}\nchannels={c}\n\n"


def build(text: str, profile: str | None = None, seed: int = 0, small_var: bool = False
          ) -> Darknet:
    """Darknet module for cfg ``text`` with random Darknet parameters (variances > 0)."""
    arch = parse_architecture(parse_cfg(textwrap.dedent(text)), profile=profile, warn=False)
    model = Darknet(arch).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, name, t in model.darknet_params():
            if name.endswith("running_var"):
                lo, hi = (1e-5, 1e-3) if small_var else (0.5, 2.0)
                t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
            else:
                t.copy_(torch.randn(t.shape, generator=g))
    return model


def run(model: Darknet, batch: int = 1, seed: int = 1, lo: float = -2.0, hi: float = 2.0):
    """(input, outputs): numpy float32 (N, C, H, W) input and every layer's output."""
    n = model.arch.net
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, n.channels, n.height, n.width, generator=g) * (hi - lo) + lo
    with torch.no_grad():
        outs = model.forward_all(x)
    for spec, out in zip(model.specs, outs):  # every output has the shape its spec promises
        assert tuple(out.shape[1:]) == tuple(spec.out_shape), (spec.index, spec.type)
    return x.numpy(), [o.numpy() for o in outs]


def params(model: Darknet, i: int) -> dict[str, np.ndarray]:
    """Layer i's Darknet parameters by name, as float64 numpy arrays."""
    return {name: t.detach().double().numpy() for name, t in model.layers[i].darknet_params()}


def close(ours, ref, rtol=1e-4, atol=1e-5):
    np.testing.assert_allclose(np.asarray(ours, np.float64), np.asarray(ref, np.float64),
                               rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------
# activations.c / activations.h: scalar ports (double arithmetic as C's exp() does)
# --------------------------------------------------------------------------------------
def _logistic(x):
    return 1. / (1. + math.exp(-x))


def _softplus(x, threshold):  # AlexeyAB activations.h softplus_activate
    if x > threshold:
        return x
    if x < -threshold:
        return math.exp(x)
    return math.log(math.exp(x) + 1)


def _tanh(x):
    return (math.exp(2 * x) - 1) / (math.exp(2 * x) + 1)


def _stair(x):
    n = math.floor(x)
    if int(n) % 2 == 0:
        return math.floor(x / 2.)
    return (x - n) + math.floor(x / 2.)


def _plse(x):
    if x < -4:
        return .01 * (x + 4)
    if x > 4:
        return .01 * (x - 4) + 1
    return .125 * x + .5


def _lhtan(x):
    if x < 0:
        return .001 * x
    if x > 1:
        return .001 * (x - 1) + 1
    return x


def _hardtan(x):
    if x < -1:
        return -1
    if x > 1:
        return 1
    return x


def _hard_mish(x):  # AlexeyAB hard_mish_yashas
    if x > 0:
        return x
    if x > -2:
        return x * x / 2 + x
    return 0


C_ACTIVATIONS = {
    "linear": lambda x: x,
    "logistic": _logistic,
    "loggy": lambda x: 2. / (1. + math.exp(-x)) - 1,
    "relu": lambda x: x * (x > 0),
    "relu6": lambda x: min(max(x, 0), 6),
    "elu": lambda x: (x >= 0) * x + (x < 0) * (math.exp(x) - 1),
    "selu": lambda x: (x >= 0) * 1.0507 * x + (x < 0) * 1.0507 * 1.6732 * (math.exp(x) - 1),
    "gelu": lambda x: 0.5 * x * (1 + math.tanh(0.797885 * x + 0.035677 * x ** 3)),
    "relie": lambda x: x if x > 0 else .01 * x,
    "ramp": lambda x: x * (x > 0) + .1 * x,
    "leaky": lambda x: x if x > 0 else .1 * x,
    "tanh": _tanh,
    "plse": _plse,
    "stair": _stair,
    "hardtan": _hardtan,
    "lhtan": _lhtan,
    "swish": lambda x: x * _logistic(x),
    "mish": lambda x: x * _tanh(_softplus(x, 20)),  # activate_array_mish, MISH_THRESHOLD 20
    "hard_mish": _hard_mish,
}

ACT_GRID = np.unique(np.concatenate([
    np.linspace(-25, 25, 2001), np.arange(-8, 9), np.arange(-8, 9) + 0.5,
    [-4.0001, -3.9999, 3.9999, 4.0001, -2.0001, -1.9999, 0.9999, 1.0001, -1e-3, 1e-3,
     19.99, 20.0, 20.01, -19.99, -20.01, 0.0]]).astype(F32))


def test_activation_table_has_a_port_for_every_name():
    assert set(ACTIVATIONS) == set(C_ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(C_ACTIVATIONS))
def test_activation_matches_darknet_formula(name):
    ours = ACTIVATIONS[name](torch.from_numpy(ACT_GRID.copy())).numpy()
    ref = np.array([C_ACTIVATIONS[name](float(v)) for v in ACT_GRID])
    close(ours, ref, rtol=1e-5, atol=2e-6)


def test_activation_hand_values():
    t = torch.tensor
    assert ACTIVATIONS["leaky"](t([-2.0, 3.0])).tolist() == pytest.approx([-0.2, 3.0])
    # stair: floor(x/2) on even floors, (x - floor(x)) + floor(x/2) on odd ones
    assert ACTIVATIONS["stair"](t([0.5, 1.5, 2.5, 3.25, -0.5, -1.5])).tolist() == \
        pytest.approx([0.0, 0.5, 1.0, 1.25, -0.5, -1.0])
    assert ACTIVATIONS["plse"](t([-6.0, 0.0, 8.0])).tolist() == pytest.approx([-0.02, 0.5, 1.04])
    assert ACTIVATIONS["lhtan"](t([-1.0, 0.5, 3.0])).tolist() == pytest.approx([-0.001, 0.5, 1.002])
    assert ACTIVATIONS["hard_mish"](t([-3.0, -1.0, 2.0])).tolist() == pytest.approx([0, -0.5, 2])
    assert ACTIVATIONS["relu6"](t([-1.0, 3.0, 7.0])).tolist() == pytest.approx([0, 3, 6])
    assert ACTIVATIONS["ramp"](t([-1.0, 2.0])).tolist() == pytest.approx([-0.1, 2.2])
    assert ACTIVATIONS["relie"](t([-1.0, 2.0])).tolist() == pytest.approx([-0.01, 2.0])
    assert ACTIVATIONS["loggy"](t([0.0])).tolist() == pytest.approx([0.0])
    # mish beyond the softplus threshold is x * tanh(x)
    assert ACTIVATIONS["mish"](t([25.0])).tolist() == pytest.approx([25 * math.tanh(25)])


@pytest.mark.parametrize("name", ["leaky", "mish", "stair", "selu"])
def test_activation_layer(name):
    model = build(net(3, 4, 5) + f"[activation]\nactivation={name}\n", profile="alexeyab")
    x, outs = run(model, lo=-5, hi=5)
    port = np.vectorize(C_ACTIVATIONS[name], otypes=[float])
    close(outs[0], port(x.astype(np.float64)), rtol=1e-5, atol=2e-6)


# --------------------------------------------------------------------------------------
# [convolutional]
# --------------------------------------------------------------------------------------
def np_conv2d(x, w, stride_y, stride_x, pad, dilation, groups):
    """Direct zero-padded cross-correlation. x (C, H, W), w (N, C/groups, k, k) -> (N, h, w)."""
    c, h, wd = x.shape
    n, cg, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    out_h = (h + 2 * pad - dilation * (k - 1) - 1) // stride_y + 1
    out_w = (wd + 2 * pad - dilation * (k - 1) - 1) // stride_x + 1
    out = np.zeros((n, out_h, out_w))
    per_group = n // groups
    for f in range(n):
        g = f // per_group
        for ky in range(k):
            for kx in range(k):
                y0, x0 = ky * dilation, kx * dilation
                patch = xp[g * cg:(g + 1) * cg,
                           y0:y0 + stride_y * (out_h - 1) + 1:stride_y,
                           x0:x0 + stride_x * (out_w - 1) + 1:stride_x]
                out[f] += np.einsum("chw,c->hw", patch, w[f, :, ky, kx])
    return out


def leaky(x):
    return np.where(x > 0, x, 0.1 * x)


# (options, input (C, H, W), hand-computed output (C, H, W), effective padding)
CONV_CASES = [
    ("filters=4 size=3 stride=1 pad=1", (3, 7, 9), (4, 7, 9), 1),
    ("filters=4 size=3 stride=2 pad=1", (3, 7, 9), (4, 4, 5), 1),
    ("filters=4 size=3 stride=1 padding=2", (3, 7, 9), (4, 9, 11), 2),
    ("filters=4 size=3 pad=1 padding=5", (3, 7, 9), (4, 7, 9), 1),          # pad=1 wins
    ("filters=2 size=4 pad=1", (3, 7, 9), (2, 8, 10), 2),                   # size/2 = 2
    ("filters=2 size=2 stride=2 padding=0", (3, 7, 9), (2, 3, 4), 0),       # floor on odd
    ("filters=3 size=1", (3, 7, 9), (3, 7, 9), 0),                          # pad=0 default
    ("filters=4 size=3 stride_x=2 stride_y=1 pad=1", (3, 7, 9), (4, 7, 5), 1),
    ("filters=4 size=3 stride=2 stride_y=1 pad=1", (3, 7, 9), (4, 7, 5), 1),
    ("filters=6 size=3 pad=1 groups=3", (3, 7, 9), (6, 7, 9), 1),
    ("filters=4 size=3 pad=1 groups=2", (4, 6, 5), (4, 6, 5), 1),
    ("filters=4 size=3 pad=1 dilation=2", (3, 7, 9), (4, 7, 9), 2),         # padding*dilation
    ("filters=4 size=3 pad=1 dilation=2 stride=2", (3, 7, 9), (4, 4, 5), 2),
    # parser.c: `if (size == 1) dilation = 1;` so padding stays 1, not padding*dilation = 2
    ("filters=2 size=1 padding=1 dilation=2", (3, 7, 9), (2, 9, 11), 1),
]


@pytest.mark.parametrize("options,in_shape,out_shape,pad", CONV_CASES,
                         ids=[c[0].replace(" ", ",") for c in CONV_CASES])
def test_convolutional(options, in_shape, out_shape, pad):
    opts = dict(kv.split("=") for kv in options.split())
    model = build(net(*in_shape) + "[convolutional]\n" + "\n".join(options.split())
                  + "\nactivation=leaky\n")
    spec = model.specs[0]
    assert spec.out_shape == out_shape
    x, outs = run(model, batch=2)
    p = params(model, 0)
    size = int(opts["size"])
    stride = int(opts.get("stride", 1))
    sx, sy = int(opts.get("stride_x", stride)), int(opts.get("stride_y", stride))
    dil = 1 if size == 1 else int(opts.get("dilation", 1))
    groups = int(opts.get("groups", 1))
    for b in range(2):
        conv = np_conv2d(x[b].astype(np.float64), p["conv.weight"], sy, sx, pad, dil, groups)
        ref = leaky(conv + p["conv.bias"][:, None, None])
        close(outs[0][b], ref)


def test_convolutional_default_activation_is_logistic():
    model = build(net(2, 3, 3) + "[convolutional]\nfilters=2\nsize=1\n")
    x, outs = run(model)
    p = params(model, 0)
    z = np_conv2d(x[0].astype(np.float64), p["conv.weight"], 1, 1, 0, 1, 1) + \
        p["conv.bias"][:, None, None]
    close(outs[0][0], 1 / (1 + np.exp(-z)))


def bn_ref(z, p, profile):
    """Darknet inference batch norm on (C, H, W) with the profile's formula."""
    mean, var = p["bn.running_mean"][:, None, None], p["bn.running_var"][:, None, None]
    if profile == "pjreddie":   # blas.c normalize_cpu (pjreddie): sqrt(var) + .000001f
        zn = (z - mean) / (np.sqrt(var) + 1e-6)
    else:                       # AlexeyAB normalize_cpu: sqrt(var + .00001f)
        zn = (z - mean) / np.sqrt(var + 1e-5)
    return zn * p["bn.weight"][:, None, None] + p["bn.bias"][:, None, None]


@pytest.mark.parametrize("profile", ["pjreddie", "alexeyab"])
def test_convolutional_batch_normalize_formula(profile):
    # tiny variances make the two epsilons visibly different (about 5%)
    model = build(net(3, 5, 6) + "[convolutional]\nbatch_normalize=1\nfilters=4\nsize=3\n"
                  "pad=1\nactivation=leaky\n", profile=profile, small_var=True)
    assert model.layers[0].conv.bias is None  # batch norm: the bias is the bn's
    x, outs = run(model)
    p = params(model, 0)
    z = np_conv2d(x[0].astype(np.float64), p["conv.weight"], 1, 1, 1, 1, 1)
    close(outs[0][0], leaky(bn_ref(z, p, profile)), rtol=2e-4, atol=1e-4)
    other = leaky(bn_ref(z, p, "alexeyab" if profile == "pjreddie" else "pjreddie"))
    assert np.abs(outs[0][0] - other).max() > 1e-2 * np.abs(other).max()


def test_batchnorm_layer():
    model = build(net(3, 4, 4) + "[batchnorm]\n", profile="pjreddie")
    names = [n for n, _ in model.layers[0].darknet_params()]
    assert names == ["bn.weight", "bn.running_mean", "bn.running_var"]  # no biases
    x, outs = run(model)
    p = params(model, 0)
    p["bn.bias"] = np.zeros(3)  # never loaded: stays 0
    close(outs[0][0], bn_ref(x[0].astype(np.float64), p, "pjreddie"))


def blur_ref(x, antialiasing, stride_y, stride_x):
    """AlexeyAB antialiasing: depthwise blur at the layer's stride (input_layer, LINEAR)."""
    c = x.shape[0]
    if antialiasing == 1:
        k = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16.
        pad = 1
    else:
        k = np.full((2, 2), 0.25)
        pad = 0
    w = np.broadcast_to(k, (c, 1) + k.shape)
    return np_conv2d(x, w, stride_y, stride_x, pad, 1, c)


# (antialiasing, input (C,H,W), stride, hand-computed output)
AA_CASES = [
    (1, (3, 8, 8), 2, (4, 4, 4)),   # conv 8x8, blur (8+2-3)/2+1 = 4
    (2, (3, 8, 8), 2, (4, 4, 4)),   # blur (8-2)/2+1 = 4
    (1, (3, 7, 7), 2, (4, 4, 4)),   # (7+2-3)/2+1 = 4
    (2, (3, 7, 7), 2, (4, 3, 3)),   # (7-2)/2+1 = 3
    (1, (3, 6, 5), 1, (4, 6, 5)),
]


@pytest.mark.parametrize("aa,in_shape,stride,out_shape", AA_CASES)
def test_convolutional_antialiasing(aa, in_shape, stride, out_shape):
    model = build(net(*in_shape) + f"[convolutional]\nfilters=4\nsize=3\npad=1\nstride={stride}\n"
                  f"antialiasing={aa}\nactivation=leaky\n")
    assert model.specs[0].out_shape == out_shape
    assert model.arch.profile == "alexeyab"
    x, outs = run(model)
    p = params(model, 0)
    assert set(p) == {"conv.bias", "conv.weight"}  # the blur is not in the weights file
    conv = leaky(np_conv2d(x[0].astype(np.float64), p["conv.weight"], 1, 1, 1, 1, 1)
                 + p["conv.bias"][:, None, None])
    close(outs[0][0], blur_ref(conv, aa, stride, stride))


# --------------------------------------------------------------------------------------
# [connected]: values from a hand-written .weights file (biases, weights, then bn)
# --------------------------------------------------------------------------------------
def weights_file(path, arrays, header=(0, 2, 0), seen=0, seen64=True):
    with open(path, "wb") as f:
        f.write(struct.pack("<3i", *header))
        f.write(struct.pack("<Q" if seen64 else "<i", seen))
        for a in arrays:
            f.write(np.asarray(a, "<f4").tobytes())


@pytest.mark.parametrize("profile", ["pjreddie", "alexeyab"])
@pytest.mark.parametrize("bn", [0, 1])
def test_connected(tmp_path, profile, bn):
    c, h, w, out = 2, 3, 2, 5
    model = build(net(c, h, w) + f"[connected]\noutput={out}\nbatch_normalize={bn}\n"
                  "activation=leaky\n", profile=profile)
    assert model.specs[0].out_shape == (out, 1, 1)
    rng = np.random.default_rng(3)
    biases = rng.normal(size=out)
    weights = rng.normal(size=(out, c * h * w))
    scales, mean, var = rng.normal(size=out), rng.normal(size=out), rng.uniform(1e-4, 1e-3, out)
    arrays = [biases, weights] + ([scales, mean, var] if bn else [])
    weights_file(tmp_path / "c.weights", arrays)
    model.load_weights(tmp_path / "c.weights")
    x, outs = run(model)
    z = weights.astype(F32).astype(np.float64) @ x[0].reshape(-1).astype(np.float64)
    biases, scales, mean, var = (a.astype(F32).astype(np.float64)
                                 for a in (biases, scales, mean, var))
    if bn:
        std = np.sqrt(var) + 1e-6 if profile == "pjreddie" else np.sqrt(var + 1e-5)
        z = (z - mean) / std * scales
    close(outs[0][0, :, 0, 0], leaky(z + biases), rtol=2e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# [maxpool], [local_avgpool], [avgpool]
# --------------------------------------------------------------------------------------
def c_forward_maxpool(x, size, stride_x, stride_y, pad, avg=False):
    """maxpool_layer.c forward_maxpool_layer / forward_local_avgpool_layer, (B, C, H, W)."""
    batch, c, lh, lw = x.shape
    out_h = (lh + pad - size) // stride_y + 1
    out_w = (lw + pad - size) // stride_x + 1
    w_offset = int(-pad / 2)
    h_offset = int(-pad / 2)
    inp = x.reshape(-1)
    out = np.zeros(batch * c * out_h * out_w, F32)
    for b in range(batch):
        for k in range(c):
            for i in range(out_h):
                for j in range(out_w):
                    out_index = j + out_w * (i + out_h * (k + c * b))
                    best, total, counter = -FLT_MAX, F32(0), 0
                    for n in range(size):
                        for m in range(size):
                            cur_h = h_offset + i * stride_y + n
                            cur_w = w_offset + j * stride_x + m
                            index = cur_w + lw * (cur_h + lh * (k + b * c))
                            valid = 0 <= cur_h < lh and 0 <= cur_w < lw
                            val = inp[index] if valid else -FLT_MAX
                            best = val if val > best else best
                            if valid:
                                counter += 1
                                total += inp[index]
                    out[out_index] = total / counter if avg else best
    return out.reshape(batch, c, out_h, out_w)


# (options, input (C,H,W), hand-computed output shape, size, stride_x, stride_y, padding)
POOL_CASES = [
    ("size=2 stride=1", (2, 5, 5), (2, 5, 5), 2, 1, 1, 1),      # keeps size: extends right/bottom
    ("size=2 stride=2", (2, 5, 7), (2, 3, 4), 2, 2, 2, 1),      # odd input: ceil
    ("size=2 stride=2", (2, 6, 4), (2, 3, 2), 2, 2, 2, 1),
    ("size=3 stride=1", (2, 5, 6), (2, 5, 6), 3, 1, 1, 2),
    ("size=5 stride=1", (2, 6, 5), (2, 6, 5), 5, 1, 1, 4),      # YOLOv3-SPP
    ("size=3 stride=2", (2, 7, 6), (2, 4, 3), 3, 2, 2, 2),
    ("size=2 stride_x=2 stride_y=1", (2, 5, 6), (2, 5, 3), 2, 2, 1, 1),
    ("size=2 stride=2 stride_y=1", (2, 5, 6), (2, 5, 3), 2, 2, 1, 1),
    ("size=2 stride=2 padding=0", (2, 5, 5), (2, 2, 2), 2, 2, 2, 0),
    ("size=3 stride=1 padding=3", (2, 5, 5), (2, 6, 6), 3, 1, 1, 3),
    ("stride=2", (2, 4, 5), (2, 2, 3), 2, 2, 2, 1),              # size defaults to stride
    ("size=1 stride=1", (2, 3, 4), (2, 3, 4), 1, 1, 1, 0),
]


@pytest.mark.parametrize("options,in_shape,out_shape,size,sx,sy,pad", POOL_CASES,
                         ids=[f"{c[0].replace(' ', ',')}-{c[1][1]}x{c[1][2]}" for c in POOL_CASES])
def test_maxpool(options, in_shape, out_shape, size, sx, sy, pad):
    model = build(net(*in_shape) + "[maxpool]\n" + "\n".join(options.split()) + "\n")
    assert model.specs[0].out_shape == out_shape
    # all-negative input: cells outside the image are ignored (-FLT_MAX), not zeros
    x, outs = run(model, batch=2, lo=-3, hi=-1)
    close(outs[0], c_forward_maxpool(x, size, sx, sy, pad), rtol=0, atol=0)


def test_maxpool_size2_stride1_hand_values():
    model = build(net(1, 2, 3) + "[maxpool]\nsize=2\nstride=1\n")
    x = torch.tensor([[[[-1., -5., -3.], [-4., -2., -6.]]]])
    out = model.forward_all(x)[0][0, 0]
    # windows start at 0 and run past the right/bottom edge, where cells are ignored
    assert out.tolist() == [[-1., -2., -3.], [-2., -2., -6.]]


@pytest.mark.parametrize("c,groups,out_channels", [(4, 2, 2), (5, 2, 2), (6, 4, 4), (3, 1, 1)])
def test_maxpool_depth(c, groups, out_channels):
    model = build(net(c, 3, 4) + f"[maxpool]\nmaxpool_depth=1\nout_channels={out_channels}\n"
                  "size=1\nstride=1\n")
    assert model.specs[0].out_shape == (out_channels, 3, 4)
    x, outs = run(model, batch=2)
    ref = np.empty((2, out_channels, 3, 4), F32)
    for g in range(out_channels):  # forward_maxpool_layer: for (k = g; k < l.c; k += l.out_c)
        ref[:, g] = x[:, g::out_channels].max(axis=1)
    close(outs[0], ref, rtol=0, atol=0)


@pytest.mark.parametrize("options,in_shape,out_shape,size,sx,sy,pad", [
    ("size=3 stride=1", (2, 5, 6), (2, 5, 6), 3, 1, 1, 2),
    ("size=2 stride=2", (2, 5, 7), (2, 3, 4), 2, 2, 2, 1),
    ("size=3 stride=2", (2, 7, 6), (2, 4, 3), 3, 2, 2, 2),
    ("size=2 stride_x=1 stride_y=2", (2, 5, 4), (2, 3, 4), 2, 1, 2, 1),
    ("size=3 stride=1 padding=4", (2, 4, 4), (2, 6, 6), 3, 1, 1, 4),
])
def test_local_avgpool(options, in_shape, out_shape, size, sx, sy, pad):
    model = build(net(*in_shape) + "[local_avgpool]\n" + "\n".join(options.split()) + "\n")
    assert model.specs[0].out_shape == out_shape
    x, outs = run(model, batch=2)
    close(outs[0], c_forward_maxpool(x, size, sx, sy, pad, avg=True), rtol=1e-5, atol=1e-6)


def test_local_avgpool_corner_is_mean_of_valid_cells():
    model = build(net(1, 2, 2) + "[local_avgpool]\nsize=3\nstride=1\n")
    x = torch.tensor([[[[1., 2.], [3., 6.]]]])
    out = model.forward_all(x)[0][0, 0]
    assert out.tolist() == [[3., 3.], [3., 3.]]  # every window covers the 4 valid cells


def test_avgpool():
    model = build(net(3, 5, 4) + "[avgpool]\n")
    assert model.specs[0].out_shape == (3, 1, 1)
    x, outs = run(model, batch=2)
    close(outs[0], x.astype(np.float64).mean(axis=(2, 3), keepdims=True))


# --------------------------------------------------------------------------------------
# [upsample]
# --------------------------------------------------------------------------------------
def c_upsample(inp, w, h, c, batch, stride, forward, scale, out):
    """blas.c upsample_cpu; ``inp``/``out`` flat float32 arrays, modified in place."""
    for b in range(batch):
        for k in range(c):
            for j in range(h * stride):
                for i in range(w * stride):
                    in_index = b * w * h * c + k * w * h + (j // stride) * w + i // stride
                    out_index = b * w * h * c * stride * stride + k * w * h * stride * stride + \
                        j * w * stride + i
                    if forward:
                        out[out_index] = scale * inp[in_index]
                    else:
                        inp[in_index] += scale * out[out_index]


@pytest.mark.parametrize("stride,scale,in_shape,out_shape", [
    (2, None, (2, 3, 4), (2, 6, 8)),
    (2, 0.5, (2, 3, 4), (2, 6, 8)),
    (3, 1.5, (1, 2, 3), (1, 6, 9)),
    (-2, None, (2, 4, 6), (2, 2, 3)),
    (-2, 0.25, (2, 4, 6), (2, 2, 3)),
])
def test_upsample(stride, scale, in_shape, out_shape):
    text = net(*in_shape) + f"[upsample]\nstride={stride}\n" + \
        (f"scale={scale}\n" if scale is not None else "")
    model = build(text)
    assert model.specs[0].out_shape == out_shape
    x, outs = run(model, batch=2)
    s = 1.0 if scale is None else scale
    c, h, w = in_shape
    ref = np.zeros((2,) + out_shape, F32).reshape(-1)
    if stride > 0:   # forward_upsample_layer: upsample_cpu(input, w, h, c, ..., 1, scale, output)
        c_upsample(x.reshape(-1), w, h, c, 2, stride, 1, F32(s), ref)
    else:            # reverse: upsample_cpu(output, out_w, out_h, c, ..., 0, scale, input)
        c_upsample(ref, out_shape[2], out_shape[1], c, 2, -stride, 0, F32(s), x.reshape(-1))
    close(outs[0], ref.reshape((2,) + out_shape), rtol=1e-6, atol=1e-6)


def test_upsample_hand_values():
    model = build(net(1, 1, 2) + "[upsample]\nstride=2\nscale=0.5\n")
    out = model.forward_all(torch.tensor([[[[2., 4.]]]]))[0][0, 0]
    assert out.tolist() == [[1., 1., 2., 2.], [1., 1., 2., 2.]]


# --------------------------------------------------------------------------------------
# [reorg] and [reorg3d]
# --------------------------------------------------------------------------------------
def c_reorg_cpu(x, w, h, c, batch, stride, forward, out):
    """blas.c reorg_cpu (pjreddie naming), flat arrays; ``out`` written."""
    out_c = c // (stride * stride)
    for b in range(batch):
        for k in range(c):
            for j in range(h):
                for i in range(w):
                    in_index = i + w * (j + h * (k + c * b))
                    c2 = k % out_c
                    offset = k // out_c
                    w2 = i * stride + offset % stride
                    h2 = j * stride + offset // stride
                    out_index = w2 + w * stride * (h2 + h * stride * (c2 + out_c * b))
                    if forward:
                        out[out_index] = x[in_index]
                    else:
                        out[in_index] = x[out_index]


@pytest.mark.parametrize("in_shape,stride", [((8, 4, 6), 2), ((4, 4, 2), 2), ((18, 3, 6), 3)])
def test_reorg_is_reorg_cpu_with_input_dims(in_shape, stride):
    c, h, w = in_shape
    model = build(net(*in_shape) + f"[reorg]\nstride={stride}\n")
    assert model.specs[0].out_shape == (c * stride * stride, h // stride, w // stride)
    x, outs = run(model, batch=2)
    ref = np.zeros(x.size, F32)
    # reorg_layer.c forward_reorg_layer: reorg_cpu(net.input, l.w, l.h, l.c, ..., 0, l.output)
    c_reorg_cpu(x.reshape(-1), w, h, c, 2, stride, 0, ref)
    close(outs[0], ref.reshape(outs[0].shape), rtol=0, atol=0)
    # and it is neither pixel_unshuffle nor space_to_depth
    assert not np.array_equal(outs[0], torch.nn.functional.pixel_unshuffle(
        torch.from_numpy(x), stride).numpy())


@pytest.mark.parametrize("in_shape,stride", [((8, 2, 3), 2), ((9, 2, 2), 3)])
def test_reorg_reverse(in_shape, stride):
    c, h, w = in_shape
    model = build(net(*in_shape) + f"[reorg]\nstride={stride}\nreverse=1\n")
    assert model.specs[0].out_shape == (c // stride ** 2, h * stride, w * stride)
    x, outs = run(model, batch=2)
    ref = np.zeros(x.size, F32)
    c_reorg_cpu(x.reshape(-1), w, h, c, 2, stride, 1, ref)  # forward=1 with the input dims
    close(outs[0], ref.reshape(outs[0].shape), rtol=0, atol=0)


def c_reorg_cpu_alexeyab(x, out_w, out_h, out_c, batch, stride, forward, out):
    """AlexeyAB blas.c reorg_cpu: same loop, parameters named (and passed) as OUTPUT dims."""
    in_c = out_c // (stride * stride)
    for b in range(batch):
        for k in range(out_c):
            for j in range(out_h):
                for i in range(out_w):
                    in_index = i + out_w * (j + out_h * (k + out_c * b))
                    c2 = k % in_c
                    offset = k // in_c
                    w2 = i * stride + offset % stride
                    h2 = j * stride + offset // stride
                    out_index = w2 + out_w * stride * (h2 + out_h * stride * (c2 + in_c * b))
                    if forward:
                        out[out_index] = x[in_index]
                    else:
                        out[in_index] = x[out_index]


def space_to_depth_loop(x, s):
    """out[(dy*s + dx)*C + c, y, x] = in[c, y*s + dy, x*s + dx] for (B, C, H, W)."""
    bsz, c, h, w = x.shape
    out = np.zeros((bsz, c * s * s, h // s, w // s), x.dtype)
    for b in range(bsz):
        for dy in range(s):
            for dx in range(s):
                for k in range(c):
                    for yy in range(h // s):
                        for xx in range(w // s):
                            out[b, (dy * s + dx) * c + k, yy, xx] = \
                                x[b, k, yy * s + dy, xx * s + dx]
    return out


@pytest.mark.parametrize("in_shape,stride", [((3, 4, 6), 2), ((2, 6, 3), 3), ((8, 4, 4), 2)])
def test_reorg3d_is_space_to_depth(in_shape, stride):
    c, h, w = in_shape
    model = build(net(*in_shape) + f"[reorg3d]\nstride={stride}\n")
    out_shape = (c * stride * stride, h // stride, w // stride)
    assert model.specs[0].out_shape == out_shape
    assert model.arch.profile == "alexeyab"
    x, outs = run(model, batch=2)
    close(outs[0], space_to_depth_loop(x, stride), rtol=0, atol=0)
    # the same as AlexeyAB's reorg_cpu called with the OUTPUT dims (forward_reorg_layer)
    ref = np.zeros(x.size, F32)
    c_reorg_cpu_alexeyab(x.reshape(-1), out_shape[2], out_shape[1], out_shape[0], 2, stride, 0,
                         ref)
    close(outs[0], ref.reshape(outs[0].shape), rtol=0, atol=0)


def test_reorg3d_reverse():
    """AlexeyAB forward_reorg_layer with reverse=1 calls reorg_cpu(input, out_w, out_h, out_c,
    ..., 1) with out = (C/s², H*s, W*s), so its in_c is C/s⁴: the input is re-read with the
    output's dims (and Darknet divides by zero when C < s⁴). darknetpy must reproduce that,
    or refuse reverse=1 in [reorg3d] with a located CfgError - never compute something else."""
    c, h, w, s = 16, 2, 3, 2
    text = net(c, h, w) + f"[reorg3d]\nstride={s}\nreverse=1\n"
    try:
        model = build(text)
    except CfgError as e:
        assert e.key == "reverse" and e.line is not None
        return
    out_shape = (c // (s * s), h * s, w * s)
    assert model.specs[0].out_shape == out_shape
    x, outs = run(model, batch=2)
    ref = np.zeros(x.size, F32)
    c_reorg_cpu_alexeyab(x.reshape(-1), out_shape[2], out_shape[1], out_shape[0], 2, s, 1, ref)
    close(outs[0], ref.reshape(outs[0].shape), rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# [route]
# --------------------------------------------------------------------------------------
ROUTE_BASE = net(3, 4, 5) + """
[convolutional]
filters=4
size=1
activation=linear

[convolutional]
filters=6
size=3
pad=1
activation=linear

[convolutional]
filters=2
size=1
activation=linear
"""


def test_route_several_inputs_in_listed_order():
    model = build(ROUTE_BASE + "\n[route]\nlayers=2,0,-2\n")
    assert model.specs[3].refs == (2, 0, 1)
    assert model.specs[3].out_shape == (12, 4, 5)
    _, o = run(model, batch=2)
    close(o[3], np.concatenate([o[2], o[0], o[1]], axis=1), rtol=0, atol=0)


def test_route_single_input_is_identity():
    model = build(ROUTE_BASE + "\n[route]\nlayers=-3\n")
    assert model.specs[3].refs == (0,)
    _, o = run(model)
    close(o[3], o[0], rtol=0, atol=0)


@pytest.mark.parametrize("groups,group_id", [(2, 0), (2, 1)])
def test_route_groups_take_a_chunk_of_each_input(groups, group_id):
    model = build(ROUTE_BASE + f"\n[route]\nlayers=0,1\ngroups={groups}\ngroup_id={group_id}\n")
    assert model.specs[3].out_shape == (5, 4, 5)
    assert model.arch.profile == "alexeyab"
    _, o = run(model, batch=2)
    a = o[0][:, 2 * group_id:2 * group_id + 2]   # 4 channels -> chunk of 2
    b = o[1][:, 3 * group_id:3 * group_id + 3]   # 6 channels -> chunk of 3
    close(o[3], np.concatenate([a, b], axis=1), rtol=0, atol=0)


def test_route_groups_single_input_chunk():
    model = build(ROUTE_BASE + "\n[route]\nlayers=-2\ngroups=3\ngroup_id=2\n")
    assert model.specs[3].out_shape == (2, 4, 5)
    _, o = run(model)
    close(o[3], o[1][:, 4:6], rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# [shortcut]
# --------------------------------------------------------------------------------------
def c_shortcut_cpu(batch, w1, h1, c1, add, w2, h2, c2, s1, s2, out):
    """pjreddie blas.c shortcut_cpu; layer 1 is the `from` layer, 2 the output. In place."""
    stride = w1 // w2
    sample = w2 // w1
    assert stride == h1 // h2
    assert sample == h2 // h1
    if stride < 1:
        stride = 1
    if sample < 1:
        sample = 1
    minw = min(w1, w2)
    minh = min(h1, h2)
    minc = min(c1, c2)
    for b in range(batch):
        for k in range(minc):
            for j in range(minh):
                for i in range(minw):
                    out_index = i * sample + w2 * (j * sample + h2 * (k + c2 * b))
                    add_index = i * stride + w1 * (j * stride + h1 * (k + c1 * b))
                    out[out_index] = s1 * out[out_index] + s2 * add[add_index]


def pjreddie_shortcut(prev, frm, alpha=1.0, beta=1.0, act=lambda v: v):
    """forward_shortcut_layer (pjreddie): copy the input, shortcut_cpu, activate."""
    out = prev.copy().reshape(-1)
    batch, c2, h2, w2 = prev.shape
    _, c1, h1, w1 = frm.shape
    c_shortcut_cpu(batch, w1, h1, c1, frm.reshape(-1), w2, h2, c2, F32(alpha), F32(beta), out)
    return act(out.reshape(prev.shape))


def c_shortcut_multilayer_cpu(size, src_outputs, batch, n, outputs_of_layers, layers_output,
                              out, inp, weights, nweights, weights_normalization):
    """AlexeyAB blas.c shortcut_multilayer_cpu; normalization 0 none, 1 relu, 2 softmax."""
    relu = lambda v: v if v > 0 else 0  # noqa: E731
    layer_step = nweights // (n + 1)
    step = src_outputs // layer_step if nweights > 0 else 0
    for id_ in range(size):
        src_id = id_
        src_i = src_id % src_outputs
        src_id //= src_outputs
        src_b = src_id
        total, max_val = 1.0, -FLT_MAX
        if weights is not None and weights_normalization:
            if weights_normalization == 2:
                for i in range(n + 1):
                    wv = weights[src_i // step + i * layer_step]
                    if max_val < wv:
                        max_val = wv
            total = 0.0001
            for i in range(n + 1):
                wv = weights[src_i // step + i * layer_step]
                if weights_normalization == 1:
                    total += relu(wv)
                elif weights_normalization == 2:
                    total += math.exp(wv - max_val)
        if weights is not None:
            wv = weights[src_i // step]
            if weights_normalization == 1:
                wv = relu(wv) / total
            elif weights_normalization == 2:
                wv = math.exp(wv - max_val) / total
            out[id_] = inp[id_] * wv
        else:
            out[id_] = inp[id_]
        for i in range(n):
            add_outputs = outputs_of_layers[i]
            if src_i < add_outputs:
                add_index = add_outputs * src_b + src_i
                add = layers_output[i]
                if weights is not None:
                    wv = weights[src_i // step + (i + 1) * layer_step]
                    if weights_normalization == 1:
                        wv = relu(wv) / total
                    elif weights_normalization == 2:
                        wv = math.exp(wv - max_val) / total
                    out[id_] += add[add_index] * wv
                else:
                    out[id_] += add[add_index]


def alexeyab_shortcut(prev, froms, weights=None, normalization=0, act=lambda v: v):
    batch = prev.shape[0]
    src_outputs = prev[0].size
    out = np.zeros(prev.size, np.float64)
    sizes = [f[0].size for f in froms]
    nweights = 0 if weights is None else weights.size
    c_shortcut_multilayer_cpu(prev.size, src_outputs, batch, len(froms), sizes,
                              [f.reshape(-1).astype(np.float64) for f in froms], out,
                              prev.reshape(-1).astype(np.float64), weights, nweights,
                              normalization)
    return act(out.reshape(prev.shape))


def shortcut_net(prev_filters, from_filters, tail):
    return net(3, 4, 5) + f"""
[convolutional]
filters={from_filters}
size=3
pad=1
activation=linear

[convolutional]
filters={prev_filters}
size=1
activation=linear

{tail}
"""


@pytest.mark.parametrize("profile", ["pjreddie", "alexeyab"])
@pytest.mark.parametrize("prev_c,from_c", [(4, 4), (6, 4), (4, 6)])
def test_shortcut_same_size(profile, prev_c, from_c):
    model = build(shortcut_net(prev_c, from_c, "[shortcut]\nfrom=-2\nactivation=leaky\n"),
                  profile=profile)
    assert model.specs[2].out_shape == (prev_c, 4, 5)
    assert model.specs[2].refs == (0,)
    _, o = run(model, batch=2)
    if profile == "pjreddie":
        ref = pjreddie_shortcut(o[1], o[0], act=leaky)
    else:
        ref = alexeyab_shortcut(o[1], [o[0]], act=leaky)
    close(o[2], ref)
    # by hand: only the first min(C) channels are added
    c = min(prev_c, from_c)
    close(o[2][:, :c], leaky(o[1][:, :c] + o[0][:, :c]))
    close(o[2][:, c:], leaky(o[1][:, c:]))


def test_shortcut_pjreddie_alpha_beta():
    model = build(shortcut_net(4, 3, "[shortcut]\nfrom=-2\nalpha=0.5\nbeta=2\n"),
                  profile="pjreddie")
    _, o = run(model, batch=2)
    close(o[2], pjreddie_shortcut(o[1], o[0], 0.5, 2.0))
    close(o[2][:, 3:], o[1][:, 3:])  # not overlapping: neither alpha nor beta


# pjreddie: the `from` layer may be an integer ratio larger (strided) or smaller (sampled)
SPATIAL_NET = net(3, 8, 8) + """
[convolutional]
filters=4
size=3
pad=1
activation=linear

[convolutional]
filters=5
size=3
stride=2
pad=1
activation=linear

[route]
layers=0

[convolutional]
filters=6
size=1
activation=linear
"""


@pytest.mark.parametrize("alpha,beta", [(1, 1), (0.5, -1.5)])
def test_shortcut_pjreddie_from_larger_layer_is_strided(alpha, beta):
    # layer 4: prev = layer 1 (5, 4, 4) via a route; from = layer 0 (4, 8, 8): stride 2
    model = build(SPATIAL_NET + f"\n[route]\nlayers=1\n\n[shortcut]\nfrom=0\nalpha={alpha}\n"
                  f"beta={beta}\nactivation=leaky\n", profile="pjreddie")
    assert model.specs[5].out_shape == (5, 4, 4)
    _, o = run(model, batch=2)
    close(o[5], pjreddie_shortcut(o[4], o[0], alpha, beta, act=leaky))
    # by hand: out[k, j, i] += from[k, 2j, 2i] for k < 4
    hand = o[4].copy()
    hand[:, :4] = alpha * hand[:, :4] + beta * o[0][:, :, ::2, ::2]
    close(o[5], leaky(hand))


@pytest.mark.parametrize("alpha,beta", [(1, 1), (2, 0.5)])
def test_shortcut_pjreddie_from_smaller_layer_is_sampled(alpha, beta):
    # layer 4: prev = layer 3 (6, 8, 8); from = layer 1 (5, 4, 4): sample 2
    model = build(SPATIAL_NET + f"\n[shortcut]\nfrom=1\nalpha={alpha}\nbeta={beta}\n",
                  profile="pjreddie")
    assert model.specs[4].out_shape == (6, 8, 8)
    _, o = run(model, batch=2)
    close(o[4], pjreddie_shortcut(o[3], o[1], alpha, beta))
    hand = o[3].copy()
    hand[:, :5, ::2, ::2] = alpha * hand[:, :5, ::2, ::2] + beta * o[1]
    close(o[4], hand)


MULTI_NET = net(3, 4, 5) + """
[convolutional]
filters=4
size=3
pad=1
activation=linear

[convolutional]
filters=6
size=1
activation=linear

[convolutional]
filters=3
size=1
activation=linear

[convolutional]
filters=4
size=3
pad=1
activation=linear
"""


def test_shortcut_alexeyab_several_from_layers():
    model = build(MULTI_NET + "\n[shortcut]\nfrom=0,-3,2\nactivation=leaky\n")
    assert model.arch.profile == "alexeyab"
    assert model.specs[4].refs == (0, 1, 2)
    _, o = run(model, batch=2)
    close(o[4], alexeyab_shortcut(o[3], [o[0], o[1], o[2]], act=leaky))
    hand = o[3] + o[0] + o[1][:, :4]
    hand[:, :3] += o[2]
    close(o[4], leaky(hand))


@pytest.mark.parametrize("normalization", ["none", "relu", "softmax"])
@pytest.mark.parametrize("weights_type", ["per_feature", "per_channel"])
def test_shortcut_alexeyab_weights(weights_type, normalization):
    model = build(MULTI_NET + f"\n[shortcut]\nfrom=0,-3,2\nweights_type={weights_type}\n"
                  f"weights_normalization={normalization}\nactivation=linear\n")
    n_in = 4  # this layer's channels (previous layer's)
    nweights = 4 if weights_type == "per_feature" else 4 * n_in
    p = params(model, 4)
    assert list(p) == ["weights"] and p["weights"].size == nweights
    _, o = run(model, batch=2)
    ref = alexeyab_shortcut(o[3], [o[0], o[1], o[2]], p["weights"].reshape(-1),
                            {"none": 0, "relu": 1, "softmax": 2}[normalization])
    close(o[4], ref)


def test_shortcut_alexeyab_per_channel_hand_values():
    model = build(net(2, 1, 1) + "[activation]\nactivation=linear\n\n"
                  "[activation]\nactivation=linear\n\n[shortcut]\nfrom=-2\n"
                  "weights_type=per_channel\nweights_normalization=relu\n")
    with torch.no_grad():  # weights [prev c0, prev c1, from c0, from c1]
        model.layers[2].weights.copy_(torch.tensor([1.0, -1.0, 3.0, 2.0]))
    out = model.forward_all(torch.tensor([[[[10.0]], [[20.0]]]]))[2].flatten().tolist()
    # c0: (1*10 + 3*10) / (1e-4 + 1 + 3); c1: (0*20 + 2*20) / (1e-4 + 0 + 2)
    assert out == pytest.approx([40 / 4.0001, 40 / 2.0001], rel=1e-6)


# --------------------------------------------------------------------------------------
# [scale_channels] and [sam]
# --------------------------------------------------------------------------------------
def test_scale_channels():
    model = build(net(3, 4, 5) + """
[convolutional]
filters=4
size=3
pad=1
activation=linear

[avgpool]

[convolutional]
filters=4
size=1
activation=logistic

[scale_channels]
from=-3
activation=leaky
""")
    assert model.specs[3].out_shape == (4, 4, 5)
    _, o = run(model, batch=2)
    # forward_scale_channels_layer: output[i] = input[i / channel_size] * from_output[i]
    frm, scale = o[0].reshape(-1), o[2].reshape(-1)
    channel_size = 4 * 5
    ref = np.array([scale[i // channel_size] * frm[i] for i in range(frm.size)])
    close(o[3], leaky(ref.reshape(o[0].shape)))


def test_scale_channels_scale_wh():
    model = build(net(3, 4, 5) + """
[convolutional]
filters=4
size=3
pad=1
activation=linear

[convolutional]
filters=1
size=1
activation=logistic

[scale_channels]
from=-2
scale_wh=1
""")
    assert model.specs[2].out_shape == (4, 4, 5)
    _, o = run(model, batch=2)
    # scale_wh: input_index = i % channel_size + (i / batch_size) * channel_size
    frm, scale = o[0].reshape(-1), o[1].reshape(-1)
    channel_size, batch_size = 4 * 5, 4 * 4 * 5
    ref = np.array([scale[i % channel_size + (i // batch_size) * channel_size] * frm[i]
                    for i in range(frm.size)])
    close(o[2], ref.reshape(o[0].shape))


def test_scale_channels_needs_a_1x1_previous_layer():
    """make_scale_channels_layer asserts w == 1 && h == 1 for the scaling layer (when not
    scale_wh); a (C, H, W) previous layer must be a located CfgError at build time."""
    text = net(3, 4, 5) + """
[convolutional]
filters=4
size=1
activation=linear

[convolutional]
filters=4
size=1
activation=logistic

[scale_channels]
from=-2
"""
    with pytest.raises(CfgError) as e:
        build(text)
    header = text.splitlines().index("[scale_channels]") + 1
    assert e.value.section == "scale_channels" and e.value.line in (header, header + 1)


def test_sam():
    model = build(net(3, 4, 5) + """
[convolutional]
filters=4
size=3
pad=1
activation=linear

[convolutional]
filters=4
size=1
activation=logistic

[sam]
from=-2
""")
    assert model.arch.profile == "alexeyab"
    _, o = run(model, batch=2)
    close(o[2], o[1] * o[0], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------
# [dropout], [softmax], [crop]
# --------------------------------------------------------------------------------------
def test_dropout_is_identity():
    model = build(net(3, 4, 5) + "[dropout]\nprobability=.5\n")
    x, o = run(model, batch=2)
    close(o[0], x, rtol=0, atol=0)


def c_softmax(inp, temp):
    """blas.c softmax: exp(x/t - largest/t) / sum."""
    largest = max(inp)
    e = [math.exp(v / temp - largest / temp) for v in inp]
    s = sum(e)
    return [v / s for v in e]


@pytest.mark.parametrize("groups,temperature", [(1, 1.0), (2, 1.0), (4, 0.5), (3, 2.0)])
def test_softmax(groups, temperature):
    text = net(3, 2, 2) + f"[softmax]\ngroups={groups}\ntemperature={temperature}\n"
    model = build(text)
    x, o = run(model, batch=2, lo=-4, hi=4)
    n = 12 // groups
    for b in range(2):
        flat = x[b].reshape(-1).astype(np.float64)
        ref = sum((c_softmax(list(flat[g * n:(g + 1) * n]), temperature)
                   for g in range(groups)), [])
        close(o[0][b].reshape(-1), ref, rtol=1e-5, atol=1e-7)
        for g in range(groups):
            assert o[0][b].reshape(-1)[g * n:(g + 1) * n].sum() == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("noadjust", [0, 1])
def test_crop(noadjust):
    model = build(net(2, 8, 7) + f"[crop]\ncrop_height=5\ncrop_width=4\nnoadjust={noadjust}\n")
    assert model.specs[0].out_shape == (2, 5, 4)
    x, o = run(model, batch=2)
    # forward_crop_layer at test time: dh = (8-5)/2 = 1, dw = (7-4)/2 = 1; x*2 - 1 unless noadjust
    crop = x[:, :, 1:6, 1:5]
    close(o[0], crop if noadjust else crop * 2 - 1, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------------------
# detection heads: [yolo], [Gaussian_yolo], [region]
# --------------------------------------------------------------------------------------
def logistic(v):
    return 1 / (1 + np.exp(-v))


def c_forward_yolo(x, n, classes, scale_x_y=1.0, new_coords=False):
    """forward_yolo_layer (AlexeyAB; pjreddie is scale_x_y=1, new_coords=0), (B, C, H, W)."""
    batch, _, h, w = x.shape
    out = x.astype(np.float64).reshape(batch, -1).copy()
    entries = 4 + 1 + classes

    def entry_index(location, entry):
        return (location // (w * h)) * w * h * entries + entry * w * h + location % (w * h)

    for b in range(batch):
        o = out[b]
        for a in range(n):
            bbox_index = entry_index(a * w * h, 0)
            if not new_coords:
                sl = slice(bbox_index, bbox_index + 2 * w * h)
                o[sl] = logistic(o[sl])
                obj_index = entry_index(a * w * h, 4)
                sl = slice(obj_index, obj_index + (1 + classes) * w * h)
                o[sl] = logistic(o[sl])
            sl = slice(bbox_index, bbox_index + 2 * w * h)   # scal_add_cpu
            o[sl] = o[sl] * scale_x_y + (-0.5 * (scale_x_y - 1))
    return out.reshape(x.shape)


YOLO = """[yolo]
mask={mask}
anchors=10,13, 16,30, 33,23, 30,61, 62,45, 59,119
classes={classes}
num=6
{extra}
"""


@pytest.mark.parametrize("mask,classes,extra,scale,new_coords", [
    ("0,1,2", 2, "", 1.0, False),
    ("3,5", 3, "", 1.0, False),
    ("0,1,2", 2, "scale_x_y=1.2", 1.2, False),
    ("0,1,2", 2, "scale_x_y=2.0\nnew_coords=1", 2.0, True),
    ("4", 1, "new_coords=1", 1.0, True),
])
def test_yolo(mask, classes, extra, scale, new_coords):
    a = len(mask.split(","))
    c = a * (5 + classes)
    model = build(net(c, 3, 4) + YOLO.format(mask=mask, classes=classes, extra=extra))
    spec = model.specs[0]
    anchors = [(10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119)]
    assert spec.anchors == tuple(anchors[int(m)] for m in mask.split(","))
    x, o = run(model, batch=2, lo=-4, hi=4)
    close(o[0], c_forward_yolo(x, a, classes, scale, new_coords), rtol=1e-5, atol=1e-6)
    # by hand, anchor by anchor: (x, y, w, h, obj, classes...)
    y = o[0].reshape(2, a, 5 + classes, 3, 4)
    r = x.reshape(2, a, 5 + classes, 3, 4).astype(np.float64)
    close(y[:, :, 2:4], r[:, :, 2:4], rtol=0, atol=0)                     # w, h raw
    if new_coords:
        close(y[:, :, 4:], r[:, :, 4:], rtol=0, atol=0)                   # nothing activated
        close(y[:, :, :2], scale * r[:, :, :2] - (scale - 1) / 2, atol=1e-6)
    else:
        close(y[:, :, 4:], logistic(r[:, :, 4:]), rtol=1e-5, atol=1e-6)
        close(y[:, :, :2], scale * logistic(r[:, :, :2]) - (scale - 1) / 2, atol=1e-6)


def test_gaussian_yolo():
    classes, a, scale = 2, 3, 1.1
    model = build(net(a * (9 + classes), 3, 2) + f"""[Gaussian_yolo]
mask=0,1,2
anchors=10,13, 16,30, 33,23
classes={classes}
num=3
scale_x_y={scale}
""")
    assert model.arch.profile == "alexeyab"
    assert model.specs[0].entries == 9 + classes
    x, o = run(model, batch=2, lo=-4, hi=4)
    y = o[0].reshape(2, a, 9 + classes, 3, 2)
    r = x.reshape(2, a, 9 + classes, 3, 2).astype(np.float64)
    # forward_gaussian_yolo_layer: entries x, sx, y, sy, w, sw, h, sh, obj, classes
    ref = r.copy()
    ref[:, :, [0, 1, 2, 3, 5, 7]] = logistic(r[:, :, [0, 1, 2, 3, 5, 7]])
    ref[:, :, 8:] = logistic(r[:, :, 8:])
    ref[:, :, [0, 2]] = ref[:, :, [0, 2]] * scale - 0.5 * (scale - 1)
    close(y, ref, rtol=1e-5, atol=1e-6)
    close(y[:, :, [4, 6]], r[:, :, [4, 6]], rtol=0, atol=0)  # w, h raw


def c_forward_region_pjreddie(x, n, classes, softmax):
    """pjreddie region_layer.c forward_region_layer (CPU, coords=4, no background)."""
    batch, _, h, w = x.shape
    coords = 4
    entries = coords + 1 + classes
    out = x.astype(np.float64).reshape(batch, -1).copy()
    raw = x.astype(np.float64).reshape(batch, -1)

    def entry_index(location, entry):
        return (location // (w * h)) * w * h * entries + entry * w * h + location % (w * h)

    for b in range(batch):
        for a in range(n):
            i = entry_index(a * w * h, 0)
            out[b, i:i + 2 * w * h] = logistic(out[b, i:i + 2 * w * h])
            i = entry_index(a * w * h, coords)
            out[b, i:i + w * h] = logistic(out[b, i:i + w * h])
            i = entry_index(a * w * h, coords + 1)
            if not softmax:
                out[b, i:i + classes * w * h] = logistic(out[b, i:i + classes * w * h])
    if softmax:  # softmax_cpu(net.input + index, classes, batch*n, inputs/n, w*h, 1, w*h, 1, ...)
        for b in range(batch):
            for a in range(n):
                for loc in range(w * h):
                    base = entry_index(a * w * h, coords + 1) + loc
                    idx = [base + k * w * h for k in range(classes)]
                    out[b, idx] = c_softmax(list(raw[b, idx]), 1.0)
    return out.reshape(x.shape)


def c_flatten(x, size, layers, batch, forward):
    """blas.c flatten (out of place)."""
    swap = np.zeros_like(x)
    for b in range(batch):
        for c in range(layers):
            for i in range(size):
                i1 = b * layers * size + c * size + i
                i2 = b * layers * size + i * layers + c
                if forward:
                    swap[i2] = x[i1]
                else:
                    swap[i1] = x[i2]
    return swap


def c_forward_region_alexeyab(x, n, classes, softmax):
    """AlexeyAB region_layer.c forward_region_layer on the CPU, transposed back to (C, H, W)."""
    batch, _, h, w = x.shape
    size = 4 + classes + 1
    outputs = x[0].size
    out = c_flatten(x.astype(np.float64).reshape(-1), w * h, size * n, batch, 1)
    for b in range(batch):
        for i in range(h * w * n):
            index = size * i + b * outputs
            out[index + 4] = _logistic(out[index + 4])
    if softmax:
        for b in range(batch):
            for i in range(h * w * n):
                index = size * i + b * outputs
                sl = slice(index + 5, index + 5 + classes)
                out[sl] = c_softmax(list(out[sl]), 1.0)
    return c_flatten(out, w * h, size * n, batch, 0).reshape(x.shape)


@pytest.mark.parametrize("profile", ["pjreddie", "alexeyab"])
@pytest.mark.parametrize("softmax", [1, 0])
def test_region(profile, softmax):
    n, classes = 2, 3
    model = build(net(n * (5 + classes), 3, 2) + f"""[region]
anchors=1.08,1.19, 3.42,4.41
classes={classes}
coords=4
num={n}
softmax={softmax}
""", profile=profile)
    assert model.specs[0].anchors == ((1.08, 1.19), (3.42, 4.41))
    x, o = run(model, batch=2, lo=-4, hi=4)
    port = c_forward_region_pjreddie if profile == "pjreddie" else c_forward_region_alexeyab
    close(o[0], port(x, n, classes, softmax), rtol=1e-5, atol=1e-6)
    y = o[0].reshape(2, n, 5 + classes, 3, 2)
    r = x.reshape(2, n, 5 + classes, 3, 2).astype(np.float64)
    close(y[:, :, 2:4], r[:, :, 2:4], rtol=0, atol=0)          # w, h raw in both
    close(y[:, :, 4], logistic(r[:, :, 4]), rtol=1e-5, atol=1e-6)
    xy = logistic(r[:, :, :2]) if profile == "pjreddie" else r[:, :, :2]
    close(y[:, :, :2], xy, rtol=1e-5, atol=1e-6)
    if softmax:
        e = np.exp(r[:, :, 5:] - r[:, :, 5:].max(axis=2, keepdims=True))
        close(y[:, :, 5:], e / e.sum(axis=2, keepdims=True), rtol=1e-5, atol=1e-6)
    elif profile == "pjreddie":
        close(y[:, :, 5:], logistic(r[:, :, 5:]), rtol=1e-5, atol=1e-6)
    else:
        close(y[:, :, 5:], r[:, :, 5:], rtol=0, atol=0)
