"""The README's main command on a machine without a display: bragg-inspector runs itself
under Xvfb, renders, taps the centre pixel and saves the window."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("xvfb-run") is None, reason="needs xvfb-run")


def test_headless_launcher_saves_a_screenshot_of_the_rendered_inspector(tmp_path, small_hkl):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    args = ["-cell", "100", "100", "100", "90", "90", "90", "-hkl", str(small_hkl), "-default_F", "50", "-N", "3",
            "-lambda", "1.0", "-distance", "100", "-detpixels", "96", "-pixel", "0.5"]
    p = subprocess.run([sys.executable, "-m", "bragg_inspector"] + args, cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "no display: running under Xvfb" in p.stderr
    assert "centre pixel (48, 48)" in p.stdout and "saved bragg-inspector.png" in p.stdout
    png = tmp_path / "bragg-inspector.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image  # napari depends on Pillow

    with Image.open(png) as im:
        w, h = im.size
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert w >= 1000 and h >= 700
    assert colours is not None and len(colours) > 50  # a real window, not a blank frame


def test_headless_launcher_reports_a_bad_flag(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    p = subprocess.run([sys.executable, "-m", "bragg_inspector", "-cell", "100", "100", "100", "90", "90", "90",
                        "-default_F", "1", "-tophat_xtal"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2
    assert "unknown flag -tophat_xtal; did you mean -tophat_spots?" in p.stderr
    assert not list(Path(tmp_path).glob("*.png"))
