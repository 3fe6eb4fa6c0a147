"""ONNX export: every reference case exports, runs in ONNX Runtime and matches Darknet."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from darknetpy import boxes as B
from darknetpy import load
from darknetpy.export import (DEFAULT_OPSET, ExportCheckError, ExportError, _session,
                              export_onnx, onnx_metadata, onnx_nms_reference, verify_onnx)
from darknetpy.layers.heads import RegionSpec
from darknetpy.tree import TreeIndex
from darknetpy.verify import compare, load_reference

from conftest import require_reference

# Same allowance as test_reference.py: yolov4's last layers are 1.05e-3..1.41e-3 from
# Darknet in torch arithmetic (Darknet's own float32 rounding); ORT's convolutions
# round differently again, by the same order.
ROUNDING_LIMITED = {"yolov4_dog_alexeyab": 2e-3}
BATCH = 3


def _case(reference_dir, name, case_weights, profile=None):
    case_dir = reference_dir / "cases" / name
    meta = json.loads((case_dir / "case.json").read_text())
    ref = load_reference(case_dir)
    c, h, w = ref.input.shape
    model = load(case_dir / "model.cfg", case_weights(name), profile=profile or meta["impl"],
                 width=w, height=h, tree=str(reference_dir / "names" / "9k.tree"))
    return meta, ref, model


def _flat_index(dets: B.Detections, specs, profile: str) -> np.ndarray:
    """Index into the graph's B axis of each decoded box (from ``Detections.source``)."""
    sizes = [s.num_anchors * s.out_shape[1] * s.out_shape[2] for s in specs]
    offsets = np.cumsum([0] + sizes)
    out = []
    for head, anchor, cell in dets.source.tolist():
        s = specs[head]
        hw = s.out_shape[1] * s.out_shape[2]
        anchor_major = isinstance(s, RegionSpec) and profile == "pjreddie"
        out.append(offsets[head] + (anchor * hw + cell if anchor_major
                                    else cell * s.num_anchors + anchor))
    return np.asarray(out, dtype=np.int64)


def _check_decode(model, heads_np, boxes, scores, thresh):
    """The graph's boxes/scores of one image agree with darknetpy.boxes' decoders."""
    specs = [model.specs[i] for i in model.heads]
    heads = [torch.from_numpy(np.ascontiguousarray(h)) for h in heads_np]
    net = model.net
    dets = B.get_network_boxes(heads, specs, net.width, net.height, net.width, net.height,
                               thresh, 0.5, letterbox=False, profile=model.profile)[0]
    idx = _flat_index(dets, specs, model.profile)
    want_b = dets.boxes.numpy()
    got_b = boxes[idx]
    np.testing.assert_array_less(np.abs(got_b - want_b),
                                 1e-5 * np.maximum(1, np.abs(want_b)) + 1e-7)
    t = np.float32(thresh)
    got_p = np.where(scores[idx] > t, scores[idx], 0)
    np.testing.assert_allclose(got_p, dets.prob.numpy(), rtol=1e-5, atol=1e-7)
    # boxes a YOLO head dropped (objectness <= thresh) have no score above thresh
    rest = np.ones(scores.shape[0], dtype=bool)
    rest[idx] = False
    assert not (scores[rest] > t).any()
    return dets, idx


