"""The vectorised nanoBragg kernel: per-evaluation physics over a pixel block.

One *evaluation* is one (pixel, thickness layer, subpixel, source, phi step,
mosaic domain) combination — one pass through the C program's innermost loop.
:func:`evaluate_block` computes every evaluation of a rectangular block of
pixels at once and either reduces them to pixel values (rendering) or returns
them all (pixel taps). Rendering and taps therefore share one implementation of
the physics.

Evaluations are laid out in C's loop order, ``[rows, cols, T, subS, subF,
sources, phi, mosaic]``; flattened, the last five axes form the evaluation
index ``e`` used for the interpolation switch-off rule.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

__all__ = ["KernelTensors", "BlockResult", "evaluate_block", "LOOKUP_REASONS", "LOOKUP_CODES", "FastPlan",
           "fast_enabled", "fast_unsupported", "fused_unsupported", "fast_library", "fast_scan_function",
           "kernel_cache_dir", "fallback_count_dtype", "fast_math_probe", "kernel_source"]

#: lookup reason codes used in per-evaluation results and fallback maps
LOOKUP_REASONS = {
    0: "table",
    1: "default_F:no_table",
    2: "default_F:outside_table",
    3: "default_F:unlisted",
    4: "interpolated",
}
LOOKUP_CODES = {v: k for k, v in LOOKUP_REASONS.items()}


@dataclass
class KernelTensors:
    """Set-up values moved to the render device and dtype."""

    dtype: torch.dtype
    device: torch.device
    fdet: torch.Tensor
    sdet: torch.Tensor
    odet: torch.Tensor
    pix0: torch.Tensor  # metres
    beam: torch.Tensor
    pixel_size: float
    subpixel_size: float
    oversample: int
    thick_offsets: torch.Tensor  # [T] metres
    thickstep: float
    mu: float
    thick: float
    distance: float
    close_distance: float
    curved: bool
    point_pixel: bool
    incident: torch.Tensor  # [S,3] unit, pointing along the beam
    inv_lambda: torch.Tensor  # [S] 1/Å
    polar_axis: torch.Tensor
    kahn: float
    nopolar: bool
    dmin_A: float
    lattice: torch.Tensor  # [P,M,3,3] rows a,b,c (Å) for the normal loop
    lattice_first: Optional[torch.Tensor]  # [P,M,3,3] for the very first phi loop (phi=0 quirk), or None
    a_star: torch.Tensor  # [3,3] rows a*,b*,c* (1/Å), unrotated (C uses these for round/gauss/tophat)
    N: tuple
    shape: str
    fudge: float
    water: bool
    table: Optional[torch.Tensor]  # flattened F values
    listed: Optional[torch.Tensor]  # flattened bool
    bounds: Optional[tuple]  # (hmin,hmax,kmin,kmax,lmin,lmax)
    default_F: float
    interpolate: bool


@dataclass
class BlockResult:
    """Per-evaluation and per-subpixel quantities of one pixel block.

    Shapes: per-evaluation tensors are ``[R, C, T, os, os, S, P, M]``;
    per-subpixel tensors ``[R, C, T, os, os]``; per-(subpixel, source)
    ``[R, C, T, os, os, S]``.
    """

    hkl: torch.Tensor  # [..., 3] fractional
    hkl0: torch.Tensor  # [..., 3] int64 rounded
    F_cell: torch.Tensor
    F_latt: torch.Tensor
    reason: torch.Tensor  # uint8 codes of LOOKUP_REASONS
    skipped: torch.Tensor  # bool: evaluation skipped by -dmin or a zero lattice factor (no lookup, no sum)
    dmin_skip: torch.Tensor  # [R,C,T,os,os,S] bool
    position: torch.Tensor  # [R,C,T,os,os,3] metres
    airpath: torch.Tensor
    omega: torch.Tensor  # [R,C,T,os,os]
    capture: torch.Tensor  # [R,C,T,os,os]
    polar: torch.Tensor  # [R,C,T,os,os,S]
    scattering: torch.Tensor  # [R,C,T,os,os,S,3] 1/Å


def _sincg_frac(frac: torch.Tensor, h0: torch.Tensor, N: float, h: torch.Tensor) -> torch.Tensor:
    """sin(πNh)/sin(πh) evaluated through the fractional part ``frac = h - h0``.

    Using the distance to the nearest integer keeps float32 renders accurate at
    high Miller indices, where sin(πh) of a large argument loses digits.
    """
    if N != int(N):
        x = math.pi * h
        return torch.where(x == 0, torch.full_like(h, N), torch.sin(N * x) / torch.sin(x))
    x = frac * math.pi
    n = int(N)
    sign = 1.0 - 2.0 * torch.remainder(h0 * (n - 1), 2).to(frac.dtype)
    safe = torch.where(x == 0, torch.ones_like(x), x)
    value = torch.sin(n * safe) / torch.sin(safe)
    return sign * torch.where(x == 0, torch.full_like(frac, float(n)), value)


def _sinc3(x: torch.Tensor) -> torch.Tensor:
    safe = torch.where(x == 0, torch.ones_like(x), x)
    return torch.where(x == 0, torch.ones_like(x), 3.0 * (torch.sin(safe) / safe - torch.cos(safe)) / (safe * safe))


def _lagrange_weights(t: torch.Tensor) -> torch.Tensor:
    """Cubic Lagrange weights for nodes -1, 0, 1, 2 at offset t (…, 4)."""
    tm1, tm2, tp1 = t - 1.0, t - 2.0, t + 1.0
    return torch.stack((
        -t * tm1 * tm2 / 6.0,
        tp1 * tm1 * tm2 / 2.0,
        -tp1 * t * tm2 / 2.0,
        tp1 * t * tm1 / 6.0,
    ), dim=-1)


def _rotate_about(v: torch.Tensor, axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle)[..., None], torch.sin(angle)[..., None]
    dot = (v * axis).sum(-1, keepdim=True)
    return axis * dot * (1 - c) + v * c + torch.cross(axis.expand_as(v), v, dim=-1) * s


def evaluate_block(kt: KernelTensors, rows: torch.Tensor, cols: torch.Tensor, *,
                   interp_cutoff: Optional[int] = None, fpixels: int = 0,
                   first_pixel: Optional[tuple] = None, detail: bool = False,
                   want_hkl_only: bool = False) -> Dict[str, torch.Tensor]:
    """Evaluate every evaluation of the pixel block ``rows × cols``.

    Parameters
    ----------
    kt : KernelTensors
    rows, cols : 1-D int64 tensors
        Slow and fast pixel indices of the block.
    interp_cutoff : int, optional
        Global evaluation ordinal ``(slow*fpixels + fast)*E + e`` from which
        interpolation is switched off (C's switch-off-for-the-rest-of-the-run
        rule); ``None`` means it never switches off.
    first_pixel : (slow, fast), optional
        The first pixel C renders; its first phi loop uses ``lattice_first``.
    detail : bool
        Return every per-evaluation quantity (:class:`BlockResult` fields)
        rather than only the pixel reductions.
    want_hkl_only : bool
        Return only what the interpolation switch-off scan needs.

    Returns
    -------
    dict of tensors
    """
    dt, dev = kt.dtype, kt.device
    gdt = kt.fdet.dtype  # geometry dtype: float64
    os_ = kt.oversample
    T = kt.thick_offsets.numel()
    S = kt.incident.shape[0]
    P, M = kt.lattice.shape[0], kt.lattice.shape[1]

    sub = torch.arange(os_, device=dev, dtype=gdt) + 0.5
    Fdet = (cols.to(gdt)[:, None] * os_ + sub[None, :]) * kt.subpixel_size  # [C, os]
    Sdet = (rows.to(gdt)[:, None] * os_ + sub[None, :]) * kt.subpixel_size  # [R, os]
    pos = (Fdet[None, :, None, None, :, None] * kt.fdet
           + Sdet[:, None, None, :, None, None] * kt.sdet
           + kt.thick_offsets[None, None, :, None, None, None] * kt.odet
           + kt.pix0)  # [R,C,T,os,os,3]
    if kt.curved:
        # C treats the flat position's lab y and z (metres) as angles times distance
        base = (kt.distance * kt.beam).expand_as(pos)
        turned = _rotate_about(base, kt.sdet, pos[..., 1] / kt.distance)
        pos = _rotate_about(turned, kt.fdet, pos[..., 2] / kt.distance)
    airpath = torch.linalg.vector_norm(pos, dim=-1)
    diffracted = pos / airpath[..., None]

    # scattering vector per source, 1/Å
    scat = (diffracted[..., None, :] - kt.incident) * kt.inv_lambda[:, None]  # [R,C,T,os,os,S,3]

    # Miller indices for every phi step and mosaic domain
    hkl = torch.einsum("rctabsx,pmjx->rctabspmj", scat, kt.lattice)
    if kt.lattice_first is not None and first_pixel is not None:
        fs, ff = first_pixel
        r_hit = (rows == fs).nonzero()
        c_hit = (cols == ff).nonzero()
        if r_hit.numel() and c_hit.numel():
            r0, c0 = int(r_hit[0]), int(c_hit[0])
            hkl[r0, c0, 0, 0, 0, 0] = torch.einsum("x,pmjx->pmj", scat[r0, c0, 0, 0, 0, 0], kt.lattice_first)
    # geometry above runs in float64 (C's precision); the rest in the render dtype
    hkl0 = torch.ceil(hkl - 0.5)
    frac = (hkl - hkl0).to(dt)
    fh, fk, fl = frac.unbind(-1)
    h0, k0, l0 = hkl0.unbind(-1)

    stol = 0.5 * torch.linalg.vector_norm(scat, dim=-1)  # [R,C,T,os,os,S]
    if kt.dmin_A > 0:
        dmin_skip = (stol > 0) & (kt.dmin_A > 0.5 / torch.where(stol > 0, stol, torch.ones_like(stol)))
    else:
        dmin_skip = torch.zeros_like(stol, dtype=torch.bool)

    # lattice factor
    Na, Nb, Nc = kt.N
    if kt.shape == "square":
        F_latt = torch.ones_like(fh)
        for x, x0, n, full in ((fh, h0, Na, 0), (fk, k0, Nb, 1), (fl, l0, Nc, 2)):
            if n > 1:
                F_latt = F_latt * _sincg_frac(x, x0, n, hkl[..., full].to(dt))
    elif kt.shape == "round":
        hrad = fh * fh * Na * Na + fk * fk * Nb * Nb + fl * fl * Nc * Nc
        F_latt = Na * Nb * Nc * 0.723601254558268 * _sinc3(math.pi * torch.sqrt(hrad * kt.fudge))
    else:
        dq = torch.einsum("...j,jx->...x", hkl - hkl0, kt.a_star)
        rad = ((dq * dq).sum(-1) * (Na * Na * Nb * Nb * Nc * Nc)).to(dt)
        if kt.shape == "gauss":
            F_latt = Na * Nb * Nc * torch.exp(-(rad / 0.63 * kt.fudge))
        else:
            F_latt = Na * Nb * Nc * (rad * kt.fudge < 0.3969).to(dt)
    h = fh

    evshape = hkl.shape[:-1]
    skipped = dmin_skip[..., None, None].expand(evshape)
    if not kt.water:
        skipped = skipped | (F_latt == 0)

    E = T * os_ * os_ * S * P * M
    if want_hkl_only:
        return {"hkl": hkl, "skipped": skipped, "E": E}

    # structure factor lookup
    h0i, k0i, l0i = h0.long(), k0.long(), l0.long()
    if kt.table is None:
        F_cell = torch.full_like(h, kt.default_F)
        reason = torch.full(evshape, 1, dtype=torch.uint8, device=dev)
    else:
        hmin, hmax, kmin, kmax, lmin, lmax = kt.bounds
        nk, nl = kmax - kmin + 1, lmax - lmin + 1
        inside = ((h0i >= hmin) & (h0i <= hmax) & (k0i >= kmin) & (k0i <= kmax) & (l0i >= lmin) & (l0i <= lmax))
        idx = ((h0i - hmin) * nk + (k0i - kmin)) * nl + (l0i - lmin)
        idx = torch.where(inside, idx, torch.zeros_like(idx))
        F_cell = torch.where(inside, kt.table[idx], torch.full_like(h, kt.default_F))
        reason = torch.where(inside, torch.where(kt.listed[idx], 0, 3), 2).to(torch.uint8)
        if kt.interpolate:
            F_cell, reason = _interpolate(kt, hkl, F_cell, reason, skipped, rows, cols, fpixels, E, interp_cutoff)

    intensity = torch.where(skipped, torch.zeros_like(h), F_cell * F_cell * F_latt * F_latt)

    # per-subpixel factors
    if kt.point_pixel:
        omega = 1.0 / (airpath * airpath)
    else:
        omega = kt.pixel_size * kt.pixel_size / (airpath * airpath) * kt.close_distance / airpath
    if kt.thick > 0:
        parallax = (diffracted * kt.odet).sum(-1)
        t_idx = torch.arange(T, device=dev, dtype=dt)[None, None, :, None, None]
        capture = (torch.exp(-t_idx * kt.thickstep * kt.mu / parallax)
                   - torch.exp(-(t_idx + 1) * kt.thickstep * kt.mu / parallax))
        # a ray that meets the sensor from behind (curved detectors beyond 90° of its normal) is not
        # captured; C computes a negative fraction there, or inf - inf = NaN at grazing rays
        capture = torch.where(parallax > 0, capture, torch.zeros((), dtype=capture.dtype, device=dev))
    else:
        capture = torch.ones_like(omega)
    if kt.nopolar:
        polar = torch.ones_like(stol)
    else:
        polar = _polarization(kt, diffracted)
    omega, capture, polar = omega.to(dt), capture.to(dt), polar.to(dt)

    out = {"intensity": intensity, "omega": omega, "capture": capture, "polar": polar,
           "dmin_skip": dmin_skip, "skipped": skipped, "reason": reason, "E": E}
    if detail:
        out.update(hkl=hkl.to(dt), hkl0=torch.stack((h0i, k0i, l0i), -1), F_cell=F_cell, F_latt=F_latt,
                   position=pos, airpath=airpath, scattering=scat)
    return out


def _polarization(kt: KernelTensors, diffracted: torch.Tensor) -> torch.Tensor:
    """Polarisation factor per (subpixel, source), C's Kahn formula."""
    inc = kt.incident  # [S,3]
    d = diffracted[..., None, :]  # [...,1,3]
    cos2t = (d * inc).sum(-1)
    cos2t_sq = cos2t * cos2t
    sin2t_sq = 1 - cos2t_sq
    if kt.kahn == 0.0:
        return 0.5 * (1.0 + cos2t_sq)
    B_in = torch.cross(kt.polar_axis.expand_as(inc), inc, dim=-1)
    B_in = B_in / torch.linalg.vector_norm(B_in, dim=-1, keepdim=True)
    E_in = torch.cross(inc, B_in, dim=-1)
    E_in = E_in / torch.linalg.vector_norm(E_in, dim=-1, keepdim=True)
    psi = -torch.atan2((d * B_in).sum(-1), (d * E_in).sum(-1))
    return 0.5 * (1.0 + cos2t_sq - kt.kahn * torch.cos(2 * psi) * sin2t_sq)


