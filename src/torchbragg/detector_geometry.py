"""Where things are on the detector: pixel centres, the direct beam, resolution
rings and the structure-factor table's box.

These are the geometric facts a viewer shows beside the image (a hover readout,
a beam-centre marker, rings labelled in Å, the outline where lookups leave the
HKL table).  They use the same resolved set-up as the render kernels, in
float64 NumPy, for the pixel centre of the first sensor layer, the first source
and the first phi step and mosaic domain (the orientation the tap reports as
``geometry``).  No render is needed: a pixel costs microseconds.

Examples
--------
>>> sim = Simulation.from_args(TAP_CONFIG_ARGS)
>>> g = pixel_geometry(sim, 2048, 2048)
>>> g["d_angstrom"], g["hkl"]
"""

from __future__ import annotations

import math

import numpy as np

from .kernels.reasons import LOOKUP_REASONS

__all__ = ["pixel_geometry", "beam_centre_pixel", "resolution_ring", "resolution_range",
           "default_ring_spacings", "table_box_mask", "structure_factor_source"]


def _first_lattice(sim) -> np.ndarray:
    """Real-space rows a, b, c in Å of the first phi step and mosaic domain."""
    lat = sim.kernel_tensors.lattice  # [P, M, 3, 3], float64 on the simulation's device
    return lat[0, 0].detach().cpu().numpy().astype(np.float64)


def _positions(sim, slow: np.ndarray, fast: np.ndarray) -> np.ndarray:
    """Lab positions (m) of pixel centres, flat or curved detector, sensor layer 0."""
    s = sim.setup
    F = (np.asarray(fast, dtype=np.float64) + 0.5) * s.pixel_size
    S = (np.asarray(slow, dtype=np.float64) + 0.5) * s.pixel_size
    pos = F[..., None] * s.fdet + S[..., None] * s.sdet + s.pix0
    if s.curved:  # C turns the direct-beam point by the flat position's lab y, z over the distance
        base = np.broadcast_to(s.distance * s.beam, pos.shape)
        turned = _rotate_about(base, s.sdet, pos[..., 1] / s.distance)
        pos = _rotate_about(turned, s.fdet, pos[..., 2] / s.distance)
    return pos


def _rotate_about(v: np.ndarray, axis: np.ndarray, angle: np.ndarray) -> np.ndarray:
    c, sn = np.cos(angle)[..., None], np.sin(angle)[..., None]
    dot = (v * axis).sum(-1, keepdims=True)
    return axis * dot * (1 - c) + v * c + np.cross(np.broadcast_to(axis, v.shape), v) * sn


def pixel_geometry(sim, slow, fast) -> dict[str, np.ndarray]:
    """Geometry of pixel centres (scalars or arrays of indices).

    Parameters
    ----------
    sim : Simulation
        The simulation whose resolved set-up gives the geometry.
    slow, fast : int or array_like of int
        Pixel indices (any shape, broadcast together).

    Returns
    -------
    dict
        ``two_theta_deg``, ``d_angstrom`` (``inf`` on the direct beam),
        ``hkl`` (fractional Miller indices, ``[..., 3]``), ``hkl0`` (nearest,
        C's rule ``ceil(h - 0.5)``), ``position_m`` (``[..., 3]``); arrays of the
        broadcast shape (0-d for scalars).
    """
    s = sim.setup
    slow, fast = np.broadcast_arrays(np.asarray(slow), np.asarray(fast))
    pos = _positions(sim, slow, fast)
    diffracted = pos / np.linalg.norm(pos, axis=-1, keepdims=True)
    incident = -s.source_dirs[0]
    lam_A = float(s.source_lambdas[0]) * 1e10
    scat = (diffracted - incident) / lam_A
    cos2t = np.clip((diffracted * incident).sum(-1), -1.0, 1.0)
    stol = 0.5 * np.linalg.norm(scat, axis=-1)
    with np.errstate(divide="ignore"):
        d = np.where(stol > 0, 0.5 / np.where(stol > 0, stol, 1.0), np.inf)
    hkl = scat @ _first_lattice(sim).T
    return {"two_theta_deg": np.degrees(np.arccos(cos2t)), "d_angstrom": d, "hkl": hkl,
            "hkl0": np.ceil(hkl - 0.5).astype(np.int64), "position_m": pos}


