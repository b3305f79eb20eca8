"""Closing the viewer while the inspector works: panels opened through napari's plugin machinery on a
plain viewer, a render or a sensitivity (dI/dp) job still running in its thread when the window
closes. The job ends on its own; nothing may reach the deleted panels (pytest-qt fails the test on
an exception in a Qt callback, which a napari process turns into an abort)."""

from __future__ import annotations

import pytest
from bragg_inspector import _engine
from bragg_inspector.args import join_args

pytestmark = [pytest.mark.gui]

PLUGIN = "bragg-inspector"


def _panels(make_napari_viewer, pixels: int):
    viewer = make_napari_viewer(show=True)
    _, sim_panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Bragg simulation")
    _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Bragg pixel tap")
    args = _engine.tap_config_args()
    args[args.index("-detpixels") + 1] = str(pixels)
    sim_panel.args_edit.value = join_args(args)
    return viewer, sim_panel, panel, panel.controller


def test_closing_during_a_sensitivity_job(make_napari_viewer, qtbot):
    viewer, sim_panel, panel, c = _panels(make_napari_viewer, 512)
    sim_panel.run_button.native.click()
    qtbot.waitUntil(lambda: not c.running and c.model.image is not None, timeout=120_000)
    assert c.click(256, 256) is not None
    assert c.compute_sensitivity() and c.sensitivity_running
    viewer.close()
    qtbot.waitUntil(lambda: c.detached, timeout=5_000)  # once the window's close was accepted
    qtbot.waitUntil(lambda: not c.sensitivity_running, timeout=120_000)
    qtbot.wait(300)  # the job's callbacks and the panels' pending timers have run
    assert all(len(getattr(c, n)) == 0 for n in ("status", "sensitivity_ready", "rendered"))


def test_closing_during_a_render(make_napari_viewer, qtbot):
    viewer, sim_panel, panel, c = _panels(make_napari_viewer, 4096)
    sim_panel.run_button.native.click()
    qtbot.waitUntil(lambda: c.running, timeout=10_000)
    viewer.close()
    qtbot.waitUntil(lambda: c.detached, timeout=5_000)  # once the window's close was accepted
    qtbot.waitUntil(lambda: not c.running, timeout=120_000)
    qtbot.wait(300)
    assert c.last_message.startswith("render cancelled")


def test_a_close_the_window_refuses_keeps_the_inspector_working(make_napari_viewer, qtbot):
    viewer, sim_panel, panel, c = _panels(make_napari_viewer, 64)
    win = viewer.window._qt_window
    win.closeEvent = lambda event: event.ignore()  # as when the user answers Cancel to "are you sure?"
    try:
        win.close()
        qtbot.wait(100)
        assert win.isVisible() and not c.detached
        sim_panel.run_button.native.click()
        qtbot.waitUntil(lambda: not c.running and c.model.image is not None, timeout=60_000)
        assert c.model.image.shape == (64, 64) and c.last_error is None
        assert len(c.status) > 0 and sim_panel.status_label.value == c.last_message
    finally:
        del win.closeEvent


def test_after_the_close_new_jobs_are_refused(make_napari_viewer, qtbot):
    viewer, sim_panel, panel, c = _panels(make_napari_viewer, 64)
    viewer.close()
    qtbot.waitUntil(lambda: c.detached, timeout=5_000)
    assert c.simulate(wait=True) is False and not c.running and c.model.image is None
