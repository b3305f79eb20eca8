"""The compiled CPU adjoint kernel (``cpu_adjoint.cpp``): the backward pass of a CPU render.

Given the gradient of a scalar with respect to every pixel, :func:`run_adjoint` returns the
gradient of ``sum(grad * image)`` with respect to the packed parameters of a
:class:`~torchbragg.kernels.packing.KernelParameters` (detector vectors, solid-angle distance,
cell vectors per phi step and mosaic domain, sources, table entries), computed per evaluation in
float64 the way the render kernel evaluates it, in the same pass over the pixels: no per-evaluation
tensors, so memory stays that of the image. :func:`adjoint_unsupported` says which set-ups it
does not cover (``-curved_det``, table interpolation, the ``-oversample_*`` factors, fractional
N of a square crystal, a differentiated N of 1 or less); those are differentiated by the eager
kernel under autograd, the reference the tests hold this kernel to. It is compiled like the
render kernel (:mod:`torchbragg.kernels.cpu`), one variant per crystal shape and table switch.
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from concurrent.futures import wait

import numpy as np
import torch

from .build import NO_COMPILER_MESSAGE, NativeSource, cached_build, compile_shared_library, cpu_signature, cxx_compiler
from .cpu import CXX_FLAGS, thread_pool
from .packing import D_LEN, KernelParameters, variant_defines

__all__ = ["adjoint_unsupported", "adjoint_problem", "cpu_adjoint_function", "run_adjoint", "ADJOINT_ARGTYPES",
           "ADJOINT_EVALUATIONS_PER_SLICE"]

#: ctypes argument types of ``tb_adjoint``: dp, ip, lattice, src, table, mask, row0, nrows, col0, ncols,
#: grad, grad_stride, skip_row, skip_col, g_dp, g_lattice, g_src, g_table
ADJOINT_ARGTYPES = ([ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_void_p] + [ctypes.c_int64] * 3
                    + [ctypes.c_void_p] * 4)

#: evaluations per slice of rows of the backward pass: the unit of progress, cancellation and load balance
ADJOINT_EVALUATIONS_PER_SLICE = 1 << 22

_functions: dict[tuple, object] = {}
_errors: dict[tuple, str] = {}


def adjoint_unsupported(plan: KernelParameters | None, fields: set[str] = frozenset()) -> str | None:
    """Why the compiled adjoint cannot differentiate this plan's render (None when it can).

    Parameters
    ----------
    plan : KernelParameters or None
        The render's packed parameters (None: no compiled render).
    fields : set of str
        The kernel fields whose gradients are wanted.

    Returns
    -------
    str or None
        The reason, or None.
    """
    if plan is None:
        return "no compiled CPU render"
    kt = plan.kt
    if kt.device.type != "cpu":
        return "not a CPU render"
    if kt.curved:
        return "-curved_det"
    if kt.table is not None and kt.interpolate:
        return "table interpolation"
    if plan.over:
        return "-oversample_thick/_polar/_omega"
    if kt.shape == "square" and any(float(n) > 1 and float(n) != int(n) for n in kt.N):
        return "fractional N with a square crystal"
    if "N" in fields and kt.shape == "square" and any(float(n) <= 1 for n in kt.N):
        return "a differentiated N of 1 or less with a square crystal"
    return None


def cpu_adjoint_function(shape: str, table: bool):
    """The compiled ``tb_adjoint`` of one variant (compiling it on first use), or None.

    Parameters
    ----------
    shape : str
        Crystal shape, a key of :data:`~torchbragg.kernels.packing.SHAPE_CODES`.
    table : bool
        Whether the set-up has a structure-factor table.

    Returns
    -------
    ctypes function or None
        None when it cannot be built or loaded (a warning is issued once; the eager kernel is used).
    """
    key = (shape, bool(table))
    if key in _functions:
        return _functions[key]
    fn = None
    try:
        source = NativeSource("cpu_adjoint.cpp", tuple(variant_defines(torch.float64, shape, table, False, False, 0)))
        cxx = cxx_compiler()
        if cxx is None:
            raise RuntimeError(NO_COMPILER_MESSAGE)
        portable = [f for f in CXX_FLAGS if f != "-march=native"]
        path = cached_build("tb_adjoint_", source, (cxx, *CXX_FLAGS, cpu_signature()), ".so",
                            lambda out: compile_shared_library(cxx, (CXX_FLAGS, portable), source, out))
        fn = ctypes.CDLL(str(path)).tb_adjoint
        fn.argtypes = ADJOINT_ARGTYPES
        fn.restype = ctypes.c_int
    except Exception as err:  # no compiler, compile error: the eager kernel differentiates
        _errors[key] = f"CPU adjoint kernel: {type(err).__name__}: {err}"
        warnings.warn(f"torchbragg: {_errors[key]}; gradients use the slower PyTorch path", RuntimeWarning,
                      stacklevel=2)
    _functions[key] = fn
    return fn


def adjoint_problem(shape: str, table: bool) -> str | None:
    """Why :func:`cpu_adjoint_function` returned None for this variant (no compiler, a build error).

    Parameters
    ----------
    shape : str
        Crystal shape.
    table : bool
        Whether the set-up has a table.

    Returns
    -------
    str or None
        The reason, or None when the variant was built (or not yet tried).
    """
    return _errors.get((shape, bool(table)))


def run_adjoint(plan: KernelParameters, grad: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int], *,
                skip_pixel: tuple[int, int] | None = None, want_table: bool = False,
                threads: int | None = None, progress=None, should_cancel=None) -> dict | None:
    """The gradient of ``sum(grad * image)`` with respect to the plan's packed parameters.

    The rows are cut into slices of at most :data:`ADJOINT_EVALUATIONS_PER_SLICE` evaluations (at
    least four per thread); thread k takes slices k, k + n, ... into its own sums, so the result is
    the same bit for bit on every run.

    Parameters
    ----------
    plan : KernelParameters
        The render's packed parameters (:func:`adjoint_unsupported` must be None for it).
    grad : torch.Tensor
        ``[slow, fast]`` gradient of the scalar with respect to the image (any float dtype, CPU).
    rows, cols : (int, int)
        Inclusive first and last row and column to differentiate (the ROI).
    skip_pixel : (int, int), optional
        A pixel left out (the caller differentiates it otherwise).
    want_table : bool, optional
        Also the gradient per table entry (with a table).
    threads : int, optional
        Threads to use (default ``torch.get_num_threads()``).
    progress : callable, optional
        Called as ``progress(rows_done, rows_total)`` in the calling thread while slices finish.
    should_cancel : callable, optional
        Called in the calling thread before the pass and while its slices run (every 50 ms; before
        each slice on one thread); True stops it before the next slices.

    Returns
    -------
    dict or None
        float64 numpy arrays ``dp`` (``[D_LEN]`` at the ``D_*`` offsets), ``lattice`` (``[P*M, 9]``),
        ``src`` (``[S, 10]``) and ``table`` (``[entries + 1]`` or None); None when cancelled.

    Raises
    ------
    RuntimeError
        When the variant cannot be built (see :func:`cpu_adjoint_function`) or the kernel fails.
    """
    kt = plan.kt
    has_table = plan.table is not None
    fn = cpu_adjoint_function(kt.shape, has_table)
    if fn is None:
        raise RuntimeError(f"CPU adjoint kernel unavailable: {adjoint_problem(kt.shape, has_table)}")
    g = np.ascontiguousarray(grad.detach().cpu().to(torch.float64).numpy())
    (r_lo, r_hi), (c_lo, c_hi) = rows, cols
    nrows, ncols = r_hi - r_lo + 1, c_hi - c_lo + 1
    table = plan.wide_table() if has_table else None
    want_table = bool(want_table and has_table)
    P = ctypes.c_void_p
    ptr = lambda a: P(a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr())  # noqa: E731
    fixed = (ptr(plan.dparams), ptr(plan.iparams), ptr(plan.lattice), ptr(plan.src),
             ptr(table) if table is not None else P(None), ptr(plan.mask) if plan.mask is not None else P(None))
    skip = skip_pixel if skip_pixel is not None else (-1, -1)
    n = max(1, min(int(threads or torch.get_num_threads()), nrows))
    per_slice = max(1, ADJOINT_EVALUATIONS_PER_SLICE // max(1, plan.evaluations_per_pixel * ncols))
    step = max(1, min(per_slice, -(-nrows // (4 * n))))
    starts = list(range(r_lo, r_hi + 1, step))
    # worker k takes slices k, k + n, ... in order into its own sums, summed in worker order at the end:
    # the same additions in the same order on every run (a reproducible gradient)
    sums = [(np.zeros(D_LEN), np.zeros_like(plan.lattice), np.zeros_like(plan.src),
             np.zeros(table.numel()) if want_table else None) for _ in range(n)]
    rows_done = [0] * n
    stop = threading.Event()

    def work(k):
        dp, lat, src, tab = sums[k]
        for r0 in starts[k::n]:
            if stop.is_set():
                return
            count = min(step, r_hi + 1 - r0)
            rc = fn(*fixed, r0, count, c_lo, ncols, P(g.ctypes.data + (r0 * g.shape[1] + c_lo) * 8), g.shape[1],
                    skip[0], skip[1], ptr(dp), ptr(lat), ptr(src), ptr(tab) if tab is not None else P(None))
            if rc != 0:
                raise RuntimeError(f"CPU adjoint kernel failed ({rc})")
            rows_done[k] += count

    reported = [-1]

    def report():
        done = sum(rows_done)
        if progress is not None and done != reported[0]:
            reported[0] = done
            progress(done, nrows)

    pool = thread_pool(n)
    if pool is None:  # one thread: the calling one, asked to stop between slices
        dp, lat, src, tab = sums[0]
        for r0 in starts:
            if should_cancel is not None and should_cancel():
                return None
            count = min(step, r_hi + 1 - r0)
            rc = fn(*fixed, r0, count, c_lo, ncols, P(g.ctypes.data + (r0 * g.shape[1] + c_lo) * 8), g.shape[1],
                    skip[0], skip[1], ptr(dp), ptr(lat), ptr(src), ptr(tab) if tab is not None else P(None))
            if rc != 0:
                raise RuntimeError(f"CPU adjoint kernel failed ({rc})")
            rows_done[0] += count
            report()
    else:  # the calling thread asks should_cancel and reports progress while the workers run
        if should_cancel is not None and should_cancel():
            return None
        futures = [pool.submit(work, k) for k in range(n)]
        try:
            while not all(f.done() for f in futures):
                wait(futures, timeout=0.05)
                if any(f.done() and f.exception() is not None for f in futures):
                    stop.set()  # a failed slice: the others stop too, and its error is raised below
                elif not stop.is_set() and should_cancel is not None and should_cancel():
                    stop.set()
                if not stop.is_set():
                    report()
        finally:  # whatever happens here (an exception, an interrupt), no worker outlives the call
            if not all(f.done() for f in futures):
                stop.set()
                wait(futures)
        for f in futures:
            f.result()
        if stop.is_set():
            return None
        report()
    parts = sums
    return {"dp": sum(o[0] for o in parts), "lattice": sum(o[1] for o in parts), "src": sum(o[2] for o in parts),
            "table": sum(o[3] for o in parts) if want_table else None}