def test_case_exports_and_matches_reference(reference_dir, reference_case, case_weights, tmp_path):
    meta, ref, model = _case(reference_dir, reference_case, case_weights)
    detector = bool(model.heads)
    thresh = float(meta["thresh"])
    rtol = ROUNDING_LIMITED.get(reference_case, 1e-3)
    path = tmp_path / f"{reference_case}.onnx"
    try:
        report = export_onnx(model, path, dynamic_batch=True, decode=detector, nms=detector,
                             thresh=thresh, max_det=100_000, sample=ref.input)
        assert report.ok, report.table()
        assert report.opset == DEFAULT_OPSET and report.bytes == os.path.getsize(path) > 0
        assert report.check_batch == 2 and report.max_abs

        heads = model.heads or [len(model.specs) - 1]
        names = [f"{'head' if model.heads else 'output'}_{i}_{model.specs[i].type}" for i in heads]
        sess = _session(str(path))
        out_names = [o.name for o in sess.get_outputs()]
        assert out_names[:len(names)] == names
        assert sess.get_inputs()[0].name == "images" and sess.get_inputs()[0].shape[0] == "batch"
        got = dict(zip(out_names, sess.run(None, {"images": np.repeat(ref.input[None], BATCH, 0)})))

        for i, name in zip(heads, names):
            out = got[name]
            assert out.shape == (BATCH, *model.specs[i].out_shape)
            for b in range(1, BATCH):          # identical inputs -> identical results
                np.testing.assert_array_equal(out[b], out[0])
            data, stride = ref.layers[i]
            max_abs, max_rel, tol, ok = compare(out[0], data, stride, 0.0, rtol)
            assert ok, f"layer {i} [{model.specs[i].type}]: ORT max rel {max_rel:.3g} > {rtol}"

        report_v = verify_onnx(path, ref, rtol=rtol)
        assert report_v.ok and report_v.compared == len(heads), report_v.table()
        assert [o["layer"] for o in onnx_metadata(path)["outputs"] if o["layer"] is not None] \
            == heads

        if not detector:
            return
        boxes, scores = got["boxes"], got["scores"]
        total = sum(s.num_anchors * s.out_shape[1] * s.out_shape[2]
                    for s in (model.specs[i] for i in model.heads))
        assert boxes.shape == (BATCH, total, 4)
        assert scores.shape == (BATCH, total, model.specs[model.heads[0]].classes)
        dets, idx = _check_decode(model, [got[n][:1] for n in names], boxes[0], scores[0], thresh)

        # NMS: per class greedy IoU NMS == darknetpy.boxes.do_nms_sort on the same boxes
        sel = got["selected_indices"]
        per_image = [{(int(c), int(k)) for bb, c, k in sel if bb == b} for b in range(BATCH)]
        assert per_image[1] == per_image[0] == per_image[2]
        nms = B.do_nms_sort(dets, model.specs[model.heads[-1]].classes, 0.45)
        kept = nms.prob.numpy() > np.float32(thresh)
        flat = _flat_index(nms, [model.specs[i] for i in model.heads], model.profile)
        want = {(int(c), int(flat[r])) for r, c in zip(*np.nonzero(kept))}
        assert per_image[0] == want
        np.testing.assert_array_equal(got["det_scores"], scores[sel[:, 0], sel[:, 2], sel[:, 1]])
        np.testing.assert_array_equal(got["det_boxes"], boxes[sel[:, 0], sel[:, 2]])

        # real weights, stretched input (network-relative == image-relative boxes):
        # every ONNX detection is one Darknet printed
        if not meta["weights"]["synthetic"] and meta.get("letterbox") == 0:
            lines = [ln.split() for ln in (reference_dir / "cases" / reference_case /
                                           "detections.txt").read_text().splitlines()
                     if ln.strip() and not ln.startswith("#")]
            darknet = [(np.float32(ln[:4]), {int(c): float(p) for c, p in
                                             (cp.split(":") for cp in ln[5:])}) for ln in lines]
            for (_, c, k), box, score in zip(sel[sel[:, 0] == 0], got["det_boxes"],
                                             got["det_scores"]):
                assert any(c in probs and abs(probs[c] - score) <= 1e-3 and
                           np.allclose(box, b, rtol=1e-3, atol=1e-4) for b, probs in darknet), \
                    f"class {c} box {box} score {score} not in Darknet's detections"
    finally:
        if path.exists():
            path.unlink()


# ------------------------------------------------------------------ small models
@pytest.fixture(scope="module")
def fastest(reference_dir):
    w = require_reference(reference_dir / "weights" / "yolo-fastest-1.1.weights")
    return load(reference_dir / "cfg" / "real" / "yolo-fastest-1.1.cfg", w, width=160, height=160)


