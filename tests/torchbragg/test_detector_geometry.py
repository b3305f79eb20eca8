"""torchbragg.detector_geometry: pixel-centre geometry that the inspector's hover,
rings and table outline use, checked against the engine's own taps and formulas."""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import torchbragg
from torchbragg import detector_geometry as geo

DATA = Path(__file__).resolve().parents[1] / "data" / "inspector"
TRICLINIC = ["-cell", "70", "80", "90", "85", "95", "100", "-misset", "10", "20", "30", "-default_F", "10",
             "-N", "3", "-lambda", "1", "-distance", "100", "-detpixels", "64", "-pixel", "0.5",
             "-oversample", "1"]


@pytest.fixture(scope="module")
def triclinic():
    return torchbragg.Simulation.from_args(TRICLINIC)


@pytest.mark.parametrize("pixel", [(0, 0), (10, 50), (32, 32), (63, 7)])
def test_hkl_equals_the_tap_at_oversample_1(triclinic, pixel):
    row = triclinic.tap(*pixel).to_json()["values"]["subpixels"][0]
    g = geo.pixel_geometry(triclinic, *pixel)
    np.testing.assert_allclose(g["hkl"], row["hkl_fractional"], rtol=1e-5, atol=1e-5)  # the tap is float32
    assert g["hkl0"].tolist() == row["hkl_rounded"]


def test_arrays_broadcast_and_d_follows_bragg(triclinic):
    slow = np.arange(0, 64, 9)[:, None]
    fast = np.arange(0, 64, 13)[None, :]
    g = geo.pixel_geometry(triclinic, slow, fast)
    assert g["hkl"].shape == (slow.size, fast.size, 3) and g["d_angstrom"].shape == (slow.size, fast.size)
    one = geo.pixel_geometry(triclinic, int(slow[2, 0]), int(fast[0, 3]))
    np.testing.assert_allclose(g["hkl"][2, 3], one["hkl"])
    lam = 1.0
    theta = np.radians(g["two_theta_deg"]) / 2
    np.testing.assert_allclose(g["d_angstrom"], lam / (2 * np.sin(theta)), rtol=1e-9)
    # 2θ is the angle between the beam and the pixel's position
    pos = g["position_m"]
    beam = -triclinic.setup.source_dirs[0]
    cos2t = (pos @ beam) / np.linalg.norm(pos, axis=-1)
    np.testing.assert_allclose(np.cos(np.radians(g["two_theta_deg"])), cos2t, atol=1e-12)


def test_beam_centre_in_napari_pixel_units():
    sim = torchbragg.Simulation.from_args(TRICLINIC + ["-Xbeam", "10.25", "-Ybeam", "20.75"])
    s, f = geo.beam_centre_pixel(sim)
    # MOSFLM: Sbeam = Xbeam + pixel/2, Fbeam = Ybeam + pixel/2 (C); 0.5 mm pixels whose
    # centres are the integers: (Xbeam + 0.25 mm) / 0.5 mm - 0.5 = Xbeam / 0.5 mm
    assert (s, f) == pytest.approx((10.25 / 0.5, 20.75 / 0.5), abs=1e-9)
    g = geo.pixel_geometry(sim, round(s), round(f))
    assert float(g["two_theta_deg"]) < 0.5  # next to the direct beam


def test_resolution_rings_lie_at_their_d(triclinic):
    finest, coarsest = geo.resolution_range(triclinic)
    assert coarsest == math.inf and finest > 0  # the beam centre is on the detector
    spacings = geo.default_ring_spacings(triclinic)
    assert spacings == sorted(spacings, reverse=True) and len(spacings) >= 3
    assert all(d >= finest * 0.999 for d in spacings)
    d = spacings[1]
    pts = geo.resolution_ring(triclinic, d)
    assert pts.shape[1] == 2 and len(pts) > 10
    inside = pts[(pts >= 0).all(1) & (pts <= 63).all(1)]
    near = np.round(inside).astype(int)
    got = geo.pixel_geometry(triclinic, near[:, 0], near[:, 1])["d_angstrom"]
    # rounding to the nearest pixel centre moves a point by ≤ 0.71 px; at small angles d ∝ 1/radius
    radius = np.linalg.norm(inside - np.array(geo.beam_centre_pixel(triclinic)), axis=1)
    assert np.all(np.abs(got - d) <= d * 0.75 / (radius - 0.75))
    assert geo.resolution_ring(triclinic, 0.4).shape == (0, 2)  # finer than λ/2: no ring


def test_table_box_and_structure_factor_source(tmp_path):
    hkl = tmp_path / "holes.hkl"
    shutil.copy(DATA / "f_hkl_m3p3_holes.hkl", hkl)
    args = ["-cell", "100", "100", "100", "90", "90", "90", "-hkl", str(hkl), "-default_F", "7", "-N", "3",
            "-lambda", "1", "-distance", "100", "-detpixels", "48", "-pixel", "0.8"]
    sim = torchbragg.Simulation.from_args(args)
    tb = sim.setup.hkl
    ny, nx = sim.shape
    h0 = geo.pixel_geometry(sim, np.arange(ny)[:, None], np.arange(nx)[None, :])["hkl0"]
    lo, hi = np.array([tb.h_min, tb.k_min, tb.l_min]), np.array([tb.h_max, tb.k_max, tb.l_max])
    expect = np.all((h0 >= lo) & (h0 <= hi), axis=-1)
    mask = geo.table_box_mask(sim)
    np.testing.assert_array_equal(mask, expect)
    assert mask.any() and not mask.all()
    np.testing.assert_array_equal(geo.table_box_mask(sim, step=5), expect[::5, ::5])

    listed = np.argwhere(tb.listed)[0] + lo
    unlisted = np.argwhere(~tb.listed)
    assert geo.structure_factor_source(sim, *listed)[1] == "table"
    assert geo.structure_factor_source(sim, *(hi + 1)) == (7.0, "default_F:outside_table")
    if unlisted.size:
        assert geo.structure_factor_source(sim, *(unlisted[0] + lo))[1] == "default_F:unlisted"
    no_table = torchbragg.Simulation.from_args([a for a in args if a != str(hkl) and a != "-hkl"])
    assert geo.table_box_mask(no_table) is None
    assert geo.structure_factor_source(no_table, 0, 0, 1) == (7.0, "default_F:no_table")
