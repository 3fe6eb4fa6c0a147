"""The ``darknetpy`` command line: argument parsing only; the work is in the library.

Subcommands: ``info``, ``dump``, ``verify`` (and the others registered below).
Errors from bad input (:class:`darknetpy.errors.DarknetError`) are printed as
one line, exit status 2; a failed verification exits 1.
"""
from __future__ import annotations

import argparse
import logging
import sys

from .errors import DarknetError

log = logging.getLogger("darknetpy")


def _add_build_options(p: argparse.ArgumentParser) -> None:
    """--profile, --width, --height, --tree: how the network is built from its cfg."""
    p.add_argument("--profile", choices=("pjreddie", "alexeyab"),
                   help="which Darknet to follow (default: chosen from the cfg)")
    p.add_argument("--width", type=int, help="override [net] width")
    p.add_argument("--height", type=int, help="override [net] height")
    p.add_argument("--tree", help=".tree file for tree= options (default: next to the cfg)")


def _add_model_args(p: argparse.ArgumentParser, weights: bool = True) -> None:
    p.add_argument("cfg", help="Darknet .cfg file")
    if weights:
        p.add_argument("weights", help="Darknet .weights file")
    _add_build_options(p)


def _add_image_command_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by detect and classify: the model (files or a name), names, profile,
    size and tree overrides."""
    p.add_argument("inputs", nargs="+", metavar="ARG",
                   help="CFG WEIGHTS IMAGE... or MODEL_NAME IMAGE...")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--names", help="class names file, one per line")
    names.add_argument("--data", help="Darknet .data file with names=")
    _add_build_options(p)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def cmd_info(args) -> int:
    from .model import parse_architecture
    from .summary import summary
    arch = parse_architecture(args.cfg, profile=args.profile, width=args.width,
                              height=args.height, tree=args.tree)
    print(summary(arch))
    return 0


def cmd_dump(args) -> int:
    import numpy as np
    import torch

    from .image import load_image, prepare_input
    from .model import load
    from .verify import dump
    model = load(args.cfg, args.weights, profile=args.profile, width=args.width,
                 height=args.height, device=args.device, tree=args.tree,
                 allow_trailing_bytes=args.allow_trailing_bytes)
    net = model.net
    if args.input is not None:
        x = torch.from_numpy(np.load(args.input).astype(np.float32))
    else:
        from .detect import default_letterbox
        letterbox = args.letterbox if args.letterbox is not None else \
            default_letterbox(model.profile, net.letter_box)
        x = prepare_input(load_image(args.image), net.width, net.height, letterbox)
    paths = dump(model, x.to(args.device), args.out)
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


def cmd_verify(args) -> int:
    from .verify import verify
    if len(args.inputs) == 2 and args.inputs[0].endswith(".onnx"):
        from .export import verify_onnx
        report = verify_onnx(args.inputs[0], args.inputs[1], atol=args.atol, rtol=args.rtol)
    elif len(args.inputs) == 3:
        cfg, weights, reference = args.inputs
        report = verify(cfg, weights, reference, profile=args.profile, atol=args.atol,
                        rtol=args.rtol, device=args.device, tree=args.tree,
                        arithmetic=args.arithmetic)
    else:
        raise DarknetError("usage: darknetpy verify CFG WEIGHTS REF | darknetpy verify "
                           "MODEL.onnx REF")
    print(report.table())
    return 0 if report.ok else 1


def cmd_export(args) -> int:
    from .export import export_onnx
    from .model import load
    model = load(args.cfg, args.weights, profile=args.profile, width=args.width,
                 height=args.height, tree=args.tree)
    report = export_onnx(model, args.output, opset=args.opset, batch=args.batch,
                         dynamic_batch=args.dynamic_batch, half=args.half, decode=args.decode,
                         nms=args.nms, thresh=args.thresh, nms_thresh=args.nms_thresh,
                         max_det=args.max_det)
    print(report.table())
    return 0 if report.ok else 1


def cmd_convert(args) -> int:
    from .convert import convert
    report = convert(args.src, args.dst, args.cfg, header_version=args.header_version,
                     profile=args.profile, allow_trailing_bytes=args.allow_trailing_bytes,
                     tree=args.tree)
    print(report.summary())
    return 0


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def expand_images(items: list[str]) -> list[str]:
    """Image arguments -> image paths: files as given, directories (their image files,
    sorted), and ``.txt`` files listing one image per line (as Darknet's train/valid lists)."""
    import os
    paths = []
    for item in items:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, f) for f in os.listdir(item)
                            if f.lower().endswith(IMAGE_EXTS))
        elif item.lower().endswith(".txt") and os.path.isfile(item):
            with open(item) as f:
                paths += [line.strip() for line in f if line.strip()]
        else:
            paths.append(item)
    return paths


