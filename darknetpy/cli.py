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


def _add_model_args(p: argparse.ArgumentParser, weights: bool = True) -> None:
    p.add_argument("cfg", help="Darknet .cfg file")
    if weights:
        p.add_argument("weights", help="Darknet .weights file")
    p.add_argument("--profile", choices=("pjreddie", "alexeyab"),
                   help="which Darknet to follow (default: chosen from the cfg)")
    p.add_argument("--width", type=int, help="override [net] width")
    p.add_argument("--height", type=int, help="override [net] height")
    p.add_argument("--tree", help=".tree file for tree= options (default: next to the cfg)")


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
        letterbox = args.letterbox if args.letterbox is not None else \
            (model.profile == "pjreddie" or bool(net.letter_box))
        x = prepare_input(load_image(args.image), net.width, net.height, letterbox)
    paths = dump(model, x.to(args.device), args.out)
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


def cmd_verify(args) -> int:
    from .verify import verify
    report = verify(args.cfg, args.weights, args.reference, profile=args.profile,
                    atol=args.atol, rtol=args.rtol, device=args.device, tree=args.tree)
    print(report.table())
    return 0 if report.ok else 1


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

    p = sub.add_parser("verify", help="compare every layer with reference Darknet outputs")
    _add_model_args(p)
    p.add_argument("reference", help="case directory (case.json + outputs.npz) or a "
                                     "directory of input.npy + layer_NNN.npy")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    p.add_argument("--rtol", type=float, default=1e-3,
                   help="relative tolerance, times max(1, max|ref|) (default 1e-3)")
    _add_device(p)
    p.set_defaults(func=cmd_verify)
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