def interp_out_of_range(kt: KernelTensors, hkl: torch.Tensor) -> torch.Tensor:
    """C's test for a 4×4×4 neighbourhood that leaves the table."""
    hmin, hmax, kmin, kmax, lmin, lmax = kt.bounds
    h, k, l = hkl.unbind(-1)
    hr, kr, lr = hmax - hmin + 1, kmax - kmin + 1, lmax - lmin + 1
    return (((h - hmin + 3) > hr) | (h - 2 < hmin) | ((k - kmin + 3) > kr) | (k - 2 < kmin)
            | ((l - lmin + 3) > lr) | (l - 2 < lmin))


def evaluation_ordinals(rows, cols, fpixels: int, E: int, evshape) -> torch.Tensor:
    """Global loop-order ordinal of every evaluation of a block."""
    pix = rows[:, None] * fpixels + cols[None, :]  # [R,C]
    e = torch.arange(E, device=rows.device).reshape(evshape[2:])
    return pix.reshape(pix.shape + (1,) * (len(evshape) - 2)) * E + e


def _interpolate(kt, hkl, F_cell, reason, skipped, rows, cols, fpixels, E, cutoff):
    evshape = hkl.shape[:-1]
    if cutoff is None:
        use = ~skipped
    else:
        ords = evaluation_ordinals(rows, cols, fpixels, E, evshape)
        use = (~skipped) & (ords < cutoff)
    if not bool(use.any()):
        return F_cell, reason
    sel = hkl[use]  # [n,3]
    hmin, hmax, kmin, kmax, lmin, lmax = kt.bounds
    nk, nl = kmax - kmin + 1, lmax - lmin + 1
    flo = torch.floor(sel)
    t = sel - flo
    w = _lagrange_weights(t)  # [n,3,4]
    base = flo.long() - 1
    offs = torch.arange(4, device=sel.device)
    hi = (base[:, 0, None] + offs - hmin)  # [n,4]
    ki = (base[:, 1, None] + offs - kmin)
    li = (base[:, 2, None] + offs - lmin)
    idx = (hi[:, :, None, None] * nk + ki[:, None, :, None]) * nl + li[:, None, None, :]  # [n,4,4,4]
    vals = kt.table[idx].to(w.dtype)
    val = torch.einsum("nijk,ni,nj,nk->n", vals, w[:, 0], w[:, 1], w[:, 2]).to(F_cell.dtype)
    F_cell = F_cell.clone()
    F_cell[use] = val
    reason = reason.clone()
    reason[use] = 4
    return F_cell, reason


