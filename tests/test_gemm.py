"""darknetpy.gemm: Darknet's sequential float32 gemm order, and the "darknet" arithmetic mode.

Darknet's ``gemm_nn`` accumulates every output as ``c = 0; for k: c += a[k] * b[k]`` in
float32, a rounded multiply then a rounded add. The hand-made cases here are ones where
that order gives a different float32 result from the exact sum, from pairwise summation
and from a fused multiply-add, checked against a plain Python loop over numpy float32
scalars.
"""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from darknetpy import Darknet, gemm, load, parse_architecture, parse_cfg
from darknetpy.verify import load_reference, verify_model

f32 = np.float32


def python_gemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(M, K) @ (K, L) as Darknet's C loop, one numpy float32 scalar operation at a time."""
    m, k = a.shape
    out = np.zeros((m, b.shape[1]), f32)
    for i in range(m):
        for j in range(b.shape[1]):
            c = f32(0)
            for kk in range(k):
                c = f32(c + f32(a[i, kk] * b[kk, j]))
            out[i, j] = c
    return out


def seq(a: np.ndarray, b: np.ndarray, **kw) -> np.ndarray:
    return gemm.sequential_gemm(torch.from_numpy(a), torch.from_numpy(b), **kw).numpy()


# --------------------------------------------------------------------------------------
# Summation order
# --------------------------------------------------------------------------------------

def test_order_matters_hand_case():
    # 1e8 + 1 == 1e8 in float32 (ulp 8): sequentially the ones are lost before -1e8 comes
    a = np.array([[1e8, 1, 1, 1, 1, -1e8, 0.25, 0.25]], f32)
    b = np.ones((8, 1), f32)
    ours = seq(a, b)[0, 0]
    assert ours == python_gemm(a, b)[0, 0] == f32(0.5)
    assert float(a.astype(np.float64).sum()) == 4.5                       # exact
    assert python_gemm(a[:, ::-1].copy(), b)[0, 0] != ours                # order matters
    assert float(torch.from_numpy(a).double().sum()) != float(ours)


def test_no_fused_multiply_add():
    # step 2: fl(-1 + fl(x*x)) = 2^-11, but fma(x, x, -1) = 2^-11 + 2^-24
    x = f32(1 + 2.0 ** -12)
    a = np.array([[1, x]], f32)
    b = np.array([[-1], [x]], f32)
    ours = seq(a, b)[0, 0]
    assert ours == f32(2.0 ** -11) == python_gemm(a, b)[0, 0]
    fused = f32(np.float64(x) * np.float64(x) - 1)
    assert fused == f32(2.0 ** -11 + 2.0 ** -24) != ours
    # and torch.addcmul_ on the CPU *is* fused, which is why darknetpy.gemm avoids it
    c = torch.tensor([-1.0])
    c.addcmul_(torch.tensor([float(x)]), torch.tensor([float(x)]))
    assert c.item() in (float(ours), float(fused))


@pytest.mark.parametrize("g,m,k,l", [(1, 3, 37, 50), (1, 50, 20, 3), (3, 2, 9, 7), (4, 1, 9, 1),
                                     (1, 1, 64, 1), (2, 5, 1, 6), (1, 7, 300, 2)])
@pytest.mark.parametrize("kw", [{}, {"tile": 3, "chunk": 5}, {"tile": 1, "chunk": 1},
                                {"tile": 16, "chunk": 100, "threads": 2}])
def test_matches_python_loop(g, m, k, l, kw):
    rng = np.random.default_rng(g * 1000 + m * 100 + k + l)
    # wide dynamic range so that the order changes the rounding
    a = (rng.standard_normal((g, m, k)) * 10.0 ** rng.integers(-3, 4, (g, m, k))).astype(f32)
    b = (rng.standard_normal((g, k, l)) * 10.0 ** rng.integers(-3, 4, (g, k, l))).astype(f32)
    ours = seq(a, b, **kw)
    ref = np.stack([python_gemm(a[i], b[i]) for i in range(g)])
    np.testing.assert_array_equal(ours, ref)
    assert ours.dtype == f32


@pytest.mark.parametrize("shape", [(2, 4, 40, 6), (2, 6, 40, 4), (1, 1, 30, 1)])
def test_torch_loop_fallback_matches(monkeypatch, shape):
    # the per-k torch loop (other devices, or a numpy that would not reduce in order)
    monkeypatch.setattr(gemm, "_numpy_ok", False)
    g, m, k, l = shape
    rng = np.random.default_rng(5)
    a = (rng.standard_normal((g, m, k)) * 1e3).astype(f32)
    b = rng.standard_normal((g, k, l)).astype(f32)
    ref = np.stack([python_gemm(a[i], b[i]) for i in range(g)])
    np.testing.assert_array_equal(seq(a, b), ref)


def test_numpy_kernel_self_check():
    assert gemm.numpy_kernel_ok()


