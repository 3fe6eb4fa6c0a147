#!/usr/bin/env python
"""Benchmark darknetpy's forward (eager, optimised fp32/bf16) against ONNX Runtime and
OpenCV DNN, and time the whole detect path.

All implementations are timed in ONE process, alternating (round r runs each
implementation once, in turn), after warm-up, so that load changes on the machine
hit them alike. Reported per implementation: median and spread (IQR, min, max) of
ms per batch, ms/image and images/s at batch 1 and at a larger batch, GFLOP/s
from the cfg's FLOP count, the ratio to the fastest OTHER implementation and to
OpenCV, and the max abs difference of its outputs from darknetpy eager fp32.

Examples::

    python tools/benchmark.py --cfg cfg/yolov3.cfg --size 416            # synthetic weights
    python tools/benchmark.py --cfg /work/shared/reference/cfg/real/yolo-fastest-1.1.cfg \\
        --weights /work/shared/reference/weights/yolo-fastest-1.1.weights --per-layer
    python tools/benchmark.py --cfg cfg/yolov3-tiny.cfg --size 416 --json out.json \\
        --markdown out.md

Without ``--weights`` the parameters are random (normal, small; batch-norm
variances positive) and are written to a temporary ``.weights`` file so that
OpenCV and ONNX Runtime run the very same network. The ONNX model comes from
``darknetpy.export.export_onnx``. OpenCV DNN (``cv2.dnn.readNetFromDarknet``)
is used when ``opencv-python-headless<5`` is importable; else a skip message is printed.

OpenCV's [yolo]/[region] layers output decoded boxes, not Darknet's layer output, so
its difference is measured on the convolutions feeding the heads (raw values, the
same for every implementation); its time is for the full network as usual.

Benchmarks are scripts, not tests: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __name__ == "__main__" and "--omp-passive" in sys.argv:
    # OpenMP threads sleep instead of spinning between parallel regions: on a busy (shared)
    # machine spinning threads steal the cores from each other; see docs/BENCHMARKS.md.
    # On a quiet machine the default (spinning) is faster, most of all for many tiny layers.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from darknetpy.cfg import Option, read_cfg, sections_to_text  # noqa: E402
from darknetpy.model import Darknet, parse_architecture  # noqa: E402


# ---------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------
def synthetic_weights(model: Darknet, seed: int = 0) -> None:
    """Random small normal weights; batch-norm variances positive, means small.

    Then one calibration pass on a random input rescales each convolution (its
    batch-norm scale and bias, or its weights and bias) so that its output has unit
    standard deviation (deep random networks otherwise blow up or vanish, which makes
    output differences meaningless). Last, the objectness biases of the convolutions
    feeding [yolo] heads are set to -3, as in a trained network where few cells hold an
    object; otherwise most cells pass the threshold and NMS sees thousands of boxes.
    """
    from darknetpy.layers.conv import Convolutional
    from darknetpy.layers.heads import YoloSpec
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("conv.weight"):
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in) ** 0.5)
            elif name.endswith("bn.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
        n = model.net
        x = torch.rand(1, n.channels, n.height, n.width, generator=g)
        for i, out in model.iter_layers(x):
            layer = model.layers[i]
            if not isinstance(layer, Convolutional):
                continue
            s = float(out.std())
            if not (s > 0 and np.isfinite(s)):
                continue
            pair = (layer.bn.weight, layer.bn.bias) if layer.bn is not None else \
                (layer.conv.weight, layer.conv.bias)
            for t in pair:
                t.div_(s)
            out.div_(s)  # what later layers see (exact for leaky/relu/linear)
        for i in model.heads:
            spec, conv = model.specs[i], model.layers[i - 1]
            bias = getattr(getattr(conv, "conv", None), "bias", None)
            if isinstance(spec, YoloSpec) and bias is not None:
                obj = spec.entries - spec.classes - 1
                bias.view(spec.num_anchors, spec.entries)[:, obj] = -3.0


def load_model(args, tmp: str) -> tuple[Darknet, str, str]:
    """(model, cfg path, weights path) for the arguments; files written go into ``tmp``."""
    arch = parse_architecture(args.cfg, width=args.size, height=args.size, warn=False,
                              profile=args.profile)
    model = Darknet(arch)
    if args.weights:
        model.load_weights(args.weights)
        weights = args.weights
    else:
        synthetic_weights(model, args.seed)
        weights = os.path.join(tmp, "synthetic.weights")
        model.save_weights(weights)
    model.eval().requires_grad_(False)
    cfg = sized_cfg(args.cfg, args.size, os.path.join(tmp, "model.cfg")) if args.size \
        else args.cfg
    return model, cfg, weights


def sized_cfg(cfg: str, size: int, path: str) -> str:
    """Write ``cfg`` with ``[net]`` width = height = ``size`` to ``path`` (for OpenCV, which
    reads the size from the cfg); returns ``path``."""
    sections = read_cfg(cfg)
    net = sections[0]
    for key in ("width", "height"):
        net.options[key] = Option(str(size), net.options[key].line if key in net.options
                                  else net.line)
    Path(path).write_text(sections_to_text(sections))
    return path


def head_inputs(model) -> list[int]:
    """Layers whose outputs are compared across implementations: the layer feeding each
    head (raw convolution output), or the last layer of a classifier."""
    if model.heads:
        return [i - 1 for i in model.heads]
    return [len(model.specs) - 1]


# ---------------------------------------------------------------------------
# implementations: name -> (run(x) -> outputs, compare(x) -> list of np arrays)
# ---------------------------------------------------------------------------
def eager_impl(model):
    keep = head_inputs(model)

    def run(x):
        with torch.inference_mode():
            return model(x)

    def outputs(x):
        with torch.inference_mode():
            outs = {i: o for i, o in model.iter_layers(x) if i in keep}
            return [outs[i].float().contiguous().numpy() for i in keep]
    return run, outputs


def optimized_impl(model, precision, compile_=False):
    from darknetpy.optimize import optimize
    t = time.perf_counter()
    fast = optimize(model, precision=precision, compile=compile_)
    build_s = time.perf_counter() - t
    keep = set(head_inputs(model))

    def run(x):
        return fast(x)

    def outputs(x):
        outs = {i: o.float().contiguous().numpy() for i, o in fast.iter_layers(x) if i in keep}
        return [outs[i] for i in sorted(keep)]
    return run, outputs, fast, build_s


def onnx_impl(model, path, threads):
    """run(x) -> the model's outputs (heads, or the last layer's), by ONNX Runtime on
    ``darknetpy.export.export_onnx``'s model written to ``path``."""
    import onnxruntime as ort
    from darknetpy.export import export_onnx
    export_onnx(model, path, dynamic_batch=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no busy-waiting threads after a run: they would steal the cores from the next
    # implementation in the alternation
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name

    def run(x):
        return sess.run(None, {in_name: x.numpy()})
    return run


def opencv_impl(model, cfg, weights, threads):
    import cv2
    if int(cv2.__version__.split(".")[0]) >= 5:
        raise ImportError(f"OpenCV {cv2.__version__} >= 5 (its Darknet importer changed)")
    cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromDarknet(cfg, weights)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    out_names = net.getUnconnectedOutLayersNames()
    layer_names = list(net.getLayerNames())

    def layer_name(i):
        # OpenCV names a Darknet layer's sub-layers conv_i, bn_i, leaky_i, ...; the last one
        # added holds the Darknet layer's output
        cands = [nm for nm in layer_names if nm.rsplit("_", 1)[-1] == str(i)]
        return cands[-1] if cands else None
    keep = [layer_name(i) for i in head_inputs(model)]

    def run(x):
        net.setInput(x.numpy())
        return net.forward(out_names)

    def outputs(x):
        if any(k is None for k in keep):
            return None
        net.setInput(x.numpy())
        return [np.asarray(o) for o in net.forward(keep)]
    return run, outputs, cv2.__version__


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------
def summarize(times: list[float], batch: int, flops: float) -> dict:
    t = sorted(times)
    q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
    med = statistics.median(t)
    return {"batch": batch, "runs": len(t), "median_ms": med * 1e3, "q1_ms": q[0] * 1e3,
            "q3_ms": q[2] * 1e3, "min_ms": t[0] * 1e3, "max_ms": t[-1] * 1e3,
            "ms_per_image": med * 1e3 / batch, "images_per_s": batch / med,
            "gflops": flops * batch / med / 1e9}


def time_alternating(impls: dict, x: torch.Tensor, runs: int, warmup: int) -> dict:
    for _ in range(warmup):
        for run in impls.values():
            run(x)
    times = {k: [] for k in impls}
    for _ in range(runs):
        for name, run in impls.items():
            t = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - t)
    return times


