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

import math
from dataclasses import dataclass

import torch

from ..resolve import R_E_SQR

__all__ = ["KernelTensors", "BlockResult", "evaluate_block", "reduce_evaluations", "interp_out_of_range",
           "evaluation_ordinals"]


@dataclass
class KernelTensors:
    """Set-up values moved to the render device and dtype.

    Vectors are in the C lab frame; geometry tensors are float64 whatever the render dtype
    (C's precision for ``h = a·q``). ``T`` is the number of sensor layers, ``S`` of sources,
    ``P`` of phi steps and ``M`` of mosaic domains.

    Attributes
    ----------
    dtype : torch.dtype
        The render dtype (float32 or float64) of the intensities and per-subpixel factors.
    device : torch.device
        The render device.
    fdet : torch.Tensor
        [3] unit vector along the detector's fast axis.
    sdet : torch.Tensor
        [3] unit vector along the detector's slow axis.
    odet : torch.Tensor
        [3] unit vector normal to the detector (the direction of the sensor's depth).
    pix0 : torch.Tensor
        [3] position of the first pixel's outer corner relative to the sample, metres.
    beam : torch.Tensor
        [3] unit vector of the incident beam direction.
    pixel_size : float
        Pixel size, metres.
    subpixel_size : float
        ``pixel_size / oversample``, metres.
    oversample : int
        Subpixels per pixel along each detector axis.
    thick_offsets : torch.Tensor
        [T] depth of each sensor layer's front along ``odet``, metres.
    thickstep : float
        Thickness of one sensor layer, metres.
    mu : float
        Sensor attenuation coefficient, 1/m.
    thick : float
        Sensor thickness, metres (0: no sensor absorption, every capture fraction 1).
    distance : float
        Sample-to-detector distance along the beam, metres.
    close_distance : float
        Perpendicular distance from the sample to the detector plane, metres.
    curved : bool
        A curved detector (every pixel at ``distance`` from the sample).
    point_pixel : bool
        Solid angle ``1/r²`` instead of the pixel's projected area.
    incident : torch.Tensor
        [S, 3] unit vectors pointing along the beam, one per source.
    inv_lambda : torch.Tensor
        [S] inverse wavelength of each source, 1/Å.
    polar_axis : torch.Tensor
        [3] the polarisation axis of the incident beam (unit vector).
    kahn : float
        Kahn polarisation factor (0: unpolarised).
    nopolar : bool
        Polarisation factor switched off (every factor 1).
    dmin_A : float
        The -dmin resolution limit, Å (0: none); evaluations beyond it are skipped.
    lattice : torch.Tensor
        [P, M, 3, 3] real-space cell vectors (rows a, b, c), Å, per phi step and mosaic domain.
    lattice_first : torch.Tensor or None
        [P, M, 3, 3] the same for the very first pixel's phi loop (C's phi = 0 quirk), or None when it
        equals ``lattice``.
    a_star : torch.Tensor
        [3, 3] reciprocal vectors (rows a*, b*, c*), 1/Å, unrotated; the gauss and tophat lattice
        factors use them for the distance to the nearest reciprocal-lattice point.
    N : tuple
        Unit cells (Na, Nb, Nc) along a, b and c.
    shape : str
        Crystal shape: ``"square"``, ``"round"``, ``"gauss"`` or ``"tophat"``.
    fudge : float
        The -fudge width factor of the non-square lattice factors.
    water : bool
        Whether a water background is on (evaluations with a zero lattice factor are then not skipped).
    table : torch.Tensor or None
        Flattened structure-factor box (h slowest, l fastest) in the render dtype, or None without a table.
    listed : torch.Tensor or None
        Flattened bool, True where the table's file listed the cell, or None.
    bounds : tuple or None
        ``(h_min, h_max, k_min, k_max, l_min, l_max)`` of the table's box (inclusive), or None.
    default_F : float
        Structure factor of every lookup outside the box or unlisted.
    interpolate : bool
        Tricubic interpolation of the table (only with a table).
    """

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
    lattice_first: torch.Tensor | None  # [P,M,3,3] for the very first phi loop (phi=0 quirk), or None
    a_star: torch.Tensor  # [3,3] rows a*,b*,c* (1/Å), unrotated (C uses these for round/gauss/tophat)
    N: tuple
    shape: str
    fudge: float
    water: bool
    table: torch.Tensor | None  # flattened F values
    listed: torch.Tensor | None  # flattened bool
    bounds: tuple | None  # (hmin,hmax,kmin,kmax,lmin,lmax)
    default_F: float
    interpolate: bool


