"""``torchbragg compare REF OUT``: the image comparison on the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..compare import compare_images, format_comparison
from ..io.images import load_image_photons
from ..io.smv import SMVFormatError

__all__ = ["main_compare"]


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def main_compare(argv: Sequence[str] | None = None) -> int:
    """Command line ``torchbragg compare REF OUT [--shape S F] [--json]``.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after ``compare`` (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 after printing the report (whether or not the images agree);
        2 for bad input, with a one-line error on stderr.
    """
    parser = _Parser(
        prog="torchbragg compare",
        description="Compare an image with a reference image (SMV or raw float32).",
    )
    parser.add_argument("ref", help="reference image (.smv/.img or raw float32 .bin/.f32/.raw)")
    parser.add_argument("out", help="image to check, same kinds")
    parser.add_argument(
        "--shape", nargs=2, type=int, metavar=("SLOW", "FAST"),
        help="shape of raw float32 images (default: sidecar <file>.json, the other image, or a square)",
    )
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    parser.add_argument("--smv-scale", type=float,
                        help="SMV counts per photon (default: header, else the log beside it)")
    parser.add_argument("--smv-adc", type=float, help="SMV ADC offset (default: header, else 40)")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except _UsageError as exc:
        print(f"torchbragg compare: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        if args.shape is not None and min(args.shape) <= 0:
            raise ValueError(f"--shape needs two positive integers, got {args.shape[0]} {args.shape[1]}")
        ref, ref_info = load_image_photons(args.ref, args.shape, scale=args.smv_scale, adc=args.smv_adc)
        out, out_info = load_image_photons(args.out, args.shape, fallback_shape=ref.shape, scale=args.smv_scale,
                                           adc=args.smv_adc)
        ref_note, out_note = ref_info["shape_from"], out_info["shape_from"]
        for info in (ref_info, out_info):
            if info["converted"]:
                print(f"note: {info['note']}", file=sys.stderr)
            if info["warning"]:
                print(f"WARNING: {info['warning']}", file=sys.stderr)
        if ref.shape != out.shape:
            raise ValueError(
                f"{args.out}: image is {out.shape[0]}x{out.shape[1]} but reference {args.ref} is "
                f"{ref.shape[0]}x{ref.shape[1]}"
            )
        cmp = compare_images(ref, out)
    except (OSError, ValueError, SMVFormatError) as exc:
        message = str(exc) if not isinstance(exc, OSError) or not exc.filename else (
            f"{exc.filename}: {exc.strerror}"
        )
        print(f"torchbragg compare: error: {message}", file=sys.stderr)
        return 2
    if args.json:
        data = cmp.to_dict()
        data["ref"] = {"path": str(args.ref), "shape_from": ref_note}
        data["out"] = {"path": str(args.out), "shape_from": out_note}
        print(json.dumps(data, indent=2))
    else:
        for name, note in ((args.ref, ref_note), (args.out, out_note)):
            if note.startswith("guessed"):
                print(f"note: {name}: {note}")
        print(format_comparison(cmp, str(args.ref), str(args.out)))
    return 0