# ---------------------------------------------------------------------------
# Fused render kernel (CPU)
# ---------------------------------------------------------------------------
#
# The eager kernel above materialises every per-evaluation quantity as a
# tensor (about 100 bytes per evaluation) and runs ~60 separate passes over
# them. Rendering only needs one number per pixel, so for CPU renders a small
# C++ function does the same arithmetic per evaluation in registers: geometry
# up to h, k, l in float64 (as above), the lattice factor, structure factor
# and intensity in the render dtype, summed per pixel in float64. It is
# compiled once per (dtype, crystal shape, table, fallback-count, interpolation,
# -oversample_* rule) variant with the system C++ compiler into a per-user
# cache folder and loaded with ctypes (no torch headers, so a first compile
# takes about a second). Anything it cannot do (fractional N with square
# crystals, the row where interpolation switches off, the first pixel's phi=0
# quirk) is left to the eager kernel
# by the caller. The interpolating variants also export ``tb_scan``, C's
# interpolation switch-off scan (:meth:`FastPlan.scan`). ``TORCHBRAGG_FAST=0``
# switches it off; taps always use the eager kernel.

_D_FIELDS = (("fdet", 3), ("sdet", 3), ("odet", 3), ("pix0", 3), ("subpixel", 1), ("pixel", 1),
             ("close", 1), ("thickstep", 1), ("mu", 1), ("dmin", 1), ("kahn", 1), ("I_bg", 1),
             ("scale", 1), ("N", 3), ("default_F", 1), ("fudge", 1), ("a_star", 9), ("N2prod", 1),
             ("Nprod", 1), ("scan_eps", 1), ("beam", 3), ("distance", 1))