def beam_centre_pixel(sim) -> tuple[float, float] | None:
    """(slow, fast) where the direct beam meets the detector plane, in pixel
    units whose integers are pixel centres (napari's convention); ``None``
    when the beam misses the plane.

    Parameters
    ----------
    sim : Simulation
        The simulation; its first source gives the beam direction.

    Returns
    -------
    tuple of (float, float) or None
        ``(slow, fast)`` in pixels, or ``None`` when the beam does not meet the
        detector plane in front of the sample.
    """
    s = sim.setup
    beam = -s.source_dirs[0]
    return _plane_hit(s, beam)


def _plane_hit(s, direction: np.ndarray):
    """Pixel coordinates of the ray ``t * direction`` (t > 0) on the detector plane."""
    direction = np.asarray(direction, dtype=np.float64)
    denom = direction @ s.odet
    t = np.where(np.abs(denom) > 1e-12, (s.pix0 @ s.odet) / np.where(np.abs(denom) > 1e-12, denom, 1.0), -1.0)
    pos = t[..., None] * direction - s.pix0
    fast = (pos @ s.fdet) / s.pixel_size - 0.5
    slow = (pos @ s.sdet) / s.pixel_size - 0.5
    ok = t > 0
    if np.ndim(ok) == 0:
        return (float(slow), float(fast)) if ok else None
    return np.stack([slow, fast], axis=-1), ok


def resolution_ring(sim, d_angstrom: float, points: int = 361) -> np.ndarray:
    """The detector-plane curve of resolution ``d`` (Å) for the first source.

    Parameters
    ----------
    sim : Simulation
        The simulation; its first source gives the beam direction and wavelength.
    d_angstrom : float
        Resolution of the ring (Å); must be at least half the wavelength, else
        the result is empty.
    points : int
        Number of azimuths sampled (the first and last coincide).

    Returns
    -------
    numpy.ndarray
        ``[n, 2]`` (slow, fast) in pixel units (integers are pixel centres); only
        azimuths whose ray meets the detector plane in front of the sample (may
        be empty).  A curved detector is drawn as its flat plane.
    """
    s = sim.setup
    lam_A = float(s.source_lambdas[0]) * 1e10
    sin_t = lam_A / (2.0 * float(d_angstrom))
    if not (0.0 < sin_t <= 1.0):
        return np.zeros((0, 2))
    two_theta = 2.0 * math.asin(sin_t)
    beam = -s.source_dirs[0]
    u = np.cross(beam, s.odet if abs(beam @ s.odet) < 0.99 else s.fdet)
    u /= np.linalg.norm(u)
    v = np.cross(beam, u)
    phi = np.linspace(0.0, 2 * math.pi, int(points))
    dirs = (math.cos(two_theta) * beam[None, :]
            + math.sin(two_theta) * (np.cos(phi)[:, None] * u + np.sin(phi)[:, None] * v))
    pts, ok = _plane_hit(s, dirs)
    return pts[ok]


def resolution_range(sim) -> tuple[float, float]:
    """(finest, coarsest) resolution in Å over the detector's edge pixels
    (coarsest is ``inf`` when the beam centre is on the detector).

    Parameters
    ----------
    sim : Simulation
        The simulation whose detector is measured.

    Returns
    -------
    tuple of (float, float)
        ``(finest, coarsest)`` resolution (Å) at the centres of the edge pixels.
    """
    ny, nx = sim.shape
    e_s = np.concatenate([np.zeros(nx), np.full(nx, ny - 1), np.arange(ny), np.arange(ny)])
    e_f = np.concatenate([np.arange(nx), np.arange(nx), np.zeros(ny), np.full(ny, nx - 1)])
    d = pixel_geometry(sim, e_s.astype(int), e_f.astype(int))["d_angstrom"]
    centre = beam_centre_pixel(sim)
    inside = centre is not None and -0.5 <= centre[0] <= ny - 0.5 and -0.5 <= centre[1] <= nx - 0.5
    return float(np.min(d)), (math.inf if inside else float(np.max(d)))


_NICE = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)


def _nice(d: float) -> float:
    """The nearest 'round' resolution (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 × 10^k)."""
    e = math.floor(math.log10(d))
    m = d / 10 ** e
    best = min(_NICE + (10.0,), key=lambda x: abs(math.log(x / m)))
    return round(best * 10 ** e, 10)


