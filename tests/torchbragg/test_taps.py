"""Pixel taps: they reproduce the C program's per-subpixel printout and the rendered pixel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

import torchbragg
from torchbragg.taps import TAP_NAMES, TapError, format_tap_table, write_tap_json

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO.parent / "shared" / "golden"
DATA = REPO / "tests" / "data"
SCHEMA = json.loads((REPO / "specs" / "tap_schema.json").read_text())

SMALL_HKL_ARGS = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "50", "-N", "3", "-lambda", "1.0",
                  "-distance", "100", "-detpixels", "64", "-pixel", "0.8", "-nointerpolate", "-oversample", "2"]


def _c_taps():
    path = GOLDEN / "taps" / "c_subpixel_taps.json"
    if not path.exists():
        pytest.skip(f"{path} not available (../shared/golden is absent)")
    return json.loads(path.read_text())


def _c_pixels():
    path = GOLDEN / "taps" / "c_subpixel_taps.json"
    if not path.exists():
        return [pytest.param(None, None, None, marks=pytest.mark.skip(reason="../shared/golden is absent"))]
    data = json.loads(path.read_text())
    return [pytest.param(name, cfg, px, id=f"{name}-{px['pixel_slow_fast'][0]}-{px['pixel_slow_fast'][1]}")
            for name, cfg in data["configs"].items() for px in cfg["pixels"]]


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    cache = {}

    def get(name, args):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            for f in (GOLDEN / "cases" / name).glob("*.hkl"):
                shutil.copy(f, folder)
            cache[name] = torchbragg.Simulation.from_args(args, cwd=folder, dtype=torch.float64)
        return cache[name]

    return get


@pytest.mark.golden
@pytest.mark.parametrize("name,cfg,px", _c_pixels())
def test_tap_reproduces_c_rows(sims, name, cfg, px):
    sim = sims(name, cfg["args"])
    slow, fast = px["pixel_slow_fast"]
    tap = sim.tap(slow, fast)
    assert len(tap.rows) == len(px["rows"])
    for ours, c in zip(tap.rows, px["rows"], strict=True):
        assert (ours["thick"], ours["subS"], ours["subF"], ours["source"], ours["phi"], ours["mosaic"]) == (
            c["thick"], c["subS"], c["subF"], c["source"], c["phi"], c["mos"])
        for key in "hkl":
            assert abs(ours[key] - c[key]) <= 1e-6, (key, ours[key], c[key])
        assert (ours["h0"], ours["k0"], ours["l0"]) == (c["h0"], c["k0"], c["l0"])
        assert ours["F_cell"] == c["F_cell"]
        assert ours["out_of_bounds"] == bool(c["oob"])
        assert ours["F_latt"] == pytest.approx(c["F_latt"], rel=1e-6, abs=1e-9)
    assert tap.final_intensity == pytest.approx(px["pixel_value"], rel=1e-4)


def test_tap_final_intensity_equals_rendered_pixel(tmp_path):
    hkl = tmp_path / "small.hkl"
    hkl.write_text("".join(f"{h} {k} {l} {10 + h + 2 * k + 3 * l}\n"
                           for h in range(-2, 3) for k in range(-2, 3) for l in range(-2, 3) if (h + k + l) % 2 == 0))
    sim = torchbragg.Simulation.from_args(SMALL_HKL_ARGS + ["-hkl", str(hkl)], dtype=torch.float64)
    image = sim.render()
    for slow, fast in [(0, 0), (32, 32), (10, 50), (63, 63)]:
        tap = sim.tap(slow, fast, taps=("hkl_subpixel", "intensity"))
        assert tap.final_intensity == pytest.approx(float(image[slow, fast]), rel=1e-12)
        assert tap.values["intensity"]["final_intensity"] == tap.final_intensity
    # the table has default_F in its unlisted cells: a tap must say so
    reasons = {r["lookup"] for s in range(0, 64, 4) for f in range(0, 64, 4) for r in sim.tap(s, f).rows}
    assert {"table", "default_F:unlisted", "default_F:outside_table"} <= reasons


def test_tap_rows_agree_with_fallback_map(tmp_path):
    hkl = tmp_path / "one.hkl"
    hkl.write_text("0 0 0 5\n1 1 1 7\n")
    sim = torchbragg.Simulation.from_args(SMALL_HKL_ARGS + ["-hkl", str(hkl)], dtype=torch.float64)
    image, fmap = sim.render_with_fallback()
    for slow, fast in [(0, 0), (31, 31), (5, 40)]:
        tap = sim.tap(slow, fast)
        used_default = sum(r["lookup"].startswith("default_F") and not r["skipped"] for r in tap.rows)
        assert int(fmap.counts[slow, fast]) == used_default


def test_summary_and_table_text():
    sim = torchbragg.Simulation.from_args(["-cell", "100", "100", "100", "90", "90", "90", "-N", "5",
                                           "-default_F", "100", "-lambda", "0.5", "-distance", "500", "-pixel",
                                           "0.05", "-detpixels", "256", "-oversample", "2"], dtype=torch.float64)
    tap = sim.tap(128, 128)
    assert tap.summary == "4 of 4 evaluations used default_F: no HKL table loaded"
    text = format_tap_table(tap)
    assert "default_F:no_table" in text and "pixel (slow=128, fast=128)" in text


def test_all_taps_validate_against_schema(tmp_path):
    sim = torchbragg.Simulation.from_args(SMALL_HKL_ARGS + ["-mosaic", "0.3", "-mosaic_dom", "2", "-phi", "0",
                                                            "-osc", "0.2", "-phisteps", "2"], dtype=torch.float32)
    tap = sim.tap(20, 30, taps=TAP_NAMES)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for tap_id in TAP_NAMES:
        doc = tap.to_json(tap_id)
        validator.validate(doc)
        assert doc["pixel_coords"] == [20, 30]
    assert len(tap.rows) == 4 * 2 * 2  # subpixels x phi x mosaic
    written = [write_tap_json(tap, tmp_path, tag="t", tap_id="hkl_subpixel") for _ in range(3)]
    assert [p.name for p in written] == ["tap_hkl_subpixel_s20_f30_t.json", "tap_hkl_subpixel_s20_f30_t-2.json",
                                        "tap_hkl_subpixel_s20_f30_t-3.json"]
    for p in written:
        validator.validate(json.loads(p.read_text()))


def test_bad_tap_requests():
    sim = torchbragg.Simulation.from_args(SMALL_HKL_ARGS)
    with pytest.raises(TapError, match="outside the 64x64 detector"):
        sim.tap(64, 0)
    with pytest.raises(TapError, match="unknown tap 'hkl'"):
        sim.tap(0, 0, taps=("hkl",))


def test_tap_geometry_resolution():
    sim = torchbragg.Simulation.from_args(SMALL_HKL_ARGS, dtype=torch.float64)
    g = sim.tap(0, 0, taps=("geometry",)).values["geometry"]
    two_theta = np.radians(g["two_theta_deg"])
    assert g["d_angstrom"] == pytest.approx(1.0 / (2 * np.sin(two_theta / 2)), rel=1e-9)
    assert g["stol_invA"] == pytest.approx(np.sin(two_theta / 2) / 1.0, rel=1e-9)
