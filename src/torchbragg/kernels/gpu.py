"""The GPU render kernel: ``gpu_render.cu`` compiled at run time with NVRTC.

One CUDA thread renders one pixel: every (thickness, subpixel, source, phi,
mosaic) evaluation of it in C's loop order, with the arithmetic of the fused
CPU kernel (:class:`torchbragg.kernels.cpu.CpuPlan`), over the same parameter
packing (:class:`torchbragg.kernels.packing.KernelParameters`) and the same
physics (``kernel_math.h``). The source is compiled by NVRTC, the CUDA runtime
compiler that comes with PyTorch's CUDA wheels (no nvcc, no host compiler), into a cubin for the
device's architecture, cached on disk next to the CPU kernels
(:func:`torchbragg.kernels.build.kernel_cache_dir`), and launched through the CUDA
driver API on PyTorch's current stream, writing straight into the image
tensor.

The same source also compiles as plain C++ (``tb_render_host``): the very
same per-pixel function run over the pixels one after another. The test suite
uses that build (:class:`GpuPlan` with ``emulate=True``) to check the GPU
kernel's physics against the eager kernel and the C program's images on
machines without a GPU, and compiles the CUDA build with NVRTC where the NVRTC
library is installed.

``TORCHBRAGG_FAST=0`` switches this kernel off as it does the CPU one; a
set-up the kernel does not cover (:func:`~torchbragg.kernels.packing.compiled_kernels_unsupported`) or a machine
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

import numpy as np
import torch

from .build import NativeSource, cached_build, compile_shared_library, cxx_compiler, slow_path_note
from .eager import KernelTensors
from .packing import RENDER_ARGTYPES, KernelParameters, compiled_kernels_unsupported, variant_defines
from .row_stats import ROW_STATS, row_statistics

__all__ = ["GpuPlan", "gpu_source", "host_library", "nvrtc_compile", "nvrtc_library"]

#: threads per CUDA block
BLOCK_THREADS = 128
_lock = threading.Lock()


def gpu_source(dtype: torch.dtype, shape: str, table: bool, count: bool, interp: bool, over: int = 0) -> NativeSource:
    """``gpu_render.cu`` with the switches of one variant (see :func:`~torchbragg.kernels.packing.variant_defines`).

    Parameters
    ----------
    dtype : torch.dtype
        The render dtype, float32 or float64.
    shape : str
        Crystal shape, a key of :data:`~torchbragg.kernels.packing.SHAPE_CODES`.
    table : bool
        Whether the set-up has a structure-factor table.
    count : bool
        Whether the variant also writes the default_F fallback maps.
    interp : bool
        Whether every lookup is interpolated (only with a table).
    over : int, optional
        The -oversample_* rule: 0 none, 1 C's running product, 2 per-term weighting.

    Returns
    -------
    NativeSource
        The source file name and its ``NAME=VALUE`` switches.
    """
    return NativeSource("gpu_render.cu", tuple(variant_defines(dtype, shape, table, count, interp, over)))


# ----------------------------------------------------------------- NVRTC
def _library_candidates(stem: str) -> list[str]:
    """Where a CUDA library may be: the loader's path, pip's nvidia-* packages, CUDA_HOME."""
    major = (torch.version.cuda or "").split(".")[0]
    names = ([f"{stem}.so.{major}"] if major else []) + [f"{stem}.so"]
    found: list[str] = list(names)
    roots = [p for p in sys.path if p and os.path.isdir(os.path.join(p, "nvidia"))]
    for root in roots:
        found += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", f"{stem}.so*")), reverse=True)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            found += sorted(glob.glob(os.path.join(home, "lib64", f"{stem}.so*")), reverse=True)
    return [f for f in found if not f.endswith((".alt.so", ".alt.so.12", ".alt.so.13"))]


_nvrtc: ctypes.CDLL | None = None


def nvrtc_library() -> ctypes.CDLL:
    """The NVRTC library (``libnvrtc``); OSError naming the places tried when there is none.

    The first library that loads is kept for the rest of the process.

    Returns
    -------
    ctypes.CDLL
        The loaded NVRTC library.

    Raises
    ------
    OSError
        When no candidate (the loader's path, pip's ``nvidia-*`` packages, ``CUDA_HOME``/``CUDA_PATH``,
        ``/usr/local/cuda``) loads; the message names the first few tried.
    """
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


def nvrtc_version() -> tuple[int, int]:
    """The NVRTC library's version.

    Returns
    -------
    tuple of int
        ``(major, minor)``.
    """
    lib = nvrtc_library()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def _supported_archs() -> list[int]:
    lib = nvrtc_library()
    n = ctypes.c_int()
    if lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)) != 0:
        return []
    archs = (ctypes.c_int * n.value)()
    lib.nvrtcGetSupportedArchs(archs)
    return list(archs)


def nvrtc_compile(source: NativeSource, arch: int, options: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """Compile a CUDA source with NVRTC for ``sm_<arch>`` (e.g. 90 for an H100).

    Parameters
    ----------
    source : NativeSource
        The file (its headers go to NVRTC as its header list) and its ``-D`` switches.
    arch : int
        The compute capability, major * 10 + minor.
    options : tuple of str, optional
        More NVRTC options.

    Returns
    -------
    (bytes, str)
        ``(image, kind)``: a cubin (``kind == "cubin"``) when NVRTC knows the
        architecture, else PTX for the newest architecture it knows (``"ptx"``,
        which the driver compiles on load).

    Raises
    ------
    RuntimeError
        With NVRTC's log (file and line) when the source does not compile.
    """
    name = source.name
    lib = nvrtc_library()
    known = _supported_archs()
    if not known or arch in known:
        target, kind = f"--gpu-architecture=sm_{arch}", "cubin"
    else:
        lower = [a for a in known if a <= arch] or known
        target, kind = f"--gpu-architecture=compute_{max(lower)}", "ptx"
    opts = [target, "--std=c++17", *source.define_flags(), *options]
    headers = source.headers()
    n_headers = len(headers)
    header_texts = (ctypes.c_char_p * n_headers)(*[t.encode() for t in headers.values()])
    header_names = (ctypes.c_char_p * n_headers)(*[k.encode() for k in headers])
    prog = ctypes.c_void_p()

    def check(rc, what):
        if rc != 0:
            raise RuntimeError(f"NVRTC {what}: {lib.nvrtcGetErrorString(rc).decode()}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.text().encode(), name.encode(), n_headers,
                                 header_texts, header_names), "create")
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
        self.modules: dict[tuple, tuple] = {}

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


_driver: _Driver | None = None


def _get_driver() -> _Driver:
    global _driver
    with _lock:
        if _driver is None:
            _driver = _Driver()
        return _driver


# ----------------------------------------------------------------- plans
_variants: dict[tuple, object] = {}
_errors: dict[tuple, str] = {}


def _host_function(source: NativeSource):
    """``tb_render_host`` of the source built as plain C++ (cached)."""
    fn = ctypes.CDLL(str(host_library(source))).tb_render_host
    fn.argtypes = RENDER_ARGTYPES
    fn.restype = ctypes.c_int
    return fn


#: the host build's compiler flags (``-x c++``: the .cu file compiled as C++)
HOST_FLAGS = ["-O2", "-std=c++17", "-shared", "-fPIC"]


def host_library(source: NativeSource) -> Path:
    """The shared library of the GPU source built for the host (cached), exporting ``tb_render_host``.

    Parameters
    ----------
    source : NativeSource
        ``gpu_render.cu`` and its switches (:func:`gpu_source`).

    Returns
    -------
    pathlib.Path
        The library in the kernel cache (built with the system C++ compiler, ``-x c++``, on first use).

    Raises
    ------
    RuntimeError
        When no C++ compiler is found.
    """
    cxx = cxx_compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    return cached_build("tb_gpu_", source, (cxx, *HOST_FLAGS, "host"), ".so",
                        lambda out: compile_shared_library(cxx, (HOST_FLAGS,), source, out, extra=("-x", "c++")))


def _with_index(device: torch.device) -> torch.device:
    """``device`` with its index: cuda -> cuda:<current device>; other devices unchanged."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _cuda_function(source: NativeSource, device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    arch = 10 * major + minor

    def build(tmp):
        image, _ = nvrtc_compile(source, arch)  # a cubin, or PTX the driver compiles on load
        with open(tmp, "wb") as fh:
            fh.write(image)

    path = cached_build("tb_gpu_", source, (f"sm_{arch}", "nvrtc {}.{}".format(*nvrtc_version())), ".bin", build)
    image = path.read_bytes()
    if not image.startswith(b"\x7fELF"):
        image += b"\0"  # PTX text is loaded as a NUL-terminated string
    driver = _get_driver()
    fn = driver.function(index, image, b"tb_render")
    return index, fn