def _resolve_model(args) -> tuple[str, str | None, list[str]]:
    """(cfg, weights, images) from ``CFG WEIGHTS IMAGE...`` or ``NAME IMAGE...``."""
    import os
    first, rest = args.inputs[0], args.inputs[1:]
    if not os.path.exists(first) and not first.endswith(".cfg"):
        from .zoo import resolve_model
        cfg, weights = resolve_model(first)
        return os.fspath(cfg), os.fspath(weights), rest
    if len(rest) < 2:
        raise DarknetError("usage: darknetpy detect CFG WEIGHTS IMAGE... "
                           "(or darknetpy detect MODEL_NAME IMAGE...)")
    return first, rest[0], rest[1:]


def _out_path(out: str, image: str, many: bool) -> str:
    import os
    if not many:
        return out
    stem, ext = os.path.splitext(out)
    return f"{stem}_{os.path.splitext(os.path.basename(image))[0]}{ext or '.jpg'}"


def _model_and_images(args):
    """(model, image paths) for detect and classify."""
    from .model import load
    cfg, weights, items = _resolve_model(args)
    images = expand_images(items)
    if not images:
        raise DarknetError("no images given")
    model = load(cfg, weights, profile=args.profile, width=args.width, height=args.height,
                 device=args.device, tree=args.tree)
    return model, images


def _image_batches(images: list[str], batch_size: int, failed: list[str]):
    """Yield (decoded images, paths) batches with a progress bar; an unreadable image is
    reported by name, added to ``failed`` and skipped."""
    from tqdm import tqdm

    from .errors import ImageError
    from .image import load_image
    bar = tqdm(total=len(images), unit="img", disable=len(images) < 2, leave=False)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch, paths = [], []
        for path in chunk:
            try:
                batch.append(load_image(path))
                paths.append(path)
            except ImageError as e:
                failed.append(path)
                tqdm.write(f"darknetpy: error: {e}", file=sys.stderr)
        if batch:
            yield batch, paths
        bar.update(len(chunk))
    bar.close()


