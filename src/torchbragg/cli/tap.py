"""The ``bragg-tap`` command: per-subpixel evidence for chosen pixels.

::

    bragg-tap --pixel 2048 2048 --oversample 2 --taps hkl_subpixel --json \\
        --out-dir DIR --tag centre [-- nanoBragg arguments]
    bragg-tap --pixel 2048 2048 --pixel 0 0 --bundle reports/<topic>/<phase> [-- ...]
    bragg-tap audit BUNDLE [--c-taps FILE]

Without nanoBragg arguments the 4096² tap configuration is used (and a line
says so). Errors (a pixel outside the detector, an unknown tap, an unwritable
folder, a bad argument line) print one line and exit with code 2 before any
file is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise SystemExit(_fail(f"{message}"))


def _fail(message: str) -> int:
    print(f"bragg-tap: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    """The ``bragg-tap`` command line.

    Returns
    -------
    argparse.ArgumentParser
        Its options; nanoBragg arguments follow ``--``.
    """
    p = _Parser(prog="bragg-tap", description="Tap pixels of a nanoBragg simulation: which reflection and "
                "structure factor every subpixel used. nanoBragg arguments follow '--'.")
    p.add_argument("--pixel", nargs=2, type=int, action="append", metavar=("SLOW", "FAST"), required=True,
                   help="pixel to tap (repeatable)")
    p.add_argument("--oversample", type=int, help="override the configuration's -oversample")
    p.add_argument("--taps", default="hkl_subpixel",
                   help="comma list of hkl_subpixel,f_cell,omega,intensity,geometry (default hkl_subpixel)")
    p.add_argument("--json", action="store_true", help="write JSON (to --out-dir/--bundle, else stdout)")
    p.add_argument("--out-dir", help="folder for the JSON files")
    p.add_argument("--tag", help="tag carried in file names")
    p.add_argument("--bundle", help="reports/<topic>/<phase>: write into a fresh <UTC STAMP>/ evidence bundle "
                                    "(or into an existing bundle folder)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    return p


def _audit(argv: list[str]) -> int:
    from ..tap_audit import write_audit

    p = _Parser(prog="bragg-tap audit", description="Write comparison/tap5_hkl_audit.md for a bundle.")
    p.add_argument("bundle")
    p.add_argument("--c-taps", help="C taps JSON (format of shared/golden/taps/c_subpixel_taps.json)")
    ns = p.parse_args(argv)
    try:
        path = write_audit(ns.bundle, ns.c_taps)
    except (OSError, ValueError) as err:
        return _fail(str(err))
    from ..report_bundle import record_command

    record_command(ns.bundle, ["bragg-tap", "audit"] + list(argv), note=f"wrote {path}")
    print(path)
    return 0


def _writable_folder(path: Path) -> str | None:
    """Create ``path`` if needed; return an error message when it cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create folder {path}: {err.strerror}"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"folder {path} is not writable"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bragg-tap`` console script (SIGINT/SIGTERM: exit 130/143, one line).

    ``bragg-tap audit BUNDLE`` writes a bundle's audit; otherwise the chosen pixels are tapped and their
    tables printed, or their JSON printed or written to ``--out-dir`` / ``--bundle``.

    Parameters
    ----------
    argv : Sequence[str] or None, optional
        The command-line arguments (without the program name), nanoBragg arguments after ``--``;
        ``None`` reads ``sys.argv[1:]`` and runs as a console script.

    Returns
    -------
    int
        The exit status: 0 on success (or ``--help``); 2 for a usage error, unknown tap, unwritable folder,
        unusable device or failed set-up or tap (one line on standard error, before any file is written);
        130 after SIGINT and 143 after SIGTERM.
    """
    from .command import run_command

    return run_command("bragg-tap", _main, argv, lambda: "no tap file was left half-written")


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    original = list(argv)
    if argv and argv[0] == "audit":
        try:
            return _audit(argv[1:])
        except SystemExit as exc:
            return int(exc.code or 0)
    nb_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, nb_args = argv[:cut], argv[cut + 1:]
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)

    import torch

    from .. import TAP_CONFIG_ARGS
    from ..arguments import ArgumentError
    from ..resolve import SetupError
    from ..simulation import Simulation
    from ..taps import TAP_NAMES, TapError, format_tap_table, write_tap_json

    taps = [t.strip() for t in ns.taps.split(",") if t.strip()]
    unknown = [t for t in taps if t not in TAP_NAMES]
    if unknown or not taps:
        return _fail(f"unknown tap {unknown[0]!r}; known taps: {', '.join(TAP_NAMES)}" if unknown
                     else "--taps is empty")
    if not nb_args:
        nb_args = list(TAP_CONFIG_ARGS)
        print("bragg-tap: no nanoBragg arguments after '--': using the 4096² tap configuration "
              + " ".join(nb_args), file=sys.stderr)
    if ns.oversample is not None:
        if ns.oversample < 1:
            return _fail(f"--oversample must be at least 1, got {ns.oversample}")
        cleaned, i = [], 0
        while i < len(nb_args):
            if nb_args[i] == "-oversample":
                i += 2
                continue
            cleaned.append(nb_args[i])
            i += 1
        nb_args = cleaned + ["-oversample", str(ns.oversample)]

    folder = None
    bundle = None
    if ns.bundle:
        from ..report_bundle import is_bundle

        err = None if is_bundle(ns.bundle) else _writable_folder(Path(ns.bundle))
        if err:
            return _fail(err)
    elif ns.out_dir:
        err = _writable_folder(Path(ns.out_dir))
        if err:
            return _fail(err)
        folder = Path(ns.out_dir)

    dtype = torch.float64 if ns.dtype == "float64" else torch.float32
    try:
        device = torch.device(ns.device)
    except RuntimeError:
        return _fail(f"--device: expected cpu, cuda or cuda:N, got {ns.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail(f"--device {ns.device}: CUDA is not available on this machine")
    try:
        sim = Simulation.from_args(nb_args, device=ns.device, dtype=dtype)
        results = [sim.tap(s, f, taps=taps) for s, f in ns.pixel]  # validate every pixel before writing
    except (ArgumentError, SetupError, TapError, OSError, ValueError, RuntimeError) as err:
        return _fail(str(err))

    if ns.bundle:
        from ..report_bundle import open_bundle, record_command

        bundle = open_bundle(ns.bundle)
        folder = bundle / "py_taps"
        record_command(bundle, ["bragg-tap"] + original, device=str(sim.device), dtype=ns.dtype,
                       note="effective nanoBragg arguments: " + " ".join(nb_args))

    warnings = [f"WARNING: {w}" for w in sim.hkl_info["warnings"]]
    for line in [f"structure factors: {sim.hkl_info['describe']}"] + warnings:
        print(line, file=sys.stderr)
    for tap in results:
        if ns.json or folder is not None:
            if folder is None:
                for t in taps:
                    print(json.dumps(tap.to_json(t), indent=1))
            else:
                for t in taps:
                    print(write_tap_json(tap, folder, tag=ns.tag, tap_id=t))
        else:
            print(format_tap_table(tap))
    if bundle is not None:
        print(f"bundle: {bundle}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
