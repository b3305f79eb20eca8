"""Screenshots: the canvas is not blank, and the README picture
(docs/screenshots/inspector.png with BRAGG_SCREENSHOTS=docs)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from bragg_inspector import controller as ctl
from gui_helpers import canvas_image
from inspector_helpers import DATA, needs_taps, small_args

pytestmark = [pytest.mark.gui]


def _png_size(path):
    import imageio.v3 as iio

    return iio.imread(path).shape


@needs_taps
def test_canvas_is_not_blank(insp, viewer, small_hkl, screenshot_dir, qtbot):
    assert insp.simulate(small_args(small_hkl), wait=True)
    insp.click(32, 32)
    qtbot.wait(100)
    img = canvas_image(viewer)[..., :3].astype(int)
    colours = np.unique(img.reshape(-1, 3), axis=0)
    assert img.std() > 10 and len(colours) > 20, "the canvas looks blank"
    # the image itself is drawn: the canvas centre is not the black background
    h, w = img.shape[:2]
    assert img[h // 2 - 20:h // 2 + 20, w // 2 - 20:w // 2 + 20].mean() > 30
    path = screenshot_dir / "inspector_canvas.png"
    viewer.screenshot(str(path), canvas_only=True, flash=False)
    assert path.is_file() and _png_size(path)[0] > 100


@needs_taps
def test_readme_screenshot_table_and_default_F_overlay(insp, viewer, tmp_path, screenshot_dir, qtbot):
    hkl = tmp_path / "f_hkl_m3p3_holes.hkl"
    shutil.copy(DATA / "f_hkl_m3p3_holes.hkl", hkl)
    # relative -hkl: resolved in the inspector's cwd (tmp_path), short in the panel
    args = ["-cell", "100", "100", "100", "90", "90", "90", "-hkl", hkl.name, "-default_F", "50", "-N", "5",
            "-lambda", "1", "-distance", "290", "-detpixels", "256", "-pixel", "0.1", "-oversample", "2"]
    assert insp.simulate(args, wait=True), insp.controller.last_error
    insp.simulation_widget.gamma_spin.value = 0.6
    insp.set_overlay(True)
    assert insp.simulation_widget.overlay_check.value
    fb = insp.model.fallback
    e = fb.evaluations_per_pixel
    # a bright pixel whose evaluations are partly from the table, partly default_F
    mixed = (fb.counts > 0) & (fb.counts < e)
    assert mixed.any()
    score = np.where(mixed, insp.model.image, -1)
    s, f = np.unravel_index(int(np.argmax(score)), score.shape)
    insp.click(int(s) + 40, int(f) - 30, shift=True)
    insp.click(int(s) - 35, int(f) + 45, shift=True)
    insp.click(int(s), int(f))
    rows = insp.tap_table()
    assert any(r["default_F"] for r in rows) and not all(r["default_F"] for r in rows), (s, f, fb.counts[s, f], rows)
    layer = next(l for l in viewer.layers if "default_F" in l.name)
    assert layer.visible
    viewer.layers.selection.active = viewer.layers[ctl.SIM_LAYER]
    qtbot.wait(300)
    path = screenshot_dir / "inspector.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    h, w = _png_size(path)[:2]
    assert w >= 1200 and h >= 800
