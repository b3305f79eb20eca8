"""npe2 manifest, readers, writer, sample data and the launcher."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bragg_inspector import _npe2
from bragg_inspector import controller as ctl
from inspector_helpers import ROOT, load_json, needs_engine, needs_taps, small_args, validate_tap_json

MANIFEST = ROOT / "inspector" / "bragg_inspector" / "napari.yaml"


def test_manifest_is_valid_and_every_command_imports():
    from npe2 import PluginManifest

    m = PluginManifest.from_file(MANIFEST)
    m.validate_imports()
    c = m.contributions
    assert {w.display_name for w in c.widgets} == {"Bragg simulation", "Bragg pixel tap"}
    patterns = {p for r in c.readers for p in r.filename_patterns}
    assert {"*.img", "*.smv", "*.bin", "*.f32"} <= patterns
    assert "*.json" not in patterns  # tap JSON files only, not every JSON
    assert m.categories and {"Simulation", "Visualization"} <= set(m.categories)
    menu_cmds = {item.command for items in c.menus.values() for item in items}
    assert {w.command for w in c.widgets} <= menu_cmds
    assert c.writers[0].layer_types == ["points"] and c.writers[0].filename_extensions == [".json"]
    assert c.sample_data[0].key == "tap_config4096"


def test_readers_decline_other_files(tmp_path):
    assert _npe2.get_image_reader(str(tmp_path / "x.png")) is None
    other = tmp_path / "meta.json"
    other.write_text(json.dumps({"shape": [2, 2]}))
    assert _npe2.get_tap_reader(str(other)) is None  # not a tap file name
    named = tmp_path / "a_tap.json"
    named.write_text(json.dumps({"shape": [2, 2]}))
    assert _npe2.get_tap_reader(str(named)) is None  # a tap file name, not a tap document
    assert _npe2.get_image_reader([str(tmp_path / "a.f32"), str(tmp_path / "b.f32")]) is None


@needs_engine
@pytest.mark.gui
def test_open_raw_float_through_napari(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    img = np.random.default_rng(0).random((6, 10), dtype=np.float32)
    p = tmp_path / "img.f32"
    img.astype("<f4").tofile(p)
    (tmp_path / "img.f32.json").write_text(json.dumps({"shape": [6, 10]}))
    layers = viewer.open(str(p), plugin="bragg-inspector")
    np.testing.assert_array_equal(layers[0].data, img)
    sq = tmp_path / "sq.bin"
    np.ones((8, 8), "<f4").tofile(sq)
    assert viewer.open(str(sq), plugin="bragg-inspector")[0].data.shape == (8, 8)
    amb = tmp_path / "amb.bin"
    np.ones(12, "<f4").tofile(amb)
    with pytest.raises(Exception, match="amb.bin"):  # napari wraps it in a ReaderPluginError
        viewer.open(str(amb), plugin="bragg-inspector")


@needs_taps
@pytest.mark.gui
def test_writer_and_reader_for_tap_json(insp, viewer, small_hkl, tmp_path):
    import napari

    assert insp.simulate(small_args(small_hkl), wait=True)
    insp.click(12, 40)
    written = napari.save_layers(str(tmp_path / "one.json"), [viewer.layers[ctl.TAP_LAYER]], plugin="bragg-inspector")
    out = tmp_path / "one.tap.json"  # named so that the reader (tap JSON by name) opens it again
    assert [Path(p) for p in written] == [out]
    doc = load_json(out)
    validate_tap_json(doc)
    assert doc["pixel_coords"] == [12, 40]
    with pytest.raises(Exception) as info:  # noqa: B017 - napari may wrap the writer's error
        napari.save_layers(str(out), [viewer.layers[ctl.TAP_LAYER]], plugin="bragg-inspector")
    assert "one.tap.json" in str(info.value) or isinstance(info.value, FileExistsError)
    assert load_json(out) == doc  # never overwritten
    layers = viewer.open(str(out), plugin="bragg-inspector")
    assert layers[0].__class__.__name__ == "Points"
    np.testing.assert_array_equal(layers[0].data, [[12, 40]])
    assert layers[0].features["hkl"][0] == insp.model.current.label
    # several selected taps → one file per pixel
    insp.click(1, 2, shift=True)
    insp.click(3, 4, shift=True)
    paths = _npe2.write_taps(str(tmp_path / "sel.json"), viewer.layers[ctl.SEL_LAYER].data,
                             {"metadata": viewer.layers[ctl.SEL_LAYER].metadata})
    assert [Path(p).name for p in paths] == ["sel_s1_f2.json", "sel_s3_f4.json"]


@needs_taps
@pytest.mark.gui
def test_sample_data_renders_off_the_ui_thread_into_a_tappable_layer(make_napari_viewer, monkeypatch, qtbot):
    import time

    from bragg_inspector import _engine
    from bragg_inspector.controller import controller_for
    from gui_helpers import napari_click

    # the real sample is the 4096² tap configuration; a 256² one at 5x5 subpixels keeps the test quick
    args = small_args(None, detpixels=256, pixel=0.2, extra=["-oversample", "5"])
    monkeypatch.setattr(_engine, "tap_config_args", lambda: list(args))
    viewer = make_napari_viewer(show=True)
    t0 = time.perf_counter()
    viewer.open_sample("bragg-inspector", "tap_config4096")
    returned_s = time.perf_counter() - t0
    c = controller_for(viewer)
    assert c.running, "the sample should render in the worker thread, not in open_sample"
    docks = {"Bragg simulation (Bragg Inspector)", "Bragg pixel tap (Bragg Inspector)"}
    assert docks <= set(viewer.window.dock_widgets)
    qtbot.waitUntil(lambda: not c.running, timeout=120000)
    layer = viewer.layers[ctl.SIM_LAYER]
    assert layer.data.shape == (256, 256) and float(layer.data.max()) > 0
    assert layer.metadata["args"] == args
    napari_click(viewer, 100, 120)  # the sample's layer is the inspector's: a click taps it
    assert c.model.current is not None and c.model.current.pixel == (100, 120)
    assert len(c.tap_table()) == 25
    print(f"open_sample returned after {returned_s * 1e3:.0f} ms")


def test_launcher_parse_keeps_nanobragg_flags():
    from bragg_inspector.launcher import UsageError, main, parse

    opts, rest = parse(["-hkl", "x.hkl", "--device", "cpu", "-N", "5", "--dtype=float64", "-detpixels", "64"])
    assert rest == ["-hkl", "x.hkl", "-N", "5", "-detpixels", "64"]
    assert opts["device"] == "cpu" and opts["dtype"] == "float64" and opts["render"]
    with pytest.raises(UsageError):
        parse(["--dtype", "float16"])
    assert main(["--help"]) == 0


@needs_engine
@pytest.mark.gui
def test_launcher_opens_napari_docked_and_rendered(make_napari_viewer, monkeypatch, qtbot, small_hkl):
    import napari
    from bragg_inspector import launcher
    from bragg_inspector.controller import controller_for

    made = []

    def fake_viewer(**kw):
        made.append(make_napari_viewer(**kw))
        return made[-1]

    ran = []
    monkeypatch.setattr(napari, "Viewer", fake_viewer)
    monkeypatch.setattr(napari, "run", lambda *a, **k: ran.append(True))
    args = small_args(small_hkl, detpixels=48)
    assert launcher.main(args) == 0 and ran
    viewer = made[0]
    c = controller_for(viewer)
    qtbot.waitUntil(lambda: not c.running, timeout=60000)
    assert ctl.SIM_LAYER in viewer.layers and viewer.layers[ctl.SIM_LAYER].data.shape == (48, 48)
    docks = {"Bragg simulation (Bragg Inspector)", "Bragg pixel tap (Bragg Inspector)"}
    assert docks <= set(viewer.window.dock_widgets)
    assert c.model.args == args