def test_2d_empty_and_errors():
    a = np.arange(6, dtype=f32).reshape(2, 3)
    b = np.ones((3, 4), f32)
    assert seq(a, b).shape == (2, 4)
    assert seq(np.zeros((2, 0), f32), np.zeros((0, 4), f32)).tolist() == [[0.0] * 4] * 2
    with pytest.raises(ValueError, match="do not multiply"):
        seq(a, np.ones((4, 4), f32))
    with pytest.raises(ValueError, match="inference only"):
        gemm.sequential_gemm(torch.ones(2, 3, requires_grad=True), torch.ones(3, 1))


# --------------------------------------------------------------------------------------
# conv2d / linear against torch (same values up to float32 rounding)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("c,m,size,stride,pad,dil,groups,hw", [
    (3, 8, 3, (1, 1), 1, 1, 1, (9, 11)),
    (12, 8, 3, (2, 1), 2, 2, 4, (17, 19)),     # groups, asymmetric stride, dilation
    (6, 6, 3, (2, 2), 1, 1, 6, (8, 8)),        # depthwise
    (5, 7, 1, (1, 1), 0, 1, 1, (6, 5)),        # 1x1: the input is the matrix
    (4, 4, 1, (2, 2), 0, 1, 2, (7, 7)),        # 1x1 with stride
    (2, 3, 2, (2, 2), 0, 1, 1, (5, 5)),        # even kernel
    (3, 2, 3, (1, 1), 1, 1, 1, (1, 1)),        # one output pixel
])
def test_conv2d_matches_torch(c, m, size, stride, pad, dil, groups, hw):
    torch.manual_seed(0)
    x = torch.randn(2, c, *hw)
    w = torch.randn(m, c // groups, size, size)
    bias = torch.randn(m)
    ours = gemm.conv2d(x, w, bias, stride, pad, dil, groups, tile=7, chunk=11)
    ref = F.conv2d(x, w, bias, stride, pad, dil, groups)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_conv2d_is_sequential_in_im2col_order():
    # one output, k order = (channel, ky, kx): first channel holds 1e8 and ones, second -1e8
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0] = torch.tensor([[1e8, 1.0], [1.0, 1.0]])
    x[0, 1] = torch.tensor([[-1e8, 0.5], [0.0, 0.0]])
    w = torch.ones(1, 2, 2, 2)
    assert gemm.conv2d(x, w).item() == 0.5  # the three ones vanish into 1e8


def test_linear_matches_torch_and_loop():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, 50)) * 100).astype(f32)
    w = rng.standard_normal((7, 50)).astype(f32)
    bias = rng.standard_normal(7).astype(f32)
    ours = gemm.linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias))
    np.testing.assert_array_equal(ours.numpy(), python_gemm(x, w.T.copy()) + bias)
    torch.testing.assert_close(ours, F.linear(torch.from_numpy(x), torch.from_numpy(w),
                                              torch.from_numpy(bias)), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------
# Batch norm and leaky in Darknet's C arithmetic
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["pjreddie", "alexeyab"])
def test_batchnorm_double_division(profile):
    from darknetpy.layers.conv import DarknetBatchNorm
    torch.manual_seed(1)
    bn = DarknetBatchNorm(4, profile).requires_grad_(False)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.01, 3)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 4, 5, 6) * 3
    ours = gemm.batchnorm(x, bn).numpy()
    xn, m, v = x.numpy(), bn.running_mean.numpy(), bn.running_var.numpy()
    s, b = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    for ch in range(4):
        if profile == "alexeyab":   # (x - mean) / sqrt(var + .00001f): double sqrt and divide
            std = np.sqrt(np.float64(f32(v[ch] + f32(1e-5))))
        else:                       # (x - mean) / (sqrt(var) + .000001f)
            std = np.sqrt(np.float64(v[ch])) + np.float64(f32(1e-6))
        ref = ((xn[:, ch] - m[ch]).astype(np.float64) / std).astype(f32) * s[ch] + b[ch]
        np.testing.assert_array_equal(ours[:, ch], ref)


def test_leaky_arithmetic():
    from darknetpy.layers.activations import Activation
    act = Activation("leaky")
    x = -torch.linspace(0.01, 3, 20).reshape(1, 20)    # 20 values: AVX loop 0..15, tail 16..19
    flt = (x * f32(0.1)).numpy()
    dbl = (x.double() * 0.1).float().numpy()
    assert (flt != dbl).any()
    np.testing.assert_array_equal(gemm.activation(x, act, "pjreddie").numpy(), dbl)
    ab = gemm.activation(x, act, "alexeyab").numpy()
    np.testing.assert_array_equal(ab[:, :16], flt[:, :16])
    np.testing.assert_array_equal(ab[:, 16:], dbl[:, 16:])
    np.testing.assert_array_equal(gemm.activation(x, act, "alexeyab", vector_loop=False).numpy(),
                                  flt)
    assert gemm._avx_main_length(16) == 8 and gemm._avx_main_length(8) == 0
    pos = torch.tensor([[0.5, 2.0]])
    assert torch.equal(gemm.activation(pos, act, "alexeyab"), pos)


