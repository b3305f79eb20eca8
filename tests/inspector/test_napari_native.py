"""The inspector as napari users reach it: panels from napari's plugin machinery
on a plain viewer, real Qt mouse and key events, hover readout, geometry layers,
markers, and the table's grouping, filter, copy, delete and double-click."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from bragg_inspector import controller as ctl
from gui_helpers import canvas_widget, napari_click, pixel_to_canvas, real_click, zoom_to
from inspector_helpers import GOLDEN, load_json, needs_taps, small_args

pytestmark = [pytest.mark.gui]

PLUGIN = "bragg-inspector"


def _qt():
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtTest import QTest

    return QPoint, Qt, QTest


def _press(qtbot, viewer, key, shift=True):
    """A real key press on the canvas (where napari's viewer key bindings listen)."""
    _, Qt, QTest = _qt()
    w = canvas_widget(viewer)
    w.setFocus()
    mods = Qt.KeyboardModifier.ShiftModifier if shift else Qt.KeyboardModifier.NoModifier
    QTest.keyClick(w, key, mods)
    qtbot.wait(20)


def _click_button(qtbot, button):
    _, Qt, QTest = _qt()
    QTest.mouseClick(button.native, Qt.MouseButton.LeftButton)
    qtbot.wait(10)


def _click_check(qtbot, check):
    """A real mouse click on a check box's indicator."""
    QPoint, Qt, QTest = _qt()
    w = check.native
    before = w.isChecked()
    QTest.mouseClick(w, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, QPoint(8, w.height() // 2))
    qtbot.wait(10)
    assert w.isChecked() != before


# --------------------------------------------------------------------------- plugin machinery
@needs_taps
def test_panels_open_through_napari_plugin_machinery_on_a_plain_viewer(make_napari_viewer, qtbot, small_hkl):
    from magicgui.widgets import Container

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    _, sim_panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Bragg simulation")
    _, tap_panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Bragg pixel tap")
    assert isinstance(sim_panel, Container) and isinstance(tap_panel, Container)
    # both panels drive one controller: render from the panel's Run button (a real click)
    sim_panel.args_edit.value = " ".join(small_args(small_hkl))
    c = sim_panel.controller
    assert c is tap_panel.controller
    _click_button(qtbot, sim_panel.run_button)
    qtbot.waitUntil(lambda: not c.running and c.model.image is not None, timeout=60000)
    assert sim_panel.progress.value == 100
    qtbot.wait(50)
    real_click(qtbot, viewer, 20, 45)
    assert c.model.current is not None and c.model.current.pixel == (20, 45)
    text = tap_panel.table_text()
    assert len(text) == len(c.model.current.rows) > 0
    assert text[0]["lookup"] == c.model.current.rows[0]["lookup"]


def test_plugins_menu_opens_the_panels_and_the_api_reuses_them(make_napari_viewer, qtbot):
    from bragg_inspector import Inspector
    from magicgui.widgets import Container

    viewer = make_napari_viewer(show=True)
    menu = viewer.window.plugins_menu
    found = {}

    def walk(m):
        for a in m.actions():
            if a.menu() is not None:
                walk(a.menu())
            elif a.text().startswith(("Bragg simulation", "Bragg pixel tap")):
                found[a.text()] = a

    walk(menu)
    assert set(found) == {"Bragg simulation (Bragg Inspector)", "Bragg pixel tap (Bragg Inspector)"}, found
    found["Bragg simulation (Bragg Inspector)"].trigger()  # what a user's click on the menu item does
    qtbot.wait(20)
    panel = viewer.window.dock_widgets["Bragg simulation (Bragg Inspector)"]
    assert isinstance(panel, Container)
    insp = Inspector(viewer)  # the launcher's and the notebook's way: the same docks, no second copy
    assert insp.simulation_widget is panel
    assert sorted(viewer.window.dock_widgets) == ["Bragg pixel tap (Bragg Inspector)",
                                                  "Bragg simulation (Bragg Inspector)"]


# --------------------------------------------------------------------------- hover
@needs_taps
def test_hover_readout_follows_the_mouse(insp, viewer, small_hkl, qtbot):
    import torchbragg
    from torchbragg import detector_geometry as dg

    args = small_args(small_hkl)
    assert insp.simulate(args, wait=True)
    text = insp.hover(32, 33)
    sim = insp.model.sim
    g = dg.pixel_geometry(sim, 32, 33)
    assert f"I {insp.model.image[32, 33]:.4g}" in text
    assert "d " in text and "Å" in text and "2θ" in text and "hkl (" in text
    h0 = tuple(int(v) for v in g["hkl0"])
    assert f"→ ({h0[0]},{h0[1]},{h0[2]})" in text
    F, reason = dg.structure_factor_source(sim, *h0)
    assert f"F {F:.4g}" in text and ("table" in text if reason == "table" else "default_F" in text)
    # a corner pixel's nearest reflection is outside the -2..2 table: the F source says so
    assert "outside the table" in insp.hover(0, 0)
    # a real mouse move over the canvas: napari's status bar shows the readout
    _, Qt, QTest = _qt()
    QPoint = _qt()[0]
    zoom_to(viewer, 32, 32, 6.0)
    qtbot.wait(50)
    x, y = pixel_to_canvas(viewer, 40, 24)
    w = canvas_widget(viewer)
    for dx in (15, 0):  # from a neighbour onto the pixel: a move event even if the pointer was there
        QTest.mouseMove(w, QPoint(int(round(x)) + dx, int(round(y))))
        qtbot.wait(30)
    qtbot.waitUntil(lambda: tuple(np.round(viewer.cursor.position[-2:])) == (40, 24), timeout=5000)
    # napari's status thread is held in its test fixture: compute the status as it would
    viewer.update_status_from_cursor()
    status = viewer.status
    text = status["coordinates"] if isinstance(status, dict) else str(status)
    assert text.startswith("[40, 24]") and "hkl (" in text and text == insp.hover(40, 24)
    assert torchbragg  # the engine gave the numbers


# --------------------------------------------------------------------------- geometry layers
PARTIAL = GOLDEN / "cases" / "hkl_partial_defaultF"


@needs_taps
@pytest.mark.golden
@pytest.mark.skipif(not PARTIAL.is_dir(), reason="golden data not available")
def test_rings_beam_centre_and_table_box_on_hkl_partial_defaultF(insp, viewer, tmp_path, qtbot, screenshot_dir):
    from torchbragg import detector_geometry as dg

    case = load_json(GOLDEN / "cases.json")["hkl_partial_defaultF"]
    for f in PARTIAL.glob("*.hkl"):
        shutil.copy(f, tmp_path / f.name)
    assert insp.simulate(case["args"], wait=True), insp.controller.last_error
    sim = insp.model.sim
    # beam centre marker where the direct beam meets the detector
    np.testing.assert_allclose(viewer.layers[ctl.BEAM_LAYER].data, [dg.beam_centre_pixel(sim)])
    # rings: the default d-spacings, each path at its d; labels in Å
    layer = insp.rings(True)
    ds = insp.controller.ring_d_spacings()
    assert layer is not None and len(layer.data) == len(ds) >= 3
    for d, path in zip(ds, layer.data, strict=True):
        px = np.round(path).astype(int)
        ok = (px[:, 0] >= 0) & (px[:, 0] < sim.shape[0]) & (px[:, 1] >= 0) & (px[:, 1] < sim.shape[1])
        got = dg.pixel_geometry(sim, px[ok, 0], px[ok, 1])["d_angstrom"]
        assert np.median(np.abs(got - d) / d) < 0.02
    labels = list(viewer.layers[ctl.RING_LABELS_LAYER].features["d"])
    assert labels == [f"{d:g} Å" for d in ds]
    # the HKL table's box: inside the outline the nearest reflection is in the table, outside it is not
    box = viewer.layers[ctl.BOX_LAYER]
    assert len(box.data) >= 1
    inside = dg.table_box_mask(sim, 1)
    fb = insp.model.fallback
    outside_code = next(k for k, v in fb.reasons.items() if v == "default_F:outside_table")
    assert (fb.reason[~inside] == outside_code).mean() > 0.95
    # markers above every image, geometry above the overlay
    insp.click(*(int(v) for v in np.round(dg.beam_centre_pixel(sim))))
    insp.set_overlay(True)
    names = [lay.name for lay in viewer.layers]
    assert names.index(ctl.FALLBACK_LAYER) < names.index(ctl.BOX_LAYER) < names.index(ctl.TAP_LAYER)
    viewer.layers.selection.active = viewer.layers[ctl.SIM_LAYER]
    qtbot.wait(200)
    viewer.screenshot(str(screenshot_dir / "rings_beam_box.png"), canvas_only=False, flash=False)
    # user d-spacings, and off again
    assert len(insp.rings(True, d_spacings=[20, 10]).data) == 2
    insp.rings(False)
    assert ctl.RINGS_LAYER not in viewer.layers


@needs_taps
def test_opened_smv_image_gets_beam_centre_rings_and_hover_from_its_header(insp, viewer, tmp_path):
    from inspector_helpers import ROOT

    smv = ROOT / "tests" / "data" / "golden_small" / "cases" / "cubic_hkl_mosflm" / "img.smv"
    layers = viewer.open(str(smv), plugin=PLUGIN)
    assert layers and layers[0].data.shape == (256, 256)
    np.testing.assert_allclose(viewer.layers[ctl.BEAM_LAYER].data, [[128.5, 128.5]])
    insp.rings(True, d_spacings=[20])
    assert len(viewer.layers[ctl.RINGS_LAYER].data) == 1
    text = insp.hover(10, 20)
    assert text.startswith("[10, 20]") and "d " in text and "2θ" in text and "hkl" not in text
    assert f"I {layers[0].data[10, 20]:.4g}" in text


# --------------------------------------------------------------------------- markers and view
@needs_taps
def test_markers_fixed_screen_size_leave_the_spot_visible(insp, viewer, small_hkl, qtbot, screenshot_dir):
    from gui_helpers import canvas_image

    assert insp.simulate(small_args(small_hkl), wait=True)
    s, f = np.unravel_index(int(np.argmax(insp.model.image)), insp.model.image.shape)
    insp.click(int(s), int(f))
    layer = viewer.layers[ctl.TAP_LAYER]
    assert tuple(layer.canvas_size_limits) == (ctl.MARKER_SCREEN_PX, ctl.MARKER_SCREEN_PX)
    green = np.array([0x00, 0xC8, 0x53])

    def marker_pixels(zoom):
        zoom_to(viewer, int(s), int(f), zoom)
        qtbot.wait(100)
        img = canvas_image(viewer)[..., :3].astype(int)
        x, y = pixel_to_canvas(viewer, int(s), int(f))
        ratio = img.shape[1] / canvas_widget(viewer).width()  # logical → physical pixels
        cx, cy = int(round(x * ratio)), int(round(y * ratio))
        near = np.abs(img - green).sum(-1) < 60
        return int(near.sum()), img[cy, cx], near[cy - 2:cy + 3, cx - 2:cx + 3].any()

    n1, centre1, hidden1 = marker_pixels(3.0)
    n2, centre2, hidden2 = marker_pixels(12.0)
    assert n1 > 20 and n2 > 20
    assert 0.6 < n1 / n2 < 1.6, (n1, n2)  # the same size on screen at 4x the zoom
    assert not hidden1 and not hidden2, "the marker covers the clicked pixel"
    viewer.screenshot(str(screenshot_dir / "marker_zoomed.png"), canvas_only=True, flash=False)


@needs_taps
def test_selection_labels_do_not_overlap_at_full_view(insp, viewer, small_hkl, qtbot):
    assert insp.simulate(small_args(small_hkl, detpixels=128, pixel=0.4), wait=True)
    for s, f in [(10, 10), (11, 12), (13, 10), (100, 100), (60, 20)]:
        insp.click(s, f, shift=True)
    viewer.reset_view()
    qtbot.wait(50)
    sel = viewer.layers[ctl.SEL_LAYER]
    shown = [t for t in sel.features["label"] if t]
    assert 1 < len(shown) < 5
    zoom = viewer.scene.camera.zoom
    xy = np.asarray(sel.data) * zoom
    keep = np.array([bool(t) for t in sel.features["label"]])
    d = np.hypot(*(xy[keep][:, None] - xy[keep][None]).transpose(2, 0, 1))
    assert (d[np.triu_indices(keep.sum(), 1)] >= ctl.LABEL_SEPARATION_PX).all()
    zoom_to(viewer, 11, 11, 40.0)  # close up every label fits
    qtbot.wait(50)
    assert all(sel.features["label"])


@needs_taps
def test_view_refits_when_the_detector_changes_and_markers_stay_on_top(insp, viewer, small_hkl, qtbot):
    assert insp.simulate(small_args(small_hkl, detpixels=32), wait=True)
    insp.click(5, 5, shift=True)
    insp.click(6, 6)
    assert insp.simulate(small_args(small_hkl, detpixels=128, pixel=0.2), wait=True)
    qtbot.wait(50)
    centre = np.asarray(viewer.scene.camera.center)[-2:]
    np.testing.assert_allclose(centre, [63.5, 63.5], atol=1.0)
    # a new image layer (a reference) lands below the markers
    ref = viewer.add_image(np.zeros((128, 128), np.float32), name="other")
    names = [lay.name for lay in viewer.layers]
    assert names.index("other") < names.index(ctl.TAP_LAYER)
    assert names.index("other") < names.index(ctl.SEL_LAYER)
    assert ref is not None


@needs_taps
def test_default_F_layer_is_read_only_and_no_table_is_a_notice(insp, viewer, small_hkl, qtbot):
    assert insp.simulate(small_args(small_hkl), wait=True)
    _press(qtbot, viewer, _qt()[1].Key.Key_D)  # Shift-D: the overlay on
    layer = viewer.layers[ctl.FALLBACK_LAYER]
    assert not layer.editable
    assert insp.simulate(small_args(small_hkl, extra=["-N", "2"]), wait=True)  # re-render: still read-only
    assert not viewer.layers[ctl.FALLBACK_LAYER].editable
    # no table: no orange wash, one line instead
    assert insp.simulate(small_args(None), wait=True)
    assert ctl.FALLBACK_LAYER not in viewer.layers and insp.controller.overlay_enabled
    legend = insp.simulation_widget.legend_label.value
    assert legend.startswith("no HKL table: every evaluation uses default_F = 50")
    _press(qtbot, viewer, _qt()[1].Key.Key_D)  # and off
    assert not insp.controller.overlay_enabled


# --------------------------------------------------------------------------- work you can follow
@needs_taps
def test_long_tap_grouped_and_filtered_copy_delete_double_click(insp, viewer, small_hkl, qtbot, tmp_path):
    from qtpy.QtWidgets import QApplication

    _, Qt, QTest = _qt()
    args = small_args(small_hkl, detpixels=48, extra=["-oversample", "3", "-mosaic", "0.5", "-mosaic_domains", "5",
                                                      "-phi", "0", "-osc", "1", "-phisteps", "3"])
    assert insp.simulate(args, wait=True), insp.controller.last_error
    tw = insp.tap_widget
    insp.click(40, 6)
    rec = insp.model.current
    assert len(rec.rows) == 135
    assert tw.table.native.rowCount() == 135
    # group by (h0,k0,l0) with a real click on the checkbox
    _click_check(qtbot, tw.group_check)
    reflections = {(r["h0"], r["k0"], r["l0"]) for r in rec.rows}
    assert tw.table.native.rowCount() == len(reflections)
    cells = tw.table_text()
    assert sum(int(c["evaluations"]) for c in cells) == 135
    assert "reflection group" in tw.caption_label.value
    # default_F only
    _click_check(qtbot, tw.default_only_check)
    n_def = sum(r["lookup"].startswith("default_F") for r in rec.rows)
    assert all(tw.row_highlighted(i) for i in range(tw.table.native.rowCount()))
    _click_check(qtbot, tw.group_check)
    assert tw.table.native.rowCount() == n_def
    _click_check(qtbot, tw.default_only_check)
    assert tw.table.native.rowCount() == 135
    # Ctrl+C copies the table as TSV
    QApplication.clipboard().clear()
    tw.table.native.setFocus()
    QTest.keyClick(tw.table.native, Qt.Key.Key_C, Qt.KeyboardModifier.ControlModifier)
    lines = QApplication.clipboard().text().rstrip("\n").split("\n")
    assert len(lines) == 136 and lines[0].split("\t")[:2] == ["subS", "subF"]
    assert lines[1].split("\t")[lines[0].split("\t").index("lookup")] == rec.rows[0]["lookup"]
    # selection: Delete removes the selected entry, double-click jumps to a pixel and shows its table
    insp.click(10, 20, shift=True)
    insp.click(30, 7, shift=True)
    insp.click(5, 5)
    lw = tw.selection_list.native
    assert lw.count() == 2
    item = lw.item(0)
    rect = lw.visualItemRect(item)
    # a user's double-click: press, release, then the second press Qt reports as a double-click
    QTest.mouseClick(lw.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, rect.center())
    QTest.mouseDClick(lw.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, rect.center())
    qtbot.wait(20)
    assert insp.model.current.pixel == (10, 20)
    np.testing.assert_allclose(np.asarray(viewer.scene.camera.center)[-2:], [10, 20])
    assert "slow 10, fast 20" in tw.pixel_label.value
    QTest.mouseClick(lw.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                     lw.visualItemRect(lw.item(1)).center())
    lw.setFocus()
    QTest.keyClick(lw, Qt.Key.Key_Delete)
    qtbot.wait(20)
    assert list(insp.model.selection) == [(10, 20)] and lw.count() == 1


@needs_taps
def test_selection_survives_a_rerun_and_shortcuts_clear_and_export(insp, viewer, small_hkl, qtbot, tmp_path):
    _, Qt, _ = _qt()
    assert insp.simulate(small_args(small_hkl), wait=True)
    insp.click(10, 20, shift=True)
    insp.click(40, 41, shift=True)
    before = {p: r.value for p, r in insp.model.selection.items()}
    assert insp.simulate(small_args(small_hkl, extra=["-N", "2"]), wait=True)
    after = insp.model.selection
    assert list(after) == [(10, 20), (40, 41)]
    assert all(after[p].tap.meta["config"]["args"] == insp.model.args for p in after)
    assert any(after[p].value != before[p] for p in after)  # re-tapped on the new image
    assert "selection re-tapped on the new image: 2 pixel(s)" in insp.simulation_widget.status_label.value
    np.testing.assert_array_equal(viewer.layers[ctl.SEL_LAYER].data, [[10, 20], [40, 41]])
    # a smaller detector drops what falls outside
    assert insp.simulate(small_args(small_hkl, detpixels=32), wait=True)
    assert list(insp.model.selection) == [(10, 20)]
    assert "1 dropped" in insp.simulation_widget.status_label.value
    # Shift-E exports a bundle, Shift-X clears; both listed in the panel's tooltip
    insp.controller.model.cwd = str(tmp_path)
    _press(qtbot, viewer, Qt.Key.Key_E)
    assert insp.controller.last_export and insp.controller.last_export[0].parent.name == "py_taps"
    _press(qtbot, viewer, Qt.Key.Key_X)
    assert not insp.model.selection and insp.tap_widget.selection_list.native.count() == 0
    tips = insp.simulation_widget.tooltip + insp.tap_widget.tooltip
    for key in ctl.KEYS.values():
        assert key in tips
    # Shift-R toggles the rings
    _press(qtbot, viewer, Qt.Key.Key_R)
    assert ctl.RINGS_LAYER in viewer.layers
    _press(qtbot, viewer, Qt.Key.Key_R)
    assert ctl.RINGS_LAYER not in viewer.layers


@needs_taps
def test_reopened_tap_json_shows_its_stored_table_when_clicked(insp, viewer, small_hkl, tmp_path, qtbot,
                                                               make_napari_viewer):
    from bragg_inspector import Inspector

    assert insp.simulate(small_args(small_hkl), wait=True)
    insp.click(12, 40, shift=True)
    paths = insp.export(tmp_path / "taps")
    doc = load_json(paths[0])
    # a fresh viewer with the panels and nothing rendered: open the file, click its point
    v2 = make_napari_viewer(show=True)
    other = Inspector(v2, cwd=tmp_path)
    layers = v2.open(str(paths[0]), plugin=PLUGIN)
    assert layers[0].__class__.__name__ == "Points"
    napari_click(v2, 12.2, 39.8)
    rec = other.model.current
    assert rec is not None and rec.pixel == (12, 40) and rec.source != "engine"
    rows = other.tap_widget.table_text()
    stored = doc["values"]["subpixels"]
    assert len(rows) == len(stored)
    assert [r["lookup"] for r in rows] == [s["lookup"] for s in stored]
    assert "stored table" in other.tap_widget.pixel_label.value
    assert json.dumps(doc)  # the document itself is untouched


def test_no_compiler_says_so_in_the_status_line(insp, viewer, small_hkl, monkeypatch, tmp_path, qtbot,
                                                 screenshot_dir):
    """Without a C++ compiler the image still renders, and one plain line says how and what to do."""
    from torchbragg.kernels import cpu as cpu_kernel
    from torchbragg.kernels.build import NO_COMPILER_MESSAGE, slow_path_note

    monkeypatch.setattr(cpu_kernel, "_libraries", {})
    monkeypatch.setattr(cpu_kernel, "_errors", {})
    monkeypatch.setattr(cpu_kernel, "cxx_compiler", lambda: None)
    monkeypatch.setenv("TORCHBRAGG_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("TORCHBRAGG_FAST", "1")
    assert insp.simulate(small_args(small_hkl), wait=True), insp.controller.last_error
    status = insp.simulation_widget.status_label.value
    assert status.startswith(slow_path_note(NO_COMPILER_MESSAGE) + "; rendered ")
    assert "eager kernel" in status and "\n" not in status
    assert insp.simulation_widget.status_label.native.styleSheet() == "color: #f4a261;"
    viewer.window._qt_window.grab().save(str(screenshot_dir / "no_compiler_status.png"))