def _failures(failed: list[str], total: int) -> int:
    if failed:
        print(f"darknetpy: {len(failed)} of {total} images failed: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


def cmd_detect(args) -> int:
    import time

    from tqdm import tqdm

    from .detect import Detector, format_lines, load_names, to_json
    from .draw import draw_detections, save_jpeg, to_pil
    model, images = _model_and_images(args)
    if args.optimize or args.precision != "fp32":
        from .optimize import optimize
        model = optimize(model, precision=args.precision)
    names = load_names(args.names, args.data) if (args.names or args.data) else None
    detector = Detector(model, names=names, thresh=args.thresh, hier=args.hier, nms=args.nms,
                        letterbox=args.letterbox)
    results, failed = [], []
    for batch, paths in _image_batches(images, args.batch_size, failed):
        t0 = time.perf_counter()
        batch_results = detector.detect_tensors(batch, paths)
        ms = (time.perf_counter() - t0) * 1000 / len(batch)
        for im, res in zip(batch, batch_results):
            tqdm.write(f"{res.path}: Predicted in {ms:.3f} milli-seconds.")
            for line in format_lines(res, args.ext_output):
                tqdm.write(line)
            if args.out:  # draw on the pixels that were detected on (byte/255, exact)
                drawn = draw_detections(to_pil(im), res, detector.classes)
                save_jpeg(drawn, _out_path(args.out, res.path, len(images) > 1))
            results.append(res)
    if args.json:
        from .weights import atomic_write
        atomic_write(args.json, to_json(results).encode())
    return _failures(failed, len(images))


def cmd_classify(args) -> int:
    from tqdm import tqdm

    from .classify import format_top, predictions, top_rows
    from .detect import load_names
    model, images = _model_and_images(args)
    out_c, out_h, out_w = model.specs[-1].out_shape
    names = load_names(args.names, args.data, out_c * out_h * out_w)
    failed: list[str] = []
    for batch, paths in _image_batches(images, args.batch_size, failed):
        for path, probs in zip(paths, predictions(model, batch, args.letterbox)):
            tqdm.write(f"{path}:")
            for line in format_top(top_rows(probs.tolist(), args.top, names)):
                tqdm.write(line)
    return _failures(failed, len(images))


def cmd_download(args) -> int:
    from .zoo import download
    for name in args.names:
        print(download(name, progress=not args.quiet))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog="darknetpy", description="Darknet's inference, faithfully, in PyTorch.")
    parser.add_argument("--version", action="version", version=f"darknetpy {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print the layer table of a cfg (Darknet style)")
    _add_model_args(p, weights=False)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("dump", help="write input.npy and every layer's output layer_NNN.npy")
    _add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="image file (resized or letterboxed as Darknet does)")
    src.add_argument("--input", help="network input as a .npy (C, H, W) float32")
    p.add_argument("--letterbox", action=argparse.BooleanOptionalAction, default=None,
                   help="letterbox the image (default: pjreddie yes; alexeyab per cfg)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--allow-trailing-bytes", action="store_true",
                   help="accept a weights file longer than the cfg needs")
    _add_device(p)
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("detect", help="detect objects like ./darknet detect",
                       description="darknetpy detect CFG WEIGHTS IMAGE... | MODEL_NAME IMAGE... "
                       "(images, directories, or .txt lists of images)")
    _add_image_command_args(p)
    p.add_argument("--thresh", type=float, help="probability threshold "
                   "(default: pjreddie 0.5, alexeyab 0.25)")
    p.add_argument("--hier", type=float, default=0.5, help="hierarchy threshold (default 0.5)")
    p.add_argument("--nms", type=float, default=0.45, help="NMS IoU threshold (default 0.45)")
    p.add_argument("--letterbox", action=argparse.BooleanOptionalAction, default=None,
                   help="letterbox the image (default: pjreddie yes; alexeyab per cfg)")
    p.add_argument("--out", default="predictions.jpg",
                   help="picture with the boxes drawn (default predictions.jpg; '' for none)")
    p.add_argument("--ext-output", action="store_true",
                   help="also print box positions in pixels (AlexeyAB -ext_output)")
    p.add_argument("--json", help="write AlexeyAB-style JSON results to this file")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    p.add_argument("--optimize", action="store_true",
                   help="run the optimised module (folded batch norm, fused kernels; "
                        "still within verify's tolerance)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="bf16/fp16: reduced-precision optimised module (explicit opt-in; "
                        "outputs differ, see docs/BENCHMARKS.md)")
    _add_device(p)
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("classify", help="classify images like ./darknet classifier predict",
                       description="darknetpy classify CFG WEIGHTS IMAGE... | MODEL_NAME IMAGE...")
    _add_image_command_args(p)
    p.add_argument("--top", type=int, default=5, help="how many classes to print (default 5)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    p.add_argument("--letterbox", action=argparse.BooleanOptionalAction, default=None,
                   help="letterbox the image (default: pjreddie yes, alexeyab no)")
    _add_device(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("download", help="fetch official weights into the cache")
    p.add_argument("names", nargs="+", metavar="NAME", help="model name, e.g. yolov4-tiny")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("verify", help="compare every layer with reference Darknet outputs",
                       description="darknetpy verify CFG WEIGHTS REF | darknetpy verify "
                       "MODEL.onnx REF (ONNX: the head outputs)")
    p.add_argument("inputs", nargs="+", metavar="ARG",
                   help="CFG WEIGHTS REF, or MODEL.onnx REF; REF is a case directory "
                        "(case.json + outputs.npz) or a directory of input.npy + layer_NNN.npy")
    p.add_argument("--profile", choices=("pjreddie", "alexeyab"),
                   help="which Darknet to follow (default: the case's impl, else the cfg's)")
    p.add_argument("--tree", help=".tree file for tree= options")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    p.add_argument("--rtol", type=float, default=1e-3,
                   help="relative tolerance, times max(1, max|ref|) (default 1e-3)")
    p.add_argument("--arithmetic", choices=("torch", "darknet"), default="torch",
                   help="torch: fast kernels (default); darknet: Darknet's CPU gemm order and "
                        "batch-norm/activation rounding, mostly bit-exact, slower")
    _add_device(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export", help="export to ONNX and check it with ONNX Runtime")
    _add_model_args(p)
    p.add_argument("-o", "--output", required=True, help="destination .onnx file")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 13..20 (default 17)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, help="static batch size (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="batch dimension dynamic")
    p.add_argument("--half", action="store_true", help="float16 weights and outputs")
    p.add_argument("--decode", action="store_true",
                   help="add decoded boxes (N, B, 4) cxcywh relative and scores (N, B, C)")
    p.add_argument("--nms", action="store_true",
                   help="add ONNX NonMaxSuppression (per class, greedy IoU) after --decode")
    p.add_argument("--thresh", type=float, help="score threshold for --nms "
                   "(default: pjreddie 0.5, alexeyab 0.25)")
    p.add_argument("--nms-thresh", type=float, default=0.45, help="IoU threshold (default 0.45)")
    p.add_argument("--max-det", type=int, default=300,
                   help="boxes kept per image and class by --nms (default 300)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="convert weights: .weights <-> .pt <-> .safetensors")
    p.add_argument("src", help="source weights (.weights, .pt, .safetensors)")
    p.add_argument("dst", help="destination (format from the extension)")
    p.add_argument("--cfg", help="the Darknet cfg (needed when either side is .weights)")
    p.add_argument("--header-version", help="write .weights with this header, e.g. 0.2.5 "
                   "(default: keep the source's)")
    p.add_argument("--profile", choices=("pjreddie", "alexeyab"))
    p.add_argument("--tree", help=".tree file for tree= options")
    p.add_argument("--allow-trailing-bytes", action="store_true")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="darknetpy: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except DarknetError as e:
        print(f"darknetpy: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad option values that reached the library
        print(f"darknetpy: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
