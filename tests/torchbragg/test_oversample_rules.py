"""``-oversample_thick/_polar/_omega``: C's running product and ``-fix_oversample``.

C adds each evaluation's term to the pixel's running sum and then multiplies the
*whole sum* (water background and earlier terms included) by that evaluation's
capture fraction / polarisation / solid angle. ``-fix_oversample`` weights each
term by its own factors and the background by their mean. Both rules are checked
against an explicit loop over a tap's evaluations, and the three kernels (eager,
fused CPU, host build of the GPU kernel) must give the same image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchbragg
from torchbragg.kernels.gpu import GpuPlan
from torchbragg.resolve import R_E_SQR

BASE = torchbragg.TAP_CONFIG_ARGS[:-4] + [
    "-detpixels", "24", "-oversample", "2", "-mosaic", "0.5", "-mosaic_domains", "2", "-dispersion", "0.1",
    "-dispsteps", "2", "-detector_thick", "100", "-detector_thicksteps", "2", "-detector_abs", "300",
    "-polar", "0.8", "-water", "50", "-dmin", "2.5", "-distance", "100", "-pixel", "0.5"]
FLAG_SETS = [["-oversample_omega"], ["-oversample_thick"], ["-oversample_polar"],
             ["-oversample_omega", "-oversample_thick", "-oversample_polar"]]


def _explicit_pixel(args, slow, fast, running_product: bool) -> float:
    """The pixel value from a tap's per-evaluation numbers and the rule, written as a plain loop."""
    sim = torchbragg.Simulation.from_args(args, dtype=torch.float64)
    sim.use_compiled_kernels = False
    s = sim.setup
    res = sim.evaluate(torch.tensor([slow]), torch.tensor([fast]), detail=True)
    T, os_, S = s.thicksteps, s.oversample, len(s.source_lambdas)
    PM = s.phisteps * len(s.mosaic_umats)
    omega = res["omega"][0, 0].reshape(T, os_, os_).numpy()
    capture = res["capture"][0, 0].reshape(T, os_, os_).numpy()
    polar = res["polar"][0, 0].reshape(T, os_, os_, S).numpy()
    F_cell = res["F_cell"][0, 0].reshape(-1).double().numpy()
    F_latt = res["F_latt"][0, 0].reshape(-1).double().numpy()
    skipped = res["skipped"][0, 0].reshape(-1).numpy()
    I = s.I_bg if running_product else 0.0
    factors = []
    e = 0
    for t in range(T):
        for a in range(os_):
            for b in range(os_):
                for src in range(S):
                    for _ in range(PM):
                        f = 1.0
                        if s.oversample_thick:
                            f *= capture[t, a, b]
                        if s.oversample_omega:
                            f *= omega[t, a, b]
                        if s.oversample_polar:
                            f *= polar[t, a, b, src]
                        factors.append(f)
                        term = 0.0 if skipped[e] else F_cell[e] ** 2 * F_latt[e] ** 2
                        if running_product:
                            if not skipped[e]:
                                I = (I + term) * f
                        else:
                            I += term * f
                        e += 1
    if not running_product:
        I += s.I_bg * float(np.mean(factors))
    red = sim.reduce(res)  # the factors applied once at the end (first / last values: tested elsewhere)
    value = R_E_SQR * s.fluence * I / s.steps
    for name, flag in (("capture_applied", s.oversample_thick), ("polar_applied", s.oversample_polar),
                       ("omega_applied", s.oversample_omega)):
        if not flag:
            value *= float(red[name][0, 0])
    return value


@pytest.mark.parametrize("fix", [False, True], ids=["C", "fix_oversample"])
@pytest.mark.parametrize("flags", FLAG_SETS, ids=["omega", "thick", "polar", "all"])
def test_rule_equals_an_explicit_loop(flags, fix):
    args = BASE + flags + (["-fix_oversample"] if fix else [])
    sim = torchbragg.Simulation.from_args(args, dtype=torch.float64)
    image = sim.render()  # the fused kernel
    assert sim.compiled_plan() is not None
    for slow, fast in ((12, 12), (3, 20), (23, 0)):
        want = _explicit_pixel(args, slow, fast, running_product=not fix)
        assert float(image[slow, fast]) == pytest.approx(want, rel=1e-12), (slow, fast)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("fix", [False, True], ids=["C", "fix_oversample"])
