"""The optimised module (darknetpy.optimize) computes what the model computes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from darknetpy import load, parse_architecture
from darknetpy.model import Darknet
from darknetpy.optimize import fold_batchnorm, optimize
from darknetpy.verify import compare, load_reference, verify_model

# yolov4 at 320x320: Darknet's own float32 rounding (its sequential gemm accumulation) puts its
# last layers ~1.4e-3 (relative) from the exact result; the eager model is at the same
# distance (see test_reference.py), so the optimised one is checked at 2e-3 as well.
ROUNDING_LIMITED = {"yolov4_dog_alexeyab": 2e-3}


def _load_case(reference_dir, case, case_weights):
    case_dir = reference_dir / "cases" / case
    meta = json.loads((case_dir / "case.json").read_text())
    ref = load_reference(case_dir)
    c, h, w = ref.input.shape
    model = load(case_dir / "model.cfg", case_weights(case), profile=meta["impl"], width=w,
                 height=h, tree=str(reference_dir / "names" / "9k.tree"))
    return meta, ref, model


def test_optimized_fp32_verifies(reference_dir, reference_case, case_weights):
    """Every layer of the optimised fp32 forward, and its returned outputs (heads, or the
    classifier's last layer), match Darknet's reference outputs."""
    meta, ref, model = _load_case(reference_dir, reference_case, case_weights)
    fast = optimize(model)
    rtol = ROUNDING_LIMITED.get(reference_case, 1e-3)
    report = verify_model(fast, ref, rtol=rtol)
    assert report.compared == len(meta["layers"]), "every recorded layer is compared"
    assert report.ok, report.table()

    # what forward returns: NCHW contiguous float32, in Darknet's layout
    x = torch.from_numpy(np.ascontiguousarray(ref.input, dtype=np.float32))[None]
    outs = fast(x)
    wanted = fast.heads or [len(fast.specs) - 1]
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert len(outs) == len(wanted)
    for i, out in zip(wanted, outs):
        assert out.dtype == torch.float32 and out.is_contiguous()
        assert tuple(out.shape) == (1, *fast.specs[i].out_shape)
        data, stride = ref.layers[i]
        _, max_rel, _, ok = compare(out[0].numpy(), data, stride, 0.0, rtol, ref.stats.get(i))
        assert ok, f"layer {i}: max rel {max_rel:.3g}"


def _random_model(cfg: str, profile: str) -> Darknet:
    model = Darknet(parse_architecture_text(cfg, profile))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) * 2 + 1e-3)
    return model.eval().requires_grad_(False)


def parse_architecture_text(text: str, profile: str):
    from darknetpy.cfg import parse_cfg
    return parse_architecture(parse_cfg(text), profile=profile, warn=False)


SMALL_CFG = """
[net]
width=32
height=32
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
groups=8
activation=mish

[convolutional]
batch_normalize=1
filters=8
size=1
stride=1
pad=1
activation=linear

[shortcut]
from=-2
activation=leaky

[maxpool]
size=2
stride=1

[route]
layers=-1,-4

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=swish

[upsample]
stride=2

[convolutional]
size=1
stride=1
pad=1
filters=21
activation=linear

[yolo]
mask=0,1,2
anchors=10,13, 16,30, 33,23
classes=2
num=3
scale_x_y=1.05
"""


@pytest.mark.parametrize("profile", ["pjreddie", "alexeyab"])
def test_folded_batchnorm_equals_unfolded(profile):
    """A conv with its batch norm folded (float64 fold, profile's formula) gives the conv
    followed by Darknet's batch norm within 1e-5."""
    model = _random_model(SMALL_CFG, profile)
    layer = model.layers[0]
    x = torch.rand(2, 3, 32, 32)
    w, b = fold_batchnorm(layer, profile)
    folded = torch.nn.functional.conv2d(x.double(), w, b, 1, 1)
    # the reference in float64: conv, then the profile's batch-norm formula
    conv = torch.nn.functional.conv2d(x.double(), layer.conv.weight.double(), None, 1, 1)
    bn = layer.bn
    std = (bn.running_var.double().sqrt() + 1e-6 if profile == "pjreddie"
           else (bn.running_var.double() + 1e-5).sqrt())
    ref = ((conv - bn.running_mean.double().view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
           * bn.weight.double().view(1, -1, 1, 1) + bn.bias.double().view(1, -1, 1, 1))
    assert torch.allclose(folded, ref, rtol=1e-9, atol=1e-9)
    # and the float32 eager layer agrees with the folded float32 conv within 1e-5
    eager = layer.bn(layer.conv(x))
    fast = torch.nn.functional.conv2d(x, w.float(), b.float(), 1, 1)
    scale = max(1.0, eager.abs().max().item())
    assert (eager - fast).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("profile", ["pjreddie", "alexeyab"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_optimized_matches_eager_small(profile, channels_last):
    """Every layer type of the small cfg (grouped conv, mish, shortcut, odd maxpool, route,
    swish, upsample, yolo with scale_x_y), batch 3, fp32: optimised == eager within 1e-5."""
    model = _random_model(SMALL_CFG, profile)
    fast = optimize(model, channels_last=channels_last)
    x = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        want = model(x)
        got = fast(x)
    assert len(got) == len(want) == 1
    for a, b in zip(want, got):
        assert b.dtype == torch.float32 and b.is_contiguous() and a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())
    # every layer, through iter_layers
    for (i, a), b in zip(model.iter_layers(x), fast.forward_all(x)):
        assert a.shape == b.shape, i
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item()), i
    # the input is not modified, and a second call gives the same result
    x2 = x.clone()
    again = fast(x)
    assert torch.equal(x, x2) and torch.equal(again[0], got[0])


def test_bf16_close_and_float32_output():
    model = _random_model(SMALL_CFG, "alexeyab")
    fast = optimize(model, precision="bf16")
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        want = model(x)
        got = fast(x)
    assert got[0].dtype == torch.float32 and got[0].is_contiguous()
    assert (want[0] - got[0]).abs().max().item() < 0.1


def test_unknown_precision():
    model = _random_model(SMALL_CFG, "alexeyab")
    with pytest.raises(ValueError, match="precision"):
        optimize(model, precision="int8")
