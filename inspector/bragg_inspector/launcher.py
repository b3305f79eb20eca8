"""``bragg-inspector [nanoBragg arguments]``: napari with the panels docked and
the configuration rendered (default: the 4096² tap configuration)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["UsageError", "parse", "main"]

USAGE = """bragg-inspector [--device DEV] [--dtype float32|float64] [--no-render] [--screenshot PNG]
                       [nanoBragg arguments…]
       bragg-inspector --bench-clicks N [nanoBragg arguments…]   (click → table and hover latencies)
       bragg-inspector --bench-launch N [nanoBragg arguments…]   (time to the first picture against plain napari)

Without a display (no DISPLAY/WAYLAND_DISPLAY, e.g. a fresh server) it runs
itself under xvfb-run and saves a screenshot (bragg-inspector.png) instead of
opening a window. --screenshot PNG renders, taps the centre pixel, shows the
default_F regions, saves the whole window and exits.

Opens napari with the Bragg Inspector panels and renders the nanoBragg
arguments (default: the tap configuration
  -cell 100 100 100 90 90 90 -N 5 -default_F 100 -lambda 0.5 -distance 500
  -pixel 0.05 -detpixels 4096 -oversample 2)."""


class UsageError(ValueError):
    """A command line the launcher cannot use (the message says why)."""


def parse(argv: Sequence[str]) -> tuple[dict, list[str]]:
    """Split our own ``--`` options from the nanoBragg arguments (which use a
    single dash and are passed on untouched: no prefix matching, so ``-hkl``
    is never mistaken for ``-h``).

    Parameters
    ----------
    argv : sequence of str
        The command line without the program name.

    Returns
    -------
    opts : dict
        ``device``, ``dtype``, ``render``, ``help``, ``screenshot``, ``bench_clicks``, ``bench_launch`` and
        ``first_picture``.
    rest : list of str
        The nanoBragg arguments, in order.

    Raises
    ------
    UsageError
        An option without its value, a non-integer count, or a dtype other than float32/float64.
    """
    opts = {"device": "cpu", "dtype": "float32", "render": True, "help": False, "screenshot": None,
            "bench_clicks": 0, "bench_launch": 0, "first_picture": False}
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        if a in ("--help", "-h"):
            opts["help"] = True
        elif a == "--no-render":
            opts["render"] = False
        elif a == "--first-picture":
            opts["first_picture"] = True
        elif a == "--bench-launch" or a.startswith("--bench-launch="):
            val = a.partition("=")[2] or next(it, None)
            try:
                opts["bench_launch"] = int(val)
            except (TypeError, ValueError):
                raise UsageError(f"--bench-launch needs a number of runs, not {val!r}") from None
        elif a == "--bench-clicks" or a.startswith("--bench-clicks="):
            val = a.partition("=")[2] or next(it, None)
            try:
                opts["bench_clicks"] = int(val)
            except (TypeError, ValueError):
                raise UsageError(f"--bench-clicks needs a number of clicks, not {val!r}") from None
        elif a == "--screenshot" or a.startswith("--screenshot="):
            val = a.partition("=")[2] or next(it, None)
            if not val:
                raise UsageError("--screenshot needs a PNG path")
            opts["screenshot"] = val
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
    """The ``bragg-inspector`` command.

    Parameters
    ----------
    argv : sequence of str, optional
        The command line without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0 on success, 2 for a usage error or a failed run, the re-run's status when
        it runs itself under Xvfb.
    """
    try:
        opts, nb_args = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"bragg-inspector: {exc}\n\n{USAGE}", file=sys.stderr)
        return 2
    if opts["help"]:
        print(USAGE)
        return 0
    if opts["bench_launch"]:
        from .launch_bench import bench_launch

        return bench_launch(opts["bench_launch"], nb_args)
    if _needs_virtual_display():
        return _rerun_under_xvfb(list(sys.argv[1:] if argv is None else argv), opts)
    pre = None
    if opts["render"] and not opts["screenshot"] and not opts["bench_clicks"]:
        # the first render runs in its own process while napari builds its window
        from . import _engine
        from .prerender import Prerender

        pre = Prerender(nb_args or _engine.tap_config_args(), opts["device"], opts["dtype"])
    import napari

    from . import _engine
    from .controller import controller_for
    from .inspector import Inspector
    viewer = napari.Viewer(title="Bragg Inspector")
    _cached_unit_registry()
    args = nb_args or _engine.tap_config_args()
    ctrl = controller_for(viewer)
    ctrl.model.args, ctrl.model.device, ctrl.model.dtype = list(args), opts["device"], opts["dtype"]
    # with a render on its way the picture comes first: the panels dock once it is on screen
    insp = Inspector(viewer, dock=pre is None)
    if pre is not None:
        _dock_after_first_picture(viewer, insp)
    if opts["bench_clicks"]:
        return _bench_clicks(viewer, insp, args, opts)
    if opts["screenshot"]:
        return _screenshot(viewer, insp, args, opts)
    if pre is not None:
        if pre.poll() is None:  # the child still renders: meanwhile build what the first layer needs
            _warm_image_layers()
        insp.controller.adopt_prerender(pre, args, opts["device"], opts["dtype"])
    if opts["first_picture"]:
        return _first_picture(viewer, insp, args, opts)
    napari.run()
    return 0


def _cached_unit_registry() -> None:
    """napari's first layer builds pint's unit registry (about 0.3 s of parsing); pint can
    keep the parsed definitions in the user's cache folder and read them in 0.07 s."""
    try:
        import pint

        pint.set_application_registry(pint.UnitRegistry(cache_folder=":auto:"))
    except Exception:  # noqa: BLE001 - only a speed-up: napari builds its own registry as before
        pass