@pytest.mark.parametrize("flags", FLAG_SETS, ids=["omega", "thick", "polar", "all"])
def test_eager_fused_and_gpu_kernels_agree(flags, fix, dtype):
    args = BASE + flags + (["-fix_oversample"] if fix else [])
    eager = torchbragg.Simulation.from_args(args, dtype=dtype)
    eager.use_compiled_kernels = False
    fused = torchbragg.Simulation.from_args(args, dtype=dtype)
    gpu = torchbragg.Simulation.from_args(args, dtype=dtype)
    gpu.__dict__["_compiled_plan_cache"] = (GpuPlan(gpu._tensors, emulate=True, **gpu.plan_arguments()),)
    a = eager.render().double()
    tol = 1e-12 if dtype == torch.float64 else 3e-6
    for sim in (fused, gpu):
        b = sim.render().double()
        assert float((a - b).abs().max()) <= tol * float(a.abs().max())
        assert sim.last_stats.solid_angle_sr == pytest.approx(eager.last_stats.solid_angle_sr,
                                                              rel=1e-9 if dtype == torch.float64 else 1e-6)


def test_fix_oversample_converges_to_the_plain_image_where_c_does_not():
    """Solid angle and polarisation vary little inside a pixel: weighted per term, the image is
    the plain one to within that variation; C's running product multiplies by omega (~1e-5 sr)
    again and again and leaves almost nothing."""
    plain = torchbragg.Simulation.from_args(BASE, dtype=torch.float64).render()
    for flags in (["-oversample_omega"], ["-oversample_polar"], ["-oversample_omega", "-oversample_polar"]):
        fixed = torchbragg.Simulation.from_args(BASE + flags + ["-fix_oversample"], dtype=torch.float64).render()
        assert float(fixed.sum() / plain.sum()) == pytest.approx(1.0, abs=2e-3), flags
        assert float(((fixed - plain).abs() / plain.abs().max()).max()) < 1e-2, flags
    c_rule = torchbragg.Simulation.from_args(BASE + ["-oversample_omega"], dtype=torch.float64).render()
    assert float(c_rule.sum() / plain.sum()) < 1e-6


def test_flag_is_reported():
    sim = torchbragg.Simulation.from_args(BASE + ["-oversample_omega", "-fix_oversample"])
    assert sim.config.compat.oversample_running_product is False
    tap = sim.tap(5, 5, ["omega", "intensity"])
    assert tap.meta["config"]["oversample_factors"] == {"thick": False, "polar": False, "omega": True,
                                                       "running_product": False}
    assert "-fix_oversample" in tap.values["omega"]["rule"]


@pytest.mark.parametrize("fix", [False, True], ids=["C", "fix_oversample"])
def test_interpolating_render_with_oversample_factors(tmp_path, fix):
    """Interpolated rows, the row where C switches interpolation off and the rows after it."""
    rng = np.random.default_rng(3)
    lines = [f"{h} {k} {l} {rng.uniform(50, 150):.3f}" for h in range(-3, 4) for k in range(-3, 4)
             for l in range(-3, 4)]
    (tmp_path / "small.hkl").write_text("\n".join(lines) + "\n")
    # a 10 Å cell with the beam at the top edge: |h| grows down the image, so the 4x4x4 neighbourhoods
    # leave the table's box some rows down
    args = ["-cell", "10", "10", "10", "90", "90", "90", "-N", "5", "-default_F", "100", "-detpixels", "32",
            "-oversample", "2", "-hkl", "small.hkl", "-interpolate", "-lambda", "1.0", "-distance", "100",
            "-pixel", "0.8", "-Xbeam", "0", "-Ybeam", "12.8", "-roi", "12", "20", "0", "31",
            "-oversample_omega", "-oversample_polar"] + (["-fix_oversample"] if fix else [])
    eager = torchbragg.Simulation.from_args(args, dtype=torch.float64, cwd=tmp_path)
    eager.use_compiled_kernels = False
    a = eager.render()
    cutoff = eager.interpolation_cutoff()
    assert cutoff is not None and 5 < cutoff // eager.evaluations_per_pixel // 32 < 25  # switches off mid-image
    fused = torchbragg.Simulation.from_args(args, dtype=torch.float64, cwd=tmp_path)
    gpu = torchbragg.Simulation.from_args(args, dtype=torch.float64, cwd=tmp_path)
    gpu.__dict__["_compiled_plan_cache"] = (GpuPlan(gpu._tensors, emulate=True, **gpu.plan_arguments()),)
    assert eager.last_kernel == "eager kernel"
    for sim, name in ((fused, "fused CPU kernel"), (gpu, "GPU kernel")):
        b = sim.render()
        assert sim.last_kernel == name + " + eager rows"  # the switch-off row
        assert float(b.abs().max()) > 0
        assert [m for m, _, _ in sim._row_segments(sim.compiled_plan(), False, cutoff, 0, 31, 32)] == [
            "interp", "eager", "fast"]
        assert float((a - b).abs().max()) <= 1e-12 * float(a.abs().max())
