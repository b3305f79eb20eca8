"""nanoBragg-compatible command-line parsing.

Every flag of the C program is accepted with the same meaning and units.
Unlike C, flags are matched exactly (C matches by substring, so ``-tophat_xtal``
is silently ignored there); an unknown or misspelt flag raises
:class:`ArgumentError` naming it and the closest real flag, and a flag with a
missing or non-numeric value names the flag and the value.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable

from .config import SimulationConfig

__all__ = ["ArgumentError", "parse_args", "count_numbers", "FLAGS", "ENGINE_FLAGS"]


class ArgumentError(ValueError):
    """A nanoBragg argument line that cannot be understood."""


#: largest magnitude of an integer flag (C reads them into a 32-bit int)
INT_FLAG_LIMIT = 2 ** 31 - 1


def _num(flag: str, text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ArgumentError(f"{flag}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ArgumentError(f"{flag}: expected a finite number, got {text}")
    return value


def _int(flag: str, text: str) -> int:
    value = _num(flag, text)
    if value != int(value):
        raise ArgumentError(f"{flag}: expected an integer, got {text!r}")
    if abs(value) > INT_FLAG_LIMIT:
        raise ArgumentError(f"{flag}: {text} is out of range (at most {INT_FLAG_LIMIT} in magnitude)")
    return int(value)


def _vec(flag: str, vals: list[str]) -> tuple[float, float, float]:
    return tuple(_num(flag, v) for v in vals)  # type: ignore[return-value]


Handler = Callable[[SimulationConfig, str, list[str]], None]
#: flag -> (number of values, handler, help)
FLAGS: dict[str, tuple[int, Handler, str]] = {}
#: flags this engine adds to nanoBragg's (consumed by the command line, not by C)
ENGINE_FLAGS: dict[str, tuple[int, str]] = {
    "-device": (1, "cpu | cuda | cuda:N: where to render"),
    "-dtype": (1, "float32 | float64: precision of the render"),
    "-chunk_rows": (1, "detector rows rendered at once (bounds memory)"),
}


def _flag(names, nargs: int, help: str):
    def register(fn: Handler) -> Handler:
        for name in names.split():
            FLAGS[name] = (nargs, fn, help)
        return fn

    return register


def _set(path: str, conv=None):
    section, attr = path.split(".")

    def handler(cfg, flag, vals):
        value = vals[0] if vals else True
        if conv is float:
            value = _num(flag, vals[0])
        elif conv is int:
            value = _int(flag, vals[0])
        elif conv == "vec":
            value = _vec(flag, vals)
        setattr(getattr(cfg, section), attr, value)

    return handler


def _simple(names: str, nargs: int, path: str, conv=None, help: str = ""):
    _flag(names, nargs, help)(_set(path, conv))


# ---- crystal -------------------------------------------------------------
@_flag("-N", 1, "number of unit cells along a, b and c")
def _n(cfg, flag, vals):
    n = float(_int(flag, vals[0]))
    cfg.crystal.N = (n, n, n)


def _n_axis(i):
    def handler(cfg, flag, vals):
        n = list(cfg.crystal.N)
        n[i] = float(_int(flag, vals[0]))
        cfg.crystal.N = tuple(n)

    return handler


for _i, _name in enumerate(("-Na", "-Nb", "-Nc")):
    _flag(_name, 1, f"number of unit cells along {'abc'[_i]}")(_n_axis(_i))


@_flag("-cell", 6, "unit cell a b c (Å) alpha beta gamma (degrees)")
def _cell(cfg, flag, vals):
    cfg.crystal.cell = tuple(_num(flag, v) for v in vals)


_simple("-mat", 1, "crystal.matrix_path", help="MOSFLM orientation matrix file")
_simple("-hkl", 1, "crystal.hkl_path", help="structure factors: text h k l F, or an Fdump.bin")
_simple("-default_F", 1, "crystal.default_F", float, "F for reflections not in the table")
_simple("-fudge", 1, "crystal.fudge", float, "shape-transform width fudge factor")
_simple("-water", 1, "crystal.water_um", float, "water background thickness (µm)")
_simple("-mosaic -mosaicity -mosaic_spread", 1, "crystal.mosaic_deg", float, "mosaic spread (degrees)")
_simple("-mosaic_domains -mosaic_dom", 1, "crystal.mosaic_domains", int, "number of mosaic domains")
_simple("-mosaic_seed", 1, "crystal.mosaic_seed", int, "seed of the mosaic domain generator")
_simple("-misset_seed", 1, "crystal.misset_seed", int, "seed of -misset random")
_simple("-phi", 1, "crystal.phi0_deg", float, "starting spindle angle (degrees)")
_simple("-osc", 1, "crystal.osc_deg", float, "oscillation range (degrees)")
_simple("-phistep", 1, "crystal.phistep_deg", float, "spindle step (degrees)")
_simple("-phisteps", 1, "crystal.phisteps", int, "number of spindle steps")
_simple("-spindle_axis", 3, "crystal.spindle_axis", "vec", "spindle rotation axis")
_simple("-interpolate", 0, "crystal.interpolate", help="tricubic interpolation of F between Bragg peaks")


@_flag("-nointerpolate", 0, "nearest-neighbour structure factors only")
def _noint(cfg, flag, vals):
    cfg.crystal.interpolate = False


@_flag("-misset", 3, "crystal misset rotations about x, y, z (degrees), or 'random'")
def _misset(cfg, flag, vals):
    cfg.crystal.misset_deg = _vec(flag, vals)


for _shape, _names in (("square", "-square_xtal"), ("round", "-round_xtal"),
                       ("gauss", "-gauss_xtal"), ("tophat", "-tophat_spots -binary_spots")):
    _flag(_names, 0, f"{_shape} crystal shape transform")(
        (lambda s: (lambda cfg, flag, vals: setattr(cfg.crystal, "shape", s)))(_shape))


def _size(indices):
    def handler(cfg, flag, vals):
        size = list(cfg.crystal.size_um)
        for i in indices:
            size[i] = _num(flag, vals[0]) * 1000.0
        cfg.crystal.size_um = tuple(size)

    return handler


_flag("-xtalsize -xtal_size -samplesize -sample_size", 1, "crystal full width (mm)")(_size((0, 1, 2)))
_flag("-xtal_thick -xtal_x -sample_thick -sample_x", 1, "crystal size along x (mm)")(_size((0,)))
_flag("-xtal_width -xtal_y -sample_width -sample_y -width", 1, "crystal size along y (mm)")(_size((1,)))
_flag("-xtal_height -xtal_z -sample_height -sample_z -height -xtal_heigh -sample_heigh",
      1, "crystal size along z (mm)")(_size((2,)))
for _name in ("-density", "-sample_density", "-MW", "-molecular_weight", "-molec"):
    _flag(_name, 1, "accepted for compatibility; no effect on the image (as in C)")(lambda cfg, flag, vals: None)

# ---- beam ----------------------------------------------------------------
_simple("-lambda -wavelength -wave", 1, "beam.wavelength_A", float, "wavelength (Å)")


@_flag("-energy", 1, "photon energy (eV)")
def _energy(cfg, flag, vals):
    energy = _num(flag, vals[0])
    if energy <= 0.0:
        raise ArgumentError(f"{flag}: expected a positive photon energy in eV, got {vals[0]}")
    cfg.beam.wavelength_A = 12398.42 / energy


_simple("-fluence", 1, "beam.fluence", float, "photons per m²")
_simple("-flux", 1, "beam.flux", float, "photons per second")
_simple("-exposure", 1, "beam.exposure_s", float, "exposure time (s)")
_simple("-beamsize", 1, "beam.beamsize_mm", float, "beam size (mm)")
_simple("-dispersion", 1, "beam.dispersion_percent", float, "spectral width (percent)")
_simple("-dispsteps", 1, "beam.dispsteps", int, "number of wavelengths")
_simple("-hdivrange", 1, "beam.hdivrange_mrad", float, "horizontal divergence (mrad)")
_simple("-vdivrange", 1, "beam.vdivrange_mrad", float, "vertical divergence (mrad)")
_simple("-hdivstep", 1, "beam.hdivstep_mrad", float, "horizontal divergence step (mrad)")
_simple("-vdivstep", 1, "beam.vdivstep_mrad", float, "vertical divergence step (mrad)")
_simple("-hdivsteps", 1, "beam.hdivsteps", int, "horizontal divergence steps")
_simple("-vdivsteps", 1, "beam.vdivsteps", int, "vertical divergence steps")
_simple("-sourcefile", 1, "beam.sourcefile", help="text file of sources: X Y Z I lambda")
_simple("-beam_vector", 3, "beam.beam_vector", "vec", "beam direction (CUSTOM convention)")
_simple("-polar_vector", 3, "beam.polar_vector", "vec", "E-vector direction (CUSTOM convention)")
@_flag("-polar", 1, "Kahn polarisation factor (switches polarisation back on)")
def _polar(cfg, flag, vals):
    kahn = _num(flag, vals[0])
    if not -1.0 <= kahn <= 1.0:
        raise ArgumentError(f"{flag}: the Kahn polarisation factor must be within -1..1, got {vals[0]}")
    cfg.beam.kahn_factor = kahn
    cfg.beam.nopolar = False
_simple("-nopolar", 0, "beam.nopolar", help="no polarisation correction")


@_flag("-divergence", 1, "horizontal and vertical divergence (mrad)")
def _div(cfg, flag, vals):
    cfg.beam.hdivrange_mrad = cfg.beam.vdivrange_mrad = _num(flag, vals[0])


@_flag("-divsteps", 1, "horizontal and vertical divergence steps")
def _divsteps(cfg, flag, vals):
    cfg.beam.hdivsteps = cfg.beam.vdivsteps = _int(flag, vals[0])


@_flag("-round_div", 0, "cut the divergence grid to an ellipse (default)")
def _round_div(cfg, flag, vals):
    cfg.beam.round_div = True


@_flag("-square_div", 0, "full divergence grid")
def _square_div(cfg, flag, vals):
    cfg.beam.round_div = False


@_flag("-dmin", 1, "skip scattering beyond this resolution (Å)")
def _dmin(cfg, flag, vals):
    cfg.beam.dmin_A = _num(flag, vals[0])


# ---- detector ------------------------------------------------------------
def _convention(name, pivot):
    def handler(cfg, flag, vals):
        # as in C, a named convention replaces every axis vector given before it
        cfg.detector.convention = name
        cfg.detector.implied_pivot = pivot
        for section, attr in _VECTOR_FIELDS:
            setattr(getattr(cfg, section), attr, None)

    return handler


for _conv, _piv in (("MOSFLM", "beam"), ("XDS", "sample"), ("ADXV", "beam"), ("DENZO", "beam"), ("DIALS", "beam")):
    _flag("-" + _conv.lower(), 0, f"{_conv} detector convention")(_convention(_conv, _piv))


_VECTOR_FIELDS = (("beam", "beam_vector"), ("beam", "polar_vector"), ("crystal", "spindle_axis"),
                  ("detector", "fdet_vector"), ("detector", "sdet_vector"), ("detector", "odet_vector"),
                  ("detector", "twotheta_axis"), ("detector", "pix0_vector_m"))


def _custom_vec(attr, section="detector"):
    def handler(cfg, flag, vals):
        cfg.detector.convention = "CUSTOM"
        setattr(getattr(cfg, section), attr, _vec(flag, vals))

    return handler


_flag("-fdet_vector", 3, "fast axis unit vector (CUSTOM convention)")(_custom_vec("fdet_vector"))
_flag("-sdet_vector", 3, "slow axis unit vector (CUSTOM convention)")(_custom_vec("sdet_vector"))
_flag("-odet_vector", 3, "detector normal (CUSTOM convention)")(_custom_vec("odet_vector"))
_flag("-twotheta_axis", 3, "two-theta rotation axis (CUSTOM convention)")(_custom_vec("twotheta_axis"))
_flag("-pix0_vector", 3, "crystal to first pixel vector in metres (CUSTOM convention)")(_custom_vec("pix0_vector_m"))
FLAGS["-beam_vector"] = (3, _custom_vec("beam_vector", "beam"), "beam direction (CUSTOM convention)")
FLAGS["-polar_vector"] = (3, _custom_vec("polar_vector", "beam"), "E-vector direction (CUSTOM convention)")
FLAGS["-spindle_axis"] = (3, _custom_vec("spindle_axis", "crystal"), "spindle axis (CUSTOM convention)")


def _with_pivot(attr, pivot, conv=float):
    def handler(cfg, flag, vals):
        setattr(cfg.detector, attr, _num(flag, vals[0]) if conv is float else vals[0])
        cfg.detector.implied_pivot = pivot

    return handler


_flag("-distance", 1, "sample to detector distance along the beam (mm)")(_with_pivot("distance_mm", "beam"))
_flag("-close_distance", 1, "sample to detector plane distance (mm)")(_with_pivot("close_distance_mm", "sample"))
_flag("-Xbeam", 1, "direct beam X coordinate (mm; the slow axis in MOSFLM/DENZO, fast otherwise)")(
    _with_pivot("xbeam_mm", "beam"))
_flag("-Ybeam", 1, "direct beam Y coordinate (mm; the fast axis in MOSFLM/DENZO, slow otherwise)")(
    _with_pivot("ybeam_mm", "beam"))
_flag("-Xclose", 1, "nearest point fast coordinate (mm)")(_with_pivot("xclose_mm", "sample"))
_flag("-Yclose", 1, "nearest point slow coordinate (mm)")(_with_pivot("yclose_mm", "sample"))
_flag("-ORGX", 1, "XDS origin, fast (pixels)")(_with_pivot("orgx", "sample"))
_flag("-ORGY", 1, "XDS origin, slow (pixels)")(_with_pivot("orgy", "sample"))
_flag("-twotheta", 1, "detector two-theta swing (degrees)")(_with_pivot("twotheta_deg", "sample"))


@_flag("-pivot", 1, "detector pivot: beam | sample")
def _pivot(cfg, flag, vals):
    value = vals[0].lower()
    if value not in ("beam", "sample"):
        raise ArgumentError(f"-pivot: expected 'beam' or 'sample', got {vals[0]!r}")
    cfg.detector.pivot = value
    cfg.detector.implied_pivot = value


_simple("-detector_rotx", 1, "detector.rotx_deg", float, "detector rotation about x (degrees)")
_simple("-detector_roty", 1, "detector.roty_deg", float, "detector rotation about y (degrees)")
_simple("-detector_rotz", 1, "detector.rotz_deg", float, "detector rotation about z (degrees)")
_simple("-pixel", 1, "detector.pixel_mm", float, "pixel size (mm)")
_simple("-point_pixel", 0, "detector.point_pixel", help="inverse-square solid angle only")
_simple("-curved_det", 0, "detector.curved", help="all pixels at the same distance")
_simple("-detector_thick", 1, "detector.thick_um", float, "sensor thickness (µm)")
_simple("-detector_thicksteps -thicksteps", 1, "detector.thicksteps", int, "sensor layers")
_simple("-mask", 1, "detector.mask_path", help="SMV mask image (0 = skip pixel)")


@_flag("-detector_abs -detector_absorb", 1, "sensor attenuation depth (µm), or inf")
def _det_abs(cfg, flag, vals):
    if "inf" in vals[0].lower() or _num(flag, vals[0]) == 0.0:
        # C: no absorption modelling: thickness 0 *at this point of the line*, mu 0
        cfg.detector.thick_um = 0.0
        cfg.detector.attenuation_depth_um = math.inf
    else:
        cfg.detector.attenuation_depth_um = _num(flag, vals[0])


@_flag("-detsize", 1, "detector size (mm), both axes")
def _detsize(cfg, flag, vals):
    cfg.detector.detsize_f_mm = cfg.detector.detsize_s_mm = _num(flag, vals[0])


_simple("-detsize_f", 1, "detector.detsize_f_mm", float, "detector fast size (mm)")
_simple("-detsize_s", 1, "detector.detsize_s_mm", float, "detector slow size (mm)")


@_flag("-detpixels", 1, "detector size (pixels), both axes")
def _detpixels(cfg, flag, vals):
    cfg.detector.fpixels = cfg.detector.spixels = _int(flag, vals[0])


_simple("-detpixels_f -detpixels_x", 1, "detector.fpixels", int, "detector fast size (pixels)")
_simple("-detpixels_s -detpixels_y", 1, "detector.spixels", int, "detector slow size (pixels)")


@_flag("-roi", 4, "render only fast xmin xmax, slow ymin ymax (pixels, inclusive)")
def _roi(cfg, flag, vals):
    cfg.detector.roi = tuple(_int(flag, v) for v in vals)  # type: ignore[assignment]


# ---- sampling ------------------------------------------------------------
_simple("-oversample", 1, "sampling.oversample", int, "subpixels per pixel edge")
_simple("-oversample_thick", 0, "sampling.oversample_thick", help="capture fraction per subpixel")
_simple("-oversample_polar", 0, "sampling.oversample_polar", help="polarisation per subpixel")
_simple("-oversample_omega", 0, "sampling.oversample_omega", help="solid angle per subpixel")

# ---- output --------------------------------------------------------------
_simple("-floatfile -floatimage", 1, "output.floatfile", help="raw float32 image")
_simple("-intfile -intimage", 1, "output.intfile", help="SMV image, scaled")
_simple("-noisefile -noiseimage", 1, "output.noisefile", help="SMV image with Poisson noise")
_simple("-pgmfile -pgmimage", 1, "output.pgmfile", help="8-bit PGM image")
_simple("-scale", 1, "output.intfile_scale", float, "scale of -intfile (default: auto)")
_simple("-pgmscale", 1, "output.pgm_scale", float, "scale of -pgmfile (default: auto)")
_simple("-adc", 1, "output.adc_offset", float, "ADC offset of SMV images")
_simple("-seed", 1, "output.seed", int, "seed of the noise generator")
_simple("-img", 1, "output.img_header_path", help="take geometry from an SMV header")
_simple("-write_fdump", 1, "output.write_fdump", help="write the structure factor table as Fdump.bin")


@_flag("-printout_pixel", 2, "print the trace of pixel fast slow")
def _printout_pixel(cfg, flag, vals):
    cfg.output.printout_pixel = (_int(flag, vals[0]), _int(flag, vals[1]))


@_flag("-nonoise", 0, "cancel an earlier -noisefile")
def _nonoise(cfg, flag, vals):
    cfg.output.noisefile = None


@_flag("-nopgm", 0, "cancel an earlier -pgmfile")
def _nopgm(cfg, flag, vals):
    cfg.output.pgmfile = None


for _name in ("-coherent", "-printout", "-noprogress", "-progress"):
    _flag(_name, 0, "accepted for compatibility")(lambda cfg, flag, vals: None)
for _name in ("-stol", "-4stol", "-Q", "-stolout"):
    _flag(_name, 1, "amorphous F(stol) file: read by C but never used; accepted, no effect")(
        lambda cfg, flag, vals: None)

# ---- compatibility switches of this engine -----------------------------------
@_flag("-fix_phi0", 0, "corrected physics: phi = 0 is the unrotated crystal (C reuses the previous step)")
def _fix_phi0(cfg, flag, vals):
    cfg.compat.phi0_reuse = False


@_flag("-fix_oversample", 0, "corrected physics: -oversample_thick/_polar/_omega weight each term by its own "
      "factor (C multiplies the running sum)")
def _fix_oversample(cfg, flag, vals):
    cfg.compat.oversample_running_product = False


@_flag("-use_fdump", 0, "C behaviour: read ./Fdump.bin when no -hkl is given")
def _use_fdump(cfg, flag, vals):
    cfg.compat.implicit_fdump = True


def _suggest(flag: str) -> str:
    names = list(FLAGS) + list(ENGINE_FLAGS)
    close = difflib.get_close_matches(flag, names, n=1, cutoff=0.5)
    if not close:
        close = [n for n in names if n.lstrip("-").startswith(flag.lstrip("-")[:4])][:1]
    return f"; did you mean {close[0]}?" if close else ""


def parse_args(argv: list[str], cfg: SimulationConfig | None = None) -> SimulationConfig:
    """Parse a nanoBragg argument list into a :class:`SimulationConfig`.

    Parameters
    ----------
    argv : list of str
        nanoBragg arguments (without the program name).
    cfg : SimulationConfig, optional
        Configuration to update (e.g. one pre-filled from an SMV header); a new
        default :class:`SimulationConfig` when omitted.

    Returns
    -------
    SimulationConfig
        The updated configuration (``cfg`` itself when one was given), with
        ``args`` set to the argument list as strings.

    Raises
    ------
    ArgumentError
        For an unknown flag (naming the closest real one), a missing value or a
        value that is not a number.
    """
    cfg = cfg or SimulationConfig()
    argv = [str(a) for a in argv]
    cfg.args = list(argv)
    i = 0
    while i < len(argv):
        flag = argv[i]
        if not flag.startswith("-") or _is_number(flag):
            raise ArgumentError(f"unexpected value {flag!r} (argument {i + 1}): every value must follow a flag")
        if flag in ENGINE_FLAGS:
            raise ArgumentError(f"{flag} is an option of the torchbragg command, not of the simulation")
        if flag not in FLAGS:
            raise ArgumentError(f"unknown flag {flag}{_suggest(flag)}")
        nargs, handler, _ = FLAGS[flag]
        if flag == "-misset" and i + 1 < len(argv) and argv[i + 1].lower().startswith("rand"):
            cfg.crystal.misset_random = True
            cfg.crystal.misset_deg = None
            i += 2
            continue
        if flag == "-cell":
            vals = []
            while len(vals) < 6 and i + 1 + len(vals) < len(argv) and _is_number(argv[i + 1 + len(vals)]):
                vals.append(argv[i + 1 + len(vals)])
            if not vals:
                raise ArgumentError("-cell: expected a b c alpha beta gamma")
            vals = vals + ["0"] * (6 - len(vals))
            handler(cfg, flag, vals)
            i += 1 + count_numbers(argv, i + 1, 6)
            continue
        vals = argv[i + 1:i + 1 + nargs]
        if len(vals) < nargs or any(v.startswith("-") and not _is_number(v) for v in vals):
            plural = "s" if nargs > 1 else ""
            raise ArgumentError(f"{flag}: expected {nargs} value{plural}, got {' '.join(vals) or 'none'}")
        handler(cfg, flag, vals)
        i += 1 + nargs
    return cfg


def count_numbers(argv: list[str], start: int, limit: int) -> int:
    """How many of ``argv[start:start + limit]`` read as numbers, counted from ``start``.

    Parameters
    ----------
    argv : list of str
        The command line's words.
    start : int
        Index of the first word to look at.
    limit : int
        The most words to count.

    Returns
    -------
    int
        The length of the run of numeric words beginning at ``start`` (at most ``limit``).
    """
    n = 0
    while n < limit and start + n < len(argv) and _is_number(argv[start + n]):
        n += 1
    return n


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
