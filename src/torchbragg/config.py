"""Typed configuration of one nanoBragg simulation.

The dataclasses mirror the C program's inputs in user units (mm, Å, degrees,
µm, mrad, percent) and keep ``None`` for "not given", so that the automatic
choices of the C program (beam centre, oversampling, step counts, ...) are made
in one place, :mod:`torchbragg.resolve`, exactly as C makes them.

People who do not think in flags build a :class:`SimulationConfig` directly::

    cfg = SimulationConfig(
        crystal=CrystalConfig(cell=(100, 100, 100, 90, 90, 90), N=(5, 5, 5), default_F=100),
        beam=BeamConfig(wavelength_A=0.5),
        detector=DetectorConfig(distance_mm=500, pixel_mm=0.05, fpixels=4096, spixels=4096),
        sampling=SamplingConfig(oversample=2),
    )
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = [
    "BeamConfig",
    "CompatConfig",
    "CrystalConfig",
    "DetectorConfig",
    "OutputConfig",
    "SamplingConfig",
    "SimulationConfig",
    "CONVENTIONS",
    "TAP_CONFIG_ARGS",
]

#: Detector conventions understood by the engine (C names, upper case).
CONVENTIONS = ("MOSFLM", "XDS", "ADXV", "DENZO", "DIALS", "CUSTOM")

#: The 4096² "tap configuration" used throughout the project.
TAP_CONFIG_ARGS = [
    "-cell", "100", "100", "100", "90", "90", "90",
    "-N", "5", "-default_F", "100", "-lambda", "0.5", "-distance", "500",
    "-pixel", "0.05", "-detpixels", "4096", "-oversample", "2",
]

Vec3 = tuple[float, float, float]


@dataclass
class DetectorConfig:
    """Detector geometry in user units (mm, degrees, µm)."""

    convention: str = "MOSFLM"
    #: explicit pivot ("beam" | "sample"). C honours it only in the CUSTOM
    #: convention; the named conventions force their own pivot.
    pivot: str | None = None
    #: pivot implied by the last flag that implies one (-distance: beam,
    #: -close_distance/-Xclose/-ORGX/-twotheta: sample), used in CUSTOM
    implied_pivot: str | None = None
    distance_mm: float | None = None  # default 100 mm
    close_distance_mm: float | None = None
    pixel_mm: float = 0.1
    fpixels: int | None = None
    spixels: int | None = None
    detsize_f_mm: float = 102.4
    detsize_s_mm: float = 102.4
    xbeam_mm: float | None = None
    ybeam_mm: float | None = None
    xclose_mm: float | None = None
    yclose_mm: float | None = None
    orgx: float | None = None
    orgy: float | None = None
    rotx_deg: float = 0.0
    roty_deg: float = 0.0
    rotz_deg: float = 0.0
    twotheta_deg: float = 0.0
    twotheta_axis: Vec3 | None = None
    fdet_vector: Vec3 | None = None
    sdet_vector: Vec3 | None = None
    odet_vector: Vec3 | None = None
    pix0_vector_m: Vec3 | None = None
    curved: bool = False
    point_pixel: bool = False
    roi: tuple[int, int, int, int] | None = None  # xmin xmax ymin ymax (fast, slow), inclusive
    mask_path: str | None = None
    thick_um: float = 0.0
    thicksteps: int | None = None
    #: -detector_abs (µm); None: C's default (the thickness); inf: no absorption (mu = 0)
    attenuation_depth_um: float | None = None


@dataclass
class BeamConfig:
    """Incident beam: wavelength, fluence, polarisation, divergence, dispersion."""

    wavelength_A: float = 1.0
    beam_vector: Vec3 | None = None
    polar_vector: Vec3 | None = None
    kahn_factor: float = 0.0
    nopolar: bool = False
    fluence: float = 125932015286227086360700780544.0
    flux: float = 0.0
    exposure_s: float = 1.0
    beamsize_mm: float = 0.1
    dispersion_percent: float = 0.0
    dispsteps: int | None = None
    hdivrange_mrad: float | None = None
    vdivrange_mrad: float | None = None
    hdivstep_mrad: float | None = None
    vdivstep_mrad: float | None = None
    hdivsteps: int | None = None
    vdivsteps: int | None = None
    round_div: bool = True
    sourcefile: str | None = None
    dmin_A: float = 0.0


@dataclass
class CrystalConfig:
    """Unit cell, orientation, size, shape and structure factors."""

    cell: tuple[float, ...] | None = None  # a b c alpha beta gamma (Å, degrees)
    matrix_path: str | None = None
    misset_deg: Vec3 | None = None
    misset_random: bool = False
    misset_seed: int | None = None
    N: tuple[float, float, float] = (1.0, 1.0, 1.0)
    size_um: tuple[float, float, float] = (0.0, 0.0, 0.0)  # -xtal_size and friends (given in mm, stored in µm)
    shape: str = "square"  # square | round | gauss | tophat
    fudge: float = 1.0
    hkl_path: str | None = None
    default_F: float = 0.0
    interpolate: bool | None = None  # None: C's automatic choice
    spindle_axis: Vec3 | None = None
    phi0_deg: float = 0.0
    osc_deg: float | None = None
    phistep_deg: float | None = None
    phisteps: int | None = None
    mosaic_deg: float | None = None
    mosaic_domains: int | None = None
    mosaic_seed: int = 12345678
    water_um: float = 0.0


@dataclass
class SamplingConfig:
    """Oversampling choices."""

    oversample: int | None = None  # None: C's automatic choice
    oversample_thick: bool = False
    oversample_polar: bool = False
    oversample_omega: bool = False


@dataclass
class OutputConfig:
    """Files to write and their scales (written only when named)."""

    floatfile: str | None = None
    intfile: str | None = None
    noisefile: str | None = None
    pgmfile: str | None = None
    intfile_scale: float = 0.0
    pgm_scale: float = 0.0
    adc_offset: float = 40.0
    seed: int | None = None
    img_header_path: str | None = None
    write_fdump: str | None = None
    printout_pixel: tuple[int, int] | None = None


@dataclass
class CompatConfig:
    """Switches between the C program's behaviour and corrected physics.

    Defaults reproduce the C program (parity is what users check).
    """

    #: C skips the spindle rotation when phi == 0 and reuses the previous step's
    #: orientation. False: phi = 0 means the unrotated crystal.
    phi0_reuse: bool = True
    #: C reads ./Fdump.bin silently when no -hkl is given. False (default here):
    #: never read it implicitly; only report that it is present and unused.
    implicit_fdump: bool = False
    #: C's -oversample_thick/_polar/_omega multiply the pixel's running sum (the water
    #: background and every earlier term) by each evaluation's factor. False: each
    #: evaluation's term is weighted by its own factor (the background by their mean).
    oversample_running_product: bool = True


@dataclass
class SimulationConfig:
    """Everything one render needs."""

    detector: DetectorConfig = field(default_factory=DetectorConfig)
    beam: BeamConfig = field(default_factory=BeamConfig)
    crystal: CrystalConfig = field(default_factory=CrystalConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)
    #: the nanoBragg arguments this configuration came from, if any
    args: list | None = None
    #: folder relative file names are resolved against (None: current folder)
    cwd: str | None = None

    def to_dict(self) -> dict:
        """Plain-JSON view of the configuration."""
        return asdict(self)