def per_layer_profile(model, fast, x, repeats: int = 5) -> list[dict]:
    """Median time of each layer, eager (module by module) and optimised (generated code,
    timed between layers), in ms."""
    def timed(it_fn):
        per = [[] for _ in model.specs]
        for _ in range(repeats):
            t = time.perf_counter()
            for i, _o in it_fn(x):
                now = time.perf_counter()
                per[i].append(now - t)
                t = now
        return [statistics.median(p) * 1e3 for p in per]
    with torch.inference_mode():
        eager = timed(model.iter_layers)
    opt = timed(fast.iter_layers)
    return [{"index": i, "type": s.type, "out_shape": list(s.out_shape),
             "mflop": s.flops / 1e6, "eager_ms": e, "optimized_ms": o}
            for i, (s, e, o) in enumerate(zip(model.specs, eager, opt))]


def detect_path(model, fast, image: str, runs: int) -> dict:
    """Median time of each stage of detection on ``image`` with the optimised fp32 model:
    load (decode), resize/letterbox, forward, decode (get_network_boxes), NMS."""
    from darknetpy.boxes import detector_nms, get_network_boxes
    from darknetpy.detect import DEFAULT_THRESH, default_letterbox
    from darknetpy.image import load_image, prepare_input
    net = model.net
    letterbox = default_letterbox(model.profile, net.letter_box)
    thresh = DEFAULT_THRESH[model.profile]
    specs = [model.specs[i] for i in model.heads]
    stages = {"load": [], "resize": [], "forward": [], "decode": [], "nms": []}
    n_boxes = 0
    for r in range(runs + 1):
        t0 = time.perf_counter()
        im = load_image(image)
        t1 = time.perf_counter()
        x = prepare_input(im, net.width, net.height, letterbox)[None]
        t2 = time.perf_counter()
        heads = fast(x)
        t3 = time.perf_counter()
        dets = get_network_boxes(list(heads), specs, im.shape[2], im.shape[1], net.width,
                                 net.height, thresh, 0.5, letterbox, model.profile)
        t4 = time.perf_counter()
        d = detector_nms(dets[0], model.specs[-1], model.profile, 0.45)
        t5 = time.perf_counter()
        n_boxes = int((d.prob > thresh).any(dim=1).sum()) if len(d) else 0
        if r == 0:
            continue  # warm-up
        for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            stages[k].append(v)
    med = {k: statistics.median(v) * 1e3 for k, v in stages.items()}
    total = sum(med.values())
    return {"image": image, "letterbox": letterbox, "thresh": thresh, "boxes": n_boxes,
            "stages_ms": med, "total_ms": total,
            "share": {k: v / total for k, v in med.items()},
            "decode_nms_share": (med["decode"] + med["nms"]) / total}


