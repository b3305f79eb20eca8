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

_FAST_SOURCE = r"""// torchbragg fused render kernel. Compiled on first use by torchbragg.kernel
// with -DTB_REAL=float|double -DTB_SHAPE=0..3 -DTB_TABLE=0|1 -DTB_COUNT=0|1 -DTB_INTERP=0|1 -DTB_OVER=0..2
// (TB_OVER: -oversample_thick/_polar/_omega factors per evaluation, 1 as C's running product of the
// pixel's sum, 2 each term weighted by its own factors; which factors: I_ov_*);
// the parameter indices (D_*, I_*) are generated from kernel.py and prepended.
#include <math.h>
#include <cmath>
#include <cstdint>
#include <cstring>

typedef TB_REAL real;
#if TB_INTERP
typedef double tb_table_t;  // interpolation reads 64 entries a lookup: the table comes widened already
#else
typedef real tb_table_t;
#endif
#define CB 256

#define TB_HD static inline
// @include kernel_math.h

// 2^m for an integer-valued m in the exponent range (m >= -1022 double, -126 float), from the exponent
// bits: m + bias added to 1.5 * 2^52 (2^23) lands in the low mantissa bits, a shift moves it into the
// exponent field (integer adds and shifts only, so it vectorises without AVX-512)
static inline double tb_pow2(double m) {
    const double t = m + (1023.0 + 6755399441055744.0);
    uint64_t bits;
    std::memcpy(&bits, &t, sizeof bits);
    bits <<= 52;
    double v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
}
static inline float tb_pow2(float m) {
    const float t = m + (127.0f + 12582912.0f);
    uint32_t bits;
    std::memcpy(&bits, &t, sizeof bits);
    bits <<= 23;
    float v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
}

// e^x in the render dtype, written to vectorise (the C library's exp does not): x = k ln2 + r with
// |r| <= ln2/2 (ln2 in two parts), e^r by its Taylor series, times 2^k in two steps so that subnormal
// results are kept; 0 below half the smallest subnormal, infinity above the largest value
static inline real tb_exp(real x) {
#if TB_DOUBLE
    const real lo_limit = (real)-745.1332191019412, hi_limit = (real)709.782712893384;
    const real ln2_hi = (real)0.6931471803691238, ln2_lo = (real)1.9082149292705877e-10;
#else
    const real lo_limit = (real)-103.97208f, hi_limit = (real)88.72283f;
    const real ln2_hi = (real)0.693145751953125f, ln2_lo = (real)1.428606765330187e-06f;
#endif
    const real k = rint(x * (real)1.4426950408889634);
    const real r = (x - k * ln2_hi) - k * ln2_lo;
    real p;
#if TB_DOUBLE
    p = (real)(1.0 / 6227020800.0);
    p = p * r + (real)(1.0 / 479001600.0);
    p = p * r + (real)(1.0 / 39916800.0);
    p = p * r + (real)(1.0 / 3628800.0);
    p = p * r + (real)(1.0 / 362880.0);
    p = p * r + (real)(1.0 / 40320.0);
#else
    p = (real)(1.0 / 40320.0);
#endif
    p = p * r + (real)(1.0 / 5040.0);
    p = p * r + (real)(1.0 / 720.0);
    p = p * r + (real)(1.0 / 120.0);
    p = p * r + (real)(1.0 / 24.0);
    p = p * r + (real)(1.0 / 6.0);
    p = p * r + (real)0.5;
    p = p * r + (real)1;
    p = p * r + (real)1;
    const real k1 = floor(k * (real)0.5), k2 = k - k1;
    const real v = p * tb_pow2(k1) * tb_pow2(k2);
    return x < lo_limit ? (real)0 : (x > hi_limit ? (real)INFINITY : v);
}

// -curved_det positions of a block of n columns from cstart (fast subpixel offset fo, slow part bx..bz,
// sensor layer offset toff), the flat position's arithmetic of the render loop, then tb_curve
static inline void tb_curved_block(double* X, double* Y, double* Z, int n, int64_t cstart, int64_t os, double fo,
                                   double bx, double by, double bz, double toff, const double* dp) {
    const double sub = dp[D_subpixel];
    for (int c = 0; c < n; ++c) {
        const double Fdet = ((double)((cstart + c) * os) + fo) * sub;
        double p[3] = {Fdet * dp[D_fdet + 0] + bx + toff * dp[D_odet + 0] + dp[D_pix0 + 0],
                       Fdet * dp[D_fdet + 1] + by + toff * dp[D_odet + 1] + dp[D_pix0 + 1],
                       Fdet * dp[D_fdet + 2] + bz + toff * dp[D_odet + 2] + dp[D_pix0 + 2]};
        tb_curve(p, dp);
        X[c] = p[0]; Y[c] = p[1]; Z[c] = p[2];
    }
}

#if TB_COUNT
// one block's fallback counts (int8, int16 or int32: the smallest that holds a pixel's evaluations)
// and dominant reasons, ties to the lower code: 1 without a table; with one, 3 (unlisted) only when
// it outnumbers 2 (outside the box)
template <typename C>
static inline void store_counts(C* cs, uint8_t* rs, const uint8_t* mrow, const uint32_t* cnt,
                                const uint32_t* cnt_out, int n) {
#pragma omp simd
    for (int c = 0; c < n; ++c) {
        const bool active = mrow == nullptr || mrow[c] != 0;
        const uint32_t tot = TB_INTERP ? 0u : cnt[c], out_n = cnt_out[c];
        const uint8_t dom = TB_TABLE ? (tot - out_n > out_n ? 3 : 2) : 1;
        cs[c] = (C)(active ? tot : 0u);
        rs[c] = (active && tot > 0) ? dom : (uint8_t)0;
    }
}
#endif

// Fallback counting (TB_COUNT): with a table, ``table`` is the flagged copy whose sign bit marks the
// entries that are default_F (unlisted ones and the extra last entry used outside the box; the values
// are only ever squared here), so counting needs no second gather: two 32-bit counters per pixel, the
// evaluations that used default_F and those of them outside the box. Interpolated lookups never use
// default_F, so the interpolating variant writes zero counts.
extern "C" int TB_ENTRY(const double* dp, const int64_t* ip, const double* lattice, const double* src,
                        const tb_table_t* table, const uint8_t* mask,
                        int64_t row0, int64_t nrows, int64_t col0, int64_t ncols,
                        real* image, int64_t image_stride, void* counts, uint8_t* reasons,
                        int64_t fb_stride, double* row_stats) {
    const int64_t os = ip[I_oversample], T = ip[I_T], S = ip[I_S], P = ip[I_P], M = ip[I_M];
    const int64_t fpixels = ip[I_fpixels];
    const bool point_pixel = ip[I_point_pixel] != 0, nopolar = ip[I_nopolar] != 0;
    const bool thick_on = ip[I_thick_on] != 0, dmin_on = ip[I_dmin_on] != 0, water = ip[I_water] != 0;
    const bool curved = ip[I_curved] != 0;
    const double sub = dp[D_subpixel], pix = dp[D_pixel], close = dp[D_close];
    const double fx = dp[D_fdet + 0], fy = dp[D_fdet + 1], fz = dp[D_fdet + 2];
    const double sx_ = dp[D_sdet + 0], sy_ = dp[D_sdet + 1], sz_ = dp[D_sdet + 2];
    const double ox = dp[D_odet + 0], oy = dp[D_odet + 1], oz = dp[D_odet + 2];
    const double p0x = dp[D_pix0 + 0], p0y = dp[D_pix0 + 1], p0z = dp[D_pix0 + 2];
    const double thickstep = dp[D_thickstep], mu = dp[D_mu], dmin = dp[D_dmin], kahn = dp[D_kahn];
    const double I_bg = dp[D_I_bg], scale = dp[D_scale];
    const real na = (real)dp[D_N + 0], nb = (real)dp[D_N + 1], nc = (real)dp[D_N + 2];
    const bool na_even = ((int64_t)dp[D_N + 0] - 1) % 2 != 0;
    const bool nb_even = ((int64_t)dp[D_N + 1] - 1) % 2 != 0;
    const bool nc_even = ((int64_t)dp[D_N + 2] - 1) % 2 != 0;
    const real default_F = (real)dp[D_default_F];
    const double fudge = dp[D_fudge];
    (void)fudge; (void)table; (void)counts; (void)reasons; (void)fb_stride;
    const int64_t count_bytes = ip[I_count_bytes];
    (void)count_bytes;
#if TB_TABLE
    const int64_t hmin = ip[I_bounds + 0], hmax = ip[I_bounds + 1], kmin = ip[I_bounds + 2];
    const int64_t kmax = ip[I_bounds + 3], lmin = ip[I_bounds + 4], lmax = ip[I_bounds + 5];
    const double dhmin = (double)hmin, dhmax = (double)hmax, dkmin = (double)kmin, dkmax = (double)kmax;
    const double dlmin = (double)lmin, dlmax = (double)lmax;
    const double dnk = (double)(kmax - kmin + 1), dnl = (double)(lmax - lmin + 1);
    const double dsize = (double)((hmax - hmin + 1) * (kmax - kmin + 1) * (lmax - lmin + 1));
    const double dnh = (double)(hmax - hmin + 1);
    const double lo[3] = {dhmin, dkmin, dlmin};
    (void)dnh; (void)lo;
#endif
    const int64_t first_sub = 0, last_t = T - 1;
    (void)first_sub;

    alignas(64) double dx[CB], dy[CB], dz[CB], cap[CB];
    alignas(64) double qx[CB], qy[CB], qz[CB];
    alignas(64) double dskip[CB];  // 1.0 where -dmin skips the (subpixel, source)
    alignas(64) double acc[CB], om_first[CB], cap_last[CB], pol_first[CB];
#if TB_OVER
    // per-evaluation factors of the -oversample_* flags: fsub per subpixel (capture, omega), fpol per
    // (subpixel, source) (times polarisation); fsum their sum (TB_OVER 2); om_sum the solid angles
    const bool ov_thick = ip[I_ov_thick] != 0, ov_polar = ip[I_ov_polar] != 0, ov_omega = ip[I_ov_omega] != 0;
    alignas(64) double fsub[CB], fpol[CB], fsum[CB], om_sum[CB];
#endif
    alignas(64) unsigned char found[CB];
#if TB_COUNT
    alignas(64) uint32_t cnt[CB], cnt_out[CB];
#endif

    for (int64_t r = 0; r < nrows; ++r) {
        const int64_t row = row0 + r;
        double omega_row = 0.0;
        for (int64_t cb = 0; cb < ncols; cb += CB) {
            const int n = (int)((ncols - cb) < CB ? (ncols - cb) : CB);
            const int64_t cstart = col0 + cb;
            for (int c = 0; c < n; ++c) {
                acc[c] = 0.0; om_first[c] = 0.0; cap_last[c] = 1.0; pol_first[c] = 0.0; found[c] = 0;
#if TB_OVER
                acc[c] = TB_OVER == 1 ? I_bg : 0.0;  // C's running product starts from the background
                fsum[c] = 0.0; om_sum[c] = 0.0;
#endif
#if TB_COUNT
                cnt[c] = 0; cnt_out[c] = 0;
#endif
            }
            int n_found = 0;
            for (int64_t t = 0; t < T; ++t) {
                const double toff = (double)t * thickstep;
                for (int64_t ss = 0; ss < os; ++ss) {
                    const double Sdet = ((double)(row * os) + ((double)ss + 0.5)) * sub;
                    const double bx = Sdet * sx_, by = Sdet * sy_, bz = Sdet * sz_;
                    for (int64_t sf = 0; sf < os; ++sf) {
                        const double fo = (double)sf + 0.5;
                        const bool first_sub_px = (t == 0 && ss == 0 && sf == 0);
                        const bool last_cap = (t == last_t && ss == 0 && sf == 0);
                        if (curved)  // positions on the sphere first (a loop of its own keeps the flat one vectorised)
                            tb_curved_block(dx, dy, dz, n, cstart, os, fo, bx, by, bz, toff, dp);
#pragma omp simd
                        for (int c = 0; c < n; ++c) {
                            const double Fdet = ((double)((cstart + c) * os) + fo) * sub;
                            const double px = curved ? dx[c] : Fdet * fx + bx + toff * ox + p0x;
                            const double py = curved ? dy[c] : Fdet * fy + by + toff * oy + p0y;
                            const double pz = curved ? dz[c] : Fdet * fz + bz + toff * oz + p0z;
                            const double air = std::sqrt(px * px + py * py + pz * pz);
                            const double inv = 1.0 / air;
                            dx[c] = px * inv; dy[c] = py * inv; dz[c] = pz * inv;
                            if (first_sub_px) {
                                om_first[c] = point_pixel ? 1.0 / (air * air)
                                                          : pix * pix / (air * air) * close / air;
                            }
#if TB_OVER
                            const double om = point_pixel ? 1.0 / (air * air) : pix * pix / (air * air) * close / air;
                            om_sum[c] += om;
                            fsub[c] = ov_omega ? om : 1.0;
#endif
                        }
                        if (thick_on) {
                            for (int c = 0; c < n; ++c) {
                                const double parallax = dx[c] * ox + dy[c] * oy + dz[c] * oz;
                                // from behind the sensor (parallax <= 0): not captured
                                cap[c] = parallax > 0.0 ? std::exp(-(double)t * thickstep * mu / parallax)
                                         - std::exp(-((double)t + 1.0) * thickstep * mu / parallax) : 0.0;
                            }
                            if (last_cap)
                                for (int c = 0; c < n; ++c) cap_last[c] = cap[c];
#if TB_OVER
                            if (ov_thick)
                                for (int c = 0; c < n; ++c) fsub[c] *= cap[c];
#endif
                        }
                        for (int64_t s = 0; s < S; ++s) {
                            const double* sp = src + 10 * s;
                            const double ix = sp[0], iy = sp[1], iz = sp[2], il = sp[3];
#pragma omp simd
                            for (int c = 0; c < n; ++c) {
                                const double X = (dx[c] - ix) * il, Y = (dy[c] - iy) * il, Z = (dz[c] - iz) * il;
                                qx[c] = X; qy[c] = Y; qz[c] = Z;
                                bool skip = false;
                                if (dmin_on) {
                                    const double stol = 0.5 * std::sqrt(X * X + Y * Y + Z * Z);
                                    skip = (stol > 0.0) && (dmin > 0.5 / (stol > 0.0 ? stol : 1.0));
                                }
                                dskip[c] = skip ? 1.0 : 0.0;
                            }
#if TB_OVER
#pragma omp simd
                            for (int c = 0; c < n; ++c) {  // this (subpixel, source)'s polarisation
                                const double polar = tb_polar(dx[c], dy[c], dz[c], sp, kahn, nopolar);
                                fpol[c] = ov_polar ? fsub[c] * polar : fsub[c];
                            }
#endif
                            if (n_found < n) {
                                // polarisation of the first (subpixel, source) not skipped by -dmin
                                int newly = 0;
#pragma omp simd reduction(+ : newly)
                                for (int c = 0; c < n; ++c) {
                                    const double polar = tb_polar(dx[c], dy[c], dz[c], sp, kahn, nopolar);
                                    const bool take = !found[c] && dskip[c] == 0.0;
                                    pol_first[c] = take ? polar : pol_first[c];
                                    found[c] = take ? 1 : found[c];
                                    newly += take ? 1 : 0;
                                }
                                n_found += newly;
                            }
                            for (int64_t pm = 0; pm < P * M; ++pm) {
                                const double* L = lattice + 9 * pm;
                                const double a0 = L[0], a1 = L[1], a2 = L[2];
                                const double b0 = L[3], b1 = L[4], b2 = L[5];
                                const double e0 = L[6], e1 = L[7], e2 = L[8];
#pragma omp simd
                                for (int c = 0; c < n; ++c) {
                                    const double X = qx[c], Y = qy[c], Z = qz[c];
                                    const double h = X * a0 + Y * a1 + Z * a2;
                                    const double k = X * b0 + Y * b1 + Z * b2;
                                    const double l = X * e0 + Y * e1 + Z * e2;
                                    const double h0 = std::ceil(h - 0.5), k0 = std::ceil(k - 0.5),
                                                 l0 = std::ceil(l - 0.5);
                                    const real fh = (real)(h - h0), fk = (real)(k - k0), fl = (real)(l - l0);
                                    real Fl;
#if TB_SHAPE == 0
                                    Fl = tb_sincg(fh, h0, na, na_even) * tb_sincg(fk, k0, nb, nb_even)
                                         * tb_sincg(fl, l0, nc, nc_even);
#elif TB_SHAPE == 1
                                    Fl = tb_round_factor(fh * fh * na * na + fk * fk * nb * nb + fl * fl * nc * nc,
                                                         (real)fudge, na * nb * nc);
#else
                                    {
                                        const double dh = h - h0, dk = k - k0, dl = l - l0;
                                        const double* A = dp + D_a_star;
                                        const double u = dh * A[0] + dk * A[3] + dl * A[6];
                                        const double v = dh * A[1] + dk * A[4] + dl * A[7];
                                        const double w = dh * A[2] + dk * A[5] + dl * A[8];
                                        const real rad = (real)((u * u + v * v + w * w) * dp[D_N2prod]);
#if TB_SHAPE == 2
                                        Fl = (real)dp[D_Nprod] * tb_exp(-(rad / (real)0.63 * (real)fudge));
#else
                                        Fl = (real)dp[D_Nprod] * (real)(rad * (real)fudge < (real)0.3969);
#endif
                                    }
#endif
                                    // a zero lattice factor skips the lookup (C); sin(pi N h) of a square crystal is
                                    // never exactly zero in C's float64 or the eager kernel, but the reduced
                                    // argument here can be, so square crystals never skip on it
                                    const bool skipped = (dskip[c] != 0.0)
                                                         | (!water & (TB_SHAPE != 0) & (Fl == (real)0));
                                    real Fc;
#if TB_TABLE
                                    // bounds and flat index in float64 (exact for integers): no out-of-range
                                    // integer conversion. Outside the table the index is the extra last
                                    // entry, which holds default_F (code 2), so the loads are plain gathers.
                                    const bool inside = (h0 >= dhmin) & (h0 <= dhmax) & (k0 >= dkmin) & (k0 <= dkmax)
                                                        & (l0 >= dlmin) & (l0 <= dlmax);
                                    const double didx = ((h0 - dhmin) * dnk + (k0 - dkmin)) * dnl + (l0 - dlmin);
                                    const int idx = (int)(inside ? didx : dsize);
                                    Fc = (real)table[idx];
#if TB_COUNT && !TB_INTERP
                                    cnt[c] += skipped ? 0u : (std::signbit(Fc) ? 1u : 0u);
                                    cnt_out[c] += (skipped | inside) ? 0u : 1u;
#endif
#if TB_INTERP
                                    {
                                        // tricubic Lagrange interpolation (kernel_math.h), where C interpolates
                                        const double val = tb_tricubic(table, h, k, l, lo, dnh, dnk, dnl);
                                        Fc = skipped ? Fc : (real)val;
                                    }
#endif
#else
                                    Fc = default_F;
#if TB_COUNT
                                    cnt[c] += skipped ? 0u : 1u;
#endif
#endif
                                    const real I = skipped ? (real)0 : Fc * Fc * Fl * Fl;
#if TB_OVER == 1
                                    acc[c] = skipped ? acc[c] : (acc[c] + (double)I) * fpol[c];
#elif TB_OVER == 2
                                    acc[c] += (double)I * fpol[c];
                                    fsum[c] += fpol[c];
#else
                                    acc[c] += (double)I;
#endif
                                }
                            }
                        }
                    }
                }
            }
            const double nsub = (double)(T * os * os);
            real* out = image + r * image_stride + cb;
            const uint8_t* mrow = mask != nullptr ? mask + row * fpixels + cstart : nullptr;
            double om_blk = 0.0;
#pragma omp simd reduction(+ : om_blk)
            for (int c = 0; c < n; ++c) {
                const bool active = mrow == nullptr || mrow[c] != 0;
#if TB_OVER
                const double E = nsub * (double)(S * P * M);
                const double sum = TB_OVER == 1 ? acc[c] : acc[c] + I_bg * fsum[c] / E;
                const double v = sum * scale * (ov_thick ? 1.0 : cap_last[c]) * (ov_polar ? 1.0 : pol_first[c])
                                 * (ov_omega ? 1.0 : om_first[c]);
                om_blk += active ? (ov_omega ? om_sum[c] : nsub * om_first[c]) : 0.0;
#else
                const double v = (acc[c] + I_bg) * scale * cap_last[c] * pol_first[c] * om_first[c];
                om_blk += active ? nsub * om_first[c] : 0.0;
#endif
                out[c] = active ? (real)v : (real)0;
            }
            omega_row += om_blk;
#if TB_COUNT
            uint8_t* rs = reasons + r * fb_stride + cb;
            const int64_t at = r * fb_stride + cb;
            if (count_bytes == 1)
                store_counts((int8_t*)counts + at, rs, mrow, cnt, cnt_out, n);
            else if (count_bytes == 2)
                store_counts((int16_t*)counts + at, rs, mrow, cnt, cnt_out, n);
            else
                store_counts((int32_t*)counts + at, rs, mrow, cnt, cnt_out, n);
#endif
        }
        // C's statistics work on the float image: values rounded to float32. Per row: count, sum and
        // sum of squares of the rendered (active) pixels, the first maximum and its column, the
        // solid angle; and, for C's rmsd pass over every ROI pixel (masked ones are 0), the squared
        // deviations of all the row's ROI pixels from their own mean, and how many there are
        const real* out = image + r * image_stride;
        const uint8_t* mrow = mask != nullptr ? mask + row * fpixels + col0 : nullptr;
        double cnt = 0.0, sum = 0.0, sumsq = 0.0, vmax = -INFINITY, amax = -1.0;
#pragma omp simd reduction(+ : cnt, sum, sumsq) reduction(max : vmax)
        for (int64_t c = 0; c < ncols; ++c) {
            const bool active = mrow == nullptr || mrow[c] != 0;
            const double v = active ? (double)(float)out[c] : 0.0;
            cnt += active ? 1.0 : 0.0;
            sum += v;
            sumsq += v * v;
            vmax = active && v > vmax ? v : vmax;
        }
        for (int64_t c = 0; c < ncols; ++c) {  // first column holding the maximum
            if ((mrow == nullptr || mrow[c] != 0) && (double)(float)out[c] == vmax) { amax = (double)c; break; }
        }
        const double roi_mean = ncols > 0 ? sum / (double)ncols : 0.0;
        double m2 = 0.0;
#pragma omp simd reduction(+ : m2)
        for (int64_t c = 0; c < ncols; ++c) {
            const bool active = mrow == nullptr || mrow[c] != 0;
            const double d = (active ? (double)(float)out[c] : 0.0) - roi_mean;
            m2 += d * d;
        }
        double* st = row_stats + 8 * r;
        st[0] = cnt; st[1] = sum; st[2] = sumsq; st[3] = m2; st[4] = vmax; st[5] = amax; st[6] = omega_row;
        st[7] = (double)ncols;
    }
    return 0;
}

// The shared arithmetic in this variant's dtype, for tests: out[i] = f(x[i]) with f by ``which``:
// 0 sin(pi x), 1 cos(pi x), 2 e^x, 3 the round-crystal factor of hrad = x (fudge 1, N 1)
extern "C" int tb_math_probe(int64_t which, const double* x, double* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const real v = (real)x[i];
        out[i] = which == 0 ? (double)tb_sinpi(v) : which == 1 ? (double)tb_cospi(v)
                 : which == 2 ? (double)tb_exp(v) : (double)tb_round_factor(v, (real)1, (real)1);
    }
    return 0;
}

#if TB_TABLE && TB_INTERP
static inline double min2(double a, double b) { return a < b ? a : b; }

// C's interpolation switch-off scan: the first evaluation, in C's loop order, of rows row0.. and
// columns col0..col0+ncols-1 whose 4x4x4 neighbourhood leaves the table and that is not skipped
// (-dmin, or a zero lattice factor), among the pixels the mask renders. The geometry is the
// render's, which can differ from the eager kernel's in the last bits, so every test keeps a margin:
// an evaluation is certainly inside, certainly outside, certainly (not) skipped, or unsure. The
// result is the global ordinal (row*fpixels + col)*E + e of the first evaluation that is not
// certainly harmless, and whether it certainly leaves the table (result[1] = 1) or the caller has
// to decide it with the eager kernel (0); result[0] = -1 when there is none. Rows are scanned in
// order and the scan returns at the first such evaluation.
extern "C" int tb_scan(const double* dp, const int64_t* ip, const double* lattice, const double* src,
                       const uint8_t* mask, int64_t row0, int64_t nrows, int64_t col0, int64_t ncols,
                       int64_t* result) {
    const int64_t os = ip[I_oversample], T = ip[I_T], S = ip[I_S], P = ip[I_P], M = ip[I_M];
    const int64_t fpixels = ip[I_fpixels];
    const bool dmin_on = ip[I_dmin_on] != 0, water = ip[I_water] != 0, curved = ip[I_curved] != 0;
    const double sub = dp[D_subpixel];
    const double fx = dp[D_fdet + 0], fy = dp[D_fdet + 1], fz = dp[D_fdet + 2];
    const double sx_ = dp[D_sdet + 0], sy_ = dp[D_sdet + 1], sz_ = dp[D_sdet + 2];
    const double ox = dp[D_odet + 0], oy = dp[D_odet + 1], oz = dp[D_odet + 2];
    const double p0x = dp[D_pix0 + 0], p0y = dp[D_pix0 + 1], p0z = dp[D_pix0 + 2];
    const double thickstep = dp[D_thickstep], dmin = dp[D_dmin], fudge = dp[D_fudge];
    const double na = dp[D_N + 0], nb = dp[D_N + 1], nc = dp[D_N + 2];
    const double Nprod = dp[D_Nprod], N2prod = dp[D_N2prod], eps = dp[D_scan_eps];
    const double* A = dp + D_a_star;
    const double hmin = (double)ip[I_bounds + 0], hmax = (double)ip[I_bounds + 1];
    const double kmin = (double)ip[I_bounds + 2], kmax = (double)ip[I_bounds + 3];
    const double lmin = (double)ip[I_bounds + 4], lmax = (double)ip[I_bounds + 5];
    const double hr = hmax - hmin + 1.0, kr = kmax - kmin + 1.0, lr = lmax - lmin + 1.0;
    const int64_t PM = P * M, E = T * os * os * S * PM;
    const int64_t NONE = INT64_MAX;
    // a lattice factor that is certainly zero / certainly not zero (square crystals: never zero)
    const int shape = TB_SHAPE;
    const bool fl_matters = !water && shape != 0;
    const bool n_zero = Nprod == 0.0;
    // gauss: Nprod * exp(-z) is zero in the render precision below log(smallest subnormal / 2)
    const double ln_tiny = (TB_DOUBLE ? -744.4400719213812 : -103.27892990343184) - 0.6931471805599453;
    const double ln_n = n_zero ? -INFINITY : std::fmin(0.0, std::log(std::fabs(Nprod)));
    (void)na; (void)nb; (void)nc; (void)A; (void)N2prod; (void)fudge; (void)ln_tiny; (void)ln_n;

    alignas(64) double dx[CB], dy[CB], dz[CB], qx[CB], qy[CB], qz[CB];
    alignas(64) double dskip[CB];  // -dmin: 1 certainly skipped, 0 certainly not, 0.5 unsure
    alignas(64) int64_t first_e[CB], first_sure[CB];  // 64-bit lanes like the doubles: one vector width
    result[0] = -1;
    result[1] = 0;
    for (int64_t r = 0; r < nrows; ++r) {
        const int64_t row = row0 + r;
        for (int64_t cb = 0; cb < ncols; cb += CB) {
            const int n = (int)((ncols - cb) < CB ? (ncols - cb) : CB);
            const int64_t cstart = col0 + cb;
            for (int c = 0; c < n; ++c) { first_e[c] = NONE; first_sure[c] = 0; }
            int64_t e = 0;
            for (int64_t t = 0; t < T; ++t) {
                const double toff = (double)t * thickstep;
                for (int64_t ss = 0; ss < os; ++ss) {
                    const double Sdet = ((double)(row * os) + ((double)ss + 0.5)) * sub;
                    const double bx = Sdet * sx_, by = Sdet * sy_, bz = Sdet * sz_;
                    for (int64_t sf = 0; sf < os; ++sf) {
                        const double fo = (double)sf + 0.5;
                        if (curved)  // positions on the sphere first (a loop of its own keeps the flat one vectorised)
                            tb_curved_block(dx, dy, dz, n, cstart, os, fo, bx, by, bz, toff, dp);
#pragma omp simd
                        for (int c = 0; c < n; ++c) {
                            const double Fdet = ((double)((cstart + c) * os) + fo) * sub;
                            const double px = curved ? dx[c] : Fdet * fx + bx + toff * ox + p0x;
                            const double py = curved ? dy[c] : Fdet * fy + by + toff * oy + p0y;
                            const double pz = curved ? dz[c] : Fdet * fz + bz + toff * oz + p0z;
                            const double inv = 1.0 / std::sqrt(px * px + py * py + pz * pz);
                            dx[c] = px * inv; dy[c] = py * inv; dz[c] = pz * inv;
                        }
                        for (int64_t s = 0; s < S; ++s) {
                            const double* sp = src + 10 * s;
                            const double ix = sp[0], iy = sp[1], iz = sp[2], il = sp[3];
#pragma omp simd
                            for (int c = 0; c < n; ++c) {
                                const double X = (dx[c] - ix) * il, Y = (dy[c] - iy) * il, Z = (dz[c] - iz) * il;
                                qx[c] = X; qy[c] = Y; qz[c] = Z;
                                double sk = 0.0;
                                if (dmin_on) {
                                    const double stol = 0.5 * std::sqrt(X * X + Y * Y + Z * Z);
                                    const double lim = 0.5 / (stol > 0.0 ? stol : 1.0);
                                    const bool yes = (stol > 0.0) && (dmin > lim * (1.0 + 1e-9));
                                    const bool no = !(stol > 0.0) || (dmin < lim * (1.0 - 1e-9));
                                    sk = yes ? 1.0 : (no ? 0.0 : 0.5);
                                }
                                dskip[c] = sk;
                            }
                            for (int64_t pm = 0; pm < PM; ++pm, ++e) {
                                const double* L = lattice + 9 * pm;
                                const double a0 = L[0], a1 = L[1], a2 = L[2];
                                const double b0 = L[3], b1 = L[4], b2 = L[5];
                                const double e0 = L[6], e1 = L[7], e2 = L[8];
#pragma omp simd
                                for (int c = 0; c < n; ++c) {
                                    const double X = qx[c], Y = qy[c], Z = qz[c];
                                    const double h = X * a0 + Y * a1 + Z * a2;
                                    const double k = X * b0 + Y * b1 + Z * b2;
                                    const double l = X * e0 + Y * e1 + Z * e2;
                                    // C: (h-hmin+3) > h_range || h-2 < hmin (and k, l): out where a gap is < 0
                                    // (NaN indices are caught below; a plain min keeps the loop vectorised)
                                    const double g = min2(min2(min2((h - 2.0) - hmin, hr - (h - hmin + 3.0)),
                                                               min2((k - 2.0) - kmin, kr - (k - kmin + 3.0))),
                                                          min2((l - 2.0) - lmin, lr - (l - lmin + 3.0)));
                                    const bool nan = (h != h) | (k != k) | (l != l);
                                    const bool in_sure = !nan & (g > eps);
                                    const bool out_sure = !nan & (g < -eps);
                                    bool fl_zero = n_zero, fl_nonzero = !n_zero;
#if TB_SHAPE == 1
                                    {
                                        const double fh = h - std::ceil(h - 0.5), fk = k - std::ceil(k - 0.5);
                                        const double fl = l - std::ceil(l - 0.5);
                                        const double hrad = fh * fh * na * na + fk * fk * nb * nb + fl * fl * nc * nc;
                                        const double x = 3.14159265358979323846 * std::sqrt(hrad * fudge);
                                        const double xs = x == 0.0 ? 1.0 : x;
                                        const double f = std::sin(xs) / xs - std::cos(xs);
                                        fl_zero = n_zero;
                                        fl_nonzero = !n_zero & ((x == 0.0) | (std::fabs(f) > 1e-4 * (1.0 + x)));
                                    }
#elif TB_SHAPE >= 2
                                    {
                                        const double dh = h - std::ceil(h - 0.5), dk = k - std::ceil(k - 0.5);
                                        const double dl = l - std::ceil(l - 0.5);
                                        const double u = dh * A[0] + dk * A[3] + dl * A[6];
                                        const double v = dh * A[1] + dk * A[4] + dl * A[7];
                                        const double w = dh * A[2] + dk * A[5] + dl * A[8];
                                        const double rad = (u * u + v * v + w * w) * N2prod;
#if TB_SHAPE == 2
                                        const double lg = -(rad / 0.63 * fudge) + ln_n;
                                        fl_zero = lg < ln_tiny - 2.0;
                                        fl_nonzero = lg > ln_tiny + 2.0;
#else
                                        const double vr = rad * fudge;
                                        fl_zero = n_zero | (vr > 0.3969 * (1.0 + 1e-5));
                                        fl_nonzero = !n_zero & (vr < 0.3969 * (1.0 - 1e-5));
#endif
                                    }
#endif
                                    const bool skip_sure = (dskip[c] == 1.0) | (fl_matters & fl_zero);
                                    const bool noskip_sure = (dskip[c] == 0.0) & (!fl_matters | fl_nonzero);
                                    const bool flag = !(in_sure | skip_sure);
                                    const bool take = flag & (first_e[c] == NONE);
                                    first_sure[c] = take ? (int64_t)(out_sure & noskip_sure) : first_sure[c];
                                    first_e[c] = take ? e : first_e[c];
                                }
                            }
                        }
                    }
                }
            }
            const uint8_t* mrow = mask != nullptr ? mask + row * fpixels + cstart : nullptr;
            for (int c = 0; c < n; ++c) {
                if (first_e[c] != NONE && (mrow == nullptr || mrow[c] != 0)) {
                    result[0] = (row * fpixels + cstart + c) * E + first_e[c];
                    result[1] = first_sure[c];
                    return 0;
                }
            }
        }
    }
    return 0;
}
#endif
"""

_SHAPE_CODES = {"square": 0, "round": 1, "gauss": 2, "tophat": 3}
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
    return kernel_source(_FAST_SOURCE)


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


def _compiler() -> Optional[str]:
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
    defines = [f"-DTB_REAL={real}", f"-DTB_DOUBLE={int(real == 'double')}", f"-DTB_SHAPE={_SHAPE_CODES[shape]}",
               f"-DTB_TABLE={int(table)}", f"-DTB_COUNT={int(count)}", f"-DTB_INTERP={int(interp)}",
               f"-DTB_OVER={int(over)}", "-DTB_ENTRY=tb_render"]
    source = _full_source()
    cxx = _compiler()
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
    if kt.shape not in _SHAPE_CODES:
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