def test_default_export_static_batch(fastest, tmp_path):
    path = tmp_path / "m.onnx"
    report = export_onnx(fastest, path)
    assert report.ok and report.opset == 17 and report.check_batch == 1
    assert [o.name for o in report.outputs] == ["head_121_yolo", "head_130_yolo"]
    assert "dynamo=False" in report.exporter and "OK" in report.table()
    sess = _session(str(path))
    assert sess.get_inputs()[0].shape == [1, 3, 160, 160]
    assert [o.shape for o in sess.get_outputs()] == [[1, 255, 5, 5], [1, 255, 10, 10]]
    x = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    got = sess.run(None, {"images": x.numpy()})
    for a, b in zip(got, fastest(x)):
        assert compare(a, b.numpy(), None, 0.0, 1e-4)[3]
    # upsample is a Resize with constant scales, maxpool padding a Pad with -inf
    import onnx
    proto = onnx.load(str(path))
    inits = {t.name for t in proto.graph.initializer}
    consts = {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    resize = [n for n in proto.graph.node if n.op_type == "Resize"]
    assert resize and all(n.input[2] in inits | consts for n in resize)


def test_static_batch_2_and_opsets(fastest, tmp_path):
    r = export_onnx(fastest, tmp_path / "b2.onnx", batch=2)
    assert r.ok and r.check_batch == 2
    assert _session(str(tmp_path / "b2.onnx")).get_inputs()[0].shape[0] == 2
    for opset in (13, 20):
        assert export_onnx(fastest, tmp_path / f"o{opset}.onnx", opset=opset).opset == opset
    with pytest.raises(ExportError, match="opset 11 not supported"):
        export_onnx(fastest, tmp_path / "o11.onnx", opset=11)


def test_half_export(fastest, tmp_path, reference_dir):
    path = tmp_path / "h.onnx"
    full = export_onnx(fastest, tmp_path / "f.onnx")
    report = export_onnx(fastest, path, half=True, decode=True, nms=True)
    assert report.ok, report.table()
    assert report.bytes < 0.6 * full.bytes
    sess = _session(str(path))
    assert sess.get_inputs()[0].type == "tensor(float16)"
    types = {o.name: o.type for o in sess.get_outputs()}
    assert types["head_121_yolo"] == "tensor(float16)" and types["boxes"] == "tensor(float)"
    x = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(4))
    got = sess.run(["head_121_yolo", "head_130_yolo"], {"images": x.half().numpy()})
    for a, b in zip(got, fastest(x)):
        assert compare(a.astype(np.float32), b.numpy(), None, 0.0, 5e-2)[3]


def test_fails_check_leaves_existing_file(fastest, tmp_path, monkeypatch):
    import darknetpy.export as E
    dest = tmp_path / "model.onnx"
    dest.write_bytes(b"precious")
    real = E._session

    class Perturbed:
        def __init__(self, path):
            self.sess = real(path)

        def get_outputs(self):
            return self.sess.get_outputs()

        def run(self, names, feed):
            out = self.sess.run(names, feed)
            out[0] = out[0] + 1.0
            return out

    monkeypatch.setattr(E, "_session", Perturbed)
    with pytest.raises(ExportCheckError, match="head_121_yolo max abs") as info:
        export_onnx(fastest, dest)
    assert info.value.report.ok is False and info.value.layer == 121
    assert "layer 121 [yolo]" in str(info.value)
    assert dest.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]     # no temporary file left


def test_unexportable_layer_is_named(fastest, tmp_path):
    from darknetpy.layers.activations import Activation
    model = load(fastest.arch.path, width=160, height=160)
    layer = next(i for i, s in enumerate(model.specs) if s.type == "convolutional" and i > 2)
    act = model.layers[layer].act
    act.fn = torch.special.i0            # no ONNX symbolic
    assert isinstance(act, Activation)
    with pytest.raises(ExportError, match=rf"layer {layer} \[convolutional\]: cannot be exported"):
        export_onnx(model, tmp_path / "x.onnx")
    assert os.listdir(tmp_path) == []


def test_unsupported_options_are_named(reference_dir, tmp_path):
    cfg = require_reference(reference_dir / "cfg" / "pjreddie" / "yolo9000.cfg")
    model = load(cfg, width=96, height=96, tree=str(reference_dir / "names" / "9k.tree"))
    head = model.heads[0]
    with pytest.raises(ExportError, match=rf"layer {head} \[region\]: half=True is not supported"):
        export_onnx(model, tmp_path / "x.onnx", half=True)
    classifier = load(reference_dir / "cfg" / "real" / "tiny.cfg", width=64, height=64)
    with pytest.raises(ExportError, match="needs detection heads"):
        export_onnx(classifier, tmp_path / "c.onnx", decode=True)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------ every layer type