# --------------------------------------------------------------------------------------
# The model-level switch
# --------------------------------------------------------------------------------------

CFG = """
[net]
width=12
height=10
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[convolutional]
filters=8
size=3
stride=2
pad=1
groups=8
activation=linear

[convolutional]
batch_normalize=1
filters=4
size=1
stride=1
activation=mish

[connected]
output=5
activation=leaky
"""


def small_model(profile: str) -> Darknet:
    arch = parse_architecture(parse_cfg(textwrap.dedent(CFG)), profile=profile, warn=False)
    model = Darknet(arch).eval().requires_grad_(False)
    torch.manual_seed(2)
    for _, _, name, t in model.darknet_params():
        if name.endswith("running_var"):
            t.data.uniform_(0.5, 2)
        else:
            t.data.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("profile", ["pjreddie", "alexeyab"])
def test_set_arithmetic_close_to_torch(profile):
    model = small_model(profile)
    x = torch.rand(2, 3, 10, 12)
    with torch.inference_mode():
        ref = model.forward_all(x)
        assert model.set_arithmetic("darknet") is model
        assert all(getattr(layer, "arithmetic", "darknet") == "darknet" for layer in model.layers)
        ours = model.forward_all(x)
        model.set_arithmetic("torch")
        again = model.forward_all(x)
    for a, b, c in zip(ours, ref, again):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert torch.equal(b, c)


def test_arithmetic_mode_errors(tmp_path):
    model = small_model("alexeyab")
    with pytest.raises(ValueError, match="unknown arithmetic"):
        model.set_arithmetic("fast")
    cfg = tmp_path / "m.cfg"
    cfg.write_text(textwrap.dedent(CFG))
    with pytest.raises(ValueError, match="unknown arithmetic"):
        load(cfg, arithmetic="exact")
    assert all(getattr(m, "arithmetic", "darknet") == "darknet"
               for m in load(cfg, arithmetic="darknet").layers)


# --------------------------------------------------------------------------------------
# Against the reference Darknet outputs
# --------------------------------------------------------------------------------------

#: cases whose every layer except the detection heads (whose logistic is not emulated) is
#: bit-for-bit Darknet's in darknet arithmetic
BIT_EXACT = ["yolov4-tiny_dog_alexeyab", "yolov3-tiny_dog_pjreddie",
             "yolov2-tiny-voc_horses_pjreddie"]
HEADS = {"yolo", "region", "gaussian_yolo", "detection"}


def _verify(reference_dir, case_weights, case):
    case_dir = reference_dir / "cases" / case
    meta = json.loads((case_dir / "case.json").read_text())
    ref = load_reference(case_dir)
    c, h, w = ref.input.shape
    model = load(case_dir / "model.cfg", case_weights(case), profile=meta["impl"], width=w,
                 height=h, arithmetic="darknet")
    return model, ref, meta


@pytest.mark.parametrize("case", BIT_EXACT)
def test_reference_bit_exact(reference_dir, case_weights, case):
    model, ref, meta = _verify(reference_dir, case_weights, case)
    x = torch.from_numpy(np.ascontiguousarray(ref.input))[None]
    with torch.inference_mode():
        for i, out in model.iter_layers(x):
            if model.specs[i].type in HEADS:
                continue
            expected, stride = ref.layers[i]
            ours = out[0].numpy().reshape(-1)
            ours = ours[::stride] if stride else ours
            assert np.array_equal(ours, expected.reshape(-1)), \
                f"{case} layer {i} [{model.specs[i].type}]: " \
                f"{np.mean(ours != expected.reshape(-1)):.4f} of the values differ"
    assert verify_model(model, ref).ok


@pytest.fixture(scope="module")
def yolov4_report(reference_dir, case_weights):
    model, ref, _ = _verify(reference_dir, case_weights, "yolov4_dog_alexeyab")
    return verify_model(model, ref)


def test_yolov4_darknet_arithmetic_bounded(yolov4_report):
    # every layer compared; the worst is bounded (regression guard; see the next test)
    assert yolov4_report.compared == len(yolov4_report.rows)
    assert yolov4_report.worst.max_rel < 2e-3, yolov4_report.table()


@pytest.mark.xfail(strict=True, reason="yolov4's mish is vectorised in the reference build "
                   "(libmvec expf/logf, RCPPS+Newton division, CPU-specific); its ulp-level "
                   "differences grow to ~1e-3 by layer 158 whatever the gemm order")
def test_yolov4_darknet_arithmetic_passes(yolov4_report):
    assert yolov4_report.ok, yolov4_report.table()
