"""Resolve a :class:`~torchbragg.config.SimulationConfig` into numbers.

This is the engine's equivalent of the set-up part of nanoBragg's ``main``:
default beam centres per convention, detector pivots and rotations, step counts
(phi, divergence, dispersion, thickness, mosaic), the source list, the crystal
lattice vectors, automatic oversampling and interpolation, the fluence and the
structure-factor table. All values are SI (metres, radians) float64 numpy, as in
C. Nothing here touches torch; :mod:`torchbragg.simulation` moves the results to
the caller's device and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .config import CONVENTIONS, SimulationConfig
from .rotations import rotate_axis, rotate_xyz, unit

__all__ = ["ResolvedSetup", "resolve", "SetupError", "R_E_SQR", "AVOGADRO"]

R_E_SQR = 7.94079248018965e-30  # Thomson cross section, m²
AVOGADRO = 6.02214179e23
RTD = 180.0 / math.pi


class SetupError(ValueError):
    """A configuration that cannot be rendered."""


#: Limits on the sizes a set-up derives from its flags (specs/cli.md §1.5).  Each one is far
#: beyond any useful render; they exist so that no argument line can make set-up or the
#: render run away (allocate without bound or loop for hours before the first pixel).
LIMITS = {
    "pixels_per_axis": 65536,        # detector pixels along fast or slow
    "pixels": 2 ** 28,               # detector pixels in all (1 GiB as float32)
    "steps": 1_000_000,              # each of: divergence steps per axis, dispersion steps,
                                     # phi steps, mosaic domains, sensor layers
    "sources": 100_000,              # divergence x dispersion steps, or -sourcefile lines
    "unit_cells": 2 ** 31 - 1,       # unit cells along one axis (-N, or the crystal size / cell)
    "oversample": 1024,              # subpixels per pixel edge, given or automatic
    "steps_per_pixel": 10 ** 8,      # sources x phi steps x mosaic domains x layers x oversample²
    "evaluations": 10 ** 12,         # steps per pixel x rendered pixels (about an hour on a CPU)
}

#: largest -sourcefile read (bytes): 100,000 sources of five numbers fit many times over
SOURCE_FILE_MAX_BYTES = 64 << 20


def _check_count(what: str, value, hint: str, limit_key: str = "steps") -> int:
    """``value`` as an int, or a SetupError that says which limit and what to change."""
    limit = LIMITS[limit_key]
    if not math.isfinite(value) or value > limit:
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        raise SetupError(f"{what} would be {shown}, above the limit of {limit}: {hint}")
    return int(value)


@dataclass
class ResolvedSetup:
    """All numbers one render needs, in SI units (float64).

    Vectors are float64 ``[3]`` arrays in the lab frame; unit vectors are normalised.

    Attributes
    ----------
    convention : str
        Detector convention, upper case (one of :data:`torchbragg.config.CONVENTIONS`).
    pivot : str
        Detector pivot in effect: ``"beam"`` or ``"sample"``.
    fpixels, spixels : int
        Detector size in pixels along the fast and slow axes.
    pixel_size : float
        Pixel size (m).
    detsize_f, detsize_s : float
        Detector size along the fast and slow axes (m).
    fdet, sdet, odet : numpy.ndarray
        Fast axis, slow axis and detector normal (unit vectors), after the detector rotations.
    pix0 : numpy.ndarray
        Position of the first pixel's corner (fast 0, slow 0) relative to the sample (m).
    distance : float
        Sample to detector distance along the beam (m).
    close_distance : float
        Sample to detector plane distance along the normal (m).
    xbeam, ybeam : float
        Direct-beam position in the convention's X and Y before the detector rotations (m),
        as given or the convention's default.
    fbeam, sbeam : float
        Where the beam meets the detector plane, along the fast and slow axes from ``pix0`` (m).
    xclose, yclose : float
        Nearest-point position as given or defaulted (m).
    fclose, sclose : float
        Foot of the perpendicular from the sample on the detector plane, along the fast and
        slow axes from ``pix0`` (m).
    orgx, orgy : float
        XDS origin (pixels): ``fclose / pixel_size + 0.5`` and ``sclose / pixel_size + 0.5``.
    dials_origin : numpy.ndarray
        ``pix0`` in the DIALS frame (mm).
    twotheta : float
        Detector two-theta swing (radians).
    curved : bool
        Curved detector (every pixel at the same distance).
    point_pixel : bool
        Inverse-square solid angle only.
    roi : tuple of 4 int
        Rendered region: fast min, fast max, slow min, slow max (pixels, inclusive); a maximum
        may lie past the last pixel (the whole detector is ``(0, fpixels, 0, spixels)``).
    mask : numpy.ndarray or None
        ``[slow, fast]`` image of ``-mask`` (pixels that are 0 are not rendered), or None.
    thicksteps : int
        Number of sensor layers.
    thickstep : float
        Thickness of one sensor layer (m).
    thick : float
        Sensor thickness (m); 0 without a sensor model.
    mu : float
        Sensor attenuation coefficient (1/m).
    beam : numpy.ndarray
        Beam direction (unit vector, from the source towards the sample).
    polar_vector : numpy.ndarray
        Electric-field direction (unit vector).
    vert_vector : numpy.ndarray
        ``beam × polar_vector`` (unit vector): the axis of the horizontal divergence.
    kahn : float
        Kahn polarisation factor.
    nopolar : bool
        No polarisation correction.
    lambda0 : float
        Central wavelength (m).
    source_dirs : numpy.ndarray
        ``[S, 3]`` unit vectors from the sample towards each source.
    source_lambdas : numpy.ndarray
        ``[S]`` wavelength of each source (m).
    fluence : float
        Incident photons per m².
    dmin : float
        Resolution limit (m); 0 for none.
    divsteps : int
        Number of divergence directions kept (or of ``-sourcefile`` lines).
    dispsteps : int
        Number of wavelengths per divergence direction.
    hdivrange, vdivrange : float
        Horizontal and vertical divergence ranges (radians).
    hdivstep, vdivstep : float
        Horizontal and vertical divergence steps (radians).
    dispersion : float
        Spectral width as a fraction of the wavelength.
    a0 : numpy.ndarray
        ``[3, 3]`` real-space lattice vectors a, b, c as rows (m), after the misset.
    a_star : numpy.ndarray
        ``[3, 3]`` reciprocal lattice vectors a*, b*, c* as rows (1/Å), not rotated by the spindle.
    cell : tuple of 6 float
        Unit cell a, b, c (Å) and alpha, beta, gamma (degrees) of the lattice vectors.
    V_cell : float
        Unit cell volume (Å³).
    N : tuple of 3 float
        Number of unit cells along a, b and c.
    shape : str
        Shape transform: ``"square"``, ``"round"``, ``"gauss"`` or ``"tophat"``.
    fudge : float
        Shape-transform width fudge factor.
    spindle : numpy.ndarray
        Spindle rotation axis (unit vector).
    phi0 : float
        Starting spindle angle (radians).
    phistep : float
        Spindle step (radians).
    phisteps : int
        Number of spindle steps.
    osc : float
        Oscillation range (radians).
    mosaic_spread : float
        Mosaic spread (radians).
    mosaic_umats : numpy.ndarray
        ``[M, 3, 3]`` rotation matrix of each mosaic domain.
    water_size : float
        Water background thickness (m).
    I_bg : float
        Water background added to every pixel's sum before scaling.
    oversample : int
        Subpixels per pixel edge.
    recommended_oversample : int
        C's recommended oversampling (at least 1).
    oversample_thick, oversample_polar, oversample_omega : bool
        Apply the capture fraction, polarisation and solid angle per subpixel.
    interpolate : bool
        Tricubic interpolation of structure factors (False without a non-empty table).
    steps : int
        C's step count: sources × mosaic domains × phi steps × oversample² (the divisor
        of the pixel scale).
    hkl : torchbragg.io.hkl_table.HKLTable or None
        The structure-factor table, or None.
    default_F : float
        Structure factor of reflections not in the table.
    hkl_source : dict
        Where the structure factors came from: ``kind``, ``source``, ``bounds``, ``count``,
        ``default_F``, ``warnings`` and ``describe``.
    log : list of str
        Set-up messages in the C program's wording and order (warnings, files read,
        automatic choices).
    notes : list of str
        This engine's notes on flags whose effect may surprise (ignored, switching the
        convention, or giving a zero image).
    """

    # detector
    convention: str
    pivot: str
    fpixels: int
    spixels: int
    pixel_size: float
    detsize_f: float
    detsize_s: float
    fdet: np.ndarray
    sdet: np.ndarray
    odet: np.ndarray
    pix0: np.ndarray
    distance: float
    close_distance: float
    xbeam: float
    ybeam: float
    fbeam: float
    sbeam: float
    xclose: float
    yclose: float
    fclose: float
    sclose: float
    orgx: float
    orgy: float
    dials_origin: np.ndarray
    twotheta: float
    curved: bool
    point_pixel: bool
    roi: tuple[int, int, int, int]  # fast min, fast max, slow min, slow max (inclusive)
    mask: np.ndarray | None
    thicksteps: int
    thickstep: float
    thick: float
    mu: float
    # beam
    beam: np.ndarray
    polar_vector: np.ndarray
    vert_vector: np.ndarray
    kahn: float
    nopolar: bool
    lambda0: float
    source_dirs: np.ndarray  # [S,3] unit vectors from sample towards the source
    source_lambdas: np.ndarray  # [S] metres
    fluence: float
    dmin: float
    divsteps: int
    dispsteps: int
    hdivrange: float
    vdivrange: float
    hdivstep: float
    vdivstep: float
    dispersion: float
    # crystal
    a0: np.ndarray  # real-space vectors, metres (rows a, b, c)
    a_star: np.ndarray  # reciprocal vectors, 1/Å (rows a*, b*, c*), unrotated
    cell: tuple[float, float, float, float, float, float]
    V_cell: float
    N: tuple[float, float, float]
    shape: str
    fudge: float
    spindle: np.ndarray
    phi0: float
    phistep: float
    phisteps: int
    osc: float
    mosaic_spread: float
    mosaic_umats: np.ndarray  # [M,3,3]
    water_size: float
    I_bg: float
    # sampling
    oversample: int
    recommended_oversample: int
    oversample_thick: bool
    oversample_polar: bool
    oversample_omega: bool
    interpolate: bool
    steps: int
    # structure factors
    hkl: object | None  # torchbragg.io.hkl_table.HKLTable or None
    default_F: float
    hkl_source: dict = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def shape_px(self) -> tuple[int, int]:
        """Image shape (slow, fast)."""
        return (self.spixels, self.fpixels)

    @property
    def phi_values(self) -> np.ndarray:
        """Spindle angle of each phi step (radians)."""
        return self.phi0 + self.phistep * np.arange(self.phisteps)


def _path(cfg: SimulationConfig, name: str | None) -> Path | None:
    if name is None:
        return None
    p = Path(name)
    if not p.is_absolute() and cfg.cwd:
        p = Path(cfg.cwd) / p
    return p


def _div_steps(steps: int, rng: float, step: float, unset_range_default: float = 1.0):
    """C's rule for divergence and dispersion sweeps (values <0 mean "not given")."""
    if steps <= 0:
        if rng < 0.0:
            if step <= 0.0:
                steps, rng, step = 1, 0.0, 0.0
            else:
                rng, steps = step, 2
        else:
            if step <= 0.0:
                step, steps = rng, 2
            else:
                steps = int(math.ceil(rng / step))
    else:
        if rng < 0.0:
            if step <= 0.0:
                rng = unset_range_default
                step = rng / steps
            else:
                rng, steps = step, 2
        else:
            if step <= 0.0:
                if steps <= 1:
                    steps = 2
                step = rng / (steps - 1)
    if rng <= 0.0 or step <= 0.0 or steps <= 0:
        steps, rng, step = 1, 0.0, 0.0
    return steps, rng, step


