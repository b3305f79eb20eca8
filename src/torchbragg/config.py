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
    """Detector geometry in user units (mm, degrees, µm).

    ``None`` means "not given": :func:`torchbragg.resolve.resolve` then applies the C program's default.

    Attributes
    ----------
    convention : str
        Detector convention (one of :data:`CONVENTIONS`); user axis vectors switch it to ``"CUSTOM"``.
    pivot : str or None
        Explicit ``-pivot`` (``"beam"`` or ``"sample"``); only honoured in the CUSTOM convention.
    implied_pivot : str or None
        Pivot implied by the last flag that implies one (used in the CUSTOM convention).
    distance_mm : float or None
        Sample to detector distance along the beam (mm); 100 mm when not given.
    close_distance_mm : float or None
        Sample to detector plane distance along the detector normal (mm).
    pixel_mm : float
        Pixel size (mm).
    fpixels, spixels : int or None
        Detector size in pixels along the fast and slow axes; derived from the detector
        size and pixel size when not given.
    detsize_f_mm, detsize_s_mm : float
        Detector size along the fast and slow axes (mm); replaced by pixels × pixel size
        when a pixel count is given.
    xbeam_mm, ybeam_mm : float or None
        Direct-beam position ``-Xbeam``/``-Ybeam`` (mm) in the convention's X and Y.
    xclose_mm, yclose_mm : float or None
        Position of the point of the detector nearest the sample, fast and slow (mm).
    orgx, orgy : float or None
        XDS detector origin, fast and slow (pixels).
    rotx_deg, roty_deg, rotz_deg : float
        Detector rotations about the lab x, y and z axes (degrees).
    twotheta_deg : float
        Detector two-theta swing about ``twotheta_axis`` (degrees).
    twotheta_axis : tuple of 3 float or None
        Two-theta rotation axis (CUSTOM convention); the convention's axis when None.
    fdet_vector, sdet_vector, odet_vector : tuple of 3 float or None
        Fast axis, slow axis and detector normal (CUSTOM convention); the convention's
        axes when None.
    pix0_vector_m : tuple of 3 float or None
        Vector from the crystal to the first pixel (m), as given by ``-pix0_vector``.
    curved : bool
        Curved detector: every pixel at the same distance from the sample.
    point_pixel : bool
        Use the inverse-square solid angle only.
    roi : tuple of 4 int or None
        Region rendered: fast min, fast max, slow min, slow max (pixels, inclusive, 0-based);
        the whole detector when None.
    mask_path : str or None
        SMV mask image (pixels that are 0 are skipped); its header also gives geometry.
    thick_um : float
        Sensor thickness (µm); 0 for no sensor absorption model.
    thicksteps : int or None
        Number of sensor layers.
    attenuation_depth_um : float or None
        Sensor attenuation depth (µm); None: the thickness (C's default); ``inf``: mu = 0.
    """

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
    """Incident beam: wavelength, fluence, polarisation, divergence, dispersion.

    ``None`` means "not given": :func:`torchbragg.resolve.resolve` then applies the C program's rule.

    Attributes
    ----------
    wavelength_A : float
        Central wavelength (Å); ``-energy`` is converted to it.
    beam_vector : tuple of 3 float or None
        Beam direction (CUSTOM convention); the convention's beam when None.
    polar_vector : tuple of 3 float or None
        Electric-field (polarisation) direction (CUSTOM convention); the convention's when None.
    kahn_factor : float
        Kahn polarisation factor, -1 to 1.
    nopolar : bool
        Skip the polarisation correction.
    fluence : float
        Incident photons per m² (used unless ``flux`` is non-zero).
    flux : float
        Photons per second; when non-zero (with a positive exposure) the fluence becomes
        ``flux × exposure / beamsize²``.
    exposure_s : float
        Exposure time (s).
    beamsize_mm : float
        Beam size (mm); also clips the crystal's height and width.
    dispersion_percent : float
        Spectral width (percent of the wavelength).
    dispsteps : int or None
        Number of wavelengths across the spectral width.
    hdivrange_mrad, vdivrange_mrad : float or None
        Horizontal and vertical divergence ranges (mrad).
    hdivstep_mrad, vdivstep_mrad : float or None
        Horizontal and vertical divergence steps (mrad).
    hdivsteps, vdivsteps : int or None
        Number of horizontal and vertical divergence steps.
    round_div : bool
        Cut the divergence grid to an ellipse (True, C's default) or keep the full grid.
    sourcefile : str or None
        Text file of sources (X Y Z I lambda per line) used instead of divergence and dispersion.
    dmin_A : float
        Skip scattering beyond this resolution (Å); 0 for no limit.
    """

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
    """Unit cell, orientation, size, shape and structure factors.

    ``None`` means "not given": :func:`torchbragg.resolve.resolve` then applies the C program's rule.

    Attributes
    ----------
    cell : tuple of float or None
        Unit cell a, b, c (Å), alpha, beta, gamma (degrees); missing values are filled by
        C's rules (b, c = a; angles 90).
    matrix_path : str or None
        MOSFLM orientation matrix file (``-mat``).
    misset_deg : tuple of 3 float or None
        Misset rotations about x, y, z (degrees).
    misset_random : bool
        ``-misset random``: a random orientation drawn from ``misset_seed``.
    misset_seed : int or None
        Seed of the random misset; ``output.seed`` (or the time) when None.
    N : tuple of 3 float
        Number of unit cells along a, b and c.
    size_um : tuple of 3 float
        Crystal size along x, y, z (µm; given in mm on the command line); a non-zero size
        replaces the matching ``N``.
    shape : str
        Shape transform: ``"square"``, ``"round"``, ``"gauss"`` or ``"tophat"``.
    fudge : float
        Shape-transform width fudge factor.
    hkl_path : str or None
        Structure-factor file: text ``h k l F`` or an ``Fdump.bin``.
    default_F : float
        Structure factor of reflections not in the table (or of all, without a table).
    interpolate : bool or None
        Tricubic interpolation of structure factors; None: C's automatic choice (on when any
        of N is 2 or less).
    spindle_axis : tuple of 3 float or None
        Spindle rotation axis (CUSTOM convention); the convention's axis when None.
    phi0_deg : float
        Starting spindle angle (degrees).
    osc_deg : float or None
        Oscillation range (degrees).
    phistep_deg : float or None
        Spindle step (degrees).
    phisteps : int or None
        Number of spindle steps.
    mosaic_deg : float or None
        Mosaic spread (degrees).
    mosaic_domains : int or None
        Number of mosaic domains.
    mosaic_seed : int
        Seed of the mosaic domain generator.
    water_um : float
        Thickness of the water background (µm); 0 for none.
    """

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
    """Oversampling choices.

    Attributes
    ----------
    oversample : int or None
        Subpixels per pixel edge; None (or 0): C's automatic choice from the crystal size.
    oversample_thick : bool
        Apply the sensor capture fraction per subpixel (else one value to the whole pixel).
    oversample_polar : bool
        Apply the polarisation factor per subpixel and source (else one value to the whole pixel).
    oversample_omega : bool
        Apply the solid angle per subpixel (else one value to the whole pixel).
    """

    oversample: int | None = None  # None: C's automatic choice
    oversample_thick: bool = False
    oversample_polar: bool = False
    oversample_omega: bool = False