#: one network with every section type and option the exporter must handle:
#: groups/dilation/antialiasing/stride_x convolutions, asymmetric maxpool padding,
#: stride_x maxpool, local_avgpool, maxpool_depth, weighted (per_channel softmax,
#: per_feature relu) and multi-input shortcuts, channel- and size-mismatched shortcuts,
#: scale_channels (both kinds), sam, reorg/reorg3d (and reverse), upsample up (scale)
#: and down, route groups, dropout/empty/batchnorm/crop, every activation, and the
#: heads [yolo] (new_coords, scale_x_y), [Gaussian_yolo], [region].
EVERY_LAYER_CFG = """\
[net]
width=32
height=32
channels=3

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
groups=4
dilation=2
activation=mish

[convolutional]
filters=16
size=3
stride=2
pad=1
antialiasing=1
activation=swish

[maxpool]
size=2
stride=1

[maxpool]
size=3
stride_x=2
stride_y=1

[local_avgpool]
size=3
stride=1

[maxpool]
maxpool_depth=1
out_channels=4

[route]
layers=-2

[shortcut]
from=-3
weights_type=per_channel
weights_normalization=softmax
activation=linear

[shortcut]
from=-4,-2
weights_type=per_feature
weights_normalization=relu
activation=leaky

[shortcut]
from=6
activation=linear

[avgpool]

[convolutional]
filters=16
size=1
activation=logistic

[scale_channels]
from=10

[convolutional]
filters=16
size=1
pad=1
activation=logistic

[sam]
from=-2

[convolutional]
filters=1
size=1
activation=logistic

[scale_channels]
from=15
scale_wh=1

[reorg3d]
stride=2

[reorg]
stride=2

[reorg]
stride=2
reverse=1

[reorg3d]
stride=2
reverse=1

[upsample]
stride=2
scale=0.5

[upsample]
stride=-2

[route]
layers=-1,-7
groups=2
group_id=1

[dropout]
probability=0.5

[empty]

[batchnorm]

[convolutional]
batch_normalize=1
filters=16
size=3
stride_x=1
stride_y=2
pad=1
activation=relu6

[activation]
activation=elu

[activation]
activation=selu

[activation]
activation=gelu

[activation]
activation=hard_mish

[activation]
activation=tanh

[activation]
activation=relie

[activation]
activation=ramp

[activation]
activation=plse

[activation]
activation=lhtan

[activation]
activation=hardtan

[activation]
activation=loggy

[activation]
activation=stair

[activation]
activation=relu

[convolutional]
filters=16
size=3
pad=1
antialiasing=2
stride=2
activation=linear

[shortcut]
from=-2
activation=linear

[crop]
crop_height=3
crop_width=3

[route]
layers=28

[convolutional]
filters=16
size=1
activation=logistic

[yolo]
mask=0,1
anchors=4,6, 10,12, 20,18
classes=3
num=3
new_coords=1
scale_x_y=2.0

[route]
layers=28

[convolutional]
filters=24
size=1
activation=linear

[Gaussian_yolo]
mask=1,2
anchors=4,6, 10,12, 20,18
classes=3
num=3
scale_x_y=1.1

[route]
layers=24

[convolutional]
filters=8
size=1
activation=linear

[yolo]
mask=2
anchors=4,6, 10,12, 20,18
classes=3
num=3
scale_x_y=1.05

[route]
layers=44

[convolutional]
filters=24
size=1
activation=linear

[region]
anchors=0.5,0.7, 1.2,1.5, 2.0,1.8
classes=3
num=3
coords=4
softmax=1
"""

CLASSIFIER_CFG = """\
[net]
width=16
height=16
channels=3

[convolutional]
filters=8
size=3
stride=2
pad=1
activation=leaky

[avgpool]

[connected]
output=12
batch_normalize=1
activation=leaky

[dropout]
probability=0.5

[connected]
output=10
activation=linear

[softmax]
groups=2
temperature=2

[cost]
type=sse
"""