def c_header_value(text: str, keyword: str) -> float | None:
    """Read a number from an SMV header the way C does.

    C takes the *last* occurrence of ``keyword`` as a substring anywhere in the
    header, then the number after the next ``=``. So ``DISTANCE`` is read from a
    later ``CLOSE_DISTANCE`` line and ``ORGX`` from ``XDS_ORGX``.

    Parameters
    ----------
    text : str
        The header text.
    keyword : str
        The keyword to look for (case-sensitive).

    Returns
    -------
    float or None
        The number, 0.0 when no number follows the ``=`` (or no ``=`` follows), or None
        when the keyword does not occur.
    """
    pos = text.rfind(keyword)
    if pos < 0:
        return None
    eq = text.find("=", pos + len(keyword))
    if eq < 0:
        return 0.0
    import re

    m = re.match(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)", text[eq + 1:])
    return float(m.group(1)) if m else 0.0


def _read_header(cfg: SimulationConfig, log: list[str]):
    """Apply geometry from -mask and -img SMV headers, like C does before parsing flags."""
    from .io import smv

    det = cfg.detector
    state = {}
    mask = None
    for kind, name in (("mask", det.mask_path), ("img", cfg.output.img_header_path)):
        path = _path(cfg, name)
        if path is None:
            continue
        try:
            header, image = smv.read_smv(path)
            text = smv.read_smv_header_text(path)
        except FileNotFoundError:
            raise SetupError(f"-{kind} {name}: no such file") from None
        except ValueError as err:
            raise SetupError(f"-{kind} {name}: {err}") from None
        height, width = np.asarray(image).shape
        state["fpixels"], state["spixels"] = width, height

        def value(key, text=text):
            return c_header_value(text, key)

        pix = value("PIXEL_SIZE")
        if pix is not None:
            state["pixel"] = pix / 1000.0
        for key, dest, scale in (("DISTANCE", "distance", 1e-3), ("CLOSE_DISTANCE", "close_distance", 1e-3),
                                 ("WAVELENGTH", "lambda0", 1e-10), ("ORGX", "orgx", 1.0), ("ORGY", "orgy", 1.0),
                                 ("PHI", "phi0", 1 / RTD), ("OSC_RANGE", "osc", 1 / RTD)):
            v = value(key)
            if v is not None:
                state[dest] = v * scale
        pixel = state.get("pixel", 1e-4)  # C reads headers before the flags: its 0.1 mm default
        xb, yb = value("BEAM_CENTER_X"), value("BEAM_CENTER_Y")
        if xb is not None:
            state["xbeam"] = xb / 1000.0
        if yb is not None:
            # the mask header's Y is flipped (detsize_s - Y), the -img header's is not
            state["ybeam"] = (pixel * height - yb / 1000.0) if kind == "mask" else yb / 1000.0
        if kind == "mask":
            mask = np.asarray(image)
        log.append(f"reading {path}")
    return state, mask


