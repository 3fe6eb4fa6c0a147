"""``.weights`` files (``parser.c: load_weights_upto`` / ``save_weights_upto``): per-layer
parameter order checked on hand-written files, save/load round trips that reproduce the
bytes, and every real trained weights file in the reference directory."""
from __future__ import annotations

import os
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import darknetpy
from darknetpy import CfgError, Darknet, parse_architecture, parse_cfg
from darknetpy.weights import WeightsHeader, expected_bytes, parse_header

NET = "[net]\nwidth=6\nheight=6\nchannels=3\n\n"

#: every parameterised layer kind, with parameter-free layers between them
ALL_KINDS = NET + """
[convolutional]
batch_normalize=1
filters=4
size=3
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
filters=4
size=1
groups=2
activation=linear

[batchnorm]

[shortcut]
from=-3
weights_type=per_channel
weights_normalization=softmax

[shortcut]
from=-2,-4
weights_type=per_feature

[connected]
output=7
batch_normalize=1
activation=leaky

[dropout]

[connected]
output=3
activation=linear
"""


def build(text: str, profile: str | None = None) -> Darknet:
    arch = parse_architecture(parse_cfg(textwrap.dedent(text)), profile=profile, warn=False)
    return Darknet(arch).eval()


def randomize(model: Darknet, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, name, t in model.darknet_params():
            t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var")
                    else torch.randn(t.shape, generator=g))


def flat(model: Darknet) -> np.ndarray:
    return torch.cat([t.detach().flatten() for *_, t in model.darknet_params()]).numpy()


# --------------------------------------------------------------------------------------
# parameter order, checked on hand-written files
# --------------------------------------------------------------------------------------
def test_parameter_order_per_layer(tmp_path):
    model = build(ALL_KINDS)
    got = [(i, spec.type, name, tuple(t.shape)) for i, spec, name, t in model.darknet_params()]
    assert got == [
        # load_convolutional_weights: biases, scales, rolling_mean, rolling_variance, weights
        (0, "convolutional", "bn.bias", (4,)),
        (0, "convolutional", "bn.weight", (4,)),
        (0, "convolutional", "bn.running_mean", (4,)),
        (0, "convolutional", "bn.running_var", (4,)),
        (0, "convolutional", "conv.weight", (4, 3, 3, 3)),
        # (maxpool: nothing) groups=2: c/groups input channels per filter
        (2, "convolutional", "conv.bias", (4,)),
        (2, "convolutional", "conv.weight", (4, 2, 1, 1)),
        # load_batchnorm_weights: scales, rolling_mean, rolling_variance (no biases)
        (3, "batchnorm", "bn.weight", (4,)),
        (3, "batchnorm", "bn.running_mean", (4,)),
        (3, "batchnorm", "bn.running_var", (4,)),
        # load_shortcut_weights: (n+1)*c per channel, n+1 per feature
        (4, "shortcut", "weights", (8,)),
        (5, "shortcut", "weights", (3,)),
        # load_connected_weights: biases, weights (out x in), THEN scales, mean, variance
        (6, "connected", "bn.bias", (7,)),
        (6, "connected", "fc.weight", (7, 4 * 3 * 3)),
        (6, "connected", "bn.weight", (7,)),
        (6, "connected", "bn.running_mean", (7,)),
        (6, "connected", "bn.running_var", (7,)),
        (8, "connected", "fc.bias", (3,)),
        (8, "connected", "fc.weight", (3, 7)),
    ]
    # a file whose values are 0, 1, 2, ... lands block by block in that order
    n = sum(np.prod(s) for *_, s in got)
    path = tmp_path / "ramp.weights"
    path.write_bytes(struct.pack("<3iQ", 0, 2, 0, 0) + np.arange(n, dtype="<f4").tobytes())
    model.load_weights(path)
    start = 0
    for i, spec, name, t in model.darknet_params():
        k = t.numel()
        assert np.array_equal(t.detach().flatten().numpy(), np.arange(start, start + k)), name
        start += k
    assert expected_bytes(model) == 20 + 4 * n == os.path.getsize(path)
    # convolutional weights are OIHW: weight[o, i, y, x] = block[((o*C + i)*k + y)*k + x]
    w = model.layers[0].conv.weight
    assert w[1, 2, 0, 1].item() == 16 + ((1 * 3 + 2) * 3 + 0) * 3 + 1


# --------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("header", [None, WeightsHeader(0, 2, 0, 123, 8),
                                    WeightsHeader(0, 1, 0, 99, 4),
                                    WeightsHeader(0, 2, 5, 2 ** 33 + 1, 8)])
