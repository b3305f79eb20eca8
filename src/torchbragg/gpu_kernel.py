"""The GPU render kernel: ``gpu_render.cu`` compiled at run time with NVRTC.

One CUDA thread renders one pixel: every (thickness, subpixel, source, phi,
mosaic) evaluation of it in C's loop order, with the arithmetic of the fused
CPU kernel (:class:`torchbragg.kernel.FastPlan`), whose parameter packing it
reuses. The source is compiled by NVRTC, the CUDA runtime compiler that comes
with PyTorch's CUDA wheels (no nvcc, no host compiler), into a cubin for the
device's architecture, cached on disk next to the CPU kernels
(:func:`torchbragg.kernel.kernel_cache_dir`), and launched through the CUDA
driver API on PyTorch's current stream, writing straight into the image
tensor.

The same source also compiles as plain C++ (``tb_render_host``): the very
same per-pixel function run over the pixels one after another. The test suite
uses that build (:class:`GpuPlan` with ``emulate=True``) to check the GPU
kernel's physics against the eager kernel and the C program's images on
machines without a GPU, and compiles the CUDA build with NVRTC where the NVRTC
library is installed.

``TORCHBRAGG_FAST=0`` switches this kernel off as it does the CPU one; a
set-up the kernel does not cover (:func:`gpu_unsupported`) or a machine
without NVRTC falls back to the eager PyTorch kernel with a warning.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .kernel import (RENDER_ARGTYPES, ROW_STATS, SHAPE_CODES, FastPlan, KernelTensors, cached_file,
                     compile_shared_library, cxx_compiler, fused_unsupported, kernel_source, row_statistics)

__all__ = ["GpuPlan", "gpu_unsupported", "gpu_source", "host_library", "nvrtc_compile", "nvrtc_library"]

SOURCE_PATH = Path(__file__).with_name("gpu_render.cu")
#: threads per CUDA block
BLOCK_THREADS = 128
_lock = threading.Lock()


def gpu_unsupported(kt: KernelTensors) -> Optional[str]:
    """Why the GPU kernel cannot render this set-up (None: it can)."""
    if kt.device.type != "cuda":
        return "not a CUDA render"
    return fused_unsupported(kt)


def gpu_source(dtype: torch.dtype, shape: str, table: bool, count: bool, interp: bool, over: int = 0) -> str:
    """The kernel source of one variant: parameter indices, variant switches, gpu_render.cu (with
    kernel_math.h)."""
    double = dtype == torch.float64
    lines = [f"#define TB_REAL {'double' if double else 'float'}", f"#define TB_DOUBLE {int(double)}",
             f"#define TB_SHAPE {SHAPE_CODES[shape]}", f"#define TB_TABLE {int(table)}",
             f"#define TB_COUNT {int(count)}", f"#define TB_INTERP {int(interp and table)}",
             f"#define TB_OVER {int(over)}"]
    return kernel_source("\n".join(lines) + "\n" + SOURCE_PATH.read_text())


# ----------------------------------------------------------------- NVRTC
def _library_candidates(stem: str) -> List[str]:
    """Where a CUDA library may be: the loader's path, pip's nvidia-* packages, CUDA_HOME."""
    major = (torch.version.cuda or "").split(".")[0]
    names = ([f"{stem}.so.{major}"] if major else []) + [f"{stem}.so"]
    found: List[str] = list(names)
    roots = [p for p in sys.path if p and os.path.isdir(os.path.join(p, "nvidia"))]
    for root in roots:
        found += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", f"{stem}.so*")), reverse=True)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            found += sorted(glob.glob(os.path.join(home, "lib64", f"{stem}.so*")), reverse=True)
    return [f for f in found if not f.endswith((".alt.so", ".alt.so.12", ".alt.so.13"))]


_nvrtc: Optional[ctypes.CDLL] = None


def nvrtc_library() -> ctypes.CDLL:
    """The NVRTC library (``libnvrtc``); OSError naming the places tried when there is none."""
    global _nvrtc
    if _nvrtc is not None:
        return _nvrtc
    tried = _library_candidates("libnvrtc")
    for name in tried:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        _nvrtc = lib
        return lib
    raise OSError("NVRTC not found (tried " + ", ".join(tried[:6]) + "); install PyTorch's CUDA build "
                  "or nvidia-cuda-nvrtc")


def nvrtc_version() -> Tuple[int, int]:
    lib = nvrtc_library()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def _supported_archs() -> List[int]:
    lib = nvrtc_library()
    n = ctypes.c_int()
    if lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)) != 0:
        return []
    archs = (ctypes.c_int * n.value)()
    lib.nvrtcGetSupportedArchs(archs)
    return list(archs)


def nvrtc_compile(source: str, arch: int, options: Tuple[str, ...] = (),
                  name: str = "gpu_render.cu") -> Tuple[bytes, str]:
    """Compile CUDA C++ with NVRTC for ``sm_<arch>`` (e.g. 90 for an H100).

    Returns ``(image, kind)``: a cubin (``kind == "cubin"``) when NVRTC knows the
    architecture, else PTX for the newest architecture it knows (``"ptx"``, which
    the driver compiles on load). Raises RuntimeError with NVRTC's log on errors.
    """
    lib = nvrtc_library()
    known = _supported_archs()
    if not known or arch in known:
        target, kind = f"--gpu-architecture=sm_{arch}", "cubin"
    else:
        lower = [a for a in known if a <= arch] or known
        target, kind = f"--gpu-architecture=compute_{max(lower)}", "ptx"
    opts = [target, "--std=c++17", *options]
    prog = ctypes.c_void_p()

    def check(rc, what):
        if rc != 0:
            raise RuntimeError(f"NVRTC {what}: {lib.nvrtcGetErrorString(rc).decode()}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None), "create")
    try:
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        log_text = log.value.decode(errors="replace").strip()
        if rc != 0:
            raise RuntimeError(f"NVRTC could not compile {name} ({' '.join(opts)}):\n{log_text}")
        getsize, get = ((lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN) if kind == "cubin"
                        else (lib.nvrtcGetPTXSize, lib.nvrtcGetPTX))
        check(getsize(prog, ctypes.byref(size)), "size")
        buf = ctypes.create_string_buffer(size.value)
        check(get(prog, buf), "output")
        return buf.raw, kind
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ------------------------------------------------------------ driver API
class _Driver:
    """The few CUDA driver calls the launch needs (libcuda, through ctypes)."""

    def __init__(self, library: str = "libcuda.so.1"):
        self.lib = ctypes.CDLL(library)
        self._check(self.lib.cuInit(0), "cuInit")
        self.modules: Dict[tuple, tuple] = {}

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(msg))
            raise RuntimeError(f"CUDA {what} failed ({rc}: {(msg.value or b'?').decode()})")

    def ensure_context(self, device_index: int) -> None:
        """Make the device's primary context (the one PyTorch uses) current on this thread."""
        ctx = ctypes.c_void_p()
        self._check(self.lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        dev = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(dev), device_index), "cuDeviceGet")
        primary = ctypes.c_void_p()
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(primary), dev), "cuDevicePrimaryCtxRetain")
        if ctx.value != primary.value:
            self._check(self.lib.cuCtxSetCurrent(primary), "cuCtxSetCurrent")
        # PyTorch holds its own reference to the primary context (its tensors live there)
        release = getattr(self.lib, "cuDevicePrimaryCtxRelease_v2", None) or self.lib.cuDevicePrimaryCtxRelease
        release(dev)

    def function(self, device_index: int, image: bytes, name: bytes) -> ctypes.c_void_p:
        key = (device_index, hashlib.sha256(image).hexdigest(), name)
        if key not in self.modules:
            self.ensure_context(device_index)
            mod = ctypes.c_void_p()
            self._check(self.lib.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(image)), "cuModuleLoadData")
            fn = ctypes.c_void_p()
            self._check(self.lib.cuModuleGetFunction(ctypes.byref(fn), mod, name), "cuModuleGetFunction")
            self.modules[key] = (mod, fn)
        return self.modules[key][1]

    def launch(self, fn: ctypes.c_void_p, grid: int, block: int, stream: int, args: list) -> None:
        # cuLaunchKernel takes the address of each argument's value
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        self._check(self.lib.cuLaunchKernel(fn, ctypes.c_uint(grid), 1, 1, ctypes.c_uint(block), 1, 1, 0,
                                            ctypes.c_void_p(stream), params, None), "cuLaunchKernel")


