"""Typed configuration of one nanoBragg simulation.

The dataclasses mirror the C program's inputs in user units (mm, Å, degrees,
µm, mrad, percent) and keep ``None`` for "not given", so that the automatic
choices of the C program (beam centre, oversampling, step counts, ...) are made
in one place, :mod:`torchbragg.setup`, exactly as C makes them.

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
from typing import Optional, Tuple

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

Vec3 = Tuple[float, float, float]


@dataclass
class DetectorConfig:
    """Detector geometry in user units (mm, degrees, µm)."""

    convention: str = "MOSFLM"
    #: explicit pivot ("beam" | "sample"). C honours it only in the CUSTOM
    #: convention; the named conventions force their own pivot.
    pivot: Optional[str] = None
    #: pivot implied by the last flag that implies one (-distance: beam,
    #: -close_distance/-Xclose/-ORGX/-twotheta: sample), used in CUSTOM
    implied_pivot: Optional[str] = None
    distance_mm: Optional[float] = None  # default 100 mm
    close_distance_mm: Optional[float] = None
    pixel_mm: float = 0.1
    fpixels: Optional[int] = None
    spixels: Optional[int] = None
    detsize_f_mm: float = 102.4
    detsize_s_mm: float = 102.4
    xbeam_mm: Optional[float] = None
    ybeam_mm: Optional[float] = None
    xclose_mm: Optional[float] = None
    yclose_mm: Optional[float] = None
    orgx: Optional[float] = None
    orgy: Optional[float] = None
    rotx_deg: float = 0.0
    roty_deg: float = 0.0
    rotz_deg: float = 0.0
    twotheta_deg: float = 0.0
    twotheta_axis: Optional[Vec3] = None
    fdet_vector: Optional[Vec3] = None
    sdet_vector: Optional[Vec3] = None
    odet_vector: Optional[Vec3] = None
    pix0_vector_m: Optional[Vec3] = None
    curved: bool = False
    point_pixel: bool = False
    roi: Optional[Tuple[int, int, int, int]] = None  # xmin xmax ymin ymax (fast, slow), inclusive
    mask_path: Optional[str] = None
    thick_um: float = 0.0
    thicksteps: Optional[int] = None
    #: -detector_abs (µm); None: C's default (the thickness); inf: no absorption (mu = 0)
    attenuation_depth_um: Optional[float] = None


@dataclass
class BeamConfig:
    """Incident beam: wavelength, fluence, polarisation, divergence, dispersion."""

    wavelength_A: float = 1.0
    beam_vector: Optional[Vec3] = None
    polar_vector: Optional[Vec3] = None
    kahn_factor: float = 0.0
    nopolar: bool = False
    fluence: float = 125932015286227086360700780544.0
    flux: float = 0.0
    exposure_s: float = 1.0
    beamsize_mm: float = 0.1
    dispersion_percent: float = 0.0
    dispsteps: Optional[int] = None
    hdivrange_mrad: Optional[float] = None
    vdivrange_mrad: Optional[float] = None
    hdivstep_mrad: Optional[float] = None
    vdivstep_mrad: Optional[float] = None
    hdivsteps: Optional[int] = None
    vdivsteps: Optional[int] = None
    round_div: bool = True
    sourcefile: Optional[str] = None
    dmin_A: float = 0.0


@dataclass
class CrystalConfig:
    """Unit cell, orientation, size, shape and structure factors."""

    cell: Optional[Tuple[float, ...]] = None  # a b c alpha beta gamma (Å, degrees)
    matrix_path: Optional[str] = None
    misset_deg: Optional[Vec3] = None
    misset_random: bool = False
    misset_seed: Optional[int] = None
    N: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    size_um: Tuple[float, float, float] = (0.0, 0.0, 0.0)  # -xtal_size and friends (given in mm, stored in µm)
    shape: str = "square"  # square | round | gauss | tophat
    fudge: float = 1.0
    hkl_path: Optional[str] = None
    default_F: float = 0.0
    interpolate: Optional[bool] = None  # None: C's automatic choice
    spindle_axis: Optional[Vec3] = None
    phi0_deg: float = 0.0
    osc_deg: Optional[float] = None
    phistep_deg: Optional[float] = None
    phisteps: Optional[int] = None
    mosaic_deg: Optional[float] = None
    mosaic_domains: Optional[int] = None
    mosaic_seed: int = 12345678
    water_um: float = 0.0


@dataclass
class SamplingConfig:
    """Oversampling choices."""

    oversample: Optional[int] = None  # None: C's automatic choice
    oversample_thick: bool = False
    oversample_polar: bool = False
    oversample_omega: bool = False


@dataclass
class OutputConfig:
    """Files to write and their scales (written only when named)."""

    floatfile: Optional[str] = None
    intfile: Optional[str] = None
    noisefile: Optional[str] = None
    pgmfile: Optional[str] = None
    intfile_scale: float = 0.0
    pgm_scale: float = 0.0
    adc_offset: float = 40.0
    seed: Optional[int] = None
    img_header_path: Optional[str] = None
    write_fdump: Optional[str] = None
    printout_pixel: Optional[Tuple[int, int]] = None


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
    args: Optional[list] = None
    #: folder relative file names are resolved against (None: current folder)
    cwd: Optional[str] = None

    def to_dict(self) -> dict:
        """Plain-JSON view of the configuration."""
        return asdict(self)
