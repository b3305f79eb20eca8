"""The GPU kernel's launch path, end to end, against a stand-in CUDA driver.

Without a GPU, everything between ``Simulation.render()`` and the kernel still
runs here: ``GpuPlan`` in CUDA mode, NVRTC compiling the kernel for sm_90 (where
the library is installed), the cubin cache, the driver calls (context, module,
function, launch) and the packing of the 16 kernel arguments. The stand-in
``libcuda`` is a small C library built by this test: it checks what a real
driver would refuse (no current context, a module that is not a cubin, a grid
too small for the block) and runs each "launch" by calling the host build of
the same kernel with the argument values it was given, so a mistake in the
argument order, types or addresses changes the image.
"""

from __future__ import annotations

import contextlib
import ctypes
import subprocess
import types

import pytest
import torch

import torchbragg
from torchbragg.kernels import gpu as gpu_kernel
from torchbragg.kernels.gpu import GpuPlan, gpu_source, nvrtc_library

FAKE_DRIVER = r"""
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
typedef int (*render_fn)(const double*, const int64_t*, const double*, const double*, const void*, const uint8_t*,
                         int64_t, int64_t, int64_t, int64_t, void*, int64_t, void*, uint8_t*, int64_t, double*);
static void* current = 0;
static void* const primary = (void*)0x1234;
static int launches = 0, loads = 0;
static const char* host_lib = 0;
void tb_fake_set_host(const char* path) { host_lib = strdup(path); }
int tb_fake_launches(void) { return launches; }
int tb_fake_loads(void) { return loads; }
int cuInit(unsigned flags) { return flags == 0 ? 0 : 1; }
int cuGetErrorString(int e, const char** s) { static const char m[] = "stand-in driver error"; *s = m; return 0; }
int cuCtxGetCurrent(void** c) { *c = current; return 0; }
int cuDeviceGet(int* d, int i) { *d = i; return i == 0 ? 0 : 101; }
int cuDevicePrimaryCtxRetain(void** c, int d) { *c = primary; return 0; }
int cuDevicePrimaryCtxRelease_v2(int d) { return 0; }
int cuCtxSetCurrent(void* c) { current = c; return 0; }
int cuModuleLoadData(void** m, const void* image) {
    if (current != primary) return 201;                      /* CUDA_ERROR_INVALID_CONTEXT */
    if (memcmp(image, "\x7f" "ELF", 4) != 0) return 200;     /* CUDA_ERROR_INVALID_IMAGE */
    ++loads;
    *m = (void*)0x5678;
    return 0;
}
int cuModuleGetFunction(void** f, void* m, const char* name) {
    if (m != (void*)0x5678 || strcmp(name, "tb_render") != 0) return 500;   /* CUDA_ERROR_NOT_FOUND */
    void* h = dlopen(host_lib, RTLD_NOW);
    if (!h) return 300;
    *f = dlsym(h, "tb_render_host");
    return *f ? 0 : 500;
}
int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shmem, void* stream, void** p, void** extra) {
    if (current != primary) return 201;
    int64_t nrows = *(int64_t*)p[7], ncols = *(int64_t*)p[9];
    if (gy != 1 || gz != 1 || by != 1 || bz != 1 || bx == 0 || bx > 1024 || extra != 0) return 1;
    if ((unsigned long long)gx * bx < (unsigned long long)(nrows * ncols)) return 1;
    ++launches;
    return ((render_fn)f)(*(const double**)p[0], *(const int64_t**)p[1], *(const double**)p[2],
                          *(const double**)p[3], *(const void**)p[4], *(const uint8_t**)p[5], *(int64_t*)p[6],
                          nrows, *(int64_t*)p[8], ncols, *(void**)p[10], *(int64_t*)p[11], *(void**)p[12],
                          *(uint8_t**)p[13], *(int64_t*)p[14], *(double**)p[15]);
}
"""