_driver: Optional[_Driver] = None


def _get_driver() -> _Driver:
    global _driver
    with _lock:
        if _driver is None:
            _driver = _Driver()
        return _driver


# ----------------------------------------------------------------- plans
_variants: Dict[tuple, object] = {}
_errors: Dict[tuple, str] = {}


def _host_function(source: str):
    """``tb_render_host`` of the source built as plain C++ (cached)."""
    fn = ctypes.CDLL(str(host_library(source))).tb_render_host
    fn.argtypes = RENDER_ARGTYPES
    fn.restype = ctypes.c_int
    return fn


def host_library(source: str) -> Path:
    """The shared library of a kernel source built for the host (cached), exporting ``tb_render_host``."""
    cxx = cxx_compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    flags = ["-O2", "-std=c++17", "-shared", "-fPIC", "-x", "c++"]
    return cached_file("tb_gpu_", (source, cxx, *flags, "host"), ".so",
                       lambda out: compile_shared_library(cxx, (flags,), source, out, source_suffix=".cu"))


def _with_index(device: torch.device) -> torch.device:
    """``device`` with its index: cuda -> cuda:<current device>; other devices unchanged."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _cuda_function(source: str, device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    arch = 10 * major + minor

    def build(tmp):
        image, _ = nvrtc_compile(source, arch)  # a cubin, or PTX the driver compiles on load
        with open(tmp, "wb") as fh:
            fh.write(image)

    path = cached_file("tb_gpu_", (source, f"sm_{arch}", "nvrtc %d.%d" % nvrtc_version()), ".bin", build)
    image = path.read_bytes()
    if not image.startswith(b"\x7fELF"):
        image += b"\0"  # PTX text is loaded as a NUL-terminated string
    driver = _get_driver()
    fn = driver.function(index, image, b"tb_render")
    return index, fn


class GpuPlan:
    """The GPU kernel bound to one simulation: parameters on the device, compiled variants.

    Same interface as :class:`~torchbragg.kernel.FastPlan` (``function``, ``run``), so
    :class:`~torchbragg.simulation.Simulation` renders with either. ``emulate=True`` runs the
    kernel's per-pixel code on the CPU (a host build of ``gpu_render.cu``), for tests.
    """

    #: what ``Simulation.last_kernel`` calls this kernel
    label = "GPU kernel"
    #: evaluations per launch: one launch covers a 4096² image at 4 evaluations per pixel; the
    #: block size only sets how often progress and cancellation are checked
    evaluations_per_chunk = 1 << 27
    #: ... but at least this many pixels per launch (one thread each), so that a set-up with many
    #: evaluations per pixel still fills the GPU
    min_pixels_per_chunk = 1 << 20

    def __init__(self, kt: KernelTensors, *, I_bg: float, scale: float, fpixels: int,
                 mask: Optional[np.ndarray] = None, emulate: bool = False,
                 oversample_factors: Tuple[bool, bool, bool] = (False, False, False), running_product: bool = True):
        why = fused_unsupported(kt) if emulate else gpu_unsupported(kt)
        if why is not None:
            raise ValueError(why)
        self.kt = kt
        self.emulate = bool(emulate)
        #: where the parameters live and the outputs must be; "cuda" gets its index (tensors made
        #: on torch.device("cuda") report cuda:N, and the two do not compare equal)
        self.device = torch.device("cpu") if emulate else _with_index(kt.device)
        self.dtype = kt.dtype
        self.packing = FastPlan(kt, I_bg=I_bg, scale=scale, fpixels=fpixels, mask=mask,
                                oversample_factors=oversample_factors, running_product=running_product)
        pk, dev = self.packing, self.device
        self.evaluations_per_pixel = pk.evaluations_per_pixel
        self.count_dtype = pk.count_dtype
        self.dparams = torch.from_numpy(pk.dparams).to(dev)
        self.iparams = torch.from_numpy(pk.iparams).to(dev)
        self.lattice = torch.from_numpy(pk.lattice).to(dev)
        self.src = torch.from_numpy(pk.src).to(dev)
        self.table = None if pk.table is None else pk.table.to(dev)
        self._flagged = None
        self.mask = None if pk.mask is None else torch.from_numpy(pk.mask).to(dev)

    def flagged_table(self) -> torch.Tensor:
        if self._flagged is None:
            self._flagged = self.packing.flagged_table().to(self.device)
        return self._flagged

    def wide_table(self) -> torch.Tensor:
        """The table in float64 for the interpolating variants (the same values)."""
        if getattr(self, "_wide", None) is None:
            self._wide = self.packing.wide_table().to(self.device)
        return self._wide

    def function(self, count: bool, interp: bool = False):
        """The compiled variant (compiling it on first use), or None with a warning."""
        table = self.table is not None
        if interp and table and not self.packing.interpolates:
            return None  # a table under 4 entries along an axis: the eager kernel interpolates
        over = self.packing.over
        key = (self.emulate, str(self.device), self.dtype, self.kt.shape, table, bool(count), bool(interp and table),
               over)
        with _lock:
            if key in _variants:
                return _variants[key]
        source = gpu_source(self.dtype, self.kt.shape, table, count, interp, over)
        fn = None
        try:
            fn = _host_function(source) if self.emulate else _cuda_function(source, self.device)
        except Exception as err:  # no NVRTC / driver / compiler: the eager kernel renders
            _errors[key] = f"{type(err).__name__}: {err}"
            warnings.warn(f"torchbragg: GPU render kernel unavailable ({err}); using the eager kernel",
                          RuntimeWarning, stacklevel=3)
        with _lock:
            _variants[key] = fn
        return fn

    def scan_function(self):
        return None  # C's interpolation switch-off scan runs on the CPU (Simulation._scan_plan)

    def run(self, row0: int, nrows: int, col0: int, ncols: int, image: torch.Tensor,
            counts: Optional[torch.Tensor] = None, reasons: Optional[torch.Tensor] = None,
            threads: Optional[int] = None, interp: bool = False, stats: bool = True) -> Optional[np.ndarray]:
        """Render rows ``row0 ..``, columns ``col0 ..`` into ``image`` (see :meth:`FastPlan.run`).

        Returns the ``[nrows, 8]`` row statistics (:data:`~torchbragg.kernel.ROW_STATS`),
        reduced on the device; with ``stats=False`` only launches the kernel (asynchronously on
        the current stream; for timing the kernel alone) and returns None.
        """
        count = counts is not None
        fn = self.function(count, interp)
        if fn is None:
            raise RuntimeError("GPU kernel unavailable")
        for t, dt in ((image, self.dtype), (counts, self.count_dtype), (reasons, torch.uint8)):
            if t is not None and (t.dtype != dt or tuple(t.shape) != (nrows, ncols) or t.stride(1) != 1
                                  or t.device != self.device):
                raise ValueError(f"GPU kernel output must be a row-strided {self.device} view of the block")
        if count and counts.stride(0) != reasons.stride(0):
            raise ValueError("counts and reasons must share a row stride")
        if nrows <= 0 or ncols <= 0:
            return np.zeros((0, len(ROW_STATS)))
        omega = torch.empty((nrows, ncols), dtype=torch.float64, device=self.device)
        table = self.table
        if count and table is not None and not interp:
            table = self.flagged_table()
        if interp and table is not None:
            table = self.wide_table()
        ptrs = [self.dparams, self.iparams, self.lattice, self.src, table, self.mask]
        args = [ctypes.c_void_p(t.data_ptr() if t is not None else None) for t in ptrs]
        args += [ctypes.c_int64(row0), ctypes.c_int64(nrows), ctypes.c_int64(col0), ctypes.c_int64(ncols),
                 ctypes.c_void_p(image.data_ptr()), ctypes.c_int64(image.stride(0)),
                 ctypes.c_void_p(counts.data_ptr() if count else None),
                 ctypes.c_void_p(reasons.data_ptr() if count else None),
                 ctypes.c_int64(counts.stride(0) if count else 0), ctypes.c_void_p(omega.data_ptr())]
        if self.emulate:
            rc = fn(*args)
            if rc != 0:
                raise RuntimeError(f"GPU kernel (host build) failed ({rc})")
        else:
            index, cu_fn = fn
            driver = _get_driver()
            with torch.cuda.device(index):
                driver.ensure_context(index)
                stream = torch.cuda.current_stream(index).cuda_stream
                grid = -(-nrows * ncols // BLOCK_THREADS)
                driver.launch(cu_fn, grid, BLOCK_THREADS, stream, args)
        if not stats:
            return None
        active = None if self.mask is None else self.mask[row0:row0 + nrows, col0:col0 + ncols] != 0
        return row_statistics(image, active, omega.sum(-1))
