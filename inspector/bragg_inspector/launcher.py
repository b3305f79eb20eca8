"""``bragg-inspector [nanoBragg arguments]``: napari with the panels docked and
the configuration rendered (default: the 4096² tap configuration)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """bragg-inspector [--device DEV] [--dtype float32|float64] [--no-render] [nanoBragg arguments…]

Opens napari with the Bragg Inspector panels and renders the nanoBragg
arguments (default: the tap configuration
  -cell 100 100 100 90 90 90 -N 5 -default_F 100 -lambda 0.5 -distance 500
  -pixel 0.05 -detpixels 4096 -oversample 2)."""


class UsageError(ValueError):
    pass


def parse(argv: Sequence[str]) -> tuple[dict, list[str]]:
    """Split our own ``--`` options from the nanoBragg arguments (which use a
    single dash and are passed on untouched: no prefix matching, so ``-hkl``
    is never mistaken for ``-h``)."""
    opts = {"device": "cpu", "dtype": "float32", "render": True, "help": False}
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        if a in ("--help", "-h"):
            opts["help"] = True
        elif a == "--no-render":
            opts["render"] = False
        elif a in ("--device", "--dtype") or a.startswith(("--device=", "--dtype=")):
            key, _, val = a[2:].partition("=")
            if not val:
                val = next(it, None)
                if val is None:
                    raise UsageError(f"{a} needs a value")
            if key == "dtype" and val not in ("float32", "float64"):
                raise UsageError(f"--dtype must be float32 or float64, not {val!r}")
            opts[key] = val
        else:
            rest.append(a)
    return opts, rest


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts, nb_args = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"bragg-inspector: {exc}\n\n{USAGE}", file=sys.stderr)
        return 2
    if opts["help"]:
        print(USAGE)
        return 0
    import napari

    from . import _engine
    from .inspector import Inspector

    from .controller import controller_for

    viewer = napari.Viewer(title="Bragg Inspector")
    args = nb_args or _engine.tap_config_args()
    ctrl = controller_for(viewer)
    ctrl.model.args, ctrl.model.device, ctrl.model.dtype = list(args), opts["device"], opts["dtype"]
    insp = Inspector(viewer)
    if opts["render"]:
        insp.simulate(args, wait=False, device=opts["device"], dtype=opts["dtype"])
    napari.run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
