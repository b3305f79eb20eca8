"""``torchbragg defaultf-map``: where another renderer uses default_F, measured from its images."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..arguments import ArgumentError
from ..defaultf_map import DefaultFMapError, measure_defaultf_map, write_result
from ..resolve import SetupError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on standard error and exit 2, not argparse's usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    """``torchbragg defaultf-map --renderer PROGRAM [--out DIR] [--list N] [--no-engine] [--timeout S]
    -- <nanoBragg args>``.

    Measures, with :func:`torchbragg.defaultf_map.measure_defaultf_map`, which pixels of ``PROGRAM``'s
    image change with default_F, prints the counts (and, unless ``--no-engine``, how they agree with this
    engine's fallback map) and, with ``--out``, writes the result into that new folder.

    Parameters
    ----------
    argv : Sequence[str] or None, optional
        The arguments after ``defaultf-map``: this command's options, then ``--`` and the nanoBragg
        arguments; ``None`` reads ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0 after printing the summary (or for ``--help``); 2 for a usage error, bad option
        value, missing nanoBragg arguments, an existing ``--out`` folder or a failed measurement (one line
        on standard error).
    """

    argv = list(sys.argv[1:] if argv is None else argv)
    nb = []
    if "--" in argv:
        k = argv.index("--")
        argv, nb = argv[:k], argv[k + 1:]
    p = _Parser(prog="torchbragg defaultf-map")
    p.add_argument("--renderer", required=True)
    p.add_argument("--out")
    p.add_argument("--list", type=int, default=20)
    p.add_argument("--no-engine", action="store_true")
    p.add_argument("--timeout", type=float, default=None, help="seconds each renderer run may take")
    try:
        opts = p.parse_args(argv)
    except SystemExit as exc:
        return 2 if exc.code else 0
    try:
        if opts.timeout is not None and not (opts.timeout > 0 and opts.timeout != float("inf")):
            raise DefaultFMapError(f"--timeout {opts.timeout}: expected a finite number of seconds > 0")
        if opts.list < 0:
            raise DefaultFMapError(f"--list {opts.list}: expected a count ≥ 0")
        if not nb:
            raise DefaultFMapError("no nanoBragg arguments after --")
        if opts.out and os.path.lexists(opts.out):
            raise DefaultFMapError(f"--out {opts.out}: already exists; give a new folder")
        mask, summary, reason = measure_defaultf_map(opts.renderer, nb, list_n=opts.list,
                                                     compare_engine=not opts.no_engine, timeout=opts.timeout)
        if opts.out:
            write_result(opts.out, mask, summary, reason)
    except (DefaultFMapError, ArgumentError, SetupError, OSError, ValueError) as err:
        print(f"torchbragg defaultf-map: error: {err}", file=sys.stderr)
        return 2
    c = summary["counts"]
    print(f"changed pixels: {c['changed']} of {c['total']} (default_F {summary['default_F'][0]:g} "
          f"and {summary['default_F'][1]:g})")
    e = summary.get("engine")
    if e:
        print(f"engine fallback pixels: {e['fallback_pixels']}; agree {e['agree']}, only measured "
              f"{e['only_measured']}, only engine {e['only_engine']}")
        for d in e["disagreements"]:
            print(f"  ({d['slow']}, {d['fast']}): measured {int(d['measured'])}, engine reason {d['engine_reason']}")
    if opts.out:
        print(f"wrote {opts.out}/summary.json")
    return 0