@dataclass
class OutputConfig:
    """Files to write and their scales (written only when named).

    Attributes
    ----------
    floatfile : str or None
        Raw float32 image file.
    intfile : str or None
        Scaled SMV image file.
    noisefile : str or None
        SMV image file with Poisson noise.
    pgmfile : str or None
        8-bit PGM image file.
    intfile_scale : float
        Scale of ``intfile``; 0 for automatic.
    pgm_scale : float
        Scale of ``pgmfile``; 0 for automatic.
    adc_offset : float
        ADC offset added to SMV images (counts).
    seed : int or None
        Seed of the noise generator.
    img_header_path : str or None
        SMV image whose header supplies geometry (``-img``).
    write_fdump : str or None
        File to write the structure-factor table to, as an ``Fdump.bin``.
    printout_pixel : tuple of (int, int) or None
        Pixel (fast, slow) whose trace is printed.
    """

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

    Attributes
    ----------
    phi0_reuse : bool
        True (C): a step at phi = 0 reuses the previous step's orientation; False: phi = 0 is
        the unrotated crystal (``-fix_phi0``).
    implicit_fdump : bool
        True: read ``./Fdump.bin`` when no ``-hkl`` is given, as C does (``-use_fdump``);
        False (default here): only report that it is present and unused.
    oversample_running_product : bool
        True (C): ``-oversample_thick/_polar/_omega`` multiply the pixel's running sum by each
        evaluation's factor; False: each term is weighted by its own factor (``-fix_oversample``).
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
    """Everything one render needs.

    Attributes
    ----------
    detector : DetectorConfig
        Detector geometry.
    beam : BeamConfig
        Incident beam.
    crystal : CrystalConfig
        Crystal and structure factors.
    sampling : SamplingConfig
        Oversampling choices.
    output : OutputConfig
        Output files.
    compat : CompatConfig
        C-behaviour switches.
    args : list of str or None
        The nanoBragg arguments this configuration came from, if any.
    cwd : str or None
        Folder relative file names are resolved against; None: the current folder.
    """

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
        """Plain-JSON view of the configuration.

        Returns
        -------
        dict
            Every section as a nested dict of its fields (:func:`dataclasses.asdict`).
        """
        return asdict(self)
