"""``torchbragg fit``: refine parameters of a simulation against a reference image."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise _UsageError(message)


class _UsageError(ValueError):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    """``torchbragg fit REF --params a,b [--roi XMIN XMAX YMIN YMAX] [--loss lsq|poisson] [--max-iter N]
    [--dtype float32|float64] [--scale S] [--adc A] [--out DIR] -- <nanoBragg args>``.

    Fits the chosen parameter families (:func:`torchbragg.fit.fit_reference`) of the simulation of the
    nanoBragg arguments to the reference image ``REF`` (SMV counts are converted to photons as
    ``torchbragg compare`` does; raw float images are photons), prints one line per fitted value with
    its uncertainty, the metrics before and after and the fitted arguments; with ``--out`` writes
    ``DIR/fit.json`` (the folder is made; an existing ``fit.json`` is never overwritten).

    Parameters
    ----------
    argv : Sequence[str] or None, optional
        The arguments after ``fit``; ``None`` reads ``sys.argv[1:]``.

    Returns
    -------
    int
        0 after a fit (or ``--help``); 2 for a usage error or a request that cannot be served (one
        line on standard error); 130 when cancelled.
    """
    import torch

    from ..arguments import ArgumentError
    from ..fit import FitError, fit_reference
    from ..io.atomic_io import atomic_write_text
    from ..io.images import load_image_photons
    from ..resolve import SetupError
    from ..simulation import RenderCancelled
    from .command import TerminalProgress

    argv = list(sys.argv[1:] if argv is None else argv)
    nb: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, nb = argv[:k], argv[k + 1:]
    p = _Parser(prog="torchbragg fit")
    p.add_argument("reference")
    p.add_argument("--params", required=True, help="comma-separated: distance,beam_center,misset,...")
    p.add_argument("--roi", type=int, nargs=4, metavar=("XMIN", "XMAX", "YMIN", "YMAX"))
    p.add_argument("--loss", default="lsq", choices=("lsq", "poisson"))
    p.add_argument("--max-iter", type=int, default=60)
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    p.add_argument("--scale", type=float, help="SMV counts per photon of the reference")
    p.add_argument("--adc", type=float, help="SMV ADC offset of the reference")
    p.add_argument("--out", help="folder for fit.json")
    try:
        opts = p.parse_args(argv)
        if not nb:
            raise FitError("no nanoBragg arguments after --")
        out_path = None
        if opts.out:
            out_path = Path(opts.out) / "fit.json"
            if out_path.exists():
                raise FitError(f"--out {opts.out}: {out_path} exists; give a new folder")
            if Path(opts.out).exists() and not Path(opts.out).is_dir():
                raise FitError(f"--out {opts.out}: not a folder")
        ref_path = Path(opts.reference)
        if not ref_path.is_file():
            raise FitError(f"{opts.reference}: no such file")
        from ..simulation import Simulation

        shape = Simulation.from_args(nb).shape
        ref, info = load_image_photons(ref_path, scale=opts.scale, adc=opts.adc, fallback_shape=shape)
        if info.get("warning"):
            print(f"torchbragg fit: warning: {info['warning']}", file=sys.stderr)
        bar = TerminalProgress(label="fitting")
        result = fit_reference(nb, ref, opts.params, roi=opts.roi, loss=opts.loss,
                               dtype=getattr(torch, opts.dtype), max_iter=opts.max_iter, progress=bar)
    except _UsageError as err:
        print(f"torchbragg fit: error: {err}", file=sys.stderr)
        return 2
    except RenderCancelled as err:
        print(f"torchbragg fit: {err}", file=sys.stderr)
        return 130
    except (ArgumentError, SetupError, FitError, OSError, ValueError) as err:
        print(f"torchbragg fit: error: {err}", file=sys.stderr)
        return 2
    for line in result.lines():
        print(line)
    print("fitted arguments: " + " ".join(result.fitted_args))
    if out_path is not None:
        doc = result.to_json()
        doc["reference"] = str(ref_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_path, json.dumps(doc, indent=1) + "\n", overwrite=False)
        print(f"wrote {out_path}")
    return 0
