"""Structure-factor lookup: rounding, table box, default_F fallbacks, tricubic interpolation.

The C rules (paraphrased):

* the nearest reflection is ``h0 = ceil(h - 0.5)`` per index, so an exact half
  goes *down* for positive and negative values alike: 0.5 -> ceil(0.0) = 0,
  -0.5 -> ceil(-1.0) = -1, 1.5 -> 1, -1.5 -> -2;
* a table is a dense box from the smallest to the largest index listed in the
  file; cells of the box not listed in the file hold default_F; a lookup outside
  the box is default_F; without a table every lookup is default_F;
* with interpolation a 4x4x4 tricubic (Lagrange) polynomial through the cells
  floor(h)-1 .. floor(h)+2 is used; the first lookup whose neighbourhood leaves the
  box switches interpolation off for the rest of the run (that lookup included).

Two kinds of test: exact Miller indices put through the kernel with a hand-made
orientation (``evaluate_block`` on a modified ``KernelTensors``), and small
simulations evaluated with ``Simulation.evaluate(..., detail=True)`` and
``Simulation.render_with_fallback()``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import torchbragg
from torchbragg.kernels import LOOKUP_CODES, LOOKUP_REASONS, evaluate_block

CELL100 = ["-cell", "100", "100", "100", "90", "90", "90"]
R_TABLE, R_NONE, R_OUTSIDE, R_UNLISTED, R_INTERP = (LOOKUP_CODES[n] for n in (
    "table", "default_F:no_table", "default_F:outside_table", "default_F:unlisted", "interpolated"))


def test_reason_codes_are_the_documented_ones():
    assert LOOKUP_REASONS == {0: "table", 1: "default_F:no_table", 2: "default_F:outside_table",
                              3: "default_F:unlisted", 4: "interpolated"}
    assert torchbragg.FallbackMap.REASONS == {i: LOOKUP_REASONS[i] for i in range(4)}


def write_hkl(path, cells):
    """Write ``h k l F`` lines."""
    path.write_text("".join(f"{h} {k} {l} {F:.10g}\n" for (h, k, l), F in cells.items()))
    return path


def box(hr, kr, lr):
    return [(h, k, l) for h in range(hr[0], hr[1] + 1) for k in range(kr[0], kr[1] + 1)
            for l in range(lr[0], lr[1] + 1)]


def F_linear(h, k, l):
    return 10.0 + h + 3.0 * k + 5.0 * l + 40.0


# --------------------------------------------------------------------------- exact indices through the kernel
X, Z = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)


def exact_kernel(sim, targets):
    """The simulation's kernel tensors, re-aimed so that the one subpixel of pixel (0, 0) sees
    the fractional Miller indices ``targets[m]`` in "mosaic domain" m, exactly.

    The pixel sits on the +z axis (diffracted = z), the beam runs along +x with 1 / lambda = 1,
    so the scattering vector is exactly (-1, 0, 1) 1/Å; the cell vectors a = (-h, 0, 0),
    b = (-k, 0, 0), c = (0, 0, l) then give h, k, l without rounding error.
    """
    kt = sim._tensors
    g = dict(dtype=torch.float64, device=kt.device)
    lattice = torch.zeros((1, len(targets), 3, 3), **g)
    for m, (h, k, l) in enumerate(targets):
        lattice[0, m, 0, 0] = -h
        lattice[0, m, 1, 0] = -k
        lattice[0, m, 2, 2] = l
    return dataclasses.replace(
        kt, fdet=torch.tensor(Z, **g), sdet=torch.zeros(3, **g), odet=torch.tensor(X, **g),
        pix0=torch.zeros(3, **g), oversample=1, subpixel_size=kt.pixel_size, thick_offsets=torch.zeros(1, **g),
        curved=False, incident=torch.tensor([X], **g), inv_lambda=torch.ones(1, **g), lattice=lattice,
        lattice_first=None, dmin_A=0.0)


def run_exact(sim, targets):
    kt = exact_kernel(sim, targets)
    one = torch.zeros(1, dtype=torch.long)
    res = evaluate_block(kt, one, one, interp_cutoff=None, fpixels=sim.setup.fpixels, detail=True)
    shape = (len(targets),)
    out = {key: res[key].reshape(shape + res[key].shape[8:]).cpu() for key in
           ("hkl", "hkl0", "F_cell", "F_latt", "reason", "skipped")}
    assert torch.allclose(out["hkl"].double(), torch.tensor(targets, dtype=torch.float64), rtol=0, atol=0)
    assert not out["skipped"].any()
    return out


@pytest.fixture
def table_sim(tmp_path):
    """A 5-cell crystal with a table over h -1..2, k -1..1, l -1..1 and three cells left out."""
    cells = {c: F_linear(*c) for c in box((-1, 2), (-1, 1), (-1, 1))}
    for missing in [(2, 1, -1), (0, 0, 0), (-1, -1, 1)]:
        del cells[missing]
    write_hkl(tmp_path / "tiny.hkl", cells)
    return torchbragg.Simulation.from_args(
        CELL100 + ["-hkl", "tiny.hkl", "-default_F", "7", "-N", "5", "-detpixels", "8", "-nointerpolate"],
        cwd=tmp_path, dtype=torch.float64)


@pytest.mark.parametrize("x, nearest", [
    (0.5, 0), (-0.5, -1), (1.5, 1), (-1.5, -2), (0.49, 0), (0.51, 1), (-0.49, 0), (-0.51, -1),
    (2.0, 2), (-1.0, -1), (0.0, 0),
])
def test_nearest_index_is_ceil_of_x_minus_half(table_sim, x, nearest):
    assert math.ceil(x - 0.5) == nearest  # the C rule itself
    out = run_exact(table_sim, [(x, x, x)])
    assert out["hkl0"][0].tolist() == [nearest] * 3


def test_lookup_reasons_with_a_table(table_sim):
    cases = {
        (1.1, 0.2, 0.9): (F_linear(1, 0, 1), R_TABLE),          # listed cell
        (-0.6, 0.7, -1.2): (F_linear(-1, 1, -1), R_TABLE),       # listed, at the box corner
        (2.3, 0.6, -0.8): (7.0, R_UNLISTED),                     # (2, 1, -1): in the box, not in the file
        (0.2, -0.3, 0.1): (7.0, R_UNLISTED),                     # (0, 0, 0) left out
        (3.1, 0.0, 0.0): (7.0, R_OUTSIDE),                       # h = 3 > h_max = 2
        (-1.6, 0.0, 0.0): (7.0, R_OUTSIDE),                      # h0 = ceil(-2.1) = -2 < h_min
        (0.0, 1.5, 0.0): (F_linear(0, 1, 0), R_TABLE),           # k = 1.5 rounds to 1, a listed cell
        (0.0, 0.0, -1.51): (7.0, R_OUTSIDE),                     # l0 = -2
    }
    targets = list(cases)
    out = run_exact(table_sim, targets)
    for m, t in enumerate(targets):
        F, reason = cases[t]
        assert out["F_cell"][m].item() == pytest.approx(F, abs=1e-12), t
        assert LOOKUP_REASONS[int(out["reason"][m])] == LOOKUP_REASONS[reason], t


def test_lookup_without_a_table(tmp_path):
    sim = torchbragg.Simulation.from_args(CELL100 + ["-default_F", "42", "-N", "5", "-detpixels", "8"],
                                          cwd=tmp_path, dtype=torch.float64)
    assert sim.hkl_info["kind"] == "none"
    out = run_exact(sim, [(0.0, 0.0, 0.0), (5.2, -3.3, 1.0)])
    assert torch.all(out["F_cell"] == 42.0)
    assert all(LOOKUP_REASONS[int(r)] == "default_F:no_table" for r in out["reason"])


# --------------------------------------------------------------------------- tricubic interpolation
def F_poly(h, k, l):
    """Degree <= 2 in each index (with cross terms): tricubic interpolation is exact for it."""
    return 60.0 + 2 * h - 0.5 * h * h + 3 * k + 0.25 * k * k - l + 0.1 * l * l + 0.3 * h * k - 0.2 * k * l


@pytest.fixture
def poly_table(tmp_path):
    write_hkl(tmp_path / "poly.hkl", {c: F_poly(*c) for c in box((-5, 5), (-5, 5), (-5, 5))})
    return tmp_path / "poly.hkl"


def test_tricubic_reproduces_a_quadratic_exactly(poly_table):
    sim = torchbragg.Simulation.from_args(
        CELL100 + ["-hkl", poly_table.name, "-N", "5", "-detpixels", "8", "-interpolate"],
        cwd=poly_table.parent, dtype=torch.float64)
    assert sim.setup.interpolate is True
    targets = [(0.3, -0.7, 0.45), (1.25, 0.5, -1.9), (-2.9, 2.99, 0.0), (2.0, -3.0, 1.0), (-0.5, 0.5, 2.75)]
    out = run_exact(sim, targets)
    for m, t in enumerate(targets):
        assert out["F_cell"][m].item() == pytest.approx(F_poly(*t), abs=1e-9), t
        assert LOOKUP_REASONS[int(out["reason"][m])] == "interpolated"
    # a linear F is exact too, and at whole indices interpolation returns the table value
    assert out["F_cell"][3].item() == pytest.approx(F_poly(2, -3, 1), abs=1e-12)


def test_tricubic_over_a_whole_image(poly_table):
    """Every lookup of a real render (no neighbourhood leaves the table) is interpolated exactly."""
    args = ["-cell", "20", "20", "20", "90", "90", "90", "-hkl", poly_table.name, "-N", "2", "-lambda", "1",
            "-distance", "100", "-detpixels", "24", "-pixel", "1"]
    sim = torchbragg.Simulation.from_args(args, cwd=poly_table.parent, dtype=torch.float64)
    assert sim.setup.interpolate is True  # N <= 2: C's automatic choice
    assert sim.interpolation_cutoff() is None
    res = sim.evaluate(torch.arange(24), torch.arange(24), detail=True)
    used = ~res["skipped"]
    hkl = res["hkl"][used].double()
    assert hkl.shape[0] > 0 and (res["reason"][used] == R_INTERP).all()
    expected = F_poly(hkl[:, 0], hkl[:, 1], hkl[:, 2])
    assert torch.allclose(res["F_cell"][used].double(), expected, rtol=0, atol=1e-8)


# --------------------------------------------------------------------------- whole small simulations
def expected_lookup(hkl0, table, default_F):
    """C's nearest-neighbour lookup and the engine's reason code, from a {(h,k,l): F} dict."""
    hs = [c[0] for c in table]
    ks = [c[1] for c in table]
    ls = [c[2] for c in table]
    lo, hi = (min(hs), min(ks), min(ls)), (max(hs), max(ks), max(ls))
    F = np.empty(len(hkl0))
    reason = np.empty(len(hkl0), dtype=np.uint8)
    for i, c in enumerate(map(tuple, hkl0.tolist())):
        if not all(lo[j] <= c[j] <= hi[j] for j in range(3)):
            F[i], reason[i] = default_F, R_OUTSIDE
        elif c in table:
            F[i], reason[i] = table[c], R_TABLE
        else:
            F[i], reason[i] = default_F, R_UNLISTED
    return F, reason


@pytest.fixture
def cubic_sim(tmp_path):
    """A 32x32 detector whose pixels reach h, k, l = -1 .. 2 with a table over 0..1 (some left out)."""
    table = {c: F_linear(*c) for c in box((-1, 1), (0, 1), (-1, 1))}
    del table[(0, 1, 0)], table[(1, 0, 1)]
    write_hkl(tmp_path / "tiny.hkl", table)
    args = ["-cell", "20", "20", "20", "90", "90", "90", "-hkl", "tiny.hkl", "-default_F", "3", "-N", "3",
            "-lambda", "1", "-distance", "60", "-detpixels", "32", "-pixel", "2", "-nointerpolate",
            "-oversample", "2"]
    return torchbragg.Simulation.from_args(args, cwd=tmp_path, dtype=torch.float64), table


def test_evaluate_detail_follows_the_c_lookup(cubic_sim):
    sim, table = cubic_sim
    res = sim.evaluate(torch.arange(32), torch.arange(32), detail=True)
    for key in ("hkl", "hkl0", "F_cell", "F_latt", "reason", "skipped"):
        assert key in res, key
    used = ~res["skipped"]
    hkl, hkl0 = res["hkl"][used].double(), res["hkl0"][used]
    assert torch.equal(hkl0, torch.ceil(hkl - 0.5).long())
    F, reason = expected_lookup(hkl0, table, 3.0)
    assert np.array_equal(res["reason"][used].numpy(), reason)
    assert np.allclose(res["F_cell"][used].numpy(), F, rtol=0, atol=1e-12)
    # the image reaches all three kinds of lookup
    assert {R_TABLE, R_OUTSIDE, R_UNLISTED} <= set(np.unique(reason).tolist())


def test_render_with_fallback_counts(cubic_sim):
    sim, table = cubic_sim
    image, fb = sim.render_with_fallback()
    assert torch.allclose(image, sim.render(), rtol=1e-12, atol=0)  # same image, with or without the map
    res = sim.evaluate(torch.arange(32), torch.arange(32), detail=True)
    R, C = 32, 32
    used = (~res["skipped"]).reshape(R, C, -1)
    reason = res["reason"].reshape(R, C, -1)
    per = [((reason == code) & used).sum(-1) for code in (R_NONE, R_OUTSIDE, R_UNLISTED)]
    counts = sum(per)
    assert torch.equal(fb.counts.long(), counts.long())
    assert fb.evaluations_per_pixel == sim.evaluations_per_pixel == 4
    # the reason map names the commonest fallback of a pixel (0 where none fell back)
    stack = torch.stack(per, -1)
    dominant = torch.where(counts > 0, torch.argmax(stack, -1) + 1, torch.zeros_like(counts))
    assert torch.equal(fb.reason.long(), dominant.long())
    summary = fb.pixel_counts()
    assert sum(summary.values()) == R * C
    assert summary["table"] == int((counts == 0).sum())
    assert summary["default_F:outside_table"] > 0 and summary["default_F:unlisted"] > 0


def test_fallback_map_without_a_table(tmp_path):
    sim = torchbragg.Simulation.from_args(CELL100 + ["-default_F", "10", "-N", "3", "-detpixels", "16",
                                                     "-pixel", "1", "-oversample", "1"], dtype=torch.float64)
    _, fb = sim.render_with_fallback()
    # C counts every lookup without a table as a fallback (taps file: oob = 1)
    assert (fb.reason == R_NONE).all()
    assert (fb.counts == 1).all()
    assert fb.pixel_counts()["default_F:no_table"] == 16 * 16


# --------------------------------------------------------------------------- interpolation switch-off
def out_of_range(hkl, lo, hi):
    """C's test: the 4x4x4 neighbourhood of fractional hkl leaves the box [lo, hi]."""
    bad = torch.zeros(hkl.shape[:-1], dtype=torch.bool)
    for j in range(3):
        rng = hi[j] - lo[j] + 1
        bad |= (hkl[..., j] - lo[j] + 3 > rng) | (hkl[..., j] - 2 < lo[j])
    return bad


