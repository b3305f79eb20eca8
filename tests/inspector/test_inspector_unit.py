"""Qt-free parts: argument helpers, file formats, model state."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bragg_inspector import io as bio
from bragg_inspector.args import get_flag_value, join_args, set_flag_value, split_args
from bragg_inspector.model import InspectorModel, format_cell, percentile_limits, row_uses_default_F, table_columns
from inspector_helpers import GOLDEN, needs_engine


def test_split_join_roundtrip():
    args = ["-cell", "100", "100", "100", "90", "90", "90", "-hkl", "/a b/c.hkl"]
    assert split_args(join_args(args)) == args
    assert split_args("-N 5  -default_F 100") == ["-N", "5", "-default_F", "100"]
    with pytest.raises(ValueError, match="argument line"):
        split_args('-hkl "unterminated')


def test_set_flag_value_adds_replaces_removes():
    base = ["-N", "5", "-hkl", "a.hkl", "-lambda", "1", "-hkl", "b.hkl"]
    assert set_flag_value(base, "-hkl", "c.hkl") == ["-N", "5", "-hkl", "c.hkl", "-lambda", "1"]
    assert set_flag_value(["-N", "5"], "-hkl", "c.hkl") == ["-N", "5", "-hkl", "c.hkl"]
    assert set_flag_value(base, "-hkl", None) == ["-N", "5", "-lambda", "1"]
    assert get_flag_value(base, "-hkl") == "b.hkl"
    assert get_flag_value(base, "-mat") is None


def test_table_columns_show_loop_indices_only_when_they_vary():
    rows = [dict(thick=0, subS=s, subF=f, source=0, phi=p, mosaic=0, h=0.1, k=0, l=0, h0=0, k0=0, l0=0,
                 F_cell=1.0, F_latt=2.0, lookup="table") for s in range(2) for f in range(2) for p in range(3)]
    cols = table_columns(rows)
    assert cols[:3] == ["subS", "subF", "phi"]
    assert "thick" not in cols and "source" not in cols and "mosaic" not in cols
    assert cols[3:] == ["h", "k", "l", "h0", "k0", "l0", "F_cell", "F_latt", "lookup"]


def test_row_uses_default_F():
    assert not row_uses_default_F({"lookup": "table"})
    for reason in ("default_F:no_table", "default_F:outside_table", "default_F:unlisted"):
        assert row_uses_default_F({"lookup": reason})
    assert row_uses_default_F({"out_of_bounds": True})
    assert format_cell("h", 0.123456) == "0.1235"
    assert format_cell("F_cell", 100.0) == "100"


def test_percentile_limits():
    img = np.zeros((100, 100), np.float32)
    img[0, :5] = 1000.0
    lo, hi = percentile_limits(img, 0, 99.9)
    assert lo == 0.0 and hi > lo
    assert percentile_limits(np.ones((4, 4))) == (1.0, 2.0)


@needs_engine
def test_raw_float_reader_sidecar_square_and_ambiguous(tmp_path):
    a = np.arange(12, dtype="<f4").reshape(3, 4)
    p = tmp_path / "img.f32"
    a.tofile(p)
    with pytest.raises(bio.ImageFormatError, match="img.f32"):
        bio.read_image(p)  # 12 values: not square, no sidecar → ambiguous
    (tmp_path / "img.f32.json").write_text(json.dumps({"shape": [3, 4]}))
    data, meta = bio.read_image(p)
    np.testing.assert_array_equal(data, a)
    assert "sidecar" in meta["shape_from"]
    q = tmp_path / "sq.bin"
    np.arange(16, dtype="<f4").tofile(q)
    assert bio.read_image(q)[0].shape == (4, 4)
    with pytest.raises(bio.ImageFormatError, match="do not fit"):
        bio.read_image(q, fallback_shape=None, shape=(3, 3))
    bad = tmp_path / "odd.bin"
    bad.write_bytes(b"12345")
    with pytest.raises(bio.ImageFormatError, match="float32"):
        bio.read_image(bad)
    with pytest.raises(bio.ImageFormatError, match="no such file"):
        bio.read_image(tmp_path / "missing.f32")


@needs_engine
@pytest.mark.skipif(not (GOLDEN / "cases").is_dir(), reason="golden data not available")
def test_smv_reader_on_golden_case():
    smvs = sorted((GOLDEN / "cases").glob("*/img.smv"))
    if not smvs:
        pytest.skip("no SMV image among the golden cases")
    data, meta = bio.read_image(smvs[0])
    assert data.ndim == 2 and data.dtype == np.float32
    assert meta["header"]


def test_tap_documents_to_points(tmp_path):
    sub = [{"subpixel_index": [0, i], "hkl_rounded": hkl, "hkl_fractional": [0.1, 0.2, 0.3]}
           for i, hkl in enumerate([[1, 0, -1], [1, 0, -1], [2, 0, -1]])]
    doc = {"schema_version": "1.0", "tap_id": "hkl_subpixel", "pixel_coords": [3, 7], "final_intensity": 1.0,
           "values": {"subpixels": sub}, "summary": "x"}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(doc))
    docs = bio.load_tap_documents(p)
    pts, kw = bio.taps_to_points(docs)
    np.testing.assert_array_equal(pts, [[3, 7]])
    assert kw["features"]["hkl"] == ["(1,0,-1) +1"]
    assert bio.tap_rows(doc)[2]["h0"] == 2 and bio.tap_rows(doc)[1]["subF"] == 1
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"shape": [3, 4]}))
    with pytest.raises(ValueError, match="not a tap JSON"):
        bio.load_tap_documents(other)


def test_exclusive_write_never_overwrites(tmp_path):
    p = bio.exclusive_write_json(tmp_path / "a.json", {"x": 1})
    with pytest.raises(FileExistsError):
        bio.exclusive_write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]  # no temp file left
    assert bio.unique_path(p).name == "a-1.json"


def test_model_export_requires_selection(tmp_path):
    m = InspectorModel(cwd=str(tmp_path))
    with pytest.raises(ValueError, match="selection is empty"):
        m.export(tmp_path)
    with pytest.raises(ValueError, match="run a simulation"):
        m.check_pixel(0, 0)


def test_sensitivity_view_text():
    from bragg_inspector.model import REFLECTION_COLUMNS, SENSITIVITY_COLUMNS, sensitivity_view

    doc = {"intensity": 2.0,
           "parameters": [{"family": "distance", "component": "distance", "unit": "mm", "value": 100.0,
                           "dI_dp": -0.25, "step": 0.1, "relative_change": -0.0125},
                          {"family": "cell", "component": "a", "unit": "Å", "value": 50.0,
                           "dI_dp": 0.0, "step": 0.01, "relative_change": None}],
           "reflections": [{"hkl": [1, -2, 3], "F": 40.0, "dI_dF": 0.05}] * 12,
           "not_differentiable": {"mosaic": "no mosaic spread"}}
    v = sensitivity_view(doc)
    assert [list(r) for r in v["parameters"]] == [SENSITIVITY_COLUMNS] * 2
    assert v["parameters"][0] == {"parameter": "distance", "unit": "mm", "value": "100", "dI/dp": "-0.25",
                                  "step": "0.1", "relative change": "-1.25 %"}
    assert v["parameters"][1]["parameter"] == "cell.a" and v["parameters"][1]["relative change"] == "—"
    assert len(v["reflections"]) == 10 and list(v["reflections"][0]) == REFLECTION_COLUMNS
    assert v["reflections"][0]["h,k,l"] == "(1,-2,3)"
    assert v["not_differentiable"] == ["mosaic: no mosaic spread"]
    assert "top 10 of 12 structure factors" in v["caption"]


@needs_engine
def test_model_exports_the_computed_sensitivity_tap(tmp_path):
    from bragg_inspector import _engine
    from inspector_helpers import small_args, validate_tap_json

    m = InspectorModel(cwd=str(tmp_path))
    args = small_args(None, detpixels=16)
    sim = m.prepare(args)
    img, fb = _engine.render(sim)
    m.set_rendered(sim, args, img, fb, m.device, m.dtype)
    rec = m.tap(8, 8)
    m.select(rec)
    assert [p.name for p in m.export(tmp_path / "a")] == ["tap_hkl_subpixel_s8_f8.json"]
    m.attach_sensitivity(rec, m.sensitivity(m.sim, 8, 8))
    paths = m.export(tmp_path / "b")
    assert [p.name for p in paths] == ["tap_hkl_subpixel_s8_f8.json", "tap_sensitivity_s8_f8.json"]
    for p in paths:
        validate_tap_json(json.loads(p.read_text()))
    assert json.loads(paths[1].read_text())["values"] == json.loads(json.dumps(rec.sensitivity))
