"""The compiled CPU render kernel (``cpu_render.cpp``) and its plan.

The eager kernel (:mod:`torchbragg.kernels.eager`) materialises every per-evaluation quantity as a
tensor (about 100 bytes per evaluation) and runs ~60 separate passes over
them. Rendering only needs one number per pixel, so for CPU renders a small
C++ function does the same arithmetic per evaluation in registers: geometry
up to h, k, l in float64 (as the eager kernel), the lattice factor, structure factor
and intensity in the render dtype, summed per pixel in float64. It is
compiled once per (dtype, crystal shape, table, fallback-count, interpolation,
-oversample_* rule) variant with the system C++ compiler into a per-user
cache folder and loaded with ctypes (no torch headers, so a first compile
takes about a second). Anything it cannot do (fractional N with square
crystals, the row where interpolation switches off, the first pixel's phi=0
quirk) is left to the eager kernel by the caller. The interpolating variants also export ``tb_scan``, C's
interpolation switch-off scan (:meth:`CpuPlan.scan`). ``TORCHBRAGG_FAST=0``
switches it off; taps always use the eager kernel.
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .build import (
    NO_COMPILER_MESSAGE,
    NativeSource,
    cached_build,
    compile_shared_library,
    cpu_signature,
    cxx_compiler,
    slow_path_note,
)
from .packing import RENDER_ARGTYPES, KernelParameters, variant_defines
from .row_stats import ROW_STATS

__all__ = ["CpuPlan", "cpu_render_function", "cpu_scan_function", "cpu_kernel_error", "kernel_math_probe",
           "CXX_FLAGS"]

#: the CPU kernel's compiler flags (without -march=native where the compiler refuses it)
CXX_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
             "-std=c++17", "-shared", "-fPIC"]
_libraries: dict[tuple, object] = {}
_errors: dict[tuple, str] = {}
_scans: dict[tuple, object] = {}
_probes: dict[tuple, object] = {}
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def cpu_render_function(dtype: torch.dtype, shape: str, table: bool, count: bool, interp: bool = False, over: int = 0):
    """The compiled render function for one variant (compiling it on first use), or None.

    ``over``: the -oversample_* rule (0 none, 1 C's running product, 2 per-term weighting).
    The reason for a None is in :func:`cpu_kernel_error`.

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
    interp : bool, optional
        Whether every lookup is interpolated (only with a table).
    over : int, optional
        The -oversample_* rule: 0 none, 1 C's running product, 2 per-term weighting.

    Returns
    -------
    ctypes function or None
        The library's ``tb_render`` (argument types :data:`~torchbragg.kernels.packing.RENDER_ARGTYPES`),
        or None when the variant could not be built or loaded (a warning is issued once).
    """
    key = (dtype, shape, bool(table), bool(count), bool(interp and table), int(over))
    if key in _libraries:
        return _libraries[key]
    fn = None
    try:
        fn = _load_variant(*key)
    except Exception as err:  # no compiler, compile error, unloadable library: use the eager kernel
        _errors[key] = str(err) if str(err) == NO_COMPILER_MESSAGE else f"CPU kernel: {type(err).__name__}: {err}"
        warnings.warn(f"torchbragg: {slow_path_note(_errors[key])}", RuntimeWarning, stacklevel=3)
    _libraries[key] = fn
    return fn


def cpu_scan_function(dtype: torch.dtype, shape: str):
    """The compiled interpolation switch-off scan (:meth:`CpuPlan.scan`), or None.

    Parameters
    ----------
    dtype : torch.dtype
        The render dtype, float32 or float64.
    shape : str
        Crystal shape, a key of :data:`~torchbragg.kernels.packing.SHAPE_CODES`.

    Returns
    -------
    ctypes function or None
        ``tb_scan`` of the interpolating variant with a table, or None when that variant is unavailable.
    """
    key = (dtype, shape, True, False, True, 0)
    if cpu_render_function(*key) is None:
        return None
    return _scans.get(key)


def kernel_math_probe(dtype: torch.dtype, which: str, x: np.ndarray) -> np.ndarray:
    """The compiled kernels' own arithmetic (kernel_math.h and the CPU exponential) on ``x``, in ``dtype``.

    ``which``: ``"sinpi"``, ``"cospi"``, ``"exp"`` or ``"round_factor"`` (of hrad = x,
    fudge 1, N 1). For tests of that arithmetic against numpy.

    Parameters
    ----------
    dtype : torch.dtype
        The variant whose arithmetic is probed (float32 or float64).
    which : str
        The function: ``"sinpi"``, ``"cospi"``, ``"exp"`` or ``"round_factor"``.
    x : numpy.ndarray
        The arguments (taken as float64).

    Returns
    -------
    numpy.ndarray
        float64, the shape of ``x``: the function's values.

    Raises
    ------
    RuntimeError
        When the CPU kernel is unavailable.
    KeyError
        For an unknown ``which``.
    """
    codes = {"sinpi": 0, "cospi": 1, "exp": 2, "round_factor": 3}
    key = (dtype, "square", False, False, False, 0)
    if cpu_render_function(*key) is None:
        raise RuntimeError(f"CPU kernel unavailable: {cpu_kernel_error(dtype, 'square', False, False)}")
    xs = np.ascontiguousarray(x, dtype=np.float64)
    out = np.empty_like(xs)
    _probes[key](codes[which], ctypes.c_void_p(xs.ctypes.data), ctypes.c_void_p(out.ctypes.data), xs.size)
    return out


def cpu_kernel_error(dtype: torch.dtype, shape: str, table: bool, count: bool, interp: bool = False,
                      over: int = 0) -> str | None:
    """Why one variant's compiled CPU kernel is unavailable (after :func:`cpu_render_function`).

    Parameters
    ----------
    dtype : torch.dtype
        The variant's render dtype, as for :func:`cpu_render_function`.
    shape : str
        The variant's crystal shape.
    table : bool
        Whether the variant reads a structure-factor table.
    count : bool
        Whether the variant writes fallback maps.
    interp : bool, optional
        Whether the variant interpolates.
    over : int, optional
        The variant's -oversample_* rule.

    Returns
    -------
    str or None
        :data:`~torchbragg.kernels.build.NO_COMPILER_MESSAGE`, the build or load error, or None
        when the variant was built (or not yet tried).
    """
    return _errors.get((dtype, shape, bool(table), bool(count), bool(interp and table), int(over)))



def cpu_source(dtype, shape, table, count, interp, over) -> NativeSource:
    """``cpu_render.cpp`` with the switches of one variant.

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
    over : int
        The -oversample_* rule: 0 none, 1 C's running product, 2 per-term weighting.

    Returns
    -------
    NativeSource
        The source file name and its ``NAME=VALUE`` switches.
    """
    return NativeSource("cpu_render.cpp", tuple(variant_defines(dtype, shape, table, count, interp, over)))


def _load_variant(dtype, shape, table, count, interp, over):
    source = cpu_source(dtype, shape, table, count, interp, over)
    cxx = cxx_compiler()
    if cxx is None:
        raise RuntimeError(NO_COMPILER_MESSAGE)
    portable = [f for f in CXX_FLAGS if f != "-march=native"]  # for compilers without -march=native
    lib_path = cached_build("tb_render_", source, (cxx, *CXX_FLAGS, cpu_signature()), ".so",
                            lambda out: compile_shared_library(cxx, (CXX_FLAGS, portable), source, out))
    lib = ctypes.CDLL(str(lib_path))
    fn = lib.tb_render
    P = ctypes.c_void_p
    I64 = ctypes.c_int64
    fn.argtypes = RENDER_ARGTYPES
    fn.restype = ctypes.c_int
    probe = lib.tb_math_probe
    probe.argtypes = [I64, P, P, I64]
    probe.restype = ctypes.c_int
    _probes[(dtype, shape, table, count, interp, over)] = probe
    if interp:  # the interpolating variants also hold C's switch-off scan
        scan = lib.tb_scan
        scan.argtypes = [P, P, P, P, P, I64, I64, I64, I64, P]
        scan.restype = ctypes.c_int
        _scans[(dtype, shape, table, count, interp, over)] = scan
    return fn


def thread_pool(n: int) -> ThreadPoolExecutor | None:
    global _pool, _pool_size
    if n <= 1:
        return None
    with _pool_lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="torchbragg")
            _pool_size = n
        return _pool


class CpuPlan(KernelParameters):
    """The compiled CPU kernel bound to one simulation's packed parameters.

    :meth:`run` renders a block of whole rows straight into the image (and the
    fallback maps) and returns each row's statistics; :meth:`scan` is C's
    interpolation switch-off scan.

    Parameters
    ----------
    kt : KernelTensors
        The set-up (on the CPU).
    I_bg : float
        The background added to every pixel's sum.
    scale : float
        The pixel scale applied after the sum.
    fpixels : int
        Pixels per detector row.
    mask : numpy.ndarray, optional
        [slow, fast] non-zero where a pixel is rendered.
    oversample_factors : tuple of bool, optional
        -oversample_thick, -oversample_polar, -oversample_omega.
    running_product : bool, optional
        With any of those: C's running product (True) or per-term weighting.

    All as for :class:`~torchbragg.kernels.packing.KernelParameters`, whose attributes the plan has.
    """

    #: what ``Simulation.last_kernel`` calls this kernel
    label = "fused CPU kernel"

    def function(self, count: bool, interp: bool = False):
        """The compiled variant for this simulation (built on first use), or None.

        Parameters
        ----------
        count : bool
            Whether the variant also writes the default_F fallback maps.
        interp : bool, optional
            The variant that interpolates every lookup.

        Returns
        -------
        ctypes function or None
            None when the kernel cannot be built (see :meth:`problem`) or the table is too
            thin to interpolate.
        """
        if interp and self.table is not None and not self.interpolates:
            return None
        return cpu_render_function(self.dtype, self.kt.shape, self.table is not None, count, interp, self.over)

    def problem(self, count: bool, interp: bool = False) -> str | None:
        """Why :meth:`function` returned None (no compiler, a build error), else None.

        Parameters
        ----------
        count : bool
            As for :meth:`function`.
        interp : bool, optional
            As for :meth:`function`.

        Returns
        -------
        str or None
            The reason, or None when the variant was built (or not yet tried).
        """
        return cpu_kernel_error(self.dtype, self.kt.shape, self.table is not None, count, interp, self.over)

    def scan_function(self):
        """The compiled switch-off scan for this set-up, or None (no table, no compiler).

        Returns
        -------
        ctypes function or None
            See :func:`cpu_scan_function`.
        """
        if self.table is None:
            return None
        return cpu_scan_function(self.dtype, self.kt.shape)

    def scan(self, row0: int, nrows: int, col0: int, ncols: int,
             threads: int | None = None) -> tuple | None:
        """C's interpolation switch-off scan over rows ``row0 ..`` and columns ``col0 ..``.

        Returns None when no evaluation there (masked pixels left out) can leave the table, else
        ``(ordinal, certain)``: the global loop-order ordinal of the first evaluation that is not
        certainly harmless, and whether it certainly leaves the table unskipped (``False``: it lies
        within rounding of C's bounds or skip tests, and the eager kernel has to decide it). The
        first pixel's phi=0 quirk is not applied: the caller checks that pixel eagerly. Row slices
        run on a thread pool in order; slices after a row with a hit are not scanned.

        Parameters
        ----------
        row0 : int
            First detector row (slow index) scanned.
        nrows : int
            Rows scanned.
        col0 : int
            First column (fast index) scanned.
        ncols : int
            Columns scanned.
        threads : int or None, optional
            Threads to use (None: ``torch.get_num_threads()``), at most ``nrows``.

        Returns
        -------
        tuple or None
            ``(ordinal, certain)`` as above, or None.

        Raises
        ------
        RuntimeError
            When the compiled scan is unavailable or fails.
        """
        fn = self.scan_function()
        if fn is None:
            raise RuntimeError("CPU scan unavailable")
        if nrows <= 0 or ncols <= 0:
            return None
        ptr = lambda a: ctypes.c_void_p(a.ctypes.data)  # noqa: E731
        fixed = (ptr(self.dparams), ptr(self.iparams), ptr(self.lattice), ptr(self.src),
                 ptr(self.mask) if self.mask is not None else ctypes.c_void_p(None))
        E = self.evaluations_per_pixel
        lock = threading.Lock()
        hits = []  # (ordinal, certain)
        first_hit_row = [row0 + nrows]

        def call(r_start, r_count):
            with lock:
                if r_start > first_hit_row[0]:
                    return  # a hit in an earlier row comes first in C's order
            out = np.zeros(2, dtype=np.int64)
            rc = fn(*fixed, r_start, r_count, col0, ncols, ctypes.c_void_p(out.ctypes.data))
            if rc != 0:
                raise RuntimeError(f"CPU scan failed ({rc})")
            if out[0] >= 0:
                with lock:
                    hits.append((int(out[0]), bool(out[1])))
                    first_hit_row[0] = min(first_hit_row[0], int(out[0]) // E // self.fpixels)

        n = max(1, min(int(threads or torch.get_num_threads()), nrows))
        pool = thread_pool(n)
        if pool is None:
            call(row0, nrows)
        else:
            # small slices, in order: an early hit stops the scan soon after it
            step = max(1, min(-(-nrows // (4 * n)), -(-(1 << 20) // max(1, ncols * E))))
            futures = [pool.submit(call, r, min(step, row0 + nrows - r)) for r in range(row0, row0 + nrows, step)]
            for f in futures:
                f.result()
        return min(hits) if hits else None

    def run(self, row0: int, nrows: int, col0: int, ncols: int, image: torch.Tensor,
            counts: torch.Tensor | None = None, reasons: torch.Tensor | None = None,
            threads: int | None = None, interp: bool = False) -> np.ndarray:
        """Render rows ``row0 .. row0+nrows-1``, columns ``col0 .. col0+ncols-1``.

        ``image`` (and ``counts``/``reasons`` for a fallback map, ``counts`` of
        :attr:`count_dtype`) are the ``[nrows, ncols]`` views to fill; rows may
        be strided, columns must be contiguous. ``interp`` interpolates every lookup of the block (the
        caller keeps it to rows before C's switch-off point). Returns the
        ``[nrows, 8]`` float64 row statistics (see :data:`ROW_STATS`).

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
            ``[nrows, ncols]`` CPU view of the plan's dtype to fill with photons per pixel.
        counts : torch.Tensor or None, optional
            ``[nrows, ncols]`` fallback counts (dtype :attr:`count_dtype`) to fill, or None for no fallback map.
        reasons : torch.Tensor or None, optional
            ``[nrows, ncols]`` uint8 fallback reasons, with the same row stride as ``counts``.
        threads : int or None, optional
            Threads to use (None: ``torch.get_num_threads()``), at most ``nrows``.
        interp : bool, optional
            Interpolate every lookup of the block.

        Returns
        -------
        numpy.ndarray
            float64 ``[nrows, 8]`` row statistics.

        Raises
        ------
        RuntimeError
            When the variant is unavailable or the kernel fails.
        ValueError
            When an output view has the wrong dtype, shape, layout or device.
        """
        count = counts is not None
        fn = self.function(count, interp)
        if fn is None:
            raise RuntimeError("CPU kernel unavailable")
        for t, dt in ((image, self.dtype), (counts, self.count_dtype), (reasons, torch.uint8)):
            if t is not None and (t.dtype != dt or t.shape != (nrows, ncols) or t.stride(1) != 1
                                  or t.device.type != "cpu"):
                raise ValueError("CPU kernel output must be a row-strided CPU view of the block")
        if count and counts.stride(0) != reasons.stride(0):
            raise ValueError("counts and reasons must share a row stride")
        stats = np.zeros((max(nrows, 1), len(ROW_STATS)), dtype=np.float64)
        ptr = lambda a: ctypes.c_void_p(a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr())  # noqa: E731
        none = ctypes.c_void_p(None)
        table = self.table
        if count and table is not None and not interp:
            table = self.flagged_table()
        if interp and table is not None:
            table = self.wide_table()
        fixed = (ptr(self.dparams), ptr(self.iparams), ptr(self.lattice), ptr(self.src),
                 ptr(table) if table is not None else none,
                 ptr(self.mask) if self.mask is not None else none)
        isz, ssz = image.element_size(), stats.strides[0]
        fb_stride = counts.stride(0) if count else 0
        csz = counts.element_size() if count else 0

        def call(r_start, r_count):
            off = r_start - row0
            rc = fn(*fixed, r_start, r_count, col0, ncols,
                    ctypes.c_void_p(image.data_ptr() + off * image.stride(0) * isz), image.stride(0),
                    ctypes.c_void_p(counts.data_ptr() + off * fb_stride * csz) if count else none,
                    ctypes.c_void_p(reasons.data_ptr() + off * fb_stride) if count else none,
                    fb_stride, ctypes.c_void_p(stats.ctypes.data + off * ssz))
            if rc != 0:
                raise RuntimeError(f"CPU kernel failed ({rc})")

        n = max(1, min(int(threads or torch.get_num_threads()), nrows))
        pool = thread_pool(n)
        if pool is None:
            call(row0, nrows)
        else:
            # several slices per thread, taken from a queue, balance uneven rows (masks)
            step = max(1, -(-nrows // (4 * n)))
            futures = [pool.submit(call, r, min(step, row0 + nrows - r)) for r in range(row0, row0 + nrows, step)]
            for f in futures:
                f.result()
        return stats[:nrows]