class GpuPlan(KernelParameters):
    """The GPU kernel bound to one simulation: its packed parameters on the device, compiled variants.

    The interface of :class:`~torchbragg.kernels.cpu.CpuPlan` (``function``, ``run``), so
    :class:`~torchbragg.simulation.Simulation` renders with either.

    Parameters
    ----------
    kt : KernelTensors
        The set-up (on a CUDA device, or any with ``emulate``).
    I_bg : float
        The background added to every pixel's sum (see :class:`~torchbragg.kernels.packing.KernelParameters`).
    scale : float
        The pixel scale applied after the sum.
    fpixels : int
        Pixels per detector row.
    mask : numpy.ndarray, optional
        [slow, fast] non-zero where a pixel is rendered.
    emulate : bool, optional
        Run the kernel's per-pixel code on the CPU (a host build of ``gpu_render.cu``), for tests.
    oversample_factors : tuple of bool, optional
        -oversample_thick, -oversample_polar, -oversample_omega.
    running_product : bool, optional
        With any of those: C's running product (True) or per-term weighting.

    Attributes
    ----------
    emulate : bool
        Whether the host build runs instead of the CUDA kernel.
    device : torch.device
        Where the packed parameters live and the outputs must be (``cuda:N`` with its index; the CPU when
        emulating).
    on_device : dict
        The packed arrays (``dparams``, ``iparams``, ``lattice``, ``src``, ``table``, ``mask``) as tensors
        on ``device``; ``table`` and ``mask`` may be None.

    Raises
    ------
    ValueError
        When the kernel does not cover the set-up (:func:`~torchbragg.kernels.packing.compiled_kernels_unsupported`).
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
                 mask: np.ndarray | None = None, emulate: bool = False,
                 oversample_factors: tuple[bool, bool, bool] = (False, False, False), running_product: bool = True):
        why = compiled_kernels_unsupported(kt, None if emulate else "cuda")
        if why is not None:
            raise ValueError(why)
        super().__init__(kt, I_bg=I_bg, scale=scale, fpixels=fpixels, mask=mask,
                         oversample_factors=oversample_factors, running_product=running_product)
        self.emulate = bool(emulate)
        #: where the parameters live and the outputs must be; "cuda" gets its index (tensors made
        #: on torch.device("cuda") report cuda:N, and the two do not compare equal)
        self.device = torch.device("cpu") if emulate else _with_index(kt.device)
        dev = self.device
        #: the packed arrays on the device (the host ones stay as KernelParameters holds them)
        self.on_device = {
            "dparams": torch.from_numpy(self.dparams).to(dev),
            "iparams": torch.from_numpy(self.iparams).to(dev),
            "lattice": torch.from_numpy(self.lattice).to(dev),
            "src": torch.from_numpy(self.src).to(dev),
            "table": None if self.table is None else self.table.to(dev),
            "mask": None if self.mask is None else torch.from_numpy(self.mask).to(dev),
        }
        self._flagged_dev = None
        self._wide_dev = None

    def device_flagged_table(self) -> torch.Tensor:
        """:meth:`~KernelParameters.flagged_table` on the device.

        Returns
        -------
        torch.Tensor
            The sign-flagged table on :attr:`device` (copied once, then kept).
        """
        if self._flagged_dev is None:
            self._flagged_dev = self.flagged_table().to(self.device)
        return self._flagged_dev

    def device_wide_table(self) -> torch.Tensor:
        """:meth:`~KernelParameters.wide_table` on the device.

        Returns
        -------
        torch.Tensor
            The float64 table on :attr:`device` (copied once, then kept).
        """
        if self._wide_dev is None:
            self._wide_dev = self.wide_table().to(self.device)
        return self._wide_dev

    def function(self, count: bool, interp: bool = False):
        """The compiled variant (compiling it on first use), or None with a warning.

        Parameters
        ----------
        count : bool
            Whether the variant also writes the default_F fallback maps.
        interp : bool, optional
            The variant that interpolates every lookup.

        Returns
        -------
        object or None
            The host build's ctypes function when emulating, else ``(device index, CUfunction)``; None when
            it cannot be built (see :meth:`problem`) or the table is too thin to interpolate.
        """
        table = self.table is not None
        if interp and table and not self.interpolates:
            return None  # a table under 4 entries along an axis: the eager kernel interpolates
        over = self.over
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
            _errors[key] = f"GPU kernel: {type(err).__name__}: {err}"
            warnings.warn(f"torchbragg: {slow_path_note(_errors[key])}", RuntimeWarning, stacklevel=3)
        with _lock:
            _variants[key] = fn
        return fn

    def problem(self, count: bool, interp: bool = False) -> str | None:
        """Why :meth:`function` returned None (no NVRTC, driver or compiler), else None.

        Parameters
        ----------
        count : bool
            As for :meth:`function`.
        interp : bool, optional
            As for :meth:`function`.

        Returns
        -------
        str or None
            The build or load error of that variant, or None.
        """
        table = self.table is not None
        return _errors.get((self.emulate, str(self.device), self.dtype, self.kt.shape, table, bool(count),
                            bool(interp and table), self.over))

    def scan_function(self):
        """No compiled switch-off scan on the GPU.

        Returns
        -------
        None
            Always: C's interpolation switch-off scan runs on the CPU.
        """
        return None  # C's interpolation switch-off scan runs on the CPU (Simulation._scan_plan)

    def run(self, row0: int, nrows: int, col0: int, ncols: int, image: torch.Tensor,
            counts: torch.Tensor | None = None, reasons: torch.Tensor | None = None,
            threads: int | None = None, interp: bool = False, stats: bool = True) -> np.ndarray | None:
        """Render rows ``row0 ..``, columns ``col0 ..`` into ``image`` (see :meth:`CpuPlan.run`).

        Returns the ``[nrows, 8]`` row statistics (:data:`~torchbragg.kernels.row_stats.ROW_STATS`),
        reduced on the device; with ``stats=False`` only launches the kernel (asynchronously on
        the current stream; for timing the kernel alone) and returns None.

        Parameters
        ----------
        row0 : int
            First detector row (slow index) of the block.
        nrows : int
            Rows in the block.
        col0 : int
            First column (fast index) of the block.
        ncols : int
            Columns in the block.
        image : torch.Tensor
            ``[nrows, ncols]`` view to fill, of the plan's dtype on :attr:`device`; rows may be strided,
            columns must be contiguous.
        counts : torch.Tensor or None, optional
            ``[nrows, ncols]`` fallback counts (dtype :attr:`count_dtype`) to fill, or None for no fallback map.
        reasons : torch.Tensor or None, optional
            ``[nrows, ncols]`` uint8 fallback reasons, with the same row stride as ``counts``.
        threads : int or None, optional
            Not used (the interface of :meth:`CpuPlan.run`).
        interp : bool, optional
            Interpolate every lookup of the block.
        stats : bool, optional
            Compute and return the row statistics.

        Returns
        -------
        numpy.ndarray or None
            float64 ``[nrows, 8]`` row statistics, or None with ``stats=False``.

        Raises
        ------
        RuntimeError
            When the variant is unavailable or the host build fails.
        ValueError
            When an output view has the wrong dtype, shape, layout or device.
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
        dev = self.on_device
        table = dev["table"]
        if count and table is not None and not interp:
            table = self.device_flagged_table()
        if interp and table is not None:
            table = self.device_wide_table()
        ptrs = [dev["dparams"], dev["iparams"], dev["lattice"], dev["src"], table, dev["mask"]]
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
        mask = dev["mask"]
        active = None if mask is None else mask[row0:row0 + nrows, col0:col0 + ncols] != 0
        return row_statistics(image, active, omega.sum(-1))