@dataclass
class BlockResult:
    """Per-evaluation and per-subpixel quantities of one pixel block.

    Shapes: per-evaluation tensors are ``[R, C, T, os, os, S, P, M]``;
    per-subpixel tensors ``[R, C, T, os, os]``; per-(subpixel, source)
    ``[R, C, T, os, os, S]``.

    The fields name the entries of :func:`evaluate_block`'s result with ``detail=True``.

    Attributes
    ----------
    hkl : torch.Tensor
        Per evaluation ``[..., 3]``: the fractional Miller indices h, k, l.
    hkl0 : torch.Tensor
        Per evaluation ``[..., 3]`` int64: the indices rounded to the nearest integers.
    F_cell : torch.Tensor
        Per evaluation: the structure factor looked up (or interpolated).
    F_latt : torch.Tensor
        Per evaluation: the lattice factor.
    reason : torch.Tensor
        Per evaluation, uint8: how the structure factor was found, a code of
        :data:`~torchbragg.kernels.reasons.LOOKUP_REASONS`.
    skipped : torch.Tensor
        Per evaluation, bool: skipped by -dmin or a zero lattice factor (no lookup, nothing summed).
    dmin_skip : torch.Tensor
        Per (subpixel, source), bool: beyond the -dmin resolution limit.
    position : torch.Tensor
        Per subpixel ``[..., 3]``: position relative to the sample, metres.
    airpath : torch.Tensor
        Per subpixel: distance from the sample, metres.
    omega : torch.Tensor
        Per subpixel: solid angle, steradians (``1/r²``, in m⁻², with ``point_pixel``).
    capture : torch.Tensor
        Per subpixel: fraction of the photons captured in that sensor layer.
    polar : torch.Tensor
        Per (subpixel, source): polarisation factor.
    scattering : torch.Tensor
        Per (subpixel, source) ``[..., 3]``: scattering vector, 1/Å.
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

    ``N`` given as a tensor (a differentiated number of cells) takes the same
    path with the sign of the nearest integer: at integer N the value is C's, and
    the derivative in N is that of the peak shape sin(πN·frac)/sin(π·frac)
    around every reflection (C's formula for non-integer N, sin(πNh)/sin(πh),
    is not continuous in N at the peaks).
    """
    if isinstance(N, torch.Tensor):
        x = frac * math.pi
        n = int(round(float(N.detach())))
        sign = 1.0 - 2.0 * torch.remainder(h0 * (n - 1), 2).to(frac.dtype)
        safe = torch.where(x == 0, torch.ones_like(x), x)
        value = torch.sin(N.to(frac.dtype) * safe) / torch.sin(safe)
        return sign * torch.where(x == 0, N.to(frac.dtype).expand_as(frac), value)
    if N != int(N):
        x = math.pi * h
        return torch.where(x == 0, torch.full_like(h, N), torch.sin(N * x) / torch.sin(x))
    x = frac * math.pi
    n = int(N)
    sign = 1.0 - 2.0 * torch.remainder(h0 * (n - 1), 2).to(frac.dtype)
    safe = torch.where(x == 0, torch.ones_like(x), x)
    value = torch.sin(n * safe) / torch.sin(safe)
    return sign * torch.where(x == 0, torch.full_like(frac, float(n)), value)


