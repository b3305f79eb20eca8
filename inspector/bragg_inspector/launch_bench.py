"""``bragg-inspector --bench-launch N``: seconds from starting the process to the
first rendered picture, side by side with plain napari's time to show its window.

Each run is a fresh process (alternating, so both see the same machine state):
``bragg-inspector --first-picture`` renders the configuration and prints once
the canvas has drawn it; the napari run opens ``napari.Viewer()``, draws its
canvas and prints.  Prints the medians and their ratio (target: ≤ 1.6)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

__all__ = ["bench_launch"]

NAPARI_WINDOW = """
import napari
from qtpy.QtWidgets import QApplication
v = napari.Viewer()
QApplication.processEvents()
v.window._qt_viewer.canvas._scene_canvas.native.repaint()
QApplication.processEvents()
print("napari: window shown", flush=True)
v.close()
"""


def _time(cmd: list[str], *markers: str) -> list[float]:
    """Seconds from the start of ``cmd`` to each marker line, in order."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[float] = []
    for line in p.stdout:
        if markers[len(out)] in line:
            out.append(time.perf_counter() - t0)
            if len(out) == len(markers):
                p.wait(timeout=120)
                return out
    err = p.stderr.read()
    p.wait(timeout=120)
    raise RuntimeError(f"{' '.join(cmd[:4])}…: no {markers[len(out)]!r} line (exit {p.returncode}): {err[-500:]}")


def bench_launch(runs: int, nb_args: list[str]) -> int:
    """Time ``runs`` launches of each; returns the exit status.

    Parameters
    ----------
    runs : int
        Launches of each kind (at least 1).
    nb_args : list of str
        nanoBragg arguments of the inspector's launches.

    Returns
    -------
    int
        0 (a launch that prints no marker line raises ``RuntimeError``).
    """
    inspector, docked, napari_s = [], [], []
    for _ in range(max(1, runs)):
        napari_s += _time([sys.executable, "-c", NAPARI_WINDOW], "napari: window shown")
        picture, panels = _time([sys.executable, "-m", "bragg_inspector", "--first-picture", *nb_args],
                                "bragg-inspector: first picture", "bragg-inspector: panels docked")
        inspector.append(picture)
        docked.append(panels)
    a, b, c = statistics.median(inspector), statistics.median(napari_s), statistics.median(docked)
    print(f"plain napari, window shown:          median {b:.2f} s  {[round(x, 2) for x in napari_s]}")
    print(f"bragg-inspector, first picture:      median {a:.2f} s  {[round(x, 2) for x in inspector]}")
    print(f"bragg-inspector, panels docked:      median {c:.2f} s  {[round(x, 2) for x in docked]}")
    print(f"ratio inspector / napari: {a / b:.2f} (target: <= 1.6); panels docked / napari: {c / b:.2f}")
    return 0