def test_save_load_round_trip(tmp_path, header):
    a = build(ALL_KINDS)
    randomize(a, seed=3)
    first = tmp_path / "a.weights"
    a.save_weights(first, header=header)
    data = first.read_bytes()
    h = header or WeightsHeader(0, 2, 5, 0, 8)   # default: AlexeyAB's 0.2.5
    assert data[:h.size] == struct.pack("<3i", h.major, h.minor, h.revision) + \
        struct.pack("<Q" if h.seen_bytes == 8 else "<i", h.seen)
    assert len(data) == expected_bytes(a, h.size)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # atomic write

    b = build(ALL_KINDS)
    loaded = b.load_weights(first)
    assert loaded == h
    for (_, _, na, ta), (_, _, nb, tb) in zip(a.darknet_params(), b.darknet_params()):
        assert na == nb and torch.equal(ta, tb)
    second = tmp_path / "b.weights"
    b.save_weights(second)        # the loaded header is kept
    assert second.read_bytes() == data
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_transposed_header_round_trip(tmp_path):
    a = build(ALL_KINDS)
    randomize(a, seed=4)
    header = WeightsHeader(1001, 0, 0, 5, 8)
    path = tmp_path / "t.weights"
    a.save_weights(path, header=header)
    b = build(ALL_KINDS)
    assert b.load_weights(path).transpose
    assert np.array_equal(flat(a), flat(b))
    # on disk the connected weights are (inputs, outputs)
    data = np.frombuffer(path.read_bytes(), "<f4", offset=20)
    fc = a.layers[8].fc.weight.detach().numpy()              # (3, 7)
    assert np.array_equal(data[-21:], fc.T.reshape(-1))


def test_parse_header_versions():
    assert parse_header(struct.pack("<3iQ", 0, 2, 5, 10)).size == 20
    assert parse_header(struct.pack("<3ii", 0, 1, 0, 10)).size == 16
    assert parse_header(struct.pack("<3iQ", 1, 0, 0, 10), "pjreddie").seen_bytes == 8
    # pjreddie: majors/minors of 1000 and more have a 32-bit seen
    assert parse_header(struct.pack("<3ii", 1000, 0, 0, 10), "pjreddie").seen_bytes == 4
    assert parse_header(struct.pack("<3iQ", 1000, 0, 0, 10), "alexeyab").seen_bytes == 8


def test_flipped_convolution_weights(tmp_path):
    """``flipped=1`` makes Darknet transpose_matrix(weights, c/groups*size*size, n) after
    reading: the file holds the (c*k*k, n) matrix. darknetpy must honour it or refuse the
    cfg - never load the block un-transposed."""
    text = NET + "[convolutional]\nfilters=4\nsize=3\npad=1\nflipped=1\nactivation=linear\n"
    try:
        model = build(text)
    except CfgError as e:
        assert e.key == "flipped"
        return
    rng = np.random.default_rng(0)
    bias = rng.normal(size=4).astype("<f4")
    w = rng.normal(size=(4, 3, 3, 3)).astype("<f4")          # OIHW as used in forward
    path = tmp_path / "f.weights"
    path.write_bytes(struct.pack("<3iQ", 0, 2, 0, 0) + bias.tobytes() +
                     np.ascontiguousarray(w.reshape(4, 27).T).tobytes())
    model.load_weights(path)
    assert np.array_equal(model.layers[0].conv.weight.detach().numpy(), w)


# --------------------------------------------------------------------------------------
# real weights (reference directory)
# --------------------------------------------------------------------------------------
def _reference_weights() -> list[str]:
    env = os.environ.get("DARKNETPY_REFERENCE")
    ref = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "reference"
    return sorted(p.stem for p in (ref / "weights").glob("*.weights"))


@pytest.mark.parametrize("stem", _reference_weights() or ["no-weights"])
def test_real_weights_load_run_and_round_trip(stem, reference_dir, tmp_path):
    weights = reference_dir / "weights" / f"{stem}.weights"
    cfg = reference_dir / "cfg" / "real" / f"{stem}.cfg"
    assert weights.is_file(), weights
    assert cfg.is_file(), f"no cfg for {weights.name}"
    model = darknetpy.load(cfg, weights)   # raises on a short file or trailing bytes
    header = model.weights_header
    assert expected_bytes(model, header.size) == weights.stat().st_size
    n = model.net
    x = torch.rand(1, n.channels, n.height, n.width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    outs = out if isinstance(out, tuple) else (out,)
    assert outs and all(torch.isfinite(o).all() for o in outs)
    again = tmp_path / weights.name
    model.save_weights(again)
    assert again.read_bytes() == weights.read_bytes()


def test_written_files_get_normal_permissions(tmp_path):
    """Atomic writers publish with the umask's permissions, not mkstemp's private 0600."""
    import os
    import stat

    from darknetpy.weights import atomic_write
    umask = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "out.bin"), b"data")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o644
    assert (tmp_path / "out.bin").read_bytes() == b"data"