def _filled(like: torch.Tensor, value) -> torch.Tensor:
    """``like``-shaped tensor of ``value`` (a number, or a 0-d tensor whose gradient is kept)."""
    if isinstance(value, torch.Tensor):
        return value.to(like.dtype).expand_as(like)
    return torch.full_like(like, value)


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
                   interp_cutoff: int | None = None, fpixels: int = 0,
                   first_pixel: tuple | None = None, detail: bool = False,
                   want_hkl_only: bool = False) -> dict[str, torch.Tensor]:
    """Evaluate every evaluation of the pixel block ``rows × cols``.

    Parameters
    ----------
    kt : KernelTensors
        The set-up on the render device.
    rows : torch.Tensor
        1-D int64: slow pixel indices of the block.
    cols : torch.Tensor
        1-D int64: fast pixel indices of the block.
    interp_cutoff : int, optional
        Global evaluation ordinal ``(slow*fpixels + fast)*E + e`` from which
        interpolation is switched off (C's switch-off-for-the-rest-of-the-run
        rule); ``None`` means it never switches off.
    fpixels : int, optional
        Pixels per detector row, for the global ordinals of ``interp_cutoff``.
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
        With ``want_hkl_only``: ``hkl`` (float64 fractional indices), ``skipped`` and ``E`` (int, the
        evaluations per pixel). Otherwise ``intensity`` (per evaluation, ``F_cell² F_latt²``, 0 where
        skipped), ``omega``, ``capture``, ``polar``, ``dmin_skip``, ``skipped``, ``reason`` and ``E``;
        with ``detail`` also ``hkl``, ``hkl0``, ``F_cell``, ``F_latt``, ``position``, ``airpath`` and
        ``scattering`` (see :class:`BlockResult`).
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
            if isinstance(n, torch.Tensor) or n > 1:  # a differentiated N has a derivative at 1 too
                F_latt = F_latt * _sincg_frac(x, x0, n, hkl[..., full].to(dt))
    elif kt.shape == "round":
        hrad = fh * fh * Na * Na + fk * fk * Nb * Nb + fl * fl * Nc * Nc
        # sqrt has no derivative at 0; hrad is quadratic in the fractions there, so the
        # lattice factor's derivative is 0 and the safe argument keeps it finite
        u = hrad * kt.fudge
        root = torch.where(u > 0, torch.sqrt(torch.where(u > 0, u, torch.ones_like(u))), torch.zeros_like(u))
        F_latt = Na * Nb * Nc * 0.723601254558268 * _sinc3(math.pi * root)
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
        F_cell = _filled(h, kt.default_F)
        reason = torch.full(evshape, 1, dtype=torch.uint8, device=dev)
    else:
        hmin, hmax, kmin, kmax, lmin, lmax = kt.bounds
        nk, nl = kmax - kmin + 1, lmax - lmin + 1
        inside = ((h0i >= hmin) & (h0i <= hmax) & (k0i >= kmin) & (k0i <= kmax) & (l0i >= lmin) & (l0i <= lmax))
        idx = ((h0i - hmin) * nk + (k0i - kmin)) * nl + (l0i - lmin)
        idx = torch.where(inside, idx, torch.zeros_like(idx))
        F_cell = torch.where(inside, kt.table[idx], _filled(h, kt.default_F))
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
    y, x = (d * B_in).sum(-1), (d * E_in).sum(-1)
    # along the beam (2θ = 0) atan2(0, 0) = 0 has no derivative; the factor multiplying it, sin²2θ, is 0
    along = (y == 0) & (x == 0)
    psi = -torch.atan2(torch.where(along, torch.zeros_like(y), y), torch.where(along, torch.ones_like(x), x))
    return 0.5 * (1.0 + cos2t_sq - kt.kahn * torch.cos(2 * psi) * sin2t_sq)


def interp_out_of_range(kt: KernelTensors, hkl: torch.Tensor) -> torch.Tensor:
    """C's test for a 4×4×4 neighbourhood that leaves the table.

    Parameters
    ----------
    kt : KernelTensors
        The set-up; its ``bounds`` must not be None.
    hkl : torch.Tensor
        ``[..., 3]`` fractional Miller indices.

    Returns
    -------
    torch.Tensor
        Bool, ``hkl.shape[:-1]``: True where the interpolation neighbourhood of that h, k, l reaches
        outside the table's box by C's integer test.
    """
    hmin, hmax, kmin, kmax, lmin, lmax = kt.bounds
    h, k, l = hkl.unbind(-1)
    hr, kr, lr = hmax - hmin + 1, kmax - kmin + 1, lmax - lmin + 1
    return (((h - hmin + 3) > hr) | (h - 2 < hmin) | ((k - kmin + 3) > kr) | (k - 2 < kmin)
            | ((l - lmin + 3) > lr) | (l - 2 < lmin))


def evaluation_ordinals(rows, cols, fpixels: int, E: int, evshape) -> torch.Tensor:
    """Global loop-order ordinal of every evaluation of a block.

    Parameters
    ----------
    rows : torch.Tensor
        1-D int64: slow pixel indices of the block.
    cols : torch.Tensor
        1-D int64: fast pixel indices of the block.
    fpixels : int
        Pixels per detector row.
    E : int
        Evaluations per pixel.
    evshape : tuple of int
        Shape of the block's per-evaluation tensors, ``[R, C, ...]`` whose trailing axes hold ``E``
        elements in all.

    Returns
    -------
    torch.Tensor
        int64 of shape ``evshape``: ``(slow * fpixels + fast) * E + e`` for evaluation ``e`` of each pixel.
    """
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


def reduce_evaluations(res: dict, setup, *, dtype: torch.dtype, running_product: bool = True) -> dict:
    """Reduce per-evaluation results to pixel values, following C's factor rules.

    Parameters
    ----------
    res : dict
        :func:`evaluate_block`'s result with ``detail``.
    setup : torchbragg.resolve.ResolvedSetup
        The set-up (fluence, steps, background, -oversample_* flags).
    dtype : torch.dtype
        The render dtype (float64 sums stay float64).
    running_product : bool, optional
        With -oversample_* flags: C's running product (True) or per-term weighting.

    Returns
    -------
    dict
        ``value`` (photons), ``I_sum`` (sum before scaling, background included), and the
        factors applied at the end (``omega_applied``, ``capture_applied``, ``polar_applied``).
    """
    s = setup
    inten = res["intensity"]
    R, C = inten.shape[:2]
    flat = inten.reshape(R, C, -1).to(torch.float64 if dtype == torch.float64 else inten.dtype)
    omega, capture, polar = res["omega"], res["capture"], res["polar"]
    T = capture.shape[2]
    omega_first = omega[:, :, 0, 0, 0]
    capture_last = capture[:, :, T - 1, 0, 0]
    # polarisation: value at the first (subpixel, source) not skipped by -dmin
    pol = polar.reshape(R, C, -1)
    ok = ~res["dmin_skip"].reshape(R, C, -1)
    first_ok = torch.argmax(ok.to(torch.int8), dim=-1)
    polar_first = torch.where(ok.any(-1), torch.gather(pol, -1, first_ok[..., None])[..., 0],
                              torch.zeros_like(pol[..., 0]))
    scale = R_E_SQR * s.fluence / s.steps
    if not (s.oversample_thick or s.oversample_polar or s.oversample_omega):
        I_sum = flat.sum(-1) + s.I_bg
        value = I_sum * scale * capture_last * polar_first * omega_first
        return {"value": value, "I_sum": I_sum, "omega_applied": omega_first,
                "capture_applied": capture_last, "polar_applied": polar_first}
    # each evaluation's oversampled factors (capture, omega per subpixel; polar per source too)
    evshape = inten.shape
    mult = torch.ones(evshape, dtype=inten.dtype, device=inten.device)
    sub_shape = evshape[:5] + (1,) * (len(evshape) - 5)
    if s.oversample_thick:
        mult = mult * capture.reshape(sub_shape)
    if s.oversample_omega:
        mult = mult * omega.reshape(sub_shape)
    if s.oversample_polar:
        mult = mult * polar.reshape(evshape[:6] + (1,) * (len(evshape) - 6))
    if running_product:
        # C multiplies the running sum (background and earlier terms) by each factor inside the loop
        mult = torch.where(res["skipped"], torch.ones_like(mult), mult).reshape(R, C, -1)
        suffix = torch.flip(torch.cumprod(torch.flip(mult, [-1]), -1), [-1])
        I_sum = (flat * suffix).sum(-1) + s.I_bg * suffix[..., 0]
    else:
        # -fix_oversample: each term weighted by its own factor, the background by their mean
        mult = mult.reshape(R, C, -1).to(flat.dtype)
        I_sum = (flat * mult).sum(-1) + s.I_bg * mult.mean(-1)
    value = I_sum * scale
    if not s.oversample_thick:
        value = value * capture_last
    if not s.oversample_polar:
        value = value * polar_first
    if not s.oversample_omega:
        value = value * omega_first
    return {"value": value, "I_sum": I_sum, "omega_applied": omega_first if not s.oversample_omega else None,
            "capture_applied": capture_last if not s.oversample_thick else None,
            "polar_applied": polar_first if not s.oversample_polar else None}