def resolve(cfg: SimulationConfig) -> ResolvedSetup:
    """Turn a configuration into the numbers of one render (C's set-up rules).

    One function per section of nanoBragg's set-up, in C's order (which is also the order of
    the warnings in :attr:`ResolvedSetup.log` and of the checks that reject bad input).

    Parameters
    ----------
    cfg : SimulationConfig
        The configuration (:func:`torchbragg.parse_args` makes one from nanoBragg flags).

    Returns
    -------
    ResolvedSetup
        Every number of the render, SI float64.

    Raises
    ------
    SetupError
        For a configuration nanoBragg cannot render or that would exceed :data:`LIMITS`.
    """
    log: list[str] = []
    notes: list[str] = []
    conv = cfg.detector.convention.upper()
    if conv not in CONVENTIONS:
        raise SetupError(f"unknown detector convention {cfg.detector.convention!r}; expected one of "
                         f"{', '.join(CONVENTIONS)}")
    hdr, mask = _read_header(cfg, log)
    args = set(cfg.args or [])
    size = _detector_size(cfg, hdr, mask, args)
    given = _given_geometry(cfg, hdr, args)
    frame = _beam_centre_and_pivot(cfg, conv, size, given, log, notes)
    steps = _steps(cfg, hdr, args, log, notes)
    placed = _detector_placement(cfg, size, given, frame, steps.thick)
    crystal = _crystal(cfg, given.lambda0, placed.distance, size.pixel, log)
    table, interpolate, hkl_source = _structure_factors(cfg, crystal.interpolate)
    source_dirs, source_lambdas, divsteps = _sources(cfg, frame.beam_v, frame.polar_v, frame.vert, given.lambda0,
                                                     *steps.divergence)
    from .c_random import mosaic_umats

    umats = mosaic_umats(steps.mosaic_spread, steps.domains, cfg.crystal.mosaic_seed)
    fluence, water_size, I_bg = _fluence_and_background(cfg)
    roi, evaluations = _roi_and_counts(cfg, size, len(source_lambdas), steps, crystal.oversample)
    det, beam, xtal, samp = cfg.detector, cfg.beam, cfg.crystal, cfg.sampling
    hsteps, hrange, hstep, vsteps, vrange, vstep, dsteps, dispersion, dstep = steps.divergence
    return ResolvedSetup(
        convention=conv, pivot=frame.pivot, fpixels=size.fpixels, spixels=size.spixels, pixel_size=size.pixel,
        detsize_f=size.detsize_f, detsize_s=size.detsize_s, fdet=placed.fdet, sdet=placed.sdet, odet=placed.odet,
        pix0=placed.pix0, distance=placed.distance, close_distance=placed.close_distance, xbeam=frame.xbeam,
        ybeam=frame.ybeam, fbeam=placed.fbeam, sbeam=placed.sbeam, xclose=frame.xclose, yclose=frame.yclose,
        fclose=placed.fclose, sclose=placed.sclose, orgx=placed.orgx, orgy=placed.orgy,
        dials_origin=placed.dials_origin, twotheta=placed.twotheta, curved=det.curved, point_pixel=det.point_pixel,
        roi=roi, mask=mask, thicksteps=steps.tsteps, thickstep=steps.tstep, thick=steps.thick, mu=steps.mu,
        beam=frame.beam_v, polar_vector=frame.polar_v, vert_vector=frame.vert, kahn=beam.kahn_factor,
        nopolar=beam.nopolar, lambda0=given.lambda0, source_dirs=source_dirs, source_lambdas=source_lambdas,
        fluence=fluence, dmin=beam.dmin_A * 1e-10, divsteps=divsteps, dispsteps=dsteps, hdivrange=hrange,
        vdivrange=vrange, hdivstep=hstep, vdivstep=vstep, dispersion=dispersion,
        a0=crystal.a_real * 1e-10, a_star=crystal.a_star, cell=crystal.cell, V_cell=crystal.V_cell, N=crystal.N,
        shape=xtal.shape, fudge=xtal.fudge, spindle=frame.spindle, phi0=steps.phi0, phistep=steps.phistep,
        phisteps=steps.phisteps, osc=steps.osc, mosaic_spread=steps.mosaic_spread, mosaic_umats=umats,
        water_size=water_size, I_bg=I_bg, oversample=crystal.oversample,
        recommended_oversample=crystal.recommended, oversample_thick=samp.oversample_thick,
        oversample_polar=samp.oversample_polar, oversample_omega=samp.oversample_omega,
        interpolate=bool(interpolate), steps=evaluations, hkl=table, default_F=xtal.default_F,
        hkl_source=hkl_source, log=log, notes=notes,
    )


def _detector_size(cfg: SimulationConfig, hdr: dict, mask, args: set) -> SimpleNamespace:
    """Pixel size, pixel counts and detector size (``-pixel``, ``-detpixels``, ``-detsize``, an -img header)."""
    det = cfg.detector
    pixel = det.pixel_mm / 1000.0
    if "pixel" in hdr and "-pixel" not in args:
        pixel = hdr["pixel"]
    fpixels = det.fpixels if det.fpixels is not None else hdr.get("fpixels", 0)
    spixels = det.spixels if det.spixels is not None else hdr.get("spixels", 0)
    detsize_f = det.detsize_f_mm / 1000.0
    detsize_s = det.detsize_s_mm / 1000.0
    if fpixels:
        detsize_f = pixel * fpixels
    if spixels:
        detsize_s = pixel * spixels
    if pixel <= 0:
        raise SetupError(f"-pixel must be positive, got {pixel * 1000} mm")
    fpixels = int(math.ceil(detsize_f / pixel - 0.5))
    spixels = int(math.ceil(detsize_s / pixel - 0.5))
    if fpixels <= 0 or spixels <= 0:
        raise SetupError(f"detector has no pixels ({fpixels}x{spixels})")
    for n, axis in ((fpixels, "fast"), (spixels, "slow")):
        _check_count(f"the detector's {axis} axis", n, "give fewer -detpixels or a larger -pixel",
                     "pixels_per_axis")
    _check_count("the detector's pixel count", fpixels * spixels, "give fewer -detpixels or a larger -pixel",
                 "pixels")
    if mask is not None and mask.shape != (spixels, fpixels):
        raise SetupError(f"-mask {det.mask_path}: image is {mask.shape[1]}x{mask.shape[0]} pixels, "
                         f"detector is {fpixels}x{spixels}")
    return SimpleNamespace(pixel=pixel, fpixels=fpixels, spixels=spixels, detsize_f=detsize_f, detsize_s=detsize_s)