def _warm_image_layers() -> None:
    """Import and initialise what napari's first image layer needs (layer class, its
    transforms and unit registry, the canvas's image visual): about half a second that
    would otherwise come after the render is ready."""
    try:
        import numpy as np
        from napari.layers import Image

        Image(np.zeros((2, 2), np.float32))
        import napari._vispy.layers.image  # noqa: F401 - the visual napari builds on insertion
    except Exception:  # noqa: BLE001 - only a speed-up
        pass


def _dock_after_first_picture(viewer, insp) -> None:
    """Dock the panels right after the canvas has drawn the first rendered picture
    (their widgets cost about half a second that the picture need not wait for)."""
    from qtpy.QtCore import QTimer

    def dock():
        if not insp.docked:
            insp.dock()
            viewer.reset_view()  # the canvas is narrower with the panels

    def on_picture():
        QTimer.singleShot(30, dock)  # after Qt has painted the canvas

    if insp.controller.first_picture_shown:
        on_picture()
    else:
        insp.controller.first_picture.connect(on_picture)
        insp.controller.render_finished.connect(lambda _ok: on_picture())  # a failed render: panels with its error


def _first_picture(viewer, insp, args, opts) -> int:
    """Launch as usual, wait until the canvas has drawn the rendered image, print
    ``first picture`` and quit (used by ``--bench-launch``)."""
    import time

    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + 600
    while not insp.controller.first_picture_shown:
        if insp.controller.last_error or time.monotonic() > deadline:
            print(f"bragg-inspector: error: {insp.controller.last_error or 'no picture'}", file=sys.stderr)
            return 2
        QApplication.processEvents()
        time.sleep(0.005)
    QApplication.processEvents()
    viewer.window._qt_viewer.canvas._scene_canvas.native.repaint()  # noqa: SLF001 - draw now, not later
    QApplication.processEvents()
    print("bragg-inspector: first picture", flush=True)
    while not insp.docked and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.005)
    QApplication.processEvents()
    print("bragg-inspector: panels docked", flush=True)
    while insp.controller.running and time.monotonic() < deadline:  # the simulation adopts the image
        QApplication.processEvents()
        time.sleep(0.005)
    viewer.close()
    return 0


def _needs_virtual_display() -> bool:
    import os

    return (sys.platform.startswith("linux") and not os.environ.get("DISPLAY")
            and not os.environ.get("WAYLAND_DISPLAY"))


