"""The GPU render kernel (``gpu_render.cu``) without a GPU.

Its per-pixel code is built for the host (``GpuPlan(..., emulate=True)``) and
renders through the same ``Simulation`` path a CUDA render takes (chunks, row
statistics, fallback maps, the phi = 0 first pixel, interpolation segments);
the images must meet the golden criteria against the C program and agree with
the fused CPU kernel. Where the NVRTC library is installed (``nvidia-cuda-nvrtc``
in requirements.txt) every variant is compiled for the H100's architecture, so a
device-code error fails here rather than on a GPU machine.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import torchbragg
from torchbragg.kernels.gpu import GpuPlan, gpu_source, nvrtc_compile, nvrtc_library
from torchbragg.kernels.packing import compiled_kernels_unsupported

DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]
TAP = ["-cell", "100", "100", "100", "90", "90", "90", "-N", "5", "-default_F", "100", "-lambda", "0.5",
       "-distance", "500", "-pixel", "0.05", "-oversample", "2"]


def gpu_emulated(sim: torchbragg.Simulation) -> GpuPlan:
    """Make ``sim`` render with the host build of the GPU kernel; returns the plan."""
    plan = GpuPlan(sim._tensors, emulate=True, **sim.plan_arguments())
    assert plan.function(False) is not None, "the host build of gpu_render.cu failed"
    sim.__dict__["_compiled_plan_cache"] = (plan,)
    return plan


def both(args, dtype, cwd=None, fallback=False):
    """(CPU fused render, emulated GPU render, their simulations)."""
    cpu = torchbragg.Simulation.from_args(args, dtype=dtype, cwd=cwd)
    gpu = torchbragg.Simulation.from_args(args, dtype=dtype, cwd=cwd)
    assert gpu_emulated(gpu).function(fallback) is not None
    if fallback:
        return cpu.render_with_fallback(), gpu.render_with_fallback(), cpu, gpu
    return cpu.render(), gpu.render(), cpu, gpu


@pytest.mark.golden
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernel_matches_c(golden_case, dtype, tmp_path, parity):
    extra, copy = (["-use_fdump"], ["Fdump.bin"]) if golden_case.name == "stale_fdump" else ((), ())
    sim = golden_case.simulation(tmp_path, dtype, extra, copy)
    gpu_emulated(sim)
    image = sim.render().to(torch.float64).numpy()
    parity(image, golden_case.reference(), dtype, f"{golden_case.name} (GPU kernel, host build)")
    cpu = golden_case.simulation(tmp_path, dtype, extra, copy)
    ref = cpu.render().to(torch.float64).numpy()
    tol = 1e-12 if dtype == torch.float64 else 2e-6  # same arithmetic; float32 rounding may contract differently
    assert np.abs(image - ref).max() <= tol * np.abs(ref).max()
    a, b = sim.last_stats, cpu.last_stats
    assert a.pixels == b.pixels
    # mirror pixels tie to rounding: each kernel's maximum pixel is a maximum of the other's image
    assert ref[a.max_pixel] >= b.max_I * (1 - 1e-6) and image[b.max_pixel] >= a.max_I * (1 - 1e-6)
    assert (a.max_I, a.mean, a.rms, a.rmsd, a.solid_angle_sr) == pytest.approx(
        (b.max_I, b.mean, b.rms, b.rmsd, b.solid_angle_sr), rel=1e-6)


@pytest.mark.parametrize("flags", [[], ["-round_xtal"], ["-gauss_xtal"], ["-tophat_spots"]],
                         ids=["square", "round", "gauss", "tophat"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernel_shapes_sources_and_layers(flags, dtype):
    args = TAP + ["-detpixels", "48", "-mosaic", "0.5", "-mosaic_domains", "3", "-phi", "0", "-osc", "0.2",
                  "-phisteps", "2", "-dispersion", "0.1", "-dispsteps", "2", "-detector_thick", "100",
                  "-detector_thicksteps", "2", "-detector_abs", "300", "-polar", "0.8", "-dmin", "2.5"] + flags
    a, b, cpu, gpu = both(args, dtype)
    assert (cpu.last_kernel, gpu.last_kernel) == ("fused CPU kernel", "GPU kernel")
    assert gpu.evaluations_per_pixel == 2 * 4 * 2 * 2 * 3
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert float(a.max()) > 0
    assert float((a.double() - b.double()).abs().max()) <= tol * float(a.double().abs().max())
    # and both compiled kernels give the eager (reference) kernel's image
    eager = torchbragg.Simulation.from_args(args, dtype=dtype)
    eager.use_compiled_kernels = False
    ref = eager.render().double()
    for img in (a, b):
        assert float((img.double() - ref).abs().max()) <= tol * float(ref.abs().max())
    assert float(a[gpu.last_stats.max_pixel]) >= cpu.last_stats.max_I * (1 - 1e-6)  # mirror pixels tie


def test_gpu_kernel_fallback_map_equals_cpu_kernel(reference_case, tmp_path):
    case = reference_case("hkl_partial_defaultF")
    (img_c, map_c), (img_g, map_g), _, _ = both(case.args, torch.float32, cwd=case.stage(tmp_path), fallback=True)
    assert torch.equal(map_c.counts, map_g.counts) and torch.equal(map_c.reason, map_g.reason)
    assert int(map_g.counts.sum()) > 0 and set(map_g.reason.unique().tolist()) >= {0, 2}
    # the count variant renders the same image
    assert float((img_c.double() - img_g.double()).abs().max()) <= 2e-6 * float(img_c.abs().max())


def test_gpu_kernel_fallback_without_table():
    (_, map_c), (_, map_g), _, gpu = both(TAP + ["-detpixels", "32"], torch.float32, fallback=True)
    assert torch.equal(map_c.counts, map_g.counts) and torch.equal(map_c.reason, map_g.reason)
    assert bool((map_g.counts == gpu.evaluations_per_pixel).all()) and bool((map_g.reason == 1).all())


def test_gpu_kernel_mask_and_roi(tmp_path):
    mask = np.ones((40, 40), dtype=np.uint8)
    mask[5:9, 10:30] = 0
    args = TAP + ["-detpixels", "40", "-roi", "3", "35", "2", "30"]
    cpu = torchbragg.Simulation.from_args(args)
    gpu = torchbragg.Simulation.from_args(args)
    for sim in (cpu, gpu):
        sim.setup.mask = mask
    gpu_emulated(gpu)
    a, b = cpu.render(), gpu.render()
    assert float(b[5:9, 10:30].abs().max()) == 0.0 and float(b[:2].abs().max()) == 0.0
    assert float(b[10, 10]) > 0
    assert float((a - b).abs().max()) <= 2e-6 * float(a.abs().max())
    assert cpu.last_stats.pixels == gpu.last_stats.pixels == int(mask[2:31, 3:36].sum())


def test_gpu_plan_refuses_what_it_cannot_render():
    sim = torchbragg.Simulation.from_args(TAP + ["-detpixels", "16"])
    assert compiled_kernels_unsupported(sim._tensors, "cuda") == "not a CUDA render"
    # fractional N with a square crystal (from a crystal size) is the eager kernel's alone
    sim._tensors = dataclasses.replace(sim._tensors, N=(4.5, 5.0, 5.0))
    with pytest.raises(ValueError, match="fractional N"):
        gpu_emulated(sim)


@pytest.mark.parametrize("extra", [[], ["-detector_rotx", "5", "-detector_roty", "3", "-twotheta", "10"],
                                   ["-detector_thick", "100", "-detector_thicksteps", "2", "-detector_abs", "300"]],
                         ids=["plain", "rotated", "thick"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_curved_detector_in_every_kernel(extra, dtype):
    args = TAP[:-8] + ["-detpixels", "40", "-oversample", "2", "-curved_det", "-distance", "50",
                        "-pixel", "1"] + extra
    eager = torchbragg.Simulation.from_args(args, dtype=dtype)
    eager.use_compiled_kernels = False
    a = eager.render().double()
    flat = torchbragg.Simulation.from_args([x for x in args if x != "-curved_det"], dtype=dtype).render().double()
    assert float((a - flat).abs().max()) > 0.1 * float(a.abs().max())  # the curvature matters here
    a_fused, b, fused, gpu = both(args, dtype)
    assert fused.compiled_plan() is not None
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for img in (a_fused, b):
        assert float((a - img.double()).abs().max()) <= tol * float(a.abs().max())


def _nvrtc_available() -> bool:
    try:
        nvrtc_library()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC library not installed (pip install nvidia-cuda-nvrtc-cu12)")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["square", "round", "gauss", "tophat"])
def test_every_cuda_variant_compiles_for_hopper(dtype, shape):
    for table, count, interp, over in ((False, False, False, 0), (False, True, False, 0), (True, False, False, 0),
                                       (True, True, False, 0), (True, False, True, 0), (True, True, False, 1),
                                       (False, False, False, 2), (True, False, True, 2)):
        image, kind = nvrtc_compile(gpu_source(dtype, shape, table, count, interp, over), 90)
        assert kind == "cubin" and image[:4] == b"\x7fELF", (shape, table, count, interp, over)


@pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC library not installed")
def test_nvrtc_errors_name_the_file_and_line():
    with pytest.raises(RuntimeError, match=r"gpu_render\.cu\(\d+\).*undefined"):
        source = gpu_source(torch.float32, "square", False, False, False)
        broken = source.text().replace("double acc = 0.0,", "double acc = not_a_name,")  # compiled in every variant
        assert broken != source.text()
        nvrtc_compile(source.with_text(broken), 90)


def test_gpu_kernel_in_many_launches_equals_one(reference_case, tmp_path):
    """Row blocks (launches), their statistics and fallback maps combine to the one-launch result."""
    case = reference_case("cubic_hkl_mosflm")
    case.stage(tmp_path)
    roi = ["-roi", "103", "160", "85", "130"]  # 58 x 46 pixels holding spots of the sparse image
    one = torchbragg.Simulation.from_args(case.args + roi, cwd=tmp_path)
    many = torchbragg.Simulation.from_args(case.args + roi, cwd=tmp_path)
    gpu_emulated(one)
    plan = gpu_emulated(many)
    plan.evaluations_per_chunk = 7 * 58 * many.evaluations_per_pixel  # 7 rows of the ROI per launch
    plan.min_pixels_per_chunk = 0
    progress = []
    (a, fa), (b, fb) = one.render_with_fallback(), many.render_with_fallback(progress=lambda d, t: progress.append(d))
    assert len(progress) == 7 and progress[-1] == 46
    assert torch.equal(a, b) and torch.equal(fa.counts, fb.counts) and torch.equal(fa.reason, fb.reason)
    assert float(a[:85].abs().max()) == float(a[131:].abs().max()) == float(a[:, :103].abs().max()) == 0.0
    assert float(a[85:131, 103:161].abs().sum()) > 0
    sa, sb = one.last_stats, many.last_stats
    assert (sa.pixels, sa.max_pixel) == (sb.pixels, sb.max_pixel) == (46 * 58, sb.max_pixel)
    assert (sa.mean, sa.rms, sa.rmsd) == pytest.approx((sb.mean, sb.rms, sb.rmsd), rel=1e-12)


def test_tables_under_four_entries_along_an_axis_are_interpolated_eagerly(tmp_path):
    """tb_tricubic reads a 4x4x4 block: a thinner table leaves interpolation to the eager kernel."""
    lines = [f"{h} {k} {l} 10" for h in range(-1, 2) for k in range(-3, 4) for l in range(-3, 4)]
    (tmp_path / "thin.hkl").write_text("\n".join(lines) + "\n")
    sim = torchbragg.Simulation.from_args(TAP + ["-detpixels", "8", "-hkl", "thin.hkl", "-interpolate"], cwd=tmp_path)
    fused = sim.compiled_plan()
    gpu = GpuPlan(sim._tensors, emulate=True, **sim.plan_arguments())
    for plan in (fused, gpu):
        assert not plan.interpolates
        assert plan.function(False, interp=True) is None and plan.function(False) is not None