def _given_geometry(cfg: SimulationConfig, hdr: dict, args: set) -> SimpleNamespace:
    """The distances, beam centres, origins and wavelength as given (flags, else the -img header; NaN: unset)."""
    det, beam = cfg.detector, cfg.beam

    def pick(user_mm, key, scale=1e-3):
        if user_mm is not None:
            return user_mm * scale
        return hdr.get(key, math.nan)

    distance = pick(det.distance_mm, "distance")
    if math.isnan(distance):
        distance = 0.1
    lambda0 = beam.wavelength_A * 1e-10
    if "lambda0" in hdr and not (args & {"-lambda", "-wavelength", "-wave", "-energy"}):
        lambda0 = hdr["lambda0"]
    if lambda0 <= 0:
        raise SetupError(f"wavelength must be positive, got {lambda0 * 1e10} Å")
    return SimpleNamespace(
        distance=distance, close_distance=pick(det.close_distance_mm, "close_distance"),
        xbeam=pick(det.xbeam_mm, "xbeam"), ybeam=pick(det.ybeam_mm, "ybeam"),
        xclose=det.xclose_mm / 1000.0 if det.xclose_mm is not None else math.nan,
        yclose=det.yclose_mm / 1000.0 if det.yclose_mm is not None else math.nan,
        orgx=det.orgx if det.orgx is not None else hdr.get("orgx", math.nan),
        orgy=det.orgy if det.orgy is not None else hdr.get("orgy", math.nan),
        lambda0=lambda0)


def _beam_centre_and_pivot(cfg: SimulationConfig, conv: str, size: SimpleNamespace, given: SimpleNamespace,
                           log: list[str], notes: list[str]) -> SimpleNamespace:
    """The convention's axes and default beam centre, its pivot, and user vectors (CUSTOM)."""
    det, beam, xtal = cfg.detector, cfg.beam, cfg.crystal
    pixel, detsize_f, detsize_s = size.pixel, size.detsize_f, size.detsize_s
    xbeam, ybeam, xclose, yclose = given.xbeam, given.ybeam, given.xclose, given.yclose
    fclose = (given.orgx - 0.5) * pixel if not math.isnan(given.orgx) else detsize_f / 2.0
    sclose = (given.orgy - 0.5) * pixel if not math.isnan(given.orgy) else detsize_s / 2.0
    if math.isnan(xclose):
        xclose = fclose
    if math.isnan(yclose):
        yclose = sclose
    fbeam, sbeam = fclose, sclose

    vecs = {
        "beam": np.array([1.0, 0, 0]), "fdet": np.array([0, 0, 1.0]), "sdet": np.array([0, -1.0, 0]),
        "odet": np.array([1.0, 0, 0]), "twotheta": np.array([0, 0, -1.0]), "polar": np.array([0, 0, 1.0]),
        "spindle": np.array([0, 0, 1.0]),
    }
    # the C defaults before any convention block (used by CUSTOM)
    custom_defaults = {
        "beam": np.array([1.0, 0, 0]), "fdet": np.array([0, 0, 1.0]), "sdet": np.array([0, -1.0, 0]),
        "odet": np.array([1.0, 0, 0]), "twotheta": np.array([0, 0, 1.0]), "polar": np.array([0, 0, 1.0]),
        "spindle": np.array([0, 0, 1.0]),
    }
    pivot = None
    if conv == "ADXV":
        xbeam = (detsize_f + pixel) / 2.0 if math.isnan(xbeam) else xbeam
        ybeam = (detsize_s - pixel) / 2.0 if math.isnan(ybeam) else ybeam
        vecs.update(beam=[0, 0, 1], fdet=[1, 0, 0], sdet=[0, -1, 0], odet=[0, 0, 1], twotheta=[-1, 0, 0],
                    polar=[1, 0, 0], spindle=[1, 0, 0])
        fbeam, sbeam, pivot = xbeam, detsize_s - ybeam, "beam"
    elif conv in ("MOSFLM", "DENZO"):
        xbeam = (detsize_s + pixel) / 2.0 if math.isnan(xbeam) else xbeam
        ybeam = (detsize_f + pixel) / 2.0 if math.isnan(ybeam) else ybeam
        half = 0.5 * pixel if conv == "MOSFLM" else 0.0
        fbeam, sbeam, pivot = ybeam + half, xbeam + half, "beam"
    elif conv in ("XDS", "DIALS"):
        xbeam = xclose if math.isnan(xbeam) else xbeam
        ybeam = yclose if math.isnan(ybeam) else ybeam
        if conv == "XDS":
            vecs.update(beam=[0, 0, 1], fdet=[1, 0, 0], sdet=[0, 1, 0], odet=[0, 0, 1], twotheta=[1, 0, 0],
                        polar=[1, 0, 0], spindle=[1, 0, 0])
        else:
            vecs.update(beam=[0, 0, 1], fdet=[1, 0, 0], sdet=[0, 1, 0], odet=[0, 0, 1], twotheta=[0, 1, 0],
                        polar=[0, 1, 0], spindle=[0, 1, 0])
        fbeam, sbeam, pivot = xbeam, ybeam, "sample"
    else:  # CUSTOM
        vecs = dict(custom_defaults)
        xbeam = xclose if math.isnan(xbeam) else xbeam
        ybeam = yclose if math.isnan(ybeam) else ybeam
        fbeam, sbeam = xbeam, ybeam
        fclose, sclose = xbeam, ybeam
        pivot = det.implied_pivot or det.pivot or "beam"  # C: the last pivot-setting flag wins
    if conv != "CUSTOM" and det.pivot is not None and det.pivot != pivot:
        notes.append(f"note: -pivot {det.pivot} has no effect with the {conv} convention "
                     f"(nanoBragg forces the {pivot} pivot); use the CUSTOM vectors to choose the pivot")
    vecs = {k: np.asarray(v, dtype=np.float64) for k, v in vecs.items()}
    user = {"beam": beam.beam_vector, "fdet": det.fdet_vector, "sdet": det.sdet_vector, "odet": det.odet_vector,
            "twotheta": det.twotheta_axis, "polar": beam.polar_vector, "spindle": xtal.spindle_axis}
    for k, v in user.items():
        if v is not None:
            if conv != "CUSTOM":
                notes.append(f"note: a user {k} vector switches nanoBragg to the CUSTOM convention")
            vecs[k] = np.asarray(v, dtype=np.float64)
    beam_v = unit(vecs["beam"])
    fdet = unit(vecs["fdet"])
    sdet = unit(vecs["sdet"])
    odet_raw = vecs["odet"]
    odet = unit(odet_raw)
    if float(np.sqrt(odet_raw @ odet_raw)) != 1.0:
        log.append("WARNING: auto-generating odet_vector")
        odet = unit(np.cross(fdet, sdet))
    polar_v = unit(vecs["polar"])
    return SimpleNamespace(
        xbeam=xbeam, ybeam=ybeam, xclose=xclose, yclose=yclose, fclose=fclose, sclose=sclose, fbeam=fbeam,
        sbeam=sbeam, pivot=pivot, beam_v=beam_v, fdet=fdet, sdet=sdet, odet=odet, polar_v=polar_v,
        spindle=unit(vecs["spindle"]), twotheta_axis=vecs["twotheta"], vert=unit(np.cross(beam_v, polar_v)))


