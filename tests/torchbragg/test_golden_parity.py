"""Parity of the engine with the C nanoBragg program's images.

Every case of ``../shared/golden/cases.json`` is rendered with
``Simulation.from_args(args, cwd=tmp)`` after copying the case's .hkl/.mat inputs
into a temporary folder, in float32 and float64, and compared with the C float
image (golden README criteria: correlation >= 0.9999, |sum ratio - 1| <= 1e-3,
maximum pixel within 1e-3 relative, worst pixel |diff| < 1e-3 x image max; float64
also to ~1e-6).  Without ``../shared`` the same test runs on the copies in
``tests/data/golden_small``.

The quirks of the C program listed in the golden README get their own tests:
the stale ``Fdump.bin`` (read only on request here), phi = 0 (the C behaviour is
the default, ``-fix_phi0`` corrects it), interpolation switching itself off, the
4096² tap configuration and the noise image with the C random generator.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch

import torchbragg
from torchbragg.cli.command import run_simulation
from torchbragg.io.smv import read_smv

DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]

#: How the C program ran a case, where that was more than "its arguments, in a folder
#: holding its inputs".  stale_fdump was the second run in the folder of another run
#: and silently read the Fdump.bin left there; the engine reads ./Fdump.bin only with
#: -use_fdump, its documented C-compatibility switch.
C_RUN_CONDITIONS = {
    "stale_fdump": {"copy": ["Fdump.bin"], "extra_args": ["-use_fdump"]},
}


def _worst(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / ref.max())


# --------------------------------------------------------------------------- every case
@pytest.mark.golden
@pytest.mark.parametrize("dtype", DTYPES)
def test_render_matches_c(golden_case, dtype, tmp_path, parity):
    cond = C_RUN_CONDITIONS.get(golden_case.name, {})
    sim, image = golden_case.render(tmp_path, dtype, cond.get("extra_args", ()), cond.get("copy", ()))
    assert image.shape == golden_case.shape
    parity(image, golden_case.reference(), dtype, golden_case.name)
    # the statistics C printed after the render (%g: 6 significant digits)
    log = golden_case.log()
    max_line = re.search(r"max_I = (\S+)  at (\S+) (\S+)", log).groups()
    mean_line = re.search(r"mean= (\S+) rms= (\S+) rmsd= (\S+)", log).groups()
    st = sim.last_stats
    assert st.max_I == pytest.approx(float(max_line[0]), rel=1e-5)
    assert (st.mean, st.rms, st.rmsd) == pytest.approx([float(v) for v in mean_line], rel=1e-5)
    # the pixel C names as the maximum is a maximum here too (mirror-symmetric pixels tie to
    # rounding, and C keeps the first of equal float values in render order)
    px = sim.setup.pixel_size
    c_max = (int(float(max_line[2]) // px), int(float(max_line[1]) // px))
    assert image[c_max] >= st.max_I * (1 - 1e-6), (c_max, st.max_pixel)


def test_small_copies_are_identical_to_shared(small_cases, shared_cases):
    """tests/data/golden_small holds exact copies of C output (checked against ../shared)."""
    for name, small in small_cases.items():
        shared = shared_cases[name]
        assert small.entry == shared.entry, name
        for path in small.folder.iterdir():
            if path.name == "img_header.smv":  # the first 512 bytes of the C img.smv
                assert path.read_bytes() == (shared.folder / "img.smv").read_bytes()[:512], name
            else:
                assert path.read_bytes() == (shared.folder / path.name).read_bytes(), f"{name}/{path.name}"


def test_small_copies_stay_small(small_cases):
    total = sum(p.stat().st_size for c in small_cases.values() for p in c.folder.iterdir())
    assert total < 1.0 * 2 ** 20, f"tests/data/golden_small holds {total} bytes"


# --------------------------------------------------------------------------- quirk 4: stale Fdump.bin
@pytest.mark.golden
def test_stale_fdump_is_not_read_implicitly(shared_cases, tmp_path, parity):
    stale, clean = shared_cases["stale_fdump"], shared_cases["stale_fdump_clean"]
    assert stale.args == clean.args and "-hkl" not in stale.args
    sim, image = stale.render(tmp_path, torch.float64, copy=["Fdump.bin"])
    assert (tmp_path / "Fdump.bin").is_file()
    # the plain arguments ignore the stale cache: the clean C image, not the stale one
    parity(image, clean.reference(), torch.float64, "stale_fdump without -use_fdump vs stale_fdump_clean")
    assert _worst(image, stale.reference()) > 0.1
    info = sim.hkl_info
    assert info["kind"] == "none"
    said = " ".join(info["warnings"])
    assert "Fdump.bin" in said and "unused" in said, info["warnings"]
    assert sim.config.compat.implicit_fdump is False


@pytest.mark.golden
@pytest.mark.parametrize("dtype", DTYPES)
def test_stale_fdump_with_use_fdump_reproduces_c(shared_cases, tmp_path, dtype, parity):
    stale = shared_cases["stale_fdump"]
    sim, image = stale.render(tmp_path, dtype, extra_args=["-use_fdump"], copy=["Fdump.bin"])
    assert sim.config.compat.implicit_fdump is True
    assert sim.hkl_info["kind"] != "none"
    assert any("-use_fdump" in w for w in sim.hkl_info["warnings"]), sim.hkl_info["warnings"]
    parity(image, stale.reference(), dtype, "stale_fdump with -use_fdump")


@pytest.mark.golden
def test_stale_fdump_read_explicitly_with_hkl(shared_cases, tmp_path, parity):
    stale = shared_cases["stale_fdump"]
    sim, image = stale.render(tmp_path, torch.float64, extra_args=["-hkl", "Fdump.bin"], copy=["Fdump.bin"])
    assert sim.hkl_info["source"].endswith("Fdump.bin")
    parity(image, stale.reference(), torch.float64, "stale_fdump with -hkl Fdump.bin")


# --------------------------------------------------------------------------- quirk 1: phi = 0
def test_mosaic_phi_c_quirk_is_the_default(reference_case, tmp_path, parity):
    case = reference_case("mosaic_phi")
    ref = case.reference()
    sim, image = case.render(tmp_path / "c", torch.float64)
    # C skips the spindle rotation at phi == 0 and reuses the previous step's orientation
    assert sim.config.compat.phi0_reuse is True
    assert sim.setup.phi_values[0] == 0.0 and sim.setup.phisteps == 3
    parity(image, ref, torch.float64, "mosaic_phi")

    # corrected physics is a different image (the central quarter is enough to see it: no
    # pixel but the first rendered one depends on where the render starts)
    roi = ["-roi", "64", "191", "64", "191"]
    fixed_sim, fixed = case.render(tmp_path / "fixed", torch.float64, extra_args=["-fix_phi0"] + roi)
    assert fixed_sim.config.compat.phi0_reuse is False
    centre = (slice(64, 192), slice(64, 192))
    assert _worst(fixed[centre], ref[centre]) > 0.05
    # ... and it is the image of a crystal really at phi = 0: a spindle start of 1e-9
    # degrees (which C does rotate) gives the same picture
    _, nudged = case.render(tmp_path / "nudged", torch.float64, extra_args=["-phi", "1e-9"] + roi)
    assert _worst(fixed[centre], nudged[centre]) < 1e-6


# --------------------------------------------------------------------------- quirk 2: interpolation
@pytest.mark.golden
def test_interpolate_case_equals_nointerpolate(shared_cases, tmp_path, parity):
    case = shared_cases["interpolate"]
    sim, image = case.render(tmp_path / "i", torch.float64)
    assert "-interpolate" in case.args and sim.setup.interpolate is True
    # C switches interpolation off at the first out-of-range lookup: the first pixel here
    assert sim.interpolation_cutoff() == 0
    _, plain = case.render(tmp_path / "n", torch.float64, extra_args=["-nointerpolate"])
    assert np.allclose(image, plain, rtol=1e-12, atol=0)
    parity(plain, case.reference(), torch.float64, "interpolate rendered with -nointerpolate")


@pytest.mark.golden
def test_interpolate_wide_table_really_interpolates(shared_cases, tmp_path):
    case = shared_cases["interpolate_widehkl"]
    sim = case.simulation(tmp_path, torch.float64)
    assert sim.setup.interpolate is True and sim.interpolation_cutoff() is None
    nointerp = shared_cases["interpolate_widehkl_ref_nointerp"].reference()
    assert _worst(case.reference(), nointerp) > 1e-4  # the two C images differ


# --------------------------------------------------------------------------- 4096² tap configuration
@pytest.mark.golden
@pytest.mark.slow
def test_tap_configuration_4096(shared_golden):
    ref = np.load(shared_golden / "ref4096" / "tap_config4096_ref.npz")
    sim = torchbragg.Simulation.from_args(torchbragg.TAP_CONFIG_ARGS, dtype=torch.float32)
    image = sim.render().numpy()
    assert image.shape == (4096, 4096)
    binned = image.reshape(512, 8, 512, 8).sum(axis=(1, 3), dtype=np.float64)
    ref_binned = ref["binned8"].astype(np.float64)
    assert np.corrcoef(binned.ravel(), ref_binned.ravel())[0, 1] >= 0.9999
    total = float(image.sum(dtype=np.float64))
    assert abs(total / float(ref["sum"]) - 1.0) <= 1e-3
    assert abs(float(image.max()) / float(ref["max"]) - 1.0) <= 1e-3
    values = image[ref["slow"], ref["fast"]].astype(np.float64)
    expected = ref["values"].astype(np.float64)
    bad = np.abs(values - expected) > 1e-3 * np.abs(expected)
    assert not bad.any(), f"{int(bad.sum())} sampled pixels off by more than 1e-3 relative"
    assert image[2048, 2048] == pytest.approx(1.5320026, rel=1e-3)


# --------------------------------------------------------------------------- noise image
def _noise_run(case, tmp_path, monkeypatch, extra=()):
    """The torchbragg command's code path (what ``main`` runs), printing into a buffer."""
    monkeypatch.chdir(tmp_path)
    assert "-seed" in case.args and case.args[case.args.index("-seed") + 1] == "12345"
    out = io.StringIO()
    assert run_simulation(case.args + ["-noisefile", "noise.smv"] + list(extra), out=out) == 0
    return out.getvalue(), read_smv(tmp_path / "noise.smv")


