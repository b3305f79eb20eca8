"""Renders on a CUDA device: the GPU kernel and the eager kernel on the GPU.

Skipped on machines without CUDA (CI); ``scripts/gpu_check.sh`` runs this file on a
GPU machine. Without a GPU, ``test_gpu_kernel.py`` checks the same kernel source
built for the host.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchbragg
from torchbragg.kernels.gpu import GpuPlan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]


def _gpu_plan(sim) -> GpuPlan:
    plan = sim.compiled_plan()
    assert isinstance(plan, GpuPlan), plan
    assert plan.function(False) is not None, "GPU kernel did not compile or load"
    return plan


@pytest.mark.golden
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_render_matches_c(golden_case, dtype, tmp_path, parity):
    extra, copy = (["-use_fdump"], ["Fdump.bin"]) if golden_case.name == "stale_fdump" else ((), ())
    golden_case.stage(tmp_path, copy)
    sim = torchbragg.Simulation.from_args(golden_case.args + list(extra), cwd=tmp_path, dtype=dtype, device="cuda")
    _gpu_plan(sim)
    image = sim.render()
    assert image.device.type == "cuda" and image.dtype == dtype
    out = image.cpu().to(torch.float64).numpy()
    parity(out, golden_case.reference(), dtype, f"{golden_case.name} (cuda)")
    cpu = golden_case.simulation(tmp_path, dtype, extra, copy)
    ref = cpu.render().to(torch.float64).numpy()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert np.abs(out - ref).max() <= tol * np.abs(ref).max()
    a, b = sim.last_stats, cpu.last_stats
    assert a.pixels == b.pixels
    assert (a.max_I, a.mean, a.rms, a.rmsd, a.solid_angle_sr) == pytest.approx(
        (b.max_I, b.mean, b.rms, b.rmsd, b.solid_angle_sr), rel=1e-5)


def test_cuda_device_carries_its_index_and_cancels():
    sim = torchbragg.Simulation.from_args(torchbragg.TAP_CONFIG_ARGS[:-4] + ["-detpixels", "512", "-oversample", "2"],
                                          device="cuda")
    assert sim.device.index is not None and sim.device == torch.empty(0, device="cuda").device
    plan = _gpu_plan(sim)
    plan.min_pixels_per_chunk = 0
    plan.evaluations_per_chunk = 64 * 512 * 4  # 64 rows per launch
    seen = []
    image = sim.render(progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (512, 512) and len(seen) == 8 and sim.last_kernel == "GPU kernel"
    assert float(image.sum()) > 0
    with pytest.raises(torchbragg.RenderCancelled):
        sim.render(should_cancel=lambda: len(seen) > 9, progress=lambda d, t: seen.append((d, t)))


def test_cuda_fallback_map_equals_cpu(reference_case, tmp_path):
    case = reference_case("hkl_partial_defaultF")
    case.stage(tmp_path)
    gpu = torchbragg.Simulation.from_args(case.args, cwd=tmp_path, device="cuda")
    _gpu_plan(gpu)
    _, fmap = gpu.render_with_fallback()
    _, ref = torchbragg.Simulation.from_args(case.args, cwd=tmp_path).render_with_fallback()
    assert fmap.counts.device.type == "cuda"
    assert torch.equal(fmap.counts.cpu(), ref.counts) and torch.equal(fmap.reason.cpu(), ref.reason)


def test_cuda_tap_equals_cpu_tap():
    args = torchbragg.TAP_CONFIG_ARGS[:]
    args[args.index("-detpixels") + 1] = "256"
    a = torchbragg.Simulation.from_args(args, device="cuda").tap(128, 128, ["hkl_subpixel", "f_cell", "intensity"])
    b = torchbragg.Simulation.from_args(args).tap(128, 128, ["hkl_subpixel", "f_cell", "intensity"])
    assert len(a.rows) == len(b.rows) == 4
    for ra, rb in zip(a.rows, b.rows, strict=True):
        assert (ra["h0"], ra["k0"], ra["l0"], ra["F_cell"], ra["lookup"]) == (rb["h0"], rb["k0"], rb["l0"],
                                                                             rb["F_cell"], rb["lookup"])
        assert (ra["h"], ra["k"], ra["l"]) == pytest.approx((rb["h"], rb["k"], rb["l"]), abs=1e-9)
    assert a.final_intensity == pytest.approx(b.final_intensity, rel=1e-5)


@pytest.mark.parametrize("extra", [[], ["-curved_det", "-oversample_omega", "-mosaic", "0.3", "-mosaic_domains", "2"]],
                         ids=["plain", "curved_oversample_omega"])
def test_cuda_eager_kernel(extra):
    """The PyTorch kernel on the GPU (TORCHBRAGG_FAST=0, and what taps run) gives the CPU image."""
    args = torchbragg.TAP_CONFIG_ARGS[:]
    args[args.index("-detpixels") + 1] = "64"
    args += extra
    gpu = torchbragg.Simulation.from_args(args, device="cuda")
    gpu.use_compiled_kernels = False
    assert gpu.compiled_plan() is None
    a = gpu.render().cpu()
    b = torchbragg.Simulation.from_args(args).render()
    assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


@pytest.mark.golden
@pytest.mark.slow
def test_cuda_tap_configuration_4096(shared_golden):
    ref = np.load(shared_golden / "ref4096" / "tap_config4096_ref.npz")
    sim = torchbragg.Simulation.from_args(torchbragg.TAP_CONFIG_ARGS, device="cuda")
    _gpu_plan(sim)
    image = sim.render().cpu().numpy()
    values = image[ref["slow"], ref["fast"]].astype(np.float64)
    expected = ref["values"].astype(np.float64)
    assert not (np.abs(values - expected) > 1e-3 * np.abs(expected)).any()
    assert abs(float(image.sum(dtype=np.float64)) / float(ref["sum"]) - 1.0) <= 1e-3
    assert image[2048, 2048] == pytest.approx(1.5320026, rel=1e-3)