def _phi_steps(cfg: SimulationConfig, hdr: dict, args: set) -> tuple[float, float, int, float]:
    """``(osc, phistep, phisteps, phi0)`` in radians (C's rules for -osc, -phistep, -phisteps)."""
    xtal = cfg.crystal
    osc = xtal.osc_deg / RTD if xtal.osc_deg is not None else hdr.get("osc", -1.0)
    phistep = xtal.phistep_deg / RTD if xtal.phistep_deg is not None else -1.0
    phisteps = xtal.phisteps if xtal.phisteps is not None else -1
    phi0 = xtal.phi0_deg / RTD if "-phi" in args or cfg.args is None or "phi0" not in hdr else hdr["phi0"]
    if phisteps < 0:
        if osc < 0.0:
            if phistep <= 0.0:
                phisteps, osc, phistep = 1, 0.0, 0.0
            else:
                osc, phisteps = phistep, 2
        else:
            if phistep <= 0.0:
                phisteps, phistep = 2, osc / 2.0
            else:
                phisteps = _check_count("the number of phi steps (-osc / -phistep)", math.ceil(osc / phistep)
                                        if math.isfinite(osc / phistep) else math.inf,
                                        "give a larger -phistep or -phisteps")
    else:
        if phisteps == 0:
            phisteps = 1
        if osc < 0.0:
            if phistep <= 0.0:
                osc = 1.0 / RTD
                phistep = osc / phisteps
            else:
                osc, phisteps = phistep, 2
        else:
            if phistep < 0.0:
                phistep = osc / phisteps
    return osc, phistep, phisteps, phi0


def _thickness_steps(cfg: SimulationConfig, log: list[str], notes: list[str]) -> tuple[int, float, float, float]:
    """``(layers, thickness m, layer step m, mu 1/m)``: C's own variant of the step rule for the sensor."""
    det = cfg.detector
    thick = det.thick_um * 1e-6
    tsteps = det.thicksteps if det.thicksteps is not None else -1
    tstep = -1.0
    if tsteps <= 0:
        if thick < 0.0:
            tsteps, thick, tstep = 1, 0.0, 0.0
        else:
            tsteps = 2
            tstep = thick / tsteps
    else:
        if thick < 0.0:
            thick = 0.5e-6
            tstep = thick / tsteps
        else:
            if tsteps <= 1:
                tsteps = 2
            tstep = thick / (tsteps - 1)
    mu = -1.0
    if det.attenuation_depth_um is not None:
        mu = 0.0 if math.isinf(det.attenuation_depth_um) else 1.0 / (det.attenuation_depth_um * 1e-6)
        if mu == 0.0 and thick > 0.0:
            notes.append("WARNING: -detector_thick after -detector_abs inf: like nanoBragg, the sensor then "
                         "captures nothing (mu = 0) and the image is zero")
    if thick > 0.0 and mu < 0.0:
        mu = 1.0 / thick
        log.append(f"WARNING: setting detector attenuation depth to {mu:g} m")
    if thick <= 0.0 or tstep <= 0.0 or tsteps <= 0:
        tsteps, thick, tstep = 1, 0.0, 0.0
    _check_count("the number of sensor layers", tsteps, "give fewer -detector_thicksteps")
    return tsteps, thick, tstep, mu


def _mosaic_steps(cfg: SimulationConfig, log: list[str]) -> tuple[float, int]:
    """``(mosaic spread rad, domains)`` (C's rules for -mosaic and -mosaic_domains)."""
    xtal = cfg.crystal
    if xtal.mosaic_deg is not None and xtal.mosaic_deg > 180.0:
        raise SetupError(f"-mosaic {xtal.mosaic_deg:g}: a mosaic spread is at most 180 degrees")
    if xtal.fudge < 0.0 and xtal.shape != "square":
        # C: sqrt of a negative number (round: a NaN image), a growing exponential (gauss),
        # every point inside the cut-off (tophat)
        raise SetupError(f"-fudge {xtal.fudge:g}: the width factor of the {xtal.shape} lattice factor must be "
                         f"0 or more")
    mosaic_spread = xtal.mosaic_deg / RTD if xtal.mosaic_deg is not None else -1.0
    domains = xtal.mosaic_domains if xtal.mosaic_domains is not None else -1
    if domains <= 0:
        if mosaic_spread < 0.0:
            domains, mosaic_spread = 1, 0.0
        elif mosaic_spread == 0.0:
            domains = 1
        else:
            log.append("WARNING: finite mosaicity with only one domain! upping to 10 mosaic domains")
            domains = 10
    else:
        if mosaic_spread < 0.0:
            log.append("WARNING: no mosaic spread specified.  setting mosaic_domains = 1")
            mosaic_spread, domains = 0.0, 1
        elif mosaic_spread == 0.0:
            log.append("WARNING: zero mosaic spread specified.  setting mosaic_domains = 1")
            domains = 1
    _check_count("the number of mosaic domains", domains, "give fewer -mosaic_domains")
    return mosaic_spread, domains


def _steps(cfg: SimulationConfig, hdr: dict, args: set, log: list[str], notes: list[str]) -> SimpleNamespace:
    """Step counts: phi, divergence and dispersion, sensor layers, mosaic domains."""
    beam = cfg.beam
    osc, phistep, phisteps, phi0 = _phi_steps(cfg, hdr, args)
    mrad = 1e-3
    hsteps, hrange, hstep = _div_steps(
        beam.hdivsteps if beam.hdivsteps is not None else -1,
        beam.hdivrange_mrad * mrad if beam.hdivrange_mrad is not None else -1.0,
        beam.hdivstep_mrad * mrad if beam.hdivstep_mrad is not None else -1.0)
    vsteps, vrange, vstep = _div_steps(
        beam.vdivsteps if beam.vdivsteps is not None else -1,
        beam.vdivrange_mrad * mrad if beam.vdivrange_mrad is not None else -1.0,
        beam.vdivstep_mrad * mrad if beam.vdivstep_mrad is not None else -1.0)
    dsteps, dispersion, dstep = _div_steps(
        beam.dispsteps if beam.dispsteps is not None else -1, beam.dispersion_percent / 100.0, -1.0)
    hint = "give fewer -hdivsteps/-vdivsteps/-divsteps/-dispsteps or larger -hdivstep/-vdivstep"
    for n, what in ((hsteps, "horizontal divergence steps"), (vsteps, "vertical divergence steps"),
                    (dsteps, "dispersion steps"), (phisteps, "phi steps")):
        _check_count(f"the number of {what}", n, hint if what != "phi steps" else "give fewer -phisteps")
    _check_count("the number of sources (divergence x dispersion steps)", hsteps * vsteps * dsteps, hint, "sources")
    tsteps, thick, tstep, mu = _thickness_steps(cfg, log, notes)
    mosaic_spread, domains = _mosaic_steps(cfg, log)
    if phisteps < 1:
        raise SetupError(f"no phi steps (-osc {osc * RTD:g} with -phistep {phistep * RTD:g}): give a positive "
                         "-osc or -phisteps")
    return SimpleNamespace(
        osc=osc, phistep=phistep, phisteps=phisteps, phi0=phi0,
        divergence=(hsteps, hrange, hstep, vsteps, vrange, vstep, dsteps, dispersion, dstep),
        tsteps=tsteps, thick=thick, tstep=tstep, mu=mu, mosaic_spread=mosaic_spread, domains=domains)


