"""Headless GUI tests (napari under Xvfb): render, click, table, selection,
export, default_F overlay, compare, cancel, bad input, screenshots."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from bragg_inspector import controller as ctl
from gui_helpers import canvas_widget, napari_click, real_click
from inspector_helpers import DATA, GOLDEN, load_json, needs_engine, needs_taps, small_args, validate_tap_json

pytestmark = [pytest.mark.gui]


def engine_sim(args, cwd, dtype="float32"):
    import torch

    import torchbragg

    return torchbragg.Simulation.from_args(args, cwd=str(cwd), dtype=getattr(torch, dtype))


def _set(args, flag, value):
    from bragg_inspector.args import set_flag_value

    return set_flag_value(args, flag, value)


def status_text(insp) -> str:
    return insp.simulation_widget.status_label.value


# --------------------------------------------------------------------------- render
@needs_engine
def test_render_small_config_with_hkl_table(insp, viewer, small_hkl, tmp_path):
    args = small_args(small_hkl)
    assert insp.simulate(args, wait=True), insp.controller.last_error
    layer = viewer.layers[ctl.SIM_LAYER]
    ref = engine_sim(args, tmp_path).render().numpy()
    np.testing.assert_array_equal(layer.data, ref)
    # contrast for diffraction: percentile upper limit below the max, not min/max
    lo, hi = layer.contrast_limits
    assert lo == pytest.approx(float(ref.min())) and hi <= float(ref.max())
    # where F came from, straight from sim.hkl_info
    info = insp.model.hkl_info
    text = insp.simulation_widget.hkl_info_label.value
    assert info["kind"] == "hkl" and info["count"] == 125
    assert info["describe"] in text and f"file: {small_hkl}" in text
    assert "125 reflections" in text and "default_F 50" in text
    assert "rendered 64×64" in status_text(insp)
    assert insp.simulation_widget.run_button.enabled


@needs_engine
def test_unused_fdump_warning_is_shown(insp, tmp_path):
    shutil.copy(GOLDEN / "cases" / "hkl_partial_defaultF" / "Fdump.bin", tmp_path / "Fdump.bin") \
        if (GOLDEN / "cases" / "hkl_partial_defaultF" / "Fdump.bin").is_file() else \
        (tmp_path / "Fdump.bin").write_bytes(b"x")
    assert insp.simulate(small_args(None, detpixels=16), wait=True), insp.controller.last_error
    label = insp.simulation_widget.hkl_info_label.native
    text = label.text()
    assert "Fdump.bin" in text and "unused" in text
    assert "no HKL table" in text
    # several wrapped lines, all of them shown (the label grows with a longer text)
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()
    assert label.heightForWidth(label.width()) > 2 * label.fontMetrics().height()
    assert label.height() >= label.heightForWidth(label.width())
    box = label.parentWidget()  # its group box: the label's last line inside the box's frame
    assert label.geometry().bottom() <= box.contentsRect().bottom(), (label.geometry(), box.contentsRect())


@needs_engine
def test_hkl_chooser_adds_and_replaces_flag(insp, small_hkl):
    w = insp.simulation_widget
    w.args_edit.value = "-N 3 -default_F 50 -hkl old.hkl -detpixels 16"
    w.hkl_file.value = str(small_hkl)  # as the file chooser sets it
    assert w.args_text().split() == ["-N", "3", "-default_F", "50", "-hkl", str(small_hkl), "-detpixels", "16"]
    assert str(w.hkl_file.value) == str(small_hkl)
    w.hkl_clear.native.click()
    assert "-hkl" not in w.args_text() and w.hkl_file.value is None


# --------------------------------------------------------------------------- click → tap
def _check_table_against_engine(insp, args, cwd, slow, fast):
    import torchbragg  # noqa: F401

    sim = engine_sim(args, cwd)
    tap = sim.tap(slow, fast, taps=("hkl_subpixel", "geometry", "intensity"))
    rows = insp.tap_table()
    assert len(rows) == len(tap.rows) > 0
    keys = {"subS", "subF", "h", "k", "l", "h0", "k0", "l0", "F_cell", "F_latt", "lookup"}
    assert keys <= set(rows[0])
    for shown, eng in zip(rows, tap.rows, strict=True):
        for k in rows[0]:
            if k == "default_F":
                continue
            assert shown[k] == pytest.approx(eng[k]) if isinstance(eng[k], float) else shown[k] == eng[k], k
        assert shown["default_F"] == (eng["lookup"] != "table")
    # the widget shows the same rows, highlighted where default_F was used
    tw = insp.tap_widget
    text = tw.table_text()
    assert len(text) == len(rows)
    for i, (cells, shown) in enumerate(zip(text, rows, strict=True)):
        assert int(cells["subS"]) == shown["subS"] and int(cells["h0"]) == shown["h0"]
        assert float(cells["h"]) == pytest.approx(shown["h"], abs=6e-5)
        assert cells["lookup"] == shown["lookup"]
        assert tw.row_highlighted(i) == shown["default_F"]
    assert tap.summary and tw.summary_label.value == tap.summary
    info = tw.pixel_label.value
    assert f"slow {slow}, fast {fast}" in info and "Å" in info and "2θ" in info
    assert f"{tap.final_intensity:.6g}" in info
    return tap


@needs_taps
def test_click_through_napari_mouse_callbacks(insp, viewer, small_hkl, tmp_path):
    args = small_args(small_hkl)
    assert insp.simulate(args, wait=True)
    # whatever layer is active, the viewer-level callback taps
    viewer.layers.selection.active = None
    napari_click(viewer, 40.2, 23.7)  # world position inside pixel (40, 24)
    rec = insp.model.current
    assert rec is not None and rec.pixel == (40, 24), insp.controller.last_message
    tap = _check_table_against_engine(insp, args, tmp_path, 40, 24)
    assert rec.value == pytest.approx(float(viewer.layers[ctl.SIM_LAYER].data[40, 24]), rel=1e-5)
    assert rec.value == pytest.approx(tap.final_intensity)
    pts = viewer.layers[ctl.TAP_LAYER]
    np.testing.assert_array_equal(pts.data, [[40, 24]])
    assert pts.features["hkl"][0].startswith("(")
    # a drag (movement between press and release) is not a click
    napari_click(viewer, 10, 10, drag_to=(30, 0))
    assert insp.model.current.pixel == (40, 24)
    # a click outside the detector does nothing
    napari_click(viewer, -5, 10)
    assert insp.model.current.pixel == (40, 24)


@needs_taps
def test_real_mouse_click_on_canvas(insp, viewer, small_hkl, qtbot, tmp_path):
    args = small_args(small_hkl)
    assert insp.simulate(args, wait=True)
    qtbot.wait(50)
    real_click(qtbot, viewer, 20, 45)
    assert insp.model.current is not None, "the canvas click did not reach the inspector"
    assert insp.model.current.pixel == (20, 45)
    _check_table_against_engine(insp, args, tmp_path, 20, 45)
    real_click(qtbot, viewer, 33, 12, shift=True)
    assert list(insp.model.selection) == [(33, 12)]


@needs_taps
def test_rows_that_used_default_F_are_highlighted(insp, small_hkl, tmp_path):
    args = small_args(small_hkl)
    assert insp.simulate(args, wait=True)
    insp.click(2, 2)  # far corner: (h0,k0,l0) outside the -2..2 table
    rows = insp.tap_table()
    assert rows and all(r["default_F"] for r in rows)
    assert {r["lookup"] for r in rows} == {"default_F:outside_table"}
    assert all(insp.tap_widget.row_highlighted(i) for i in range(len(rows)))
    insp.click(32, 32)  # direct beam: (0,0,0) is in the table
    rows = insp.tap_table()
    assert any(not r["default_F"] for r in rows)


@needs_taps
def test_loop_columns_appear_when_there_are_several(insp, small_hkl):
    args = small_args(small_hkl, detpixels=16, extra=["-oversample", "1", "-phi", "0", "-osc", "0.5",
                                                      "-phisteps", "3"])
    assert insp.simulate(args, wait=True), insp.controller.last_error
    insp.click(8, 3)
    rows = insp.tap_table()
    assert len(rows) == 3 and [r["phi"] for r in rows] == [0, 1, 2]
    assert "mosaic" not in rows[0] and "source" not in rows[0] and "thick" not in rows[0]
    t = insp.tap_widget.table.native
    header = [t.horizontalHeaderItem(j).text() for j in range(t.columnCount())]
    assert header[:3] == ["subS", "subF", "phi"]


# --------------------------------------------------------------------------- selection + export
@needs_taps
def test_shift_click_selection_and_export_roundtrip(insp, viewer, small_hkl, tmp_path):
    from bragg_inspector import _npe2

    args = small_args(small_hkl)
    assert insp.simulate(args, wait=True)
    napari_click(viewer, 10, 50, shift=True)
    napari_click(viewer, 32, 32, shift=True)
    napari_click(viewer, 10, 50, shift=True)  # already selected: not twice
    insp.click(5, 5)  # plain click: not selected
    assert list(insp.model.selection) == [(10, 50), (32, 32)]
    assert insp.tap_widget.selection_list.native.count() == 2
    np.testing.assert_array_equal(viewer.layers[ctl.SEL_LAYER].data, [[10, 50], [32, 32]])

    out = tmp_path / "export"
    paths = insp.export(out)
    assert len(paths) == 2 and all(p.parent == out and p.suffix == ".json" for p in paths)
    assert all(str(p) in insp.tap_widget.export_label.value for p in paths)
    sim = engine_sim(args, tmp_path)
    for p, (s, f) in zip(paths, [(10, 50), (32, 32)], strict=True):
        doc = load_json(p)
        validate_tap_json(doc)
        fresh = json.loads(json.dumps(sim.tap(s, f, taps=("hkl_subpixel", "geometry", "intensity")).to_json()))
        assert doc["pixel_coords"] == [s, f]
        doc.pop("timestamp_utc"), fresh.pop("timestamp_utc")
        assert doc == fresh
    # never overwrite: a second export writes new files, the first ones are untouched
    before = {p: p.read_bytes() for p in paths}
    again = insp.export(out)
    assert len(again) == 2 and not set(again) & set(paths)
    assert all(p.read_bytes() == b for p, b in before.items())
    # the reader turns the files back into labelled points
    layers = _npe2.read_tap_layers(str(paths[0]))
    data, kw, kind = layers[0]
    assert kind == "points"
    np.testing.assert_array_equal(data, [[10, 50]])
    assert kw["features"]["hkl"][0] == insp.model.selection[(10, 50)].label
    # a fresh evidence bundle (engine layout) when no folder is given
    bundle = insp.controller.export(None, bundle_root=tmp_path / "reports")
    assert len(bundle) == 2 and all(p.parent.name == "py_taps" for p in bundle)
    root = bundle[0].parent.parent
    assert root.parent == tmp_path / "reports" and (root / "comparison").is_dir()
    commands = (root / "commands.txt").read_text()
    assert "bragg-inspector" in commands and "(10,50) (32,32)" in commands
    assert insp.controller.export(None, bundle_root=tmp_path / "reports")[0].parent.parent != root


@needs_taps
def test_export_failure_leaves_nothing_and_says_why(insp, small_hkl, tmp_path, notes):
    assert insp.simulate(small_args(small_hkl), wait=True)
    assert insp.export(tmp_path / "x") == []  # empty selection
    assert "selection is empty" in status_text(insp)
    insp.click(3, 3, shift=True)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file")
    assert insp.export(blocker) == []
    assert "Export failed" in status_text(insp) and any("Export failed" in n for n in notes)
    assert blocker.read_text() == "a file"


# --------------------------------------------------------------------------- default_F overlay
@needs_engine
def test_default_F_overlay_counts_equal_fallback_map(insp, viewer, small_hkl, tmp_path):
    args = small_args(small_hkl)
    assert insp.simulate(args, wait=True)
    assert not any("default_F" in l.name for l in viewer.layers)
    insp.set_overlay(True)
    labels = [l for l in viewer.layers if "default_F" in l.name]
    assert len(labels) == 1 and labels[0].__class__.__name__ == "Labels"
    _img, fmap = engine_sim(args, tmp_path).render_with_fallback()
    reason = fmap.reason.numpy()
    np.testing.assert_array_equal(labels[0].data, reason)
    legend = {e["name"]: e["pixels"] for e in insp.model.fallback_legend()}
    expect = {fmap.REASONS[c]: int((reason == c).sum()) for c in (1, 2, 3)}
    assert legend == expect
    if hasattr(fmap, "pixel_counts"):
        assert all(fmap.pixel_counts()[k] == v for k, v in legend.items())
    text = insp.simulation_widget.legend_label.value
    for n in expect.values():
        assert f"{n:,} px" in text
    assert f"{int(fmap.counts.sum()):,} of" in text
    # the inspector keeps the engine's narrow counts (no wider copy of a 4096² map per render)
    assert insp.model.fallback.counts.dtype == fmap.counts.numpy().dtype
    np.testing.assert_array_equal(insp.model.fallback.counts, fmap.counts.numpy())
    # one colour per reason, table pixels transparent
    cmap = labels[0].colormap
    cols = {c: tuple(np.round(cmap.map(c), 3)) for c in (0, 1, 2, 3)}
    assert cols[0][3] == 0 and len({cols[1], cols[2], cols[3]}) == 3
    insp.set_overlay(False)
    assert not any("default_F" in l.name for l in viewer.layers)


# --------------------------------------------------------------------------- compare
GOLDEN_CASE = GOLDEN / "cases" / "hkl_partial_defaultF"


@needs_engine
@pytest.mark.golden
@pytest.mark.skipif(not GOLDEN_CASE.is_dir(), reason="golden data not available")
def test_compare_with_golden_case(insp, viewer, tmp_path, qtbot):
    import torchbragg.compare as tbc
    import torchbragg.io.images as tbi

    case = load_json(GOLDEN / "cases.json")["hkl_partial_defaultF"]
    for f in GOLDEN_CASE.glob("*.hkl"):
        shutil.copy(f, tmp_path / f.name)
    assert insp.simulate(case["args"], wait=True), insp.controller.last_error
    cmp = insp.open_reference(GOLDEN_CASE / "img.f32")
    assert cmp is not None, insp.controller.last_error
    ref = tbi.load_image(GOLDEN_CASE / "img.f32", shape=case["shape"])
    expect = tbc.compare_images(ref, viewer.layers[ctl.SIM_LAYER].data).to_dict()
    for k in ("correlation", "rmse", "sum_ratio", "max_abs_diff"):
        assert cmp.metrics[k] == pytest.approx(expect[k])
    assert cmp.metrics["correlation"] >= 0.9999
    text = insp.simulation_widget.metrics_label.value
    assert f"correlation: {expect['correlation']:.6f}" in text and "RMSE" in text and "sum ratio" in text
    for name in (ctl.REF_LAYER, ctl.DIFF_LAYER, ctl.RATIO_LAYER):
        assert name in viewer.layers
    np.testing.assert_allclose(viewer.layers[ctl.DIFF_LAYER].data,
                               viewer.layers[ctl.SIM_LAYER].data - ref, atol=1e-6)
    # the key binding flips between the two images
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    sim_l, ref_l = viewer.layers[ctl.SIM_LAYER], viewer.layers[ctl.REF_LAYER]
    assert sim_l.visible and not ref_l.visible
    w = canvas_widget(viewer)
    w.setFocus()
    QTest.keyClick(w, Qt.Key.Key_F, Qt.KeyboardModifier.ShiftModifier)
    qtbot.wait(20)
    assert not sim_l.visible and ref_l.visible
    QTest.keyClick(w, Qt.Key.Key_F, Qt.KeyboardModifier.ShiftModifier)
    qtbot.wait(20)
    assert sim_l.visible and not ref_l.visible


SMV_CASE = GOLDEN / "cases" / "cubic_hkl_mosflm"


@needs_engine
@pytest.mark.golden
@pytest.mark.skipif(not (SMV_CASE / "img.smv").is_file(), reason="golden SMV image not available")
def test_compare_with_an_smv_reference(insp, viewer, tmp_path):
    import torchbragg.compare as tbc
    import torchbragg.io.images as tbi

    case = load_json(GOLDEN / "cases.json")["cubic_hkl_mosflm"]
    for f in SMV_CASE.glob("*.hkl"):
        shutil.copy(f, tmp_path / f.name)
    assert insp.simulate(case["args"], wait=True), insp.controller.last_error
    cmp = insp.open_reference(SMV_CASE / "img.smv")
    assert cmp is not None, insp.controller.last_error
    # counts converted to photons with the engine's rule (the log beside the file gives the scale)
    ref, info = tbi.load_image_photons(SMV_CASE / "img.smv")
    assert info["converted"], info
    np.testing.assert_allclose(viewer.layers[ctl.REF_LAYER].data, ref.astype(np.float32))
    expect = tbc.compare_images(ref.astype(np.float32), viewer.layers[ctl.SIM_LAYER].data).to_dict()
    assert cmp.metrics["correlation"] == pytest.approx(expect["correlation"])
    assert cmp.metrics["sum_ratio"] == pytest.approx(1.0, abs=0.01)
    assert "img.smv" in insp.simulation_widget.metrics_label.value
    assert "sum ratio" in insp.simulation_widget.status_label.value
    # a copy without its log cannot be converted: the panel says so
    lone = tmp_path / "lone.smv"
    shutil.copy(SMV_CASE / "img.smv", lone)
    assert insp.open_reference(lone) is not None
    assert "NOT converted" in insp.simulation_widget.status_label.value


# --------------------------------------------------------------------------- cancel
@needs_engine
@pytest.mark.slow
def test_cancel_render_keeps_previous_image_and_ui_responsive(insp, viewer, small_hkl, qtbot, screenshot_dir):
    from bragg_inspector import _engine

    assert insp.simulate(small_args(small_hkl), wait=True)
    old = viewer.layers[ctl.SIM_LAYER].data.copy()
    progress = []
    insp.controller.render_progress.connect(lambda d, t: progress.append((d, t)))
    # the 4096² tap configuration at 5x5 subpixels: long enough to cancel half-way
    args = _set(_engine.tap_config_args(), "-oversample", "5")
    assert insp.simulate(args, wait=False)
    w = insp.simulation_widget
    assert insp.controller.running and not w.run_button.enabled and w.cancel_button.enabled
    qtbot.waitUntil(lambda: len(progress) > 0, timeout=120000)
    # progress with percent in the panel
    qtbot.waitUntil(lambda: 0 < w.progress.value < 100, timeout=120000)
    assert w.progress.native.text().endswith("%")
    viewer.screenshot(str(screenshot_dir / "progress_mid_render.png"), canvas_only=False, flash=False)
    # the UI stays usable while rendering: a tap on the old image still works
    t0 = time.perf_counter()
    insp.click(5, 6)
    assert time.perf_counter() - t0 < 2.0 and insp.model.current.pixel == (5, 6)
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    QTest.mouseClick(w.cancel_button.native, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not insp.controller.running, timeout=300000)
    assert progress[-1][0] < progress[-1][1]  # stopped before the end
    assert "cancelled" in status_text(insp)
    np.testing.assert_array_equal(viewer.layers[ctl.SIM_LAYER].data, old)
    assert w.run_button.enabled and not w.cancel_button.enabled


# --------------------------------------------------------------------------- bad input
@needs_engine
def test_bad_input_is_a_message_and_the_viewer_keeps_working(insp, viewer, small_hkl, tmp_path, notes):
    args = small_args(small_hkl)
    assert insp.simulate(args, wait=True)
    old = viewer.layers[ctl.SIM_LAYER].data.copy()
    n_layers = len(viewer.layers)

    assert not insp.simulate(args + ["-tophat_xtal"], wait=True)
    msg = status_text(insp)
    assert "-tophat_xtal" in msg and "Simulation failed" in msg
    assert "color" in insp.simulation_widget.status_label.native.styleSheet()
    assert any("-tophat_xtal" in n for n in notes)

    bad = tmp_path / "bad_line.hkl"
    shutil.copy(DATA / "bad_line.hkl", bad)
    assert not insp.simulate(small_args(bad), wait=True)
    assert "bad_line.hkl:3" in status_text(insp)
    assert any("bad_line.hkl:3" in n for n in notes)

    assert not insp.simulate('-hkl "unbalanced', wait=True)
    assert "argument line" in status_text(insp)

    wrong = tmp_path / "small.f32"
    np.zeros((32, 32), "<f4").tofile(wrong)
    assert insp.open_reference(wrong) is None
    assert "small.f32" in status_text(insp) and "64x64" in status_text(insp)
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"not an SMV image at all")
    assert insp.open_reference(junk) is None
    assert "junk.img" in status_text(insp)
    assert insp.open_reference(tmp_path / "missing.f32") is None
    assert "missing.f32" in status_text(insp)
    assert insp.click(10_000, 3) is None and "outside" in status_text(insp)

    # nothing half-done: the previous render is intact, no stray layers, clicks still work
    np.testing.assert_array_equal(viewer.layers[ctl.SIM_LAYER].data, old)
    assert len(viewer.layers) == n_layers
    assert insp.model.args == args or insp.model.image is not None
    if insp.model.sim is not None and hasattr(insp.model.sim, "tap"):
        try:
            import torchbragg.taps  # noqa: F401
        except ImportError:
            return
        assert insp.click(3, 4) is not None
        assert "tapped" in status_text(insp)
