"""Intensity comparison with a reference image in the inspector: the difference shown
with a colour bar and limits that do not stretch rounding noise, a tolerance control,
a shape field for raw references, and the reference kept across re-runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bragg_inspector import controller as ctl
from inspector_helpers import needs_engine, small_args

pytestmark = [pytest.mark.gui]


def _click(widget):
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    QTest.mouseClick(widget.native, Qt.MouseButton.LeftButton)


@needs_engine
def test_difference_tolerance_and_rerun(insp, viewer, small_hkl, tmp_path, qtbot, screenshot_dir):
    args = small_args(small_hkl)
    assert insp.simulate(args, wait=True), insp.controller.last_error
    sim = viewer.layers[ctl.SIM_LAYER].data.astype(np.float64)
    w = insp.simulation_widget

    # the render itself as the reference, with float32-sized noise: no pixel over the tolerance,
    # and the difference's colours span the tolerance, not the noise
    rng = np.random.default_rng(7)
    same = tmp_path / "same.f32"
    (sim * (1 + 1e-7 * rng.standard_normal(sim.shape))).astype("<f4").tofile(same)
    w.ref_file.value = str(same)  # the panel's file field
    qtbot.wait(20)
    cmp = insp.model.comparison
    assert cmp is not None, insp.controller.last_error
    assert cmp.n_over_tolerance == 0
    assert cmp.limits[1] == pytest.approx(1e-3 * np.abs(np.fromfile(same, "<f4")).max(), rel=1e-6)
    diff = viewer.layers[ctl.DIFF_LAYER]
    assert diff.visible and diff.colorbar.visible
    assert tuple(diff.contrast_limits) == pytest.approx(cmp.limits)
    assert not viewer.layers[ctl.REF_LAYER].visible and not viewer.layers[ctl.RATIO_LAYER].visible
    assert "over tolerance" in w.metrics_label.value and ": 0 px" in w.metrics_label.value

    # three pixels 5 % off: exactly those are outlined and counted
    bad = sim.copy()
    spots = [(10, 20), (32, 32), (50, 5)]
    peak = float(np.abs(sim).max())
    for s, f in spots:
        bad[s, f] += 0.05 * peak
    off = tmp_path / "off.f32"
    bad.astype("<f4").tofile(off)
    w.ref_file.value = str(off)
    qtbot.wait(20)
    cmp = insp.model.comparison
    over = viewer.layers[ctl.OVER_TOL_LAYER]
    assert over.visible and not over.editable
    assert sorted(zip(*np.nonzero(over.data), strict=True)) == sorted(spots)
    assert cmp.n_over_tolerance == 3 and "3 px" in w.metrics_label.value
    assert "3 pixels over" in w.status_label.value
    # the hover readout gives reference and difference
    assert "diff" in insp.hover(10, 20) and "over tolerance" in insp.hover(10, 20)
    viewer.layers.selection.active = viewer.layers[ctl.SIM_LAYER]
    qtbot.wait(200)
    viewer.screenshot(str(screenshot_dir / "intensity_comparison.png"), canvas_only=False, flash=False)

    # the tolerance control: 10 % of the maximum flags none of them, 1 % all three again
    w.tolerance_spin.value = 0.1
    qtbot.wait(20)
    assert insp.model.comparison.n_over_tolerance == 0 and not over.data.any()
    w.tolerance_spin.value = 0.01
    qtbot.wait(20)
    assert insp.model.comparison.n_over_tolerance == 3

    # a re-run keeps the reference (and the tolerance): the difference is the new image's
    rerun = small_args(small_hkl, extra=["-N", "4"])
    assert insp.simulate(rerun, wait=True), insp.controller.last_error
    cmp = insp.model.comparison
    assert cmp is not None and cmp.path == str(off) and cmp.tolerance == 0.01
    new = viewer.layers[ctl.SIM_LAYER].data.astype(np.float64)
    assert not np.allclose(new, sim)
    np.testing.assert_allclose(viewer.layers[ctl.DIFF_LAYER].data, new - bad.astype(np.float32), atol=1e-3)
    assert "off.f32" in w.metrics_label.value

    # the cycle of views: difference → reference → simulated → difference
    sim_l, ref_l, diff_l = (viewer.layers[n] for n in (ctl.SIM_LAYER, ctl.REF_LAYER, ctl.DIFF_LAYER))
    assert insp.flip() == ctl.REF_LAYER and ref_l.visible and not sim_l.visible and not diff_l.visible
    assert insp.flip() == ctl.SIM_LAYER and sim_l.visible and not ref_l.visible and not diff_l.visible
    assert insp.flip() == ctl.DIFF_LAYER and diff_l.visible and diff_l.colorbar.visible

    # the panel's × forgets the reference
    _click(w.ref_clear)
    assert insp.model.comparison is None and ctl.DIFF_LAYER not in viewer.layers
    assert ctl.OVER_TOL_LAYER not in viewer.layers and w.metrics_label.value == ""


@needs_engine
def test_comparison_is_exported_with_its_tolerance(insp, viewer, small_hkl, tmp_path, qtbot):
    assert insp.simulate(small_args(small_hkl), wait=True), insp.controller.last_error
    img = viewer.layers[ctl.SIM_LAYER].data.astype(np.float64).copy()
    img[5, 6] *= 3.0
    ref = tmp_path / "ref.f32"
    img.astype("<f4").tofile(ref)
    assert insp.open_reference(ref, tolerance=1e-2) is not None
    rec = insp.click(5, 6)
    assert rec is not None
    insp.model.select(rec)
    paths = insp.export(None)
    bundle = next(p for p in paths[0].parents if (p / "comparison").is_dir())
    doc = json.loads((bundle / "comparison" / "image_comparison.json").read_text())
    assert doc["tolerance"] == 1e-2
    assert doc["pixels_over_tolerance"] == insp.model.comparison.n_over_tolerance >= 1
    assert doc["reference_path"] == str(ref)


@needs_engine
def test_shape_field_for_a_raw_reference_of_another_size(insp, viewer, small_hkl, tmp_path, qtbot):
    assert insp.simulate(small_args(small_hkl), wait=True), insp.controller.last_error
    w = insp.simulation_widget
    # a 32×128 render: the same number of values as the 64×64 simulation, so only its
    # shape tells it apart
    wide = small_args(small_hkl, extra=["-detpixels_s", "32", "-detpixels_f", "128"])
    import torchbragg

    ref_img = torchbragg.Simulation.from_args(wide, cwd=str(tmp_path)).render().numpy()
    assert ref_img.shape == (32, 128)
    raw = tmp_path / "wide.bin"
    ref_img.astype("<f4").tofile(raw)

    w.ref_shape.value = "32 x 128"
    w.ref_file.value = str(raw)
    qtbot.wait(20)
    assert insp.model.comparison is None
    status = w.status_label.value
    assert "wide.bin" in status and "32×128" in status and "64×64" in status
    assert ctl.DIFF_LAYER not in viewer.layers
    # a bad shape is a clear message, nothing compared
    w.ref_shape.value = "32 by"
    qtbot.wait(20)
    assert "shape '32 by'" in w.status_label.value
    w.ref_shape.value = "32×128"
    qtbot.wait(20)

    # rendering at the reference's size compares it (the reference stayed chosen)
    assert insp.simulate(wide, wait=True), insp.controller.last_error
    cmp = insp.model.comparison
    assert cmp is not None and cmp.reference.shape == (32, 128)
    assert cmp.metrics["max_abs_diff"] <= 1e-3 * float(np.abs(ref_img).max())
    assert cmp.n_over_tolerance == 0
    assert viewer.layers[ctl.DIFF_LAYER].data.shape == (32, 128)

    # back to 64×64: the layers go, the status says why, and the reference waits
    assert insp.simulate(small_args(small_hkl), wait=True), insp.controller.last_error
    assert insp.model.comparison is None and ctl.DIFF_LAYER not in viewer.layers
    assert insp.model.reference_request is not None