def _detector_placement(cfg: SimulationConfig, size: SimpleNamespace, given: SimpleNamespace,
                        frame: SimpleNamespace, thick: float) -> SimpleNamespace:
    """The detector turned (-detector_rot*, -twotheta) about its pivot: pix0, axes, distances, centres."""
    det = cfg.detector
    pixel = size.pixel
    beam_v, fdet, sdet, odet = frame.beam_v, frame.fdet, frame.sdet, frame.odet
    fclose, sclose, fbeam, sbeam, pivot = frame.fclose, frame.sclose, frame.fbeam, frame.sbeam, frame.pivot
    twotheta_axis = frame.twotheta_axis
    distance, close_distance = given.distance, given.close_distance
    rx, ry, rz = det.rotx_deg / RTD, det.roty_deg / RTD, det.rotz_deg / RTD
    twotheta = det.twotheta_deg / RTD
    ratio = float(beam_v @ rotate_xyz(odet, rx, ry, rz))
    if ratio == 0.0:
        ratio = np.finfo(float).tiny
    if math.isnan(close_distance):
        close_distance = abs(ratio * distance)
    distance = close_distance / ratio
    if det.pix0_vector_m is not None:
        pix0 = np.asarray(det.pix0_vector_m, dtype=np.float64)
    else:
        pix0 = np.zeros(3)
    if pivot == "sample":
        pix0 = -fclose * fdet - sclose * sdet + close_distance * odet
        pix0 = rotate_axis(rotate_xyz(pix0, rx, ry, rz), twotheta_axis, twotheta)
    fdet = rotate_axis(rotate_xyz(fdet, rx, ry, rz), twotheta_axis, twotheta)
    sdet = rotate_axis(rotate_xyz(sdet, rx, ry, rz), twotheta_axis, twotheta)
    odet = rotate_axis(rotate_xyz(odet, rx, ry, rz), twotheta_axis, twotheta)
    if pivot == "beam":
        pix0 = -fbeam * fdet - sbeam * sdet + distance * beam_v
    fclose = -float(pix0 @ fdet)
    sclose = -float(pix0 @ sdet)
    close_distance = float(pix0 @ odet)
    if thick > 0.0 and close_distance < 0.0 and not det.curved:
        # the sample is behind the sensor: every ray's parallax is negative and C's capture fraction
        # exp(-t/mu/parallax) - exp(-(t+dt)/mu/parallax) is negative, or inf - inf = NaN at grazing rays
        raise SetupError(f"-detector_thick {thick * 1e6:g}: the sensor faces away from the sample (close "
                         f"distance {close_distance * 1000:.6g} mm; check -twotheta and -detector_rot*): its "
                         f"capture fraction would be negative; turn the detector or drop -detector_thick")
    impact = close_distance / ratio * beam_v - pix0
    fbeam = float(fdet @ impact)
    sbeam = float(sdet @ impact)
    distance = close_distance / ratio
    dials_origin = 1000.0 * np.array([pix0 @ np.array([0, 0, 1.0]), pix0 @ np.array([0, 1.0, 0]),
                                      pix0 @ np.array([-1.0, 0, 0])])
    return SimpleNamespace(
        pix0=pix0, fdet=fdet, sdet=sdet, odet=odet, fclose=fclose, sclose=sclose, close_distance=close_distance,
        fbeam=fbeam, sbeam=sbeam, distance=distance, orgx=fclose / pixel + 0.5, orgy=sclose / pixel + 0.5,
        dials_origin=dials_origin, twotheta=twotheta)


def _crystal(cfg: SimulationConfig, lambda0: float, distance: float, pixel: float,
             log: list[str]) -> SimpleNamespace:
    """The lattice, the crystal's size in unit cells, automatic interpolation and oversampling."""
    xtal, beam, samp = cfg.crystal, cfg.beam, cfg.sampling
    a_star, a_real, cell, V_cell = _lattice(cfg, lambda0, log)
    Na, Nb, Nc = (float(n) for n in xtal.N)
    interpolate = xtal.interpolate
    if interpolate is None:  # C decides from -N/-Na/-Nb/-Nc, before any crystal size is converted
        interpolate = Na <= 2 or Nb <= 2 or Nc <= 2
        log.append("auto-selected tricubic interpolation of structure factors" if interpolate
                   else "auto-selected no interpolation")
    size = [s * 1e-6 for s in xtal.size_um]
    beamsize_m = beam.beamsize_mm / 1000.0
    if beamsize_m >= 0:  # C clips the crystal's height and width (not its thickness) to the beam
        for i, axis in ((1, "high"), (2, "wide")):
            if beamsize_m < size[i]:
                log.append(f"WARNING: clipping sample ({size[i]:g} m {axis}) with beam ({beamsize_m:g} m)")
                size[i] = beamsize_m
    lengths = [float(np.sqrt(v @ v)) * 1e-10 for v in a_real]  # metres
    if size[0] > 0:
        Na = float(math.ceil(size[0] / lengths[0]))
    if size[1] > 0:
        Nb = float(math.ceil(size[1] / lengths[1]))
    if size[2] > 0:
        Nc = float(math.ceil(size[2] / lengths[2]))
    Na, Nb, Nc = (max(n, 1.0) for n in (Na, Nb, Nc))
    for n, axis in ((Na, "a"), (Nb, "b"), (Nc, "c")):
        _check_count(f"the number of unit cells along {axis}", n, "give a smaller crystal size or -N",
                     "unit_cells")
    xtalsize_max = max(lengths[0] * Na, lengths[1] * Nb, lengths[2] * Nc)
    reciprocal_pixel_size = lambda0 * distance / pixel
    if not math.isfinite(distance) or distance == 0.0:
        raise SetupError("the beam is parallel to the detector plane (distance along the beam is "
                         f"{distance:g} m): check -beam_vector/-odet_vector and the detector rotations")
    recommended_f = math.ceil(3.0 * xtalsize_max / reciprocal_pixel_size) if math.isfinite(
        3.0 * xtalsize_max / reciprocal_pixel_size) else math.inf
    oversample = samp.oversample if samp.oversample is not None and samp.oversample > 0 else 0
    if oversample <= 0:
        recommended = _check_count(
            "the automatic oversample (3 x crystal size / reciprocal pixel size)", recommended_f,
            "the detector is nearly edge-on to the beam or the crystal is huge; give -oversample N",
            "oversample")
    else:
        recommended = int(min(recommended_f, 2 ** 62))
        _check_count("-oversample", oversample, "give a smaller -oversample", "oversample")
    if recommended <= 0:
        recommended = 1
    if oversample <= 0:
        oversample = recommended
        log.append(f"auto-selected {oversample}-fold oversampling")
    elif oversample < recommended:
        log.append(f"WARNING: maximum dimension of sample is {xtalsize_max * 1e10:g} A")
        log.append(f"         but reciprocal pixel size is {reciprocal_pixel_size * 1e10:g} A")
        log.append("         intensity may vary significantly across a pixel!")
        log.append(f"         recommend -oversample {recommended} to work around this")
    return SimpleNamespace(a_star=a_star, a_real=a_real, cell=cell, V_cell=V_cell, N=(Na, Nb, Nc),
                           interpolate=interpolate, oversample=oversample, recommended=recommended)