@pytest.fixture
def fake_cuda(tmp_path, monkeypatch):
    """torch.cuda's few calls and libcuda replaced; GPU plans then launch through the stand-in driver."""
    from torchbragg.kernels.build import cxx_compiler

    cxx = cxx_compiler()
    if cxx is None:
        pytest.skip("no C compiler")
    src = tmp_path / "fake_cuda.c"
    src.write_text(FAKE_DRIVER)
    lib_path = tmp_path / "libcuda_fake.so"
    subprocess.run([cxx, "-x", "c", "-shared", "-fPIC", "-O1", str(src), "-o", str(lib_path), "-ldl"], check=True)
    monkeypatch.setattr(gpu_kernel, "_driver", gpu_kernel._Driver(str(lib_path)))
    monkeypatch.setattr(gpu_kernel, "_variants", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index=None: types.SimpleNamespace(cuda_stream=0))
    try:
        nvrtc_library()
    except OSError:  # no NVRTC here: any ELF image will do for the stand-in driver
        monkeypatch.setattr(gpu_kernel, "nvrtc_compile", lambda source, arch: (b"\x7fELF stand-in", "cubin"))
        monkeypatch.setattr(gpu_kernel, "nvrtc_version", lambda: (0, 0))
    return ctypes.CDLL(str(lib_path))


def _cuda_mode(sim) -> GpuPlan:
    """A GpuPlan of ``sim`` in CUDA mode (emulate=False) whose tensors stay on the CPU."""
    plan = GpuPlan(sim._tensors, emulate=True, **sim.plan_arguments())
    plan.emulate = False
    sim.__dict__["_compiled_plan_cache"] = (plan,)
    return plan


@pytest.mark.parametrize("extra", [[], ["-mosaic", "0.3", "-mosaic_domains", "2", "-roi", "5", "40", "3", "30"]],
                         ids=["full", "mosaic_roi"])
def test_render_through_the_driver_launch(fake_cuda, tmp_path, extra):
    # a partial table: lookups inside it, unlisted ones and ones outside its box (all three reasons)
    lines = [f"{h} {k} {l} {10 + h + 2 * k + 3 * l}" for h in range(-2, 3) for k in range(-2, 3)
             for l in range(-2, 3) if (h + k + l) % 3]
    (tmp_path / "partial.hkl").write_text("\n".join(lines) + "\n")
    args = ["-cell", "100", "100", "100", "90", "90", "90", "-hkl", "partial.hkl", "-default_F", "50", "-N", "3",
            "-lambda", "1.0", "-distance", "100", "-pixel", "0.4", "-detpixels", "48", "-oversample", "2"] + extra
    ref_sim = torchbragg.Simulation.from_args(args, cwd=tmp_path)  # the emulated plan is the reference
    ref_sim.__dict__["_compiled_plan_cache"] = (GpuPlan(ref_sim._tensors, emulate=True, **ref_sim.plan_arguments()),)
    ref, ref_map = ref_sim.render_with_fallback()
    assert set(ref_map.reason.unique().tolist()) == {0, 2, 3} and float(ref.abs().max()) > 0  # all to get wrong

    sim = torchbragg.Simulation.from_args(args, cwd=tmp_path)
    plan = _cuda_mode(sim)
    fake_cuda.tb_fake_set_host.argtypes = [ctypes.c_char_p]
    for count in (False, True):
        # the stand-in's "module" is the host build of the same variant's source
        host = gpu_kernel.host_library(gpu_source(sim.dtype, "square", True, count, False))
        fake_cuda.tb_fake_set_host(str(host).encode())
        fn = plan.function(count)
        assert isinstance(fn, tuple) and fn[0] == 0, fn  # (device index, CUfunction) from the driver
    image, fmap = sim.render_with_fallback()
    assert fake_cuda.tb_fake_launches() == 1
    assert torch.equal(image, ref)
    assert torch.equal(fmap.counts, ref_map.counts) and torch.equal(fmap.reason, ref_map.reason)
    assert sim.last_stats == ref_sim.last_stats and sim.last_kernel == "GPU kernel"
    # the module was loaded once per variant and the context made current by the plan itself
    assert fake_cuda.tb_fake_loads() == 2


def test_driver_errors_are_named(fake_cuda):
    driver = gpu_kernel._driver
    with pytest.raises(RuntimeError, match=r"cuModuleLoadData failed \(200: stand-in driver error\)"):
        driver.function(0, b"not a cubin\0", b"tb_render")
    with pytest.raises(RuntimeError, match=r"cuDeviceGet failed \(101"):
        driver.ensure_context(3)
