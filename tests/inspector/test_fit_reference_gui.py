"""The compare panel's "Fit to reference" as users reach it: the panel from napari's
plugin machinery on a plain viewer, a float32 .bin reference rendered at another
distance, the fit started with a real click on its button (worker thread, progress),
the fitted offsets and metrics shown, and "Use fitted arguments" filling the argument
line without rendering."""

from __future__ import annotations

import numpy as np
import pytest
from bragg_inspector import _engine
from bragg_inspector.args import join_args, split_args
from inspector_helpers import needs_engine

pytestmark = [pytest.mark.gui]

PLUGIN = "bragg-inspector"
BASE = ("-cell 60 60 60 90 90 90 -default_F 100 -N 6 -lambda 1 -distance {d} -pixel 0.2 -detpixels 96 "
        "-oversample 1 -misset 5 10 15")


def _click(qtbot, widget):
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    QTest.mouseClick(widget.native, Qt.MouseButton.LeftButton)
    qtbot.wait(10)


def _render(args, tmp_path):
    sim = _engine.make_simulation(split_args(args), dtype="float64", cwd=str(tmp_path))
    img, _fb = _engine.render(sim)
    return img


@needs_engine
def test_fit_to_reference_from_the_compare_panel(make_napari_viewer, qtbot, tmp_path, screenshot_dir):
    ref_path = tmp_path / "reference_d101.bin"
    ref = _render(BASE.format(d=101), tmp_path)
    assert ref.shape == (96, 96) and ref.dtype == np.float32
    ref.tofile(ref_path)

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1800, 1150)
    _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Bragg simulation")
    c = panel.controller
    c.model.cwd = str(tmp_path)

    # without a reference the button says what is missing
    _click(qtbot, panel.fit_button)
    assert not c.running and c.last_fit is None
    assert "open a reference image" in (c.last_error or "")

    panel.args_edit.value = BASE.format(d=100)
    _click(qtbot, panel.run_button)
    qtbot.waitUntil(lambda: not c.running and c.model.image is not None, timeout=60_000)
    assert c.last_error is None, c.last_error
    panel.ref_file.value = ref_path  # a raw float32 file of the simulation's size
    qtbot.waitUntil(lambda: c.model.comparison is not None, timeout=10_000)
    assert c.model.comparison.metrics["correlation"] < 0.99

    assert panel.fit_params.value == "distance,beam_center,misset"
    assert not panel.use_fit_button.enabled
    seen = []
    c.fit_progress.connect(lambda done, total: seen.append((done, total)))
    _click(qtbot, panel.fit_button)
    assert c.running and panel.cancel_button.enabled and not panel.fit_button.enabled
    qtbot.waitUntil(lambda: not c.running, timeout=300_000)
    assert c.last_error is None, c.last_error
    res = c.last_fit
    assert res is not None and seen and panel.progress.value == 100
    assert panel.use_fit_button.enabled and panel.fit_button.enabled and not panel.cancel_button.enabled
    by_name = {(p["family"], p["component"]): p for p in res.parameters}
    dist = by_name[("distance", "distance")]
    assert dist["offset"] == pytest.approx(1.0, abs=0.05)
    assert dist["uncertainty"] is not None
    assert res.metrics_after["rmsd"] < 0.1 * res.metrics_before["rmsd"]
    assert res.metrics_after["correlation"] > 0.999
    shown = panel.fit_result_label.value
    assert "distance" in shown and "misset.z" in shown and "before" in shown and "after" in shown
    assert f"{dist['offset']:+.3g}" in shown

    qtbot.wait(100)
    shot = screenshot_dir / "fit_to_reference.png"
    assert panel.native.grab().save(str(shot))

    # the arguments are offered, not applied: the line changes only on "Use fitted arguments"
    assert "-distance 100" in panel.args_text()
    rendered_image = c.model.image
    _click(qtbot, panel.use_fit_button)
    text = panel.args_text()
    argv = split_args(text)
    assert text == join_args(res.fitted_args)
    assert float(argv[argv.index("-distance") + 1]) == pytest.approx(101.0, abs=0.05)
    assert text.split("-distance ", 1)[1].startswith("101") or text.split("-distance ", 1)[1].startswith("100.9")
    assert not c.running and c.model.image is rendered_image  # no render started


def _panel_with_reference(make_napari_viewer, qtbot, tmp_path):
    """The simulation panel on a plain viewer, distance 100 rendered, a distance-101 reference open."""
    ref_path = tmp_path / "reference_d101.bin"
    _render(BASE.format(d=101), tmp_path).tofile(ref_path)
    viewer = make_napari_viewer(show=True)
    _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Bragg simulation")
    c = panel.controller
    c.model.cwd = str(tmp_path)
    panel.args_edit.value = BASE.format(d=100)
    _click(qtbot, panel.run_button)
    qtbot.waitUntil(lambda: not c.running and c.model.image is not None, timeout=60_000)
    panel.ref_file.value = ref_path
    qtbot.waitUntil(lambda: c.model.comparison is not None, timeout=10_000)
    return panel, c


@needs_engine
def test_fit_can_be_cancelled_from_the_panel(make_napari_viewer, qtbot, tmp_path):
    panel, c = _panel_with_reference(make_napari_viewer, qtbot, tmp_path)
    args_before = panel.args_text()
    _click(qtbot, panel.fit_button)
    assert c.running
    _click(qtbot, panel.cancel_button)
    qtbot.waitUntil(lambda: not c.running, timeout=120_000)
    assert c.last_fit is None and c.last_error is None
    assert "fit cancelled" in c.last_message
    assert not panel.use_fit_button.enabled and panel.fit_button.enabled and panel.run_button.enabled
    assert panel.args_text() == args_before


@needs_engine
def test_fit_loss_evaluations_and_region_from_the_panel(make_napari_viewer, qtbot, tmp_path):
    panel, c = _panel_with_reference(make_napari_viewer, qtbot, tmp_path)

    # a region outside the image is refused before any work, naming the bounds
    panel.fit_region.value = "0 95 10 200"
    _click(qtbot, panel.fit_button)
    assert not c.running and c.last_fit is None
    assert "region must be four integers xmin xmax ymin ymax inside 0..95 and 0..95" in (c.last_error or "")

    panel.fit_params.value = "distance"
    panel.fit_loss.value = "poisson"
    panel.fit_iterations.value = 40
    panel.fit_region.value = "8 87 8 87"
    _click(qtbot, panel.fit_button)
    qtbot.waitUntil(lambda: not c.running, timeout=300_000)
    assert c.last_error is None, c.last_error
    res = c.last_fit
    assert res.loss == "poisson" and res.roi == [8, 87, 8, 87]
    assert res.metrics_before["pixels"] == 80 * 80 and res.iterations <= 40
    (dist,) = res.parameters
    assert dist["offset"] == pytest.approx(1.0, abs=0.05)
    assert "poisson fit" in panel.fit_result_label.value