def _structure_factors(cfg: SimulationConfig, interpolate: bool):
    """``(table or None, interpolate, description)``: the -hkl table (or Fdump.bin with -use_fdump)."""
    from .io.hkl_table import read_fdump, read_hkl

    xtal = cfg.crystal
    table = None
    hkl_path = _path(cfg, xtal.hkl_path)
    here = Path(cfg.cwd) if cfg.cwd else Path.cwd()
    fdump_here = here / "Fdump.bin"
    hkl_warnings: list[str] = []
    if hkl_path is not None:
        if not hkl_path.exists():
            raise SetupError(f"-hkl {xtal.hkl_path}: no such file")
        if _is_fdump(hkl_path):
            table = read_fdump(hkl_path, default_F=xtal.default_F)
        else:
            table = read_hkl(hkl_path, xtal.default_F)
        hkl_warnings.extend(getattr(table, "warnings", []))
    elif fdump_here.exists():
        if cfg.compat.implicit_fdump:
            table = read_fdump(fdump_here, default_F=xtal.default_F)
            hkl_warnings.append(f"read {fdump_here} because -use_fdump was given (C behaviour)")
        else:
            hkl_warnings.append(
                f"{fdump_here} is present but unused: nanoBragg would silently read it here "
                "(no -hkl given); pass -hkl Fdump.bin or -use_fdump to read it")
    if table is None and xtal.default_F == 0.0:
        raise SetupError("no structure factors: give -hkl FILE or a non-zero -default_F")
    if table is None or table.count == 0:
        interpolate = False
    return table, interpolate, _describe_source(table, xtal.default_F, hkl_warnings)


def _fluence_and_background(cfg: SimulationConfig) -> tuple[float, float, float]:
    """``(fluence photons/m², water size m, background I_bg)``."""
    beam, xtal = cfg.beam, cfg.crystal
    fluence = beam.fluence
    beamsize = beam.beamsize_mm / 1000.0
    flux = beam.flux
    if flux != 0.0 and beam.exposure_s > 0.0 and beamsize >= 0:
        fluence = flux * beam.exposure_s / beamsize / beamsize
    if not math.isfinite(fluence):
        raise SetupError(f"the fluence (-flux x -exposure / -beamsize²) is {fluence:g}: give a larger -beamsize "
                         "or a smaller -flux")
    water_size = xtal.water_um * 1e-6
    water_F, water_MW = 2.57, 18.0
    I_bg = water_F * water_F * R_E_SQR * fluence * water_size ** 3 * 1e6 * AVOGADRO / water_MW
    return fluence, water_size, I_bg


def _roi_and_counts(cfg: SimulationConfig, size: SimpleNamespace, n_sources: int, steps: SimpleNamespace,
                    oversample: int) -> tuple[tuple[int, int, int, int], int]:
    """``(roi, evaluations per subpixel layer)``: the -roi box (C's rules) and the work it holds, checked."""
    det = cfg.detector
    fpixels, spixels = size.fpixels, size.spixels
    roi = det.roi
    if roi is None:
        roi = (0, fpixels, 0, spixels)
    else:  # C's rule: a negative bound means "from the first pixel" / "to the last one"
        xmin, xmax, ymin, ymax = roi
        xmin, ymin = max(xmin, 0), max(ymin, 0)
        xmax = fpixels if xmax < 0 else xmax
        ymax = spixels if ymax < 0 else ymax
        for lo, hi, n, axis in ((xmin, xmax, fpixels, "fast (xmin xmax)"), (ymin, ymax, spixels, "slow (ymin ymax)")):
            if lo > hi:
                raise SetupError(f"-roi {' '.join(str(v) for v in det.roi)}: the {axis} bounds are reversed")
            if lo >= n:
                raise SetupError(f"-roi {' '.join(str(v) for v in det.roi)}: the {axis} range starts outside "
                                 f"the detector ({fpixels}x{spixels} pixels, 0-based)")
        roi = (xmin, min(xmax, fpixels), ymin, min(ymax, spixels))
    _check_count("the number of sources", n_sources, "give a shorter -sourcefile", "sources")
    evaluations = n_sources * steps.domains * steps.phisteps * oversample * oversample
    per_pixel = _check_count("the evaluations per pixel (sources x phi steps x mosaic domains x layers x "
                             "oversample²)", evaluations * steps.tsteps,
                             "lower -oversample, the step counts or -mosaic_domains", "steps_per_pixel")
    rendered = (min(roi[1], fpixels - 1) - roi[0] + 1) * (min(roi[3], spixels - 1) - roi[2] + 1)
    _check_count("the number of evaluations (evaluations per pixel x rendered pixels)", per_pixel * rendered,
                 "lower -oversample, the step counts, or render a smaller -roi", "evaluations")
    return tuple(int(v) for v in roi), evaluations


def _is_fdump(path: Path) -> bool:
    if path.name.lower().endswith(".bin"):
        return True
    with open(path, "rb") as fh:
        head = fh.read(256)
    return b"\n\f" in head


def _describe_source(table, default_F: float, warnings_: list[str]) -> dict:
    if table is None:
        return {"kind": "none", "source": None, "bounds": None, "count": 0, "default_F": default_F,
                "warnings": warnings_,
                "describe": f"no HKL table: every reflection uses default_F = {default_F:g}"}
    bounds = [list(b) for b in table.bounds]
    return {"kind": table.kind, "source": str(table.source), "bounds": bounds, "count": int(table.count),
            "default_F": default_F, "warnings": warnings_, "describe": table.describe()}