def default_ring_spacings(sim, count: int = 5) -> list[float]:
    """Round resolutions (Å, coarse to fine) for ``count`` rings spread evenly in
    2θ up to the largest circle around the beam centre that the detector holds
    (the finest edge resolution when the beam centre is off the detector).

    Parameters
    ----------
    sim : Simulation
        The simulation whose detector and first source are used.
    count : int
        Number of rings asked for.

    Returns
    -------
    list of float
        Resolutions (Å), rounded to 1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power
        of ten; duplicates after rounding are dropped, so there may be fewer than ``count``.
    """
    ny, nx = sim.shape
    centre = beam_centre_pixel(sim)
    lam_A = float(sim.setup.source_lambdas[0]) * 1e10
    if centre is not None and -0.5 <= centre[0] <= ny - 0.5 and -0.5 <= centre[1] <= nx - 0.5:
        cs, cf = centre
        # the four edge midpoints seen from the beam centre: the inscribed circle
        pts_s = np.array([cs, cs, 0, ny - 1]).round().astype(int)
        pts_f = np.array([0, nx - 1, cf, cf]).round().astype(int)
        tt_max = float(np.min(pixel_geometry(sim, pts_s, pts_f)["two_theta_deg"]))
    else:
        finest, _ = resolution_range(sim)
        tt_max = math.degrees(2 * math.asin(min(1.0, lam_A / (2 * finest))))
    out: list[float] = []
    for i in range(1, count + 1):
        tt = math.radians(tt_max * i / count)
        if tt <= 0:
            continue
        d = _nice(lam_A / (2 * math.sin(tt / 2)))
        if d not in out:
            out.append(d)
    return out


def table_box_mask(sim, step: int = 1) -> np.ndarray | None:
    """Which pixel centres' nearest reflection lies inside the HKL table's box.

    Parameters
    ----------
    sim : Simulation
        The simulation whose HKL table and geometry are used.
    step : int
        Sample every ``step``-th pixel in both directions (the mask of pixel
        ``(i * step, j * step)``).

    Returns
    -------
    numpy.ndarray or None
        bool ``[ceil(slow / step), ceil(fast / step)]``; ``None`` without a table.
    """
    tb = sim.setup.hkl
    if tb is None:
        return None
    ny, nx = sim.shape
    rows = np.arange(0, ny, step)
    cols = np.arange(0, nx, step)
    out = np.empty((rows.size, cols.size), dtype=bool)
    lo = np.array([tb.h_min, tb.k_min, tb.l_min])
    hi = np.array([tb.h_max, tb.k_max, tb.l_max])
    for i0 in range(0, rows.size, 256):  # bounded memory: 256 sampled rows at a time
        r = rows[i0:i0 + 256]
        h0 = pixel_geometry(sim, r[:, None], cols[None, :])["hkl0"]
        out[i0:i0 + r.size] = np.all((h0 >= lo) & (h0 <= hi), axis=-1)
    return out


def structure_factor_source(sim, h0: int, k0: int, l0: int) -> tuple[float, str]:
    """F and where it comes from for one integer reflection, by the render's rule.

    Parameters
    ----------
    sim : Simulation
        The simulation whose HKL table and ``default_F`` are used.
    h0, k0, l0 : int
        Miller indices of the reflection.

    Returns
    -------
    (float, str)
        The structure factor and its lookup reason (``torchbragg.kernels.LOOKUP_REASONS``
        names: ``table``, ``default_F:no_table``, ``default_F:outside_table``,
        ``default_F:unlisted``).
    """
    s = sim.setup
    tb = s.hkl
    if tb is None:
        return float(s.default_F), LOOKUP_REASONS[1]
    h, k, l = int(h0), int(k0), int(l0)
    if not (tb.h_min <= h <= tb.h_max and tb.k_min <= k <= tb.k_max and tb.l_min <= l <= tb.l_max):
        return float(s.default_F), LOOKUP_REASONS[2]
    idx = (h - tb.h_min, k - tb.k_min, l - tb.l_min)
    if not bool(tb.listed[idx]):
        return float(tb.values[idx]), LOOKUP_REASONS[3]
    return float(tb.values[idx]), LOOKUP_REASONS[0]