#: a 96 x 48 detector with a table that is short on the -k side (k_min = -4): lookups with
#: k < -2 leave it.  k grows towards the top rows, and |k| = 20 y / R is largest in the middle
#: column, so the first such lookup is in row 35, column 11, at its third subpixel
SWITCH_OFF_ARGS = ["-cell", "20", "20", "20", "90", "90", "90", "-hkl", "k_short.hkl", "-default_F", "5",
                   "-N", "2", "-lambda", "1", "-distance", "50", "-detpixels_f", "96", "-detpixels_s", "48",
                   "-pixel", "0.5", "-interpolate", "-oversample", "2"]
SWITCH_OFF_BOX = ((-5, -4, -11), (3, 7, 11))


def F_switch(h, k, l):
    return 20.0 + h + 2.0 * k + 0.5 * l * l + 0.25 * h * k


@pytest.fixture
def switch_off_folder(tmp_path):
    lo, hi = SWITCH_OFF_BOX
    write_hkl(tmp_path / "k_short.hkl", {c: F_switch(*c) for c in box((lo[0], hi[0]), (lo[1], hi[1]),
                                                                     (lo[2], hi[2]))})
    return tmp_path


def test_interpolation_switches_off_mid_image(switch_off_folder):
    sim = torchbragg.Simulation.from_args(SWITCH_OFF_ARGS, cwd=switch_off_folder, dtype=torch.float64)
    ny, nx = sim.shape
    res = sim.evaluate(torch.arange(ny), torch.arange(nx), detail=True)
    E = sim.evaluations_per_pixel
    assert E == 4
    used = ~res["skipped"]
    bad = out_of_range(res["hkl"].double(), *SWITCH_OFF_BOX) & used
    ordinal = (torch.arange(ny * nx)[:, None] * E + torch.arange(E)[None, :]).reshape(bad.shape)
    first = int(ordinal[bad].min())
    assert sim.interpolation_cutoff() == first
    row, col, sub = first // E // nx, first // E % nx, first % E
    assert 0.3 * ny < row < 0.9 * ny and 0 < col < nx - 1 and sub > 0, \
        f"switch-off at row {row}, column {col}, evaluation {sub}: not mid-image"
    before, after = used & (ordinal < first), used & (ordinal >= first)
    assert (res["reason"][before] == R_INTERP).all()
    assert not (res["reason"][after] == R_INTERP).any()
    # before the switch-off the interpolated F is the exact quadratic; after it the nearest cell
    hkl = res["hkl"].double()
    assert torch.allclose(res["F_cell"][before].double(), F_switch(*hkl[before].unbind(-1)), atol=1e-9)
    near = res["hkl0"][after]
    inside = res["reason"][after] == R_TABLE
    assert torch.allclose(res["F_cell"][after][inside].double(), F_switch(*near[inside].double().unbind(-1)))

    image = sim.render().numpy()
    plain = torchbragg.Simulation.from_args(SWITCH_OFF_ARGS + ["-nointerpolate"], cwd=switch_off_folder,
                                            dtype=torch.float64).render().numpy()
    pixel = first // E
    flat, flat_plain = image.reshape(-1), plain.reshape(-1)
    # every pixel after the one where it switched off is the nearest-neighbour image (to rounding:
    # the two renders need not add up in the same order)
    assert np.allclose(flat[pixel + 1:], flat_plain[pixel + 1:], rtol=1e-12, atol=0)
    # and the pixels before it really were interpolated
    assert (flat[:pixel] != flat_plain[:pixel]).mean() > 0.5
