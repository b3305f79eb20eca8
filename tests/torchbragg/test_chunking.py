"""The image does not depend on how many detector rows are rendered at once.

Two C rules are global over the run and must survive chunking:

* phi = 0 quirk: the spindle rotation is skipped at phi == 0, so that step reuses
  the orientation left by the previous step -- except in the very first phi loop of
  the run (first rendered pixel, first subpixel, first source), where the crystal
  is still unrotated.  Only that one pixel is special, whatever the chunks.
* interpolation switches itself off at the first out-of-range lookup in C's loop
  order, for every later lookup, in whichever chunk they are.
"""

from __future__ import annotations

import pytest
import torch

import torchbragg

MOSAIC_PHI = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-N", "5", "-lambda", "1.0",
              "-mosaic", "0.5", "-mosaic_dom", "5", "-phi", "0", "-osc", "0.5", "-phisteps", "3",
              "-distance", "100", "-detpixels", "40", "-pixel", "0.6", "-oversample", "2", "-mosaic_seed", "7"]
ROI = ["-roi", "3", "30", "5", "33"]  # fast 3..30, slow 5..33: the first rendered pixel is (5, 3)


def render(args, chunk_rows=None, dtype=torch.float32, cwd=None):
    sim = torchbragg.Simulation.from_args(args, dtype=dtype, chunk_rows=chunk_rows, cwd=cwd)
    return sim, sim.render()


def assert_same_for_all_chunkings(args, dtype=torch.float32, cwd=None):
    sim, default = render(args, None, dtype, cwd)
    for rows in (1, 7):
        other_sim, other = render(args, rows, dtype, cwd)
        assert other_sim.chunk_rows == rows
        assert torch.equal(other, default), f"chunk_rows={rows} vs default ({sim.chunk_rows}): " \
            f"max |diff| {float((other - default).abs().max())}"
    return sim, default


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_mosaic_phi_quirk_does_not_depend_on_chunking(dtype):
    sim, image = assert_same_for_all_chunkings(MOSAIC_PHI, dtype)
    assert sim.config.compat.phi0_reuse is True and sim.first_pixel() == (0, 0)
    assert sim.setup.phi_values[0] == 0.0 and len(sim.setup.mosaic_umats) == 5
    # the quirk is in force: corrected physics gives another image
    _, fixed = render(MOSAIC_PHI + ["-fix_phi0"], dtype=dtype)
    assert (fixed != image).float().mean() > 0.5


def test_first_pixel_rule_with_roi():
    sim, image = assert_same_for_all_chunkings(MOSAIC_PHI + ROI, torch.float64)
    assert sim.first_pixel() == (5, 3)
    _, full = render(MOSAIC_PHI, dtype=torch.float64)
    inside = torch.zeros_like(full, dtype=torch.bool)
    inside[5:34, 3:31] = True
    assert (image[~inside] == 0).all()
    # only the first rendered pixel is special: with the ROI that is (5, 3), whose first phi
    # loop sees the unrotated crystal, while in the full render it reused the last rotation
    same = torch.isclose(image, full, rtol=1e-12, atol=0) & inside
    assert int((inside & ~same).sum()) == 1 and not bool(same[5, 3])


# --------------------------------------------------------------------------- interpolation switch-off
SWITCH_OFF_ARGS = ["-cell", "20", "20", "20", "90", "90", "90", "-hkl", "k_short.hkl", "-default_F", "5",
                   "-N", "2", "-lambda", "1", "-distance", "50", "-detpixels_f", "96", "-detpixels_s", "48",
                   "-pixel", "0.5", "-interpolate", "-oversample", "2"]


def F_switch(h, k, l):
    return 20.0 + h + 2.0 * k + 0.5 * l * l + 0.25 * h * k


@pytest.fixture
def short_table(tmp_path):
    # k only down to -4: a lookup with k < -2 leaves the 4x4x4 neighbourhood of the table;
    # the first one is in row 35, column 11, at the third subpixel (see test_lookup)
    lines = [f"{h} {k} {l} {F_switch(h, k, l):.10g}\n" for h in range(-5, 4) for k in range(-4, 8)
             for l in range(-11, 12)]
    (tmp_path / "k_short.hkl").write_text("".join(lines))
    return tmp_path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_interpolation_switch_off_does_not_depend_on_chunking(short_table, dtype):
    sim, image = assert_same_for_all_chunkings(SWITCH_OFF_ARGS, dtype, cwd=short_table)
    cutoff = sim.interpolation_cutoff()
    E = sim.evaluations_per_pixel
    row, col, sub = cutoff // E // 96, cutoff // E % 96, cutoff % E
    assert (row, col) == (35, 11) and sub > 0, (row, col, sub)
    # rows 1..7 at a time put the switch-off in the middle of a chunk, and rows after it in
    # later chunks: those are the nearest-neighbour image
    _, plain = render(SWITCH_OFF_ARGS + ["-nointerpolate"], dtype=dtype, cwd=short_table)
    flat, flat_plain = image.reshape(-1), plain.reshape(-1)
    after = cutoff // E + 1
    # (to rounding: float32 sums of the two renders need not run in the same order)
    assert torch.allclose(flat[after:], flat_plain[after:], rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    assert (flat[:after - 1] != flat_plain[:after - 1]).float().mean() > 0.5


def test_evaluate_on_a_few_rows_sees_the_global_switch_off(short_table):
    sim = torchbragg.Simulation.from_args(SWITCH_OFF_ARGS, cwd=short_table, dtype=torch.float64)
    cols = torch.arange(96)
    whole = sim.evaluate(torch.arange(48), cols, detail=True)
    part = sim.evaluate(torch.arange(33, 38), cols, detail=True)
    for key in ("F_cell", "reason", "hkl0"):
        assert torch.equal(part[key], whole[key][33:38]), key
    # rows after the switch-off row are never interpolated, even evaluated on their own
    late = sim.evaluate(torch.arange(40, 48), cols, detail=True)
    assert not (late["reason"] == 4).any()


def test_roi_chunking_with_interpolation(short_table):
    args = SWITCH_OFF_ARGS + ["-roi", "5", "90", "20", "45"]
    sim, image = assert_same_for_all_chunkings(args, torch.float64, cwd=short_table)
    assert sim.first_pixel() == (20, 5)
    assert (image[:20] == 0).all() and (image[46:] == 0).all() and (image[:, :5] == 0).all()
