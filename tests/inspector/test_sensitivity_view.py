"""The tap panel's Sensitivity view as users reach it: panels from napari's plugin
machinery on a plain viewer, the 4096² tap configuration rendered from the Run
button, a real click on the centre pixel, the view chosen with a real click, its
dI/dp table against the engine's numbers, and the exported tap JSON."""

from __future__ import annotations

import json

import pytest
from bragg_inspector import _engine
from bragg_inspector.args import join_args
from gui_helpers import real_click, zoom_to
from inspector_helpers import ROOT, SCREENSHOTS, needs_taps, validate_tap_json

pytestmark = [pytest.mark.gui, pytest.mark.slow]

PLUGIN = "bragg-inspector"
#: the committed picture, rewritten only with BRAGG_SCREENSHOTS=docs (otherwise the test's tmp folder)
SCREENSHOT = ROOT / "reports" / "screenshots" / "sensitivity_tap.png"


def _click(qtbot, widget):
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    QTest.mouseClick(widget, Qt.MouseButton.LeftButton)
    qtbot.wait(10)


def _radio(choice, text):
    from qtpy.QtWidgets import QRadioButton

    buttons = [b for b in choice.native.findChildren(QRadioButton) if b.text() == text]
    assert len(buttons) == 1, [b.text() for b in choice.native.findChildren(QRadioButton)]
    return buttons[0]


@needs_taps
def test_sensitivity_view_of_the_centre_pixel_and_its_export(make_napari_viewer, qtbot, tmp_path, screenshot_dir):
    from torchbragg.differentiable import pixel_sensitivity

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1800, 1150)
    _, sim_panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Bragg simulation")
    _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Bragg pixel tap")
    c = panel.controller
    sim_panel.args_edit.value = join_args(_engine.tap_config_args())
    _click(qtbot, sim_panel.run_button.native)
    qtbot.waitUntil(lambda: not c.running and c.model.image is not None, timeout=900_000)
    assert c.model.image.shape == (4096, 4096), c.last_error

    # the Sensitivity view first, then a shift-click: the click fills the tap at once and
    # dI/dp follows from the worker thread
    _click(qtbot, _radio(panel.view_choice, "Sensitivity"))
    assert panel.view_choice.value == "Sensitivity"
    assert panel.sensitivity_box.visible and not panel.evaluations_box.visible
    zoom_to(viewer, 2048, 2048, 6.0)
    qtbot.wait(50)
    real_click(qtbot, viewer, 2048, 2048, shift=True)
    rec = c.model.current
    assert rec is not None and rec.pixel == (2048, 2048) and rec.pixel in c.model.selection
    try:
        # the click did not wait for dI/dp: the table was filled and the worker still runs
        assert c.sensitivity_running and rec.sensitivity is None
        assert c.last_click_ms["table"] < 500, c.last_click_ms
        assert panel.sensitivity_label.value.startswith("computing dI/dp of pixel (2048, 2048)")
    finally:
        qtbot.waitUntil(lambda: not c.sensitivity_running, timeout=120_000)
    qtbot.waitUntil(lambda: rec.sensitivity is not None and bool(panel.sensitivity_text()), timeout=10_000)
    assert c.last_error is None, c.last_error

    expected = pixel_sensitivity(c.model.sim, 2048, 2048)
    assert rec.sensitivity["intensity"] == pytest.approx(expected["intensity"], rel=1e-6)
    assert rec.sensitivity["intensity"] == pytest.approx(1.5320026, rel=1e-3)  # C's centre pixel
    by_name = {}
    for p in expected["parameters"]:
        name = p["family"] if p["component"] == p["family"] else f"{p['family']}.{p['component']}"
        by_name[name] = p
    shown = {r["parameter"]: r for r in panel.sensitivity_text()}
    assert list(shown) == list(by_name)
    wanted = ["distance", "beam_center.x", "beam_center.y", "misset.x", "misset.y", "misset.z",
              "cell.a", "cell.b", "cell.c", "cell.alpha", "cell.beta", "cell.gamma"]
    for name in wanted:
        row, p = shown[name], by_name[name]
        assert row["unit"] == p["unit"]
        assert float(row["value"]) == pytest.approx(p["value"], rel=1e-5, abs=1e-9)
        assert float(row["dI/dp"]) == pytest.approx(p["dI_dp"], rel=2e-3, abs=1e-30)
        assert float(row["step"]) == pytest.approx(p["step"], rel=1e-3)
        assert float(row["relative change"].rstrip(" %")) == pytest.approx(100 * p["relative_change"], rel=6e-3,
                                                                            abs=1e-30)
    assert shown["distance"]["unit"] == "mm" and shown["cell.a"]["unit"] == "Å"
    assert shown["misset.x"]["unit"] == "deg"
    # structure factors and the families the engine cannot differentiate here, with its reasons
    refl = panel.reflection_text()
    assert len(refl) == min(10, len(expected["reflections"]))
    for row, r in zip(refl, expected["reflections"][:len(refl)], strict=True):
        assert row["h,k,l"] == "({},{},{})".format(*r["hkl"])
        assert float(row["dI/dF"]) == pytest.approx(r["dI_dF"], rel=2e-3)
    nd_text = panel.not_differentiable_label.value
    for fam, why in expected["not_differentiable"].items():
        assert f"{fam}: {why}" in nd_text

    shot = SCREENSHOT if screenshot_dir == SCREENSHOTS else screenshot_dir / SCREENSHOT.name
    shot.parent.mkdir(parents=True, exist_ok=True)
    qtbot.wait(50)
    assert panel.native.grab().save(str(shot))

    # Export to a folder: the pixel's tap JSON and its sensitivity document, both valid
    out = tmp_path / "export"
    out.mkdir()
    panel.export_dir.value = out
    _click(qtbot, panel.export_folder_button.native)
    assert c.last_error is None, c.last_error
    names = sorted(p.name for p in c.last_export)
    assert names == ["tap_hkl_subpixel_s2048_f2048.json", "tap_sensitivity_s2048_f2048.json"]
    docs = {p.name: json.loads(p.read_text()) for p in c.last_export}
    for doc in docs.values():
        validate_tap_json(doc)
    sens = docs["tap_sensitivity_s2048_f2048.json"]
    assert sens["tap_id"] == "sensitivity" and sens["pixel_coords"] == [2048, 2048]
    got = {(p["family"], p["component"]): p["dI_dp"] for p in sens["values"]["parameters"]}
    for p in expected["parameters"]:
        assert got[(p["family"], p["component"])] == pytest.approx(p["dI_dp"], rel=2e-3, abs=1e-30)

    # back to the evaluations: the tap table is still there
    _click(qtbot, _radio(panel.view_choice, "Evaluations"))
    assert panel.evaluations_box.visible and not panel.sensitivity_box.visible
    assert len(panel.table_text()) == len(rec.rows) == 4