def _rerun_under_xvfb(argv: list[str], opts: dict) -> int:
    """No screen: run under Xvfb and save a screenshot instead of showing a window."""
    import shutil
    import subprocess

    xvfb = shutil.which("xvfb-run")
    if xvfb is None:
        print("bragg-inspector: no display and no xvfb-run; install Xvfb (scripts/bootstrap.sh does) "
              "or run on a desktop", file=sys.stderr)
        return 2
    if not opts["screenshot"] and not opts["bench_clicks"]:
        argv = ["--screenshot", "bragg-inspector.png"] + argv
        print("bragg-inspector: no display: running under Xvfb and saving the window to bragg-inspector.png",
              file=sys.stderr)
    return subprocess.call([xvfb, "-a", "-s", "-screen 0 1800x1150x24", sys.executable, "-m",
                            "bragg_inspector"] + argv)


def _bench_clicks(viewer, insp, args, opts) -> int:
    """Render, then time click → table for N pixels spread over the detector."""
    import statistics
    import time

    from qtpy.QtWidgets import QApplication

    t0 = time.perf_counter()
    if not insp.simulate(args, wait=True, device=opts["device"], dtype=opts["dtype"]):
        print(f"bragg-inspector: error: {insp.controller.last_error or 'the render failed'}", file=sys.stderr)
        viewer.close()
        return 2
    render_s = time.perf_counter() - t0
    ny, nx = insp.model.shape
    insp.click(ny // 2, nx // 2)  # the first tap of a process warms the engine up
    table, total = [], []
    n = opts["bench_clicks"]
    hover = []
    for i in range(n):
        s, f = (i * 7919 + 13) % ny, (i * 104729 + 101) % nx
        t1 = time.perf_counter()
        insp.hover(s, f)
        hover.append(1e3 * (time.perf_counter() - t1))
    for i in range(n):
        s, f = (i * 7919 + 13) % ny, (i * 104729 + 101) % nx
        insp.click(s, f)
        QApplication.processEvents()
        table.append(insp.controller.last_click_ms["table"])
        total.append(insp.controller.last_click_ms["total"])
    print(f"bragg-inspector: render of {ny}x{nx} (including set-up and display) {render_s:.2f} s")
    print(f"bragg-inspector: click -> table over {n} clicks: median {statistics.median(table):.1f} ms, "
          f"max {max(table):.1f} ms; with pixel markers: median {statistics.median(total):.1f} ms, "
          f"max {max(total):.1f} ms (target: <= 100 ms)")
    print(f"bragg-inspector: hover readout over {n} pixels: median {statistics.median(hover):.2f} ms, "
          f"max {max(hover):.2f} ms (target: <= 5 ms median)")
    viewer.close()
    return 0


def _screenshot(viewer, insp, args, opts) -> int:
    """Render, tap the centre pixel, show the default_F regions, save the window, quit."""
    from pathlib import Path

    from qtpy.QtWidgets import QApplication

    viewer.window._qt_window.resize(1800, 1150)
    if not insp.simulate(args, wait=True, device=opts["device"], dtype=opts["dtype"]):
        # the panel shows the message; a headless run must say it too and write nothing
        print(f"bragg-inspector: error: {getattr(insp.controller, 'last_error', None) or 'the render failed'}",
              file=sys.stderr)
        viewer.close()
        return 2
    ny, nx = insp.model.shape if getattr(insp.model, "shape", None) else (0, 0)
    if ny and nx:
        insp.click(ny // 2, nx // 2)
        insp.set_overlay(True)
    QApplication.processEvents()
    path = Path(opts["screenshot"])
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    rows = insp.tap_table()
    print(f"bragg-inspector: rendered {' '.join(args)}")
    if rows:
        print(f"bragg-inspector: centre pixel ({ny // 2}, {nx // 2}): {len(rows)} evaluations, "
              f"lookups {sorted({r['lookup'] for r in rows})}")
    print(f"bragg-inspector: saved {path}")
    viewer.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