def max_abs_diff(ref: list[np.ndarray], got) -> float | None:
    if got is None:
        return None
    worst = 0.0
    for a, b in zip(ref, got):
        b = np.asarray(b, dtype=np.float32).reshape(a.shape)
        worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b))))
    return worst


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
def run_benchmark(args, tmp: str) -> dict:
    """Run the benchmark for the arguments; its files (weights, cfg, ONNX) go into ``tmp``."""
    torch.set_num_threads(args.threads)
    model, cfg, weights = load_model(args, tmp)
    net = model.net
    flops = model.arch.flops
    name = args.name or Path(args.cfg).stem + (f"-{net.width}" if args.size else "")
    print(f"== {name}: {len(model.specs)} layers, {flops / 1e9:.2f} GFLOP/image, "
          f"{net.width}x{net.height}, profile {model.profile}, "
          f"{'weights ' + args.weights if args.weights else 'synthetic weights'}, "
          f"{args.threads} threads", flush=True)
    # compare: name -> outputs(x) of the head inputs; compare_heads: name -> run(x) returning
    # the model's outputs (heads, or a classifier's last layer)
    impls, compare, compare_heads, notes, builds = {}, {}, {}, {}, {}
    wanted = set(args.impls.split(","))
    impls["darknetpy-eager"], compare["darknetpy-eager"] = eager_impl(model)
    fast32 = None
    for prec in ("fp32", "bf16"):
        key = f"darknetpy-opt-{prec}"
        if key in wanted or (prec == "fp32" and (args.detect or args.per_layer)):
            run, outs, fast, build_s = optimized_impl(model, prec)
            if key in wanted:
                impls[key], compare[key] = run, outs
            builds[key] = build_s
            if prec == "fp32":
                fast32 = fast
    if args.compile and "darknetpy-opt-fp32" in wanted:
        t = time.perf_counter()
        run, outs, _, _ = optimized_impl(model, "fp32", compile_=True)
        run(torch.rand(1, net.channels, net.height, net.width))  # compiles
        builds["darknetpy-opt-fp32-compiled"] = time.perf_counter() - t
        impls["darknetpy-opt-fp32-compiled"], compare["darknetpy-opt-fp32-compiled"] = \
            run, outs
    if "onnxruntime" in wanted:
        try:
            run = onnx_impl(model, os.path.join(tmp, "model.onnx"), args.threads)
            impls["onnxruntime"] = compare_heads["onnxruntime"] = run
            notes["onnxruntime"] = "export via darknetpy.export.export_onnx"
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"   onnxruntime: skipped ({type(e).__name__}: {e})", flush=True)
            notes["onnxruntime"] = f"skipped: {e}"
    if "opencv" in wanted:
        try:
            run, outs, ver = opencv_impl(model, cfg, weights, args.threads)
            impls["opencv-dnn"], compare["opencv-dnn"] = run, outs
            notes["opencv-dnn"] = f"OpenCV {ver} readNetFromDarknet, backend OPENCV, CPU"
        except ImportError as e:
            print(f"   opencv-dnn: skipped (opencv-python-headless<5 not importable: {e})",
                  flush=True)
            notes["opencv-dnn"] = f"skipped: {e}"

    # accuracy vs eager fp32, on one random input
    g = torch.Generator().manual_seed(args.seed + 1)
    x1 = torch.rand(1, net.channels, net.height, net.width, generator=g)
    ref_raw = compare["darknetpy-eager"](x1)
    with torch.inference_mode():
        ref_heads = model(x1)
    ref_heads = [h.numpy() for h in (ref_heads if isinstance(ref_heads, tuple) else (ref_heads,))]
    diffs = {k: max_abs_diff(ref_raw, c(x1)) for k, c in compare.items()}
    diffs.update({k: max_abs_diff(ref_heads, run(x1)) for k, run in compare_heads.items()})
    # head outputs too, for darknetpy's optimised modes (what the user sees)
    head_diffs = {}
    for k in impls:
        if k.startswith("darknetpy-opt"):
            out = impls[k](x1)
            out = out if isinstance(out, tuple) else (out,)
            head_diffs[k] = max_abs_diff(ref_heads, [o.numpy() for o in out])

    results = {"name": name, "cfg": args.cfg, "weights": args.weights or "synthetic",
               "size": [net.width, net.height], "layers": len(model.specs),
               "gflop_per_image": flops / 1e9, "threads": args.threads,
               "profile": model.profile, "notes": notes, "build_s": builds,
               "impls": {}}
    for batch, runs in ((1, args.runs), (args.batch, max(3, args.runs // 2))):
        if batch <= 0:
            continue
        x = torch.rand(batch, net.channels, net.height, net.width, generator=g)
        print(f"   timing batch {batch}: {runs} alternating runs after {args.warmup} warm-up",
              flush=True)
        times = time_alternating(impls, x, runs, args.warmup)
        for k, ts in times.items():
            results["impls"].setdefault(k, {"max_abs_diff_vs_eager": diffs.get(k),
                                            "max_abs_diff_heads": head_diffs.get(k)})
            results["impls"][k][f"batch{'1' if batch == 1 else 'N'}"] = summarize(ts, batch,
                                                                                  flops)
    for key in ("batch1", "batchN"):
        meds = {k: v[key]["median_ms"] for k, v in results["impls"].items() if key in v}
        for k, v in results["impls"].items():
            if key not in v:
                continue
            others = [m for kk, m in meds.items() if kk != k]
            v[key]["ratio_to_fastest_other"] = v[key]["median_ms"] / min(others) \
                if others else None
            v[key]["ratio_to_opencv"] = v[key]["median_ms"] / meds["opencv-dnn"] \
                if "opencv-dnn" in meds else None
    if args.per_layer and fast32 is not None:
        x = torch.rand(1, net.channels, net.height, net.width, generator=g)
        prof = per_layer_profile(model, fast32, x)
        results["per_layer"] = prof
    if args.detect and model.heads and fast32 is not None:
        results["detect"] = detect_path(model, fast32, args.detect, args.detect_runs)
    print_results(results)
    return results


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def markdown_rows(res: dict) -> list[str]:
    rows = []
    for k, v in res["impls"].items():
        b1, bn = v.get("batch1"), v.get("batchN")
        diff = v["max_abs_diff_vs_eager"]
        rows.append(
            f"| {res['name']} | {k} | {fmt(b1['median_ms'])} | "
            f"{fmt(b1['q1_ms'])}–{fmt(b1['q3_ms'])} | {fmt(b1['images_per_s'], '.2f')} | "
            f"{fmt(bn['images_per_s'], '.2f') if bn else '-'} (b{bn['batch'] if bn else '-'}) | "
            f"{fmt(b1['gflops'], '.1f')} | {fmt(b1['ratio_to_fastest_other'], '.2f')} | "
            f"{fmt(b1['ratio_to_opencv'], '.2f')} | "
            f"{'-' if diff is None else format(diff, '.2g')} |")
    return rows


MD_HEADER = ("| model | implementation | ms/img b1 (median) | IQR ms | img/s b1 | img/s bN | "
             "GFLOP/s b1 | × fastest other | × OpenCV | max abs diff vs eager |\n"
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def print_results(res: dict) -> None:
    print(f"\n{res['name']}: {res['gflop_per_image']:.2f} GFLOP/image")
    print(f"{'implementation':<30} {'ms b1':>8} {'IQR':>15} {'min':>8} {'img/s b1':>9} "
          f"{'img/s bN':>9} {'GFLOP/s':>8} {'x other':>8} {'x cv':>6} {'maxdiff':>9}")
    for k, v in res["impls"].items():
        b1, bn = v["batch1"], v.get("batchN")
        print(f"{k:<30} {b1['median_ms']:>8.1f} {b1['q1_ms']:>7.1f}-{b1['q3_ms']:<7.1f} "
              f"{b1['min_ms']:>8.1f} {b1['images_per_s']:>9.2f} "
              f"{(bn['images_per_s'] if bn else 0):>9.2f} {b1['gflops']:>8.1f} "
              f"{fmt(b1['ratio_to_fastest_other'], '.2f'):>8} "
              f"{fmt(b1['ratio_to_opencv'], '.2f'):>6} "
              f"{fmt(v['max_abs_diff_vs_eager'], '.2g'):>9}")
    for k, v in res["impls"].items():
        if v.get("max_abs_diff_heads") is not None:
            print(f"   {k}: max abs diff of returned head outputs vs eager: "
                  f"{v['max_abs_diff_heads']:.3g}")
    for k, n in res["notes"].items():
        print(f"   {k}: {n}")
    for k, s in res["build_s"].items():
        print(f"   {k}: built in {s:.2f} s")
    if "per_layer" in res:
        prof = res["per_layer"]
        te = sum(p["eager_ms"] for p in prof)
        to = sum(p["optimized_ms"] for p in prof)
        small = [p for p in prof if p["mflop"] < 10]
        print(f"   per layer: eager total {te:.1f} ms, optimised total {to:.1f} ms over "
              f"{len(prof)} layers; {len(small)} layers under 10 MFLOP take "
              f"{sum(p['eager_ms'] for p in small):.1f} ms eager, "
              f"{sum(p['optimized_ms'] for p in small):.1f} ms optimised")
        print(f"   {'layer':>5} {'type':<15} {'MFLOP':>8} {'eager ms':>9} {'opt ms':>8}")
        for p in sorted(prof, key=lambda p: -p["eager_ms"])[:15]:
            print(f"   {p['index']:>5} {p['type']:<15} {p['mflop']:>8.1f} {p['eager_ms']:>9.3f} "
                  f"{p['optimized_ms']:>8.3f}")
    if "detect" in res:
        d = res["detect"]
        parts = ", ".join(f"{k} {v:.1f} ms ({d['share'][k]:.1%})"
                          for k, v in d["stages_ms"].items())
        print(f"   detect path ({os.path.basename(d['image'])}, {d['boxes']} boxes): "
              f"{d['total_ms']:.1f} ms = {parts}; decode+NMS {d['decode_nms_share']:.1%}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="Darknet .cfg")
    p.add_argument("--weights", help=".weights (default: synthetic random weights)")
    p.add_argument("--size", type=int, help="network width = height (default: the cfg's)")
    p.add_argument("--profile", choices=["pjreddie", "alexeyab"], help="default: from the cfg")
    p.add_argument("--name", help="name in the tables (default: cfg stem and size)")
    p.add_argument("--runs", type=int, default=20, help="timed runs at batch 1 (default 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="the larger batch (0: skip)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--impls", default="darknetpy-opt-fp32,darknetpy-opt-bf16,onnxruntime,opencv",
                   help="comma list from darknetpy-opt-fp32, darknetpy-opt-bf16, onnxruntime, "
                        "opencv (darknetpy-eager always runs)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd opt fp32")
    p.add_argument("--per-layer", action="store_true", help="per-layer time, eager vs optimised")
    p.add_argument("--detect", nargs="?", const="__default__", default=None,
                   help="time the detect path on an image (default: reference dog.jpg)")
    p.add_argument("--detect-runs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--omp-passive", action="store_true",
                   help="set OMP_WAIT_POLICY=PASSIVE (for busy, shared machines; default: "
                        "OpenMP's spinning, faster on a quiet machine)")
    p.add_argument("--json", help="write the results (appended to a list if it exists)")
    p.add_argument("--markdown", help="write / append a Markdown table")
    args = p.parse_args(argv)
    if args.detect == "__default__":
        root = Path(__file__).resolve().parents[1]
        cand = [Path(os.environ.get("DARKNETPY_REFERENCE", root.parent / "shared" / "reference"))
                / "images" / "dog.jpg", root / "data" / "dog.jpg"]
        found = [c for c in cand if c.is_file()]
        args.detect = str(found[0]) if found else None
        if not found:
            print("   detect path: skipped (no dog.jpg found; pass --detect IMAGE)")
    with tempfile.TemporaryDirectory(prefix="darknetpy-bench-") as tmp:
        res = run_benchmark(args, tmp)
    res["machine"] = machine_info(args.threads)
    res["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    res["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
    if args.json:
        prev = []
        if os.path.isfile(args.json):
            with open(args.json) as f:
                prev = json.load(f)
            prev = prev if isinstance(prev, list) else [prev]
        with open(args.json, "w") as f:
            json.dump(prev + [res], f, indent=1)
    if args.markdown:
        new = not os.path.isfile(args.markdown)
        with open(args.markdown, "a") as f:
            if new:
                f.write(MD_HEADER + "\n")
            f.write("\n".join(markdown_rows(res)) + "\n")
    return 0


def machine_info(threads: int) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "python": platform.python_version(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        import cv2
        info["opencv"] = cv2.__version__
    except ImportError:
        pass
    return info


if __name__ == "__main__":
    sys.exit(main())