_I_FIELDS = (("oversample", 1), ("T", 1), ("S", 1), ("P", 1), ("M", 1), ("fpixels", 1), ("point_pixel", 1),
             ("nopolar", 1), ("thick_on", 1), ("dmin_on", 1), ("water", 1), ("bounds", 6),
             ("count_bytes", 1), ("ov_thick", 1), ("ov_polar", 1), ("ov_omega", 1), ("curved", 1))


def _field_offsets(fields):
    out, pos = {}, 0
    for name, n in fields:
        out[name] = pos
        pos += n
    return out, pos


_D_OFF, _D_LEN = _field_offsets(_D_FIELDS)
_I_OFF, _I_LEN = _field_offsets(_I_FIELDS)

#: the fused CPU kernel's source (compiled with the TB_* defines of _load_variant)
CPU_RENDER_PATH = Path(__file__).with_name("cpu_render.cpp")

SHAPE_CODES = {"square": 0, "round": 1, "gauss": 2, "tophat": 3}
_CXX_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
              "-std=c++17", "-shared", "-fPIC"]
_fast_libs: Dict[tuple, object] = {}
_fast_errors: Dict[tuple, str] = {}
_fast_scans: Dict[tuple, object] = {}
_fast_probes: Dict[tuple, object] = {}
_pool_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def fast_enabled() -> bool:
    """False when the environment says ``TORCHBRAGG_FAST=0`` (or ``off``/``false``/``no``)."""
    return os.environ.get("TORCHBRAGG_FAST", "1").strip().lower() not in ("0", "off", "false", "no")


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: ``$TORCHBRAGG_CACHE_DIR`` or ``~/.cache/torchbragg/kernels``."""
    env = os.environ.get("TORCHBRAGG_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchbragg" / "kernels"


#: the arithmetic both compiled kernels share, pasted where a source says "// @include kernel_math.h"
KERNEL_MATH_PATH = Path(__file__).with_name("kernel_math.h")


def kernel_source(body: str) -> str:
    """A compiled kernel's source: the packed-parameter indices (D_*, I_*), then ``body`` with
    kernel_math.h pasted in."""
    lines = [f"#define D_{k} {v}" for k, v in _D_OFF.items()] + [f"#define I_{k} {v}" for k, v in _I_OFF.items()]
    marker = "// @include kernel_math.h"
    if body.count(marker) != 1:
        raise ValueError(f"a kernel source must hold {marker!r} once")
    return "\n".join(lines) + "\n" + body.replace(marker, KERNEL_MATH_PATH.read_text())


def _full_source() -> str:
    return kernel_source(CPU_RENDER_PATH.read_text())


def _cpu_signature() -> str:
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return sig + line
    except OSError:
        pass
    return sig + platform.processor()


def cxx_compiler() -> Optional[str]:
    """The C++ compiler the fused kernel is built with: ``$CXX``, else g++, c++ or clang++ on PATH."""
    cxx = os.environ.get("CXX")
    if cxx:
        return cxx
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def fast_library(dtype: torch.dtype, shape: str, table: bool, count: bool, interp: bool = False, over: int = 0):
    """The compiled render function for one variant (compiling it on first use), or None.

    ``over``: the -oversample_* rule (0 none, 1 C's running product, 2 per-term weighting).
    The reason for a None is in :func:`fast_kernel_error`.
    """
    key = (dtype, shape, bool(table), bool(count), bool(interp and table), int(over))
    if key in _fast_libs:
        return _fast_libs[key]
    fn = None
    try:
        fn = _load_variant(*key)
    except Exception as err:  # no compiler, compile error, unloadable library: use the eager kernel
        _fast_errors[key] = f"{type(err).__name__}: {err}"
        warnings.warn(f"torchbragg: fused render kernel unavailable ({err}); using the eager kernel",
                      RuntimeWarning, stacklevel=3)
    _fast_libs[key] = fn
    return fn


def fast_scan_function(dtype: torch.dtype, shape: str):
    """The compiled interpolation switch-off scan (:meth:`FastPlan.scan`), or None."""
    key = (dtype, shape, True, False, True, 0)
    if fast_library(*key) is None:
        return None
    return _fast_scans.get(key)


def fast_math_probe(dtype: torch.dtype, which: str, x: np.ndarray) -> np.ndarray:
    """The compiled kernels' own arithmetic (kernel_math.h and the CPU exponential) on ``x``, in ``dtype``.

    ``which``: ``"sinpi"``, ``"cospi"``, ``"exp"`` or ``"round_factor"`` (of hrad = x,
    fudge 1, N 1). For tests of that arithmetic against numpy.
    """
    codes = {"sinpi": 0, "cospi": 1, "exp": 2, "round_factor": 3}
    key = (dtype, "square", False, False, False, 0)
    if fast_library(*key) is None:
        raise RuntimeError(f"fused kernel unavailable: {fast_kernel_error(dtype, 'square', False, False)}")
    xs = np.ascontiguousarray(x, dtype=np.float64)
    out = np.empty_like(xs)
    _fast_probes[key](codes[which], ctypes.c_void_p(xs.ctypes.data), ctypes.c_void_p(out.ctypes.data), xs.size)
    return out


def fast_kernel_error(dtype: torch.dtype, shape: str, table: bool, count: bool, interp: bool = False,
                      over: int = 0) -> Optional[str]:
    return _fast_errors.get((dtype, shape, bool(table), bool(count), bool(interp and table), int(over)))


#: ctypes argument types of a compiled render entry point (the fused kernel's ``tb_render``, the GPU
#: kernel's host build ``tb_render_host``): dp, ip, lattice, src, table, mask, row0, nrows, col0, ncols,
#: image, image_stride, counts, reasons, fb_stride, row statistics (GPU: per-pixel solid angles)
RENDER_ARGTYPES = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int64,
                                                                  ctypes.c_void_p, ctypes.c_void_p,
                                                                  ctypes.c_int64, ctypes.c_void_p]


def cached_file(prefix: str, key_parts: Tuple[str, ...], suffix: str, build) -> Path:
    """``<kernel cache>/<prefix><hash of key_parts><suffix>``, made by ``build(temporary path)`` when
    missing and moved into place atomically (concurrent processes see a whole file or none)."""
    key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()[:20]
    folder = kernel_cache_dir()
    path = folder / f"{prefix}{key}{suffix}"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=suffix, prefix=".tb_", dir=folder)
        os.close(fd)
        try:
            build(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def compile_shared_library(cxx: str, flag_sets, source: str, out: str, extra=(), source_suffix: str = ".cpp") -> None:
    """Compile ``source`` into the shared library ``out`` with the first of ``flag_sets`` that works."""
    fd, src = tempfile.mkstemp(suffix=source_suffix, prefix=".tb_", dir=os.path.dirname(out))
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(source)
        for flags in flag_sets:
            cmd = [cxx, *flags, *extra, src, "-o", out]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as err:
                raise RuntimeError(f"{cxx}: {err}") from None
            if proc.returncode == 0:
                return
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")
    finally:
        os.unlink(src)


def _load_variant(dtype, shape, table, count, interp, over):
    real = "double" if dtype == torch.float64 else "float"
    defines = [f"-DTB_REAL={real}", f"-DTB_DOUBLE={int(real == 'double')}", f"-DTB_SHAPE={SHAPE_CODES[shape]}",
               f"-DTB_TABLE={int(table)}", f"-DTB_COUNT={int(count)}", f"-DTB_INTERP={int(interp)}",
               f"-DTB_OVER={int(over)}", "-DTB_ENTRY=tb_render"]
    source = _full_source()
    cxx = cxx_compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (g++, c++ or clang++ on PATH, or CXX): renders take the "
                           "PyTorch path, about 75 times slower; install g++ (scripts/bootstrap.sh does)")
    portable = [f for f in _CXX_FLAGS if f != "-march=native"]  # for compilers without -march=native
    lib_path = cached_file("tb_render_", (source, cxx, *defines, *_CXX_FLAGS, _cpu_signature()), ".so",
                           lambda out: compile_shared_library(cxx, (_CXX_FLAGS, portable), source, out, defines))
    lib = ctypes.CDLL(str(lib_path))
    fn = lib.tb_render
    P = ctypes.c_void_p
    I64 = ctypes.c_int64
    fn.argtypes = RENDER_ARGTYPES
    fn.restype = ctypes.c_int
    probe = lib.tb_math_probe
    probe.argtypes = [I64, P, P, I64]
    probe.restype = ctypes.c_int
    _fast_probes[(dtype, shape, table, count, interp, over)] = probe
    if interp:  # the interpolating variants also hold C's switch-off scan
        scan = lib.tb_scan
        scan.argtypes = [P, P, P, P, P, I64, I64, I64, I64, P]
        scan.restype = ctypes.c_int
        _fast_scans[(dtype, shape, table, count, interp, over)] = scan
    return fn


#: columns of the per-row statistics the fused kernel returns (values rounded to float32 like C's float
#: image; ``m2`` is over every ROI pixel of the row, masked ones as 0, about the row's ROI mean)
ROW_STATS = ("count", "sum", "sumsq", "m2", "max", "argmax", "omega", "roi_count")


def row_statistics(values: torch.Tensor, active: Optional[torch.Tensor] = None,
                   omega: Optional[torch.Tensor] = None) -> np.ndarray:
    """The fused kernel's ``[rows, 8]`` row statistics for ROI rows rendered another way.

    ``values`` are the rows' ROI pixels as rendered (0 where masked), ``active``
    which of them are rendered (broadcast to ``values``; None: all of them), ``omega``
    each row's solid-angle sum. The reductions run on the values' device; only the
    ``[rows, 8]`` result moves.
    """
    v = values.detach().to(torch.float32).to(torch.float64)
    nroi = torch.full(v.shape[:-1], float(v.shape[-1]), dtype=torch.float64, device=v.device)
    if v.shape[-1] == 0:
        zero = torch.zeros_like(nroi)
        mx, am = torch.full_like(nroi, -math.inf), torch.full_like(nroi, -1.0)
        cnt, s, sq, m2 = zero, zero, zero, zero
    elif active is None:  # every pixel rendered: one pass for mean and variance, one for the maximum
        var, mean = torch.var_mean(v, dim=-1, correction=0)
        cnt = nroi
        s = mean * nroi
        m2 = var * nroi
        sq = m2 + s * mean  # sum v^2 = n var + n mean^2 (both terms >= 0: no cancellation)
        mx, am = v.max(-1)
        am = am.to(torch.float64)
    else:
        act = active.to(v.device).expand_as(v)
        cnt = act.sum(-1).to(torch.float64)
        z = torch.where(act, v, torch.zeros((), dtype=torch.float64, device=v.device))
        s = z.sum(-1)
        sq = (z * z).sum(-1)
        d = z - (s / nroi)[:, None]
        m2 = (d * d).sum(-1)
        masked = torch.where(act, v, torch.full((), -math.inf, dtype=torch.float64, device=v.device))
        mx, am = masked.max(-1)
        am = torch.where(torch.isfinite(mx), am.to(torch.float64), torch.full_like(s, -1.0))
    om = torch.zeros_like(s) if omega is None else omega.detach().to(v.device, torch.float64)
    return torch.stack([cnt, s, sq, m2, mx, am, om, nroi], -1).cpu().numpy()


def combine_row_statistics(stats: np.ndarray, row_index: np.ndarray, col0: int):
    """Whole-image statistics from row statistics (Chan's pairwise variance).

    Returns ``(n, mean, rms, rmsd, max_I, (slow, fast) of the first maximum, omega_sum)``
    with the conventions of :meth:`Simulation._stats`: mean and rms over the
    rendered pixels, rmsd about that mean over every ROI pixel (masked ones 0).
    """
    cnt, s, sq, m2, mx, am, om, nroi = (stats[:, j] for j in range(len(ROW_STATS)))
    n = int(cnt.sum())
    omega_sum = float(om.sum())
    if n == 0:
        return 0, 0.0, 0.0, 0.0, 0.0, (0, 0), omega_sum
    with np.errstate(invalid="ignore", over="ignore"):  # an image beyond the dtype: NaN/inf statistics, no warning
        mean = float(s.sum()) / n
        rows = nroi > 0
        roi_mean = np.where(rows, s / np.where(rows, nroi, 1.0), 0.0)
        M2 = float((m2 + nroi * (roi_mean - mean) ** 2)[rows].sum())
        rms = math.sqrt(float(sq.sum()) / max(1, n - 1)) if math.isfinite(float(sq.sum())) else math.inf
        rmsd = math.sqrt(M2 / max(1, int(nroi.sum()) - 1)) if M2 >= 0 else math.nan
    has = cnt > 0
    order = np.argsort(row_index, kind="stable")
    mx_o = np.where(has, mx, -np.inf)[order]
    j = int(np.argmax(mx_o))  # first row holding the maximum
    max_I = float(mx_o[j])
    where = (int(row_index[order][j]), int(am[order][j]) + col0)
    return n, mean, rms, rmsd, max_I, where, omega_sum


def _thread_pool(n: int) -> Optional[ThreadPoolExecutor]:
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


def fallback_count_dtype(evaluations_per_pixel: int) -> torch.dtype:
    """dtype of fallback-map counts: the smallest signed integer that holds a pixel's evaluations.

    int8 up to 127, int16 up to 32767, int32 beyond. The map is written into fresh memory on
    every render, and the operating system's zeroing of those pages is most of its cost when a
    pixel has few evaluations, so the narrower the better.
    """
    for dt in (torch.int8, torch.int16):
        if evaluations_per_pixel <= torch.iinfo(dt).max:
            return dt
    return torch.int32


def fast_unsupported(kt: KernelTensors) -> Optional[str]:
    """Why the fused CPU kernel cannot render this set-up (None: it can)."""
    if kt.device.type != "cpu":
        return "not a CPU render"
    return fused_unsupported(kt)


def fused_unsupported(kt: KernelTensors) -> Optional[str]:
    """Why neither fused kernel (CPU or GPU) covers this set-up, whatever the device (None: they do)."""
    if kt.shape not in SHAPE_CODES:
        return f"crystal shape {kt.shape}"
    if kt.shape == "square" and any(n > 1 and n != int(n) for n in kt.N):
        return "fractional N with a square crystal"
    return None


class FastPlan:
    """Packed parameters of one simulation for the fused kernel.

    :meth:`run` renders a block of whole rows straight into the image (and the
    fallback maps) and returns each row's solid-angle sum.
    """

    #: what ``Simulation.last_kernel`` calls this kernel
    label = "fused CPU kernel"

    def __init__(self, kt: KernelTensors, *, I_bg: float, scale: float, fpixels: int,
                 mask: Optional[np.ndarray] = None, oversample_factors: Tuple[bool, bool, bool] = (False, False, False),
                 running_product: bool = True):
        why = fused_unsupported(kt)  # the packing serves the GPU kernel too (gpu_kernel.GpuPlan)
        if why is not None:
            raise ValueError(why)
        self.kt = kt
        self.dtype = kt.dtype
        self.fpixels = int(fpixels)
        d = np.zeros(_D_LEN, dtype=np.float64)
        i = np.zeros(_I_LEN, dtype=np.int64)
        g = lambda x: np.asarray(x.detach().cpu(), dtype=np.float64)  # noqa: E731
        for name in ("fdet", "sdet", "odet", "pix0"):
            d[_D_OFF[name]:_D_OFF[name] + 3] = g(getattr(kt, name))
        d[_D_OFF["subpixel"]] = kt.subpixel_size
        d[_D_OFF["pixel"]] = kt.pixel_size
        d[_D_OFF["close"]] = kt.close_distance
        d[_D_OFF["beam"]:_D_OFF["beam"] + 3] = g(kt.beam)
        d[_D_OFF["distance"]] = kt.distance
        d[_D_OFF["thickstep"]] = kt.thickstep
        d[_D_OFF["mu"]] = kt.mu
        d[_D_OFF["dmin"]] = kt.dmin_A
        d[_D_OFF["kahn"]] = kt.kahn
        d[_D_OFF["I_bg"]] = I_bg
        d[_D_OFF["scale"]] = scale
        Na, Nb, Nc = (float(n) for n in kt.N)
        if kt.shape == "square":  # the eager kernel leaves out axes with N <= 1
            d[_D_OFF["N"]:_D_OFF["N"] + 3] = [n if n > 1 else 1.0 for n in (Na, Nb, Nc)]
        else:
            d[_D_OFF["N"]:_D_OFF["N"] + 3] = [Na, Nb, Nc]
        d[_D_OFF["default_F"]] = kt.default_F
        d[_D_OFF["fudge"]] = kt.fudge
        d[_D_OFF["a_star"]:_D_OFF["a_star"] + 9] = g(kt.a_star).reshape(-1)
        d[_D_OFF["N2prod"]] = Na * Na * Nb * Nb * Nc * Nc
        d[_D_OFF["Nprod"]] = Na * Nb * Nc
        # the switch-off scan's margin on h, k, l: far above the rounding of a·q (terms up to
        # 2|a|/lambda) however the eager kernel orders its sums
        lat_abs = float(np.abs(g(kt.lattice)).sum(-1).max()) if kt.lattice.numel() else 0.0
        bound_abs = max((abs(b) for b in kt.bounds), default=0) if kt.bounds is not None else 0
        d[_D_OFF["scan_eps"]] = 1e-8 + 1e-12 * (2.0 * float(g(kt.inv_lambda).max()) * lat_abs + bound_abs)
        T = kt.thick_offsets.numel()
        S = kt.incident.shape[0]
        P, M = kt.lattice.shape[0], kt.lattice.shape[1]
        i[_I_OFF["oversample"]] = kt.oversample
        i[_I_OFF["T"]], i[_I_OFF["S"]], i[_I_OFF["P"]], i[_I_OFF["M"]] = T, S, P, M
        i[_I_OFF["fpixels"]] = self.fpixels
        i[_I_OFF["point_pixel"]] = int(kt.point_pixel)
        i[_I_OFF["curved"]] = int(kt.curved)
        i[_I_OFF["nopolar"]] = int(kt.nopolar)
        i[_I_OFF["thick_on"]] = int(kt.thick > 0)
        i[_I_OFF["dmin_on"]] = int(kt.dmin_A > 0)
        i[_I_OFF["water"]] = int(kt.water)
        if kt.bounds is not None:
            i[_I_OFF["bounds"]:_I_OFF["bounds"] + 6] = kt.bounds
        self.dparams, self.iparams = d, i
        self.lattice = np.ascontiguousarray(g(kt.lattice).reshape(P * M, 9))
        inc = g(kt.incident)
        src = np.zeros((S, 10), dtype=np.float64)
        src[:, 0:3] = inc
        src[:, 3] = g(kt.inv_lambda)
        if not kt.nopolar and kt.kahn != 0.0:  # the eager kernel's polarisation frame
            axis = np.broadcast_to(g(kt.polar_axis), inc.shape)
            B = np.cross(axis, inc)
            B = B / np.linalg.norm(B, axis=-1, keepdims=True)
            E = np.cross(inc, B)
            E = E / np.linalg.norm(E, axis=-1, keepdims=True)
            src[:, 4:7], src[:, 7:10] = B, E
        self.src = np.ascontiguousarray(src)
        # the kernel's table has one extra entry, default_F, used for every index outside the box
        self.table = None
        self._flagged = None
        if kt.table is not None:
            extra = torch.full((1,), kt.default_F, dtype=kt.table.dtype)
            self.table = torch.cat([kt.table.detach().cpu(), extra]).contiguous()
        self.mask = None if mask is None else np.ascontiguousarray(np.asarray(mask) != 0, dtype=np.uint8)
        self.evaluations_per_pixel = T * kt.oversample ** 2 * S * P * M
        #: fallback counts: the smallest signed integer that holds a pixel's evaluations
        self.count_dtype = fallback_count_dtype(self.evaluations_per_pixel)
        i[_I_OFF["count_bytes"]] = torch.empty((), dtype=self.count_dtype).element_size()
        #: -oversample_thick/_polar/_omega: which factors apply per evaluation, and the kernel variant
        #: (0 none, 1 C's running product of the pixel's sum, 2 each term weighted by its own factors)
        self.oversample_factors = tuple(bool(f) for f in oversample_factors)
        for name, on in zip(("ov_thick", "ov_polar", "ov_omega"), self.oversample_factors):
            i[_I_OFF[name]] = int(on)
        self.over = 0 if not any(self.oversample_factors) else (1 if running_product else 2)

    def flagged_table(self) -> torch.Tensor:
        """The table for fallback counting: magnitudes, the sign bit set on every default_F entry.

        Only squared there, so the image is unchanged; the sign tells the kernel a lookup used
        default_F (unlisted, or the extra entry outside the box) without a second gather.
        """
        if self._flagged is None:
            kt = self.kt
            flag = torch.cat([~kt.listed.detach().cpu(), torch.ones(1, dtype=torch.bool)])
            mag = self.table.abs()
            self._flagged = torch.where(flag, -mag, mag).contiguous()
        return self._flagged

    @property
    def interpolates(self) -> bool:
        """Whether the compiled kernels can interpolate this table: at least 4 entries along each
        axis, the neighbourhood tb_tricubic reads (else the eager kernel interpolates)."""
        b = self.kt.bounds
        return b is not None and all(b[2 * i + 1] - b[2 * i] + 1 >= 4 for i in range(3))

    def wide_table(self) -> torch.Tensor:
        """The table in float64, what the interpolating variants read (the same values)."""
        if getattr(self, "_wide", None) is None:
            self._wide = self.table.to(torch.float64).contiguous()
        return self._wide

    def function(self, count: bool, interp: bool = False):
        if interp and self.table is not None and not self.interpolates:
            return None
        return fast_library(self.dtype, self.kt.shape, self.table is not None, count, interp, self.over)

    def scan_function(self):
        """The compiled switch-off scan for this set-up, or None (no table, no compiler)."""
        if self.table is None:
            return None
        return fast_scan_function(self.dtype, self.kt.shape)

    def scan(self, row0: int, nrows: int, col0: int, ncols: int,
             threads: Optional[int] = None) -> Optional[tuple]:
        """C's interpolation switch-off scan over rows ``row0 ..`` and columns ``col0 ..``.

        Returns None when no evaluation there (masked pixels left out) can leave the table, else
        ``(ordinal, certain)``: the global loop-order ordinal of the first evaluation that is not
        certainly harmless, and whether it certainly leaves the table unskipped (``False``: it lies
        within rounding of C's bounds or skip tests, and the eager kernel has to decide it). The
        first pixel's phi=0 quirk is not applied: the caller checks that pixel eagerly. Row slices
        run on a thread pool in order; slices after a row with a hit are not scanned.
        """
        fn = self.scan_function()
        if fn is None:
            raise RuntimeError("fused scan unavailable")
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
                raise RuntimeError(f"fused scan failed ({rc})")
            if out[0] >= 0:
                with lock:
                    hits.append((int(out[0]), bool(out[1])))
                    first_hit_row[0] = min(first_hit_row[0], int(out[0]) // E // self.fpixels)

        n = max(1, min(int(threads or torch.get_num_threads()), nrows))
        pool = _thread_pool(n)
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
            counts: Optional[torch.Tensor] = None, reasons: Optional[torch.Tensor] = None,
            threads: Optional[int] = None, interp: bool = False) -> np.ndarray:
        """Render rows ``row0 .. row0+nrows-1``, columns ``col0 .. col0+ncols-1``.

        ``image`` (and ``counts``/``reasons`` for a fallback map, ``counts`` of
        :attr:`count_dtype`) are the ``[nrows, ncols]`` views to fill; rows may
        be strided, columns must be contiguous. ``interp`` interpolates every lookup of the block (the
        caller keeps it to rows before C's switch-off point). Returns the
        ``[nrows, 8]`` float64 row statistics (see :data:`ROW_STATS`).
        """
        count = counts is not None
        fn = self.function(count, interp)
        if fn is None:
            raise RuntimeError("fused kernel unavailable")
        for t, dt in ((image, self.dtype), (counts, self.count_dtype), (reasons, torch.uint8)):
            if t is not None and (t.dtype != dt or t.shape != (nrows, ncols) or t.stride(1) != 1
                                  or t.device.type != "cpu"):
                raise ValueError("fused kernel output must be a row-strided CPU view of the block")
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
                raise RuntimeError(f"fused kernel failed ({rc})")

        n = max(1, min(int(threads or torch.get_num_threads()), nrows))
        pool = _thread_pool(n)
        if pool is None:
            call(row0, nrows)
        else:
            # several slices per thread, taken from a queue, balance uneven rows (masks)
            step = max(1, -(-nrows // (4 * n)))
            futures = [pool.submit(call, r, min(step, row0 + nrows - r)) for r in range(row0, row0 + nrows, step)]
            for f in futures:
                f.result()
        return stats[:nrows]