def _lattice(cfg: SimulationConfig, lambda0: float, log: list[str]):
    """Reciprocal (1/Å) and real (Å) lattice vectors as rows, like C."""
    from .io.matrix_file import read_mosflm_matrix

    xtal = cfg.crystal
    user_cell = xtal.cell is not None
    a_star = np.zeros((3, 3))
    lengths = [0.0, 0.0, 0.0]
    V_cell = 0.0
    if user_cell:
        a, b, c, al, be, ga = (list(xtal.cell) + [0.0] * 6)[:6]
        if b <= 0.0:
            b = a
        if c <= 0.0:
            c = a
        al = al / RTD if al > 0 else math.pi / 2
        be = be / RTD if be > 0 else math.pi / 2
        ga = ga / RTD if ga > 0 else math.pi / 2
        if a <= 0:
            raise SetupError(f"-cell: the a axis must be positive, got {a:g}")
        cell_text = " ".join(f"{v:g}" for v in xtal.cell)
        if max(al, be, ga) >= math.pi or al + be + ga >= 2 * math.pi or al + be <= ga or be + ga <= al \
                or ga + al <= be:
            raise SetupError(f"-cell {cell_text}: the angles describe no unit cell (each below 180 degrees, "
                             "their sum below 360, each below the sum of the other two)")
        lengths = [a, b, c]
        aavg = (al + be + ga) / 2.0
        skew = abs(math.sin(aavg) * math.sin(aavg - al) * math.sin(aavg - be) * math.sin(aavg - ga))
        V_cell = 2.0 * a * b * c * math.sqrt(skew)
        if V_cell <= 0.0:
            raise SetupError(f"-cell {xtal.cell}: impossible unit cell volume {V_cell:g}")
        V_star = 1.0 / V_cell
        as_, bs, cs = b * c * math.sin(al) * V_star, c * a * math.sin(be) * V_star, a * b * math.sin(ga) * V_star
        cos_as = (math.cos(be) * math.cos(ga) - math.cos(al)) / (math.sin(be) * math.sin(ga))
        cos_bs = (math.cos(ga) * math.cos(al) - math.cos(be)) / (math.sin(ga) * math.sin(al))
        cos_gs = (math.cos(al) * math.cos(be) - math.cos(ga)) / (math.sin(al) * math.sin(be))
        sin_gs = c * V_star / as_ / bs
        sin_gs = min(sin_gs, 1.0)
        a_star[0] = [as_, 0.0, 0.0]
        a_star[1] = [bs * cos_gs, bs * sin_gs, 0.0]
        a_star[2] = [cs * cos_bs, cs * (cos_as - cos_bs * cos_gs) / sin_gs, cs * V_cell / (a * b * c * sin_gs)]
    if xtal.matrix_path is not None:
        path = _path(cfg, xtal.matrix_path)
        if not path.exists():
            raise SetupError(f"-mat {xtal.matrix_path}: no such file")
        m = np.asarray(read_mosflm_matrix(path), dtype=np.float64)
        # columns of the file are a*, b*, c*; rows x, y, z; the matrix carries the wavelength
        a_star = m.T * (1e-10 / lambda0)
        log.append(f"reading {path}")
    elif not user_cell:
        raise SetupError("no unit cell: give -cell a b c alpha beta gamma or -mat FILE")
    misset = None
    if xtal.misset_random:
        from .c_random import random_misset

        seed = xtal.misset_seed if xtal.misset_seed is not None else cfg.output.seed
        if seed is None:  # C: the time of day, like -seed
            import time

            seed = int(time.time())
            log.append(f"-misset random with no seed: using -misset_seed {seed}")
        misset = random_misset(seed)
        log.append("random orientation misset angles: {:f} {:f} {:f} deg".format(*(m * RTD for m in misset)))
    elif xtal.misset_deg is not None:
        misset = tuple(m / RTD for m in xtal.misset_deg)
    if misset is not None:
        a_star = np.array([rotate_xyz(v, *misset) for v in a_star])
    axb, bxc, cxa = np.cross(a_star[0], a_star[1]), np.cross(a_star[1], a_star[2]), np.cross(a_star[2], a_star[0])
    V_star = float(a_star[0] @ bxc)
    if user_cell:
        def rescale(v, mag):
            n = float(np.sqrt(v @ v))
            return v * (mag / (n if n > 0 else 1.0))

        bxc = rescale(bxc, lengths[0] / V_cell)
        cxa = rescale(cxa, lengths[1] / V_cell)
        axb = rescale(axb, lengths[2] / V_cell)
        V_star = 1.0 / V_cell
    V_cell = 1.0 / V_star
    real = np.array([bxc * V_cell, cxa * V_cell, axb * V_cell])
    a_star = np.array([np.cross(real[1], real[2]), np.cross(real[2], real[0]), np.cross(real[0], real[1])]) * V_star
    la = [float(np.sqrt(v @ v)) for v in real]
    cosines = [float(real[1] @ real[2]) / la[1] / la[2], float(real[0] @ real[2]) / la[0] / la[2],
               float(real[0] @ real[1]) / la[0] / la[1]]
    angles = [math.degrees(math.acos(max(-1.0, min(1.0, c)))) for c in cosines]
    cell = (la[0], la[1], la[2], angles[0], angles[1], angles[2])
    log.append("Unit Cell: {:g} {:g} {:g} {:g} {:g} {:g}".format(*cell))
    log.append(f"volume = {V_cell:g} A^3")
    return a_star, real, cell, V_cell


def _sources(cfg, beam_v, polar_v, vert, lambda0, hsteps, hrange, hstep, vsteps, vrange, vstep,
             dsteps, dispersion, dstep):
    source_distance = 10.0
    if cfg.beam.sourcefile:
        path = _path(cfg, cfg.beam.sourcefile)
        rows = _read_source_file(path)
        dirs, lams = [], []
        for row in rows:
            x, y, z, _w, lam = (row + [math.nan] * 5)[:5]
            x = -source_distance * beam_v[0] if math.isnan(x) else x
            y = -source_distance * beam_v[1] if math.isnan(y) else y
            z = -source_distance * beam_v[2] if math.isnan(z) else z
            lam = lambda0 if math.isnan(lam) else lam
            dirs.append(unit([x, y, z]))
            lams.append(lam)
        return np.array(dirs), np.array(lams), len(rows)
    dirs, lams = [], []
    divsteps = 0
    for ht in range(hsteps):
        for vt in range(vsteps):
            hdiv = hstep * ht - hrange / 2.0
            vdiv = vstep * vt - vrange / 2.0
            test = 0.0
            with np.errstate(divide="ignore", invalid="ignore"):
                test = (np.float64(hdiv * hdiv - hstep * hstep / 4.0 * (1 - hsteps % 2))
                        / np.float64(hrange) / hrange
                        + np.float64(vdiv * vdiv - vstep * vstep / 4.0 * (1 - vsteps % 2))
                        / np.float64(vrange) / vrange)
            if cfg.beam.round_div and test * 4.0 > 1.1:
                continue
            divsteps += 1
            vec = -source_distance * beam_v
            vec = rotate_axis(vec, polar_v, vdiv)
            vec = rotate_axis(vec, vert, hdiv)
            for dt in range(dsteps):
                lam = lambda0 * (1.0 + dstep * dt - dispersion / 2.0)
                dirs.append(unit(vec))
                lams.append(lam)
    if not dirs:
        raise SetupError("the divergence settings leave no source")
    return np.array(dirs), np.array(lams), divsteps


def _read_source_file(path: Path) -> list[list[float]]:
    import re

    if path is None or not path.exists():
        raise SetupError(f"-sourcefile {path}: no such file")
    if not path.is_file():
        raise SetupError(f"-sourcefile {path}: not a regular file")
    if path.stat().st_size > SOURCE_FILE_MAX_BYTES:
        raise SetupError(f"-sourcefile {path}: {path.stat().st_size} bytes, above the limit of "
                         f"{SOURCE_FILE_MAX_BYTES} bytes for a source list")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = handle.read(SOURCE_FILE_MAX_BYTES + 1).splitlines()
    for lineno, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if len(rows) >= LIMITS["sources"]:
            raise SetupError(f"-sourcefile {path}: more than {LIMITS['sources']} sources (line {lineno}), "
                             f"above the limit")
        fields = [f for f in re.split(r"[ \t,;:!]+", text) if f]
        try:
            rows.append([float(f) for f in fields[:5]])
        except ValueError:
            raise SetupError(f"{path}:{lineno}: expected numbers X Y Z I lambda: {line!r}") from None
    if not rows:
        raise SetupError(f"{path}: no sources in file")
    return rows
