"""Comparing default_F regions across runs and renderers in the inspector."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
from bragg_inspector import controller as ctl
from inspector_helpers import GOLDEN, load_json, needs_taps, small_args

pytestmark = [pytest.mark.gui]

PARTIAL = GOLDEN / "cases" / "hkl_partial_defaultF"


def _engine_reason(args, cwd):
    import torchbragg

    _img, fmap = torchbragg.Simulation.from_args(args, cwd=str(cwd)).render_with_fallback()
    return fmap.reason.numpy()


def _counts(cur, ref):
    c, r = cur > 0, ref > 0
    return {"both": int((c & r).sum()), "only_current": int((c & ~r).sum()),
            "only_reference": int((~c & r).sum()), "neither": int((~c & ~r).sum()),
            "reason_changed": int((c & r & (cur != ref)).sum())}


@needs_taps
@pytest.mark.golden
@pytest.mark.skipif(not PARTIAL.is_dir(), reason="golden data not available")
def test_pin_then_rerender_without_hkl_and_the_comparison_survives(insp, viewer, tmp_path, qtbot, screenshot_dir):
    from bragg_inspector.args import set_flag_value

    case = load_json(GOLDEN / "cases.json")["hkl_partial_defaultF"]
    for f in PARTIAL.glob("*.hkl"):
        shutil.copy(f, tmp_path / f.name)
    args = list(case["args"])
    assert insp.simulate(args, wait=True), insp.controller.last_error
    w = insp.simulation_widget
    w.pin_name.value = "with table"
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    QTest.mouseClick(w.pin_button.native, Qt.MouseButton.LeftButton)  # the panel's button
    assert list(insp.model.pinned) == ["with table"]
    ref_reason = _engine_reason(args, tmp_path)
    np.testing.assert_array_equal(insp.model.pinned["with table"].default_F, ref_reason)

    no_table = set_flag_value(args, "-hkl", None)
    assert insp.simulate(no_table, wait=True), insp.controller.last_error
    assert w.pinned_combo.value == "with table"
    QTest.mouseClick(w.compare_button.native, Qt.MouseButton.LeftButton)
    cur_reason = _engine_reason(no_table, tmp_path)
    expect = _counts(cur_reason, ref_reason)
    got = insp.model.default_F_comparison["counts"]
    assert {k: got[k] for k in expect} == expect
    assert insp.compare_default_F("with table")["only_current"] == expect["only_current"] > 0
    layer = viewer.layers[ctl.DEFAULT_F_CMP_LAYER]
    assert not layer.editable
    for code, key in ((1, "both"), (2, "only_current"), (3, "only_reference")):
        assert int((layer.data == code).sum()) == expect[key] - (expect["reason_changed"] if code == 1 else 0)
    assert int((layer.data == 4).sum()) == expect["reason_changed"]
    legend = w.cmp_legend.value
    assert f"{expect['only_current']:,} px" in legend and "with table" in legend
    assert f"{expect['both'] - expect['reason_changed']:,} px" in legend
    viewer.layers.selection.active = viewer.layers[ctl.SIM_LAYER]
    qtbot.wait(200)
    viewer.screenshot(str(screenshot_dir / "default_F_comparison.png"), canvas_only=False, flash=False)

    # a third run: the comparison is recomputed against the same pinned run
    third = set_flag_value(args, "-N", "3")
    assert insp.simulate(third, wait=True), insp.controller.last_error
    again = insp.model.default_F_comparison
    assert again is not None and again["reference"] == "with table"
    expect3 = _counts(_engine_reason(third, tmp_path), ref_reason)
    assert {k: again["counts"][k] for k in expect3} == expect3
    np.testing.assert_array_equal(viewer.layers[ctl.DEFAULT_F_CMP_LAYER].data, again["labels"])


@needs_taps
def test_measured_map_of_torchbragg_agrees_with_its_own_fallback_map(insp, small_hkl, tmp_path):
    args = small_args(small_hkl, detpixels=40, extra=["-mosaic", "0.3", "-mosaic_domains", "3"])
    assert insp.simulate(args, wait=True)
    name = insp.measure_default_F(f"{sys.executable} -m torchbragg")
    assert name in insp.model.pinned and insp.model.pinned[name].commands
    counts = insp.compare_default_F(name)
    assert counts["only_current"] == 0 and counts["only_reference"] == 0
    assert counts["both"] == int((insp.model.fallback.reason > 0).sum()) > 0


@needs_taps
def test_bundle_after_a_failed_run_records_the_image_shown_and_its_comparison(insp, small_hkl, tmp_path):
    import json

    args = small_args(small_hkl)
    assert insp.simulate(args, wait=True)
    ref = insp.pin("first")
    assert insp.simulate(args + ["-N", "2"], wait=True)
    insp.compare_default_F(ref)
    shown = list(insp.model.args)
    assert not insp.simulate(shown + ["-no_such_flag"], wait=True)  # fails: the image on screen stays
    insp.click(10, 12, shift=True)
    paths = insp.controller.export(None, bundle_root=tmp_path / "reports")
    bundle = paths[0].parent.parent
    commands = (bundle / "commands.txt").read_text()
    assert "-no_such_flag" not in commands and " ".join(shown[-4:]) in commands
    doc = json.loads((bundle / "comparison" / "default_F_comparison.json").read_text())
    assert doc["current"]["args"] == shown and doc["reference"]["name"] == "first"
    assert doc["counts"] == {k: v for k, v in insp.model.default_F_comparison["counts"].items()}
    # nothing overwritten: a second export is a new bundle
    again = insp.controller.export(None, bundle_root=tmp_path / "reports")
    assert again[0].parent.parent != bundle