def _random_weights(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, name, t in model.darknet_params():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
    return model


@pytest.mark.parametrize("profile", ["alexeyab", "pjreddie"])
def test_every_layer_type_exports(tmp_path, profile):
    cfg = tmp_path / "every.cfg"
    cfg.write_text(EVERY_LAYER_CFG)
    model = _random_weights(load(cfg, profile=profile))
    types = {s.type for s in model.specs}
    assert {"maxpool", "local_avgpool", "shortcut", "scale_channels", "sam", "reorg", "reorg3d",
            "upsample", "route", "crop", "activation", "yolo", "Gaussian_yolo", "region"} <= types
    path = tmp_path / "every.onnx"
    report = export_onnx(model, path, dynamic_batch=True, decode=True, nms=True, thresh=0.3)
    assert report.ok, report.table()
    assert max(report.max_abs[o.name] for o in report.outputs if o.layer is not None) < 1e-5

    # every layer with a computation is in the graph (only identities disappear)
    import onnx
    names = [n.name for n in onnx.load(str(path)).graph.node]
    present = {int(m.group(1)) for m in (re.search(r"/layers\.(\d+)/", n) for n in names) if m}
    identity = {"dropout", "empty"}
    for s in model.specs:
        single_route = s.type == "route" and len(s.refs) == 1 and s.groups == 1
        if s.type not in identity and not single_route:
            assert s.index in present, f"layer {s.index} [{s.type}] missing from the graph"

    x = torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    x[1:] = x[0]
    sess = _session(str(path))
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": x.numpy()})))
    with torch.no_grad():
        want = model(x)
    heads = [o.name for o in report.outputs if o.layer is not None]
    for name, w in zip(heads, want):
        assert compare(got[name], w.numpy(), None, 0.0, 1e-4)[3], name
        for b in range(1, BATCH):
            np.testing.assert_array_equal(got[name][b], got[name][0])
    _check_decode(model, [got[n][:1] for n in heads], got["boxes"][0], got["scores"][0], 0.3)


def test_classifier_layers_export(tmp_path):
    cfg = tmp_path / "cls.cfg"
    cfg.write_text(CLASSIFIER_CFG)
    model = _random_weights(load(cfg))
    report = export_onnx(model, tmp_path / "cls.onnx", dynamic_batch=True)
    assert report.ok and [o.name for o in report.outputs] == ["output_6_cost"]
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    (got,) = _session(str(tmp_path / "cls.onnx")).run(None, {"images": x.numpy()})
    with torch.no_grad():
        assert compare(got, model(x).numpy(), None, 0.0, 1e-5)[3]


# --------------------------------------------------------------- tree decoders
def test_tree_decoders_export_and_match_python(reference_dir, tmp_path):
    from darknetpy.tree import (alexeyab_region_tree_probs, hierarchy_predictions,
                                hierarchy_top_prediction, read_tree, softmax_tree)
    path = require_reference(reference_dir / "names" / "9k.tree")
    tree = read_tree(path)
    index = TreeIndex(tree)

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.index = index

        def forward(self, probs, obj):
            a = self.index.absolute(probs)
            return a, self.index.top_prediction(a, 0.5), self.index.alexeyab_probs(a, obj, 0.25)

    gen = torch.Generator().manual_seed(0)
    probs = softmax_tree(torch.randn(64, tree.n, generator=gen) * 4, tree)   # (M, n)
    obj = torch.rand(64, generator=gen)
    onnx_path = tmp_path / "tree.onnx"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Probe(), (probs, obj), str(onnx_path), input_names=["p", "o"],
                          opset_version=DEFAULT_OPSET, dynamo=False,
                          dynamic_axes={"p": {0: "m"}, "o": {0: "m"}})
    a, top, ab = _session(str(onnx_path)).run(None, {"p": probs.numpy(), "o": obj.numpy()})
    want_a = hierarchy_predictions(probs, tree, False, dim=-1)
    np.testing.assert_array_equal(a, want_a.numpy())
    assert top.tolist() == [hierarchy_top_prediction(r, tree, 0.5) for r in want_a]
    np.testing.assert_array_equal(ab, alexeyab_region_tree_probs(want_a, obj, 0.25).numpy())


# ----------------------------------------------------------------------- NMS
def test_onnx_nms_reference_matches_onnxruntime(tmp_path):
    """The numpy port used by the export check agrees with ORT's NonMaxSuppression,
    ties included (equal scores: lower box index first)."""
    import onnx
    from onnx import TensorProto, helper
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.random((2, 300, 2)), rng.random((2, 300, 2)) * 0.3], -1)
    scores = np.round(rng.random((2, 300, 3)), 2)           # many ties
    boxes, scores = boxes.astype(np.float32), scores.astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Transpose", ["s"], ["st"], perm=[0, 2, 1]),
         helper.make_node("NonMaxSuppression", ["b", "st", "m", "i", "t"], ["sel"],
                          center_point_box=1)],
        "nms", [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 300, 4]),
                helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 300, 3])],
        [helper.make_tensor_value_info("sel", TensorProto.INT64, ["K", 3])],
        [onnx.numpy_helper.from_array(np.array([40], np.int64), "m"),
         onnx.numpy_helper.from_array(np.array([0.45], np.float32), "i"),
         onnx.numpy_helper.from_array(np.array([0.3], np.float32), "t")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)],
                              ir_version=8)
    onnx.save(model, str(tmp_path / "nms.onnx"))
    (sel,) = _session(str(tmp_path / "nms.onnx")).run(None, {"b": boxes, "s": scores})
    np.testing.assert_array_equal(sel, onnx_nms_reference(boxes, scores, 0.45, 0.3, 40))