@pytest.mark.golden
def test_c_random_generator_reproduces_c_noise_from_the_c_image(shared_cases):
    from torchbragg.c_random import poisson_noise_image

    case = shared_cases["water_noise_0p2um"]
    _, c_noise = read_smv(case.folder / "noise.smv")
    noise, photons, overloads = poisson_noise_image(case.reference().astype(np.float32), 12345, 40.0,
                                                    roi=(0, case.shape[1], 0, case.shape[0]))
    assert np.array_equal(noise, c_noise)
    assert f"{photons:.0f} photons on noise image ({overloads} overloads)" in case.log()


@pytest.mark.golden
def test_water_noise_cli_matches_c(shared_cases, tmp_path, monkeypatch):
    case = shared_cases["water_noise_0p2um"]
    out, (header, noise) = _noise_run(case, tmp_path, monkeypatch, ["-dtype", "float64"])
    c_header, c_noise = read_smv(case.folder / "noise.smv")
    assert header == c_header
    assert np.array_equal(noise, c_noise), f"{int((noise != c_noise).sum())} noise pixels differ"
    photons_line = next(l for l in case.log().splitlines() if "photons on noise image" in l)
    assert photons_line in out


@pytest.mark.golden
def test_water_noise_cli_default_dtype_matches_c(shared_cases, tmp_path, monkeypatch):
    case = shared_cases["water_noise_0p2um"]
    _, (_, noise) = _noise_run(case, tmp_path, monkeypatch)
    _, c_noise = read_smv(case.folder / "noise.smv")
    assert np.array_equal(noise, c_noise), f"{int((noise != c_noise).sum())} noise pixels differ"


@pytest.mark.golden
def test_float64_statistics_pick_the_c_maximum_pixel(shared_cases, tmp_path):
    case = shared_cases["hkl_partial_defaultF"]
    sim, _ = case.render(tmp_path, torch.float64)
    assert "max_I = 1.70847  at 0.02065 0.01255" in case.log()
    assert sim.last_stats.max_pixel == (125, 206)
    assert (sim.last_stats.max_I_fast_m, sim.last_stats.max_I_slow_m) == pytest.approx((0.02065, 0.01255))
