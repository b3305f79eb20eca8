"""``bragg-inspector [nanoBragg arguments]``: napari with the panels docked and
the configuration rendered (default: the 4096² tap configuration)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

USAGE = """bragg-inspector [--device DEV] [--dtype float32|float64] [--no-render] [nanoBragg arguments…]

Opens napari with the Bragg Inspector panels and renders the nanoBragg
arguments (default: the tap configuration
  -cell 100 100 100 90 90 90 -N 5 -default_F 100 -lambda 0.5 -distance 500
  -pixel 0.05 -detpixels 4096 -oversample 2)."""


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="bragg-inspector", usage=USAGE, add_help=False)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--no-render", action="store_true")
    p.add_argument("--help", "-help", "-h", action="store_true")
    # nanoBragg flags use a single dash: everything argparse does not know is theirs
    ns, rest = p.parse_known_args(list(argv))
    return ns, rest


def main(argv: Sequence[str] | None = None) -> int:
    ns, nb_args = parse(sys.argv[1:] if argv is None else argv)
    if ns.help:
        print(USAGE)
        return 0
    import napari

    from . import _engine
    from .inspector import Inspector

    viewer = napari.Viewer(title="Bragg Inspector")
    insp = Inspector(viewer)
    args = nb_args or _engine.tap_config_args()
    insp.controller.set_args(args)
    insp.controller.model.device, insp.controller.model.dtype = ns.device, ns.dtype
    if not ns.no_render:
        insp.simulate(args, wait=False, device=ns.device, dtype=ns.dtype)
    napari.run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
