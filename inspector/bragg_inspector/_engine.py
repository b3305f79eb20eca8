"""The one place that talks to ``torchbragg``.

Everything physical (rendering, taps, F lookup, detector geometry, comparison
metrics, file formats) comes from the engine; this module only adapts calls and
converts tensors to NumPy for napari.  ``torchbragg`` (and so torch) is
imported on first use, so loading the plugin's manifest stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Fallback", "tap_config_args", "render_cancelled_type", "user_error_types", "lookup_descriptions",
    "make_simulation", "render", "fit_reference", "tap", "SENSITIVITY_TAP", "pixel_sensitivity", "attach_tap",
    "pixel_geometry", "structure_factor_source", "beam_centre",
    "resolution_ring", "default_ring_spacings", "table_box_mask", "compare_fallback", "fallback_labels",
    "measure_default_F", "write_tap_json", "new_evidence_bundle", "is_evidence_bundle", "record_command",
    "compare_images", "load_image_info", "load_image_photons", "read_smv", "image_suffixes",
]


def tb():
    """The torchbragg package.

    Returns
    -------
    module
        ``torchbragg``, imported on the first call.
    """
    return importlib.import_module("torchbragg")


def _module(name: str):
    return importlib.import_module(f"torchbragg.{name}")


def _source_literal(module: str, name: str):
    """The literal ``name = ...`` of the engine module ``module`` (a dotted name below torchbragg).

    Until the engine is imported it is read from the module's source, so that panels and
    the launcher start without torch; afterwards from the module itself."""
    import sys

    if "torchbragg" in sys.modules:
        return getattr(_module(module), name)
    import ast
    import importlib.util

    spec = importlib.util.find_spec("torchbragg")  # a top-level spec: the package is not imported
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder, *module.split(".")).with_suffix(".py")
        if not path.is_file():
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
                try:
                    return ast.literal_eval(node.value)
                except ValueError:
                    break
    return getattr(_module(module), name)


def tap_config_args() -> list[str]:
    """The engine's 4096² tap configuration (``torchbragg.TAP_CONFIG_ARGS``, read without torch).

    Returns
    -------
    list of str
        The nanoBragg arguments of the configuration.
    """
    return [str(a) for a in _source_literal("config", "TAP_CONFIG_ARGS")]


def render_cancelled_type() -> type[BaseException]:
    """The exception the engine raises when a render is cancelled.

    Returns
    -------
    type
        ``torchbragg.RenderCancelled``.
    """
    return tb().RenderCancelled


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, shown as a message (not a traceback).

    Returns
    -------
    tuple of type
        ``ValueError``, ``OSError`` and the engine's ``ArgumentError``, ``SetupError`` and ``HKLFormatError``.
    """
    return (ValueError, OSError, tb().ArgumentError, tb().SetupError, _module("io.hkl_table").HKLFormatError)


def lookup_descriptions() -> dict[str, str]:
    """The engine's lookup-reason names and what they mean (``torchbragg.kernels.reasons``, read without torch).

    Returns
    -------
    dict of str to str
        A copy of ``LOOKUP_DESCRIPTIONS``: reason name → description.
    """
    return dict(_source_literal("kernels.reasons", "LOOKUP_DESCRIPTIONS"))


def torch_dtype(name: str):
    """The torch dtype of a dtype name.

    Parameters
    ----------
    name : str
        ``"float32"`` or ``"float64"`` (any other name is a ``KeyError``).

    Returns
    -------
    torch.dtype
        ``torch.float32`` or ``torch.float64``.
    """
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[name]


def make_simulation(args: list[str], device: str = "cpu", dtype: str = "float32", cwd: str | None = None):
    """The engine's simulation of nanoBragg arguments (``torchbragg.Simulation.from_args``).

    Parameters
    ----------
    args : list of str
        nanoBragg arguments.
    device : str
        Torch device, e.g. ``"cpu"`` or ``"cuda"``.
    dtype : str
        ``"float32"`` or ``"float64"``.
    cwd : str, optional
        Folder that relative file names in ``args`` are resolved against.

    Returns
    -------
    torchbragg.Simulation
        The simulation (not rendered yet).
    """
    return tb().Simulation.from_args(list(args), device=device, dtype=torch_dtype(dtype), cwd=cwd)


def to_numpy(t: Any) -> np.ndarray:
    """A tensor (detached, on the CPU) or any array-like as a NumPy array.

    Parameters
    ----------
    t : torch.Tensor or array_like
        The values.

    Returns
    -------
    numpy.ndarray
        The values as an array (no copy where NumPy does not need one).
    """
    if hasattr(t, "detach"):
        t = t.detach().cpu().numpy()
    return np.asarray(t)


class Fallback:
    """NumPy copy of the engine's fallback map (counts keep the engine's narrow dtype).

    Parameters
    ----------
    counts : numpy.ndarray
        ``[slow, fast]`` number of evaluations of each pixel that used default_F.
    reason : numpy.ndarray
        ``[slow, fast]`` reason code of each pixel (0: no default_F).
    reasons : dict of int to str
        Reason code → reason name (copied).
    evaluations_per_pixel : int
        Evaluations of one pixel in the render.

    Attributes
    ----------
    counts, reason : numpy.ndarray
        As given.
    reasons : dict of int to str
        As given.
    evaluations_per_pixel : int
        As given.
    """

    def __init__(self, counts: np.ndarray, reason: np.ndarray, reasons: dict[int, str], evaluations_per_pixel: int):
        self.counts = counts
        self.reason = reason
        self.reasons = dict(reasons)
        self.evaluations_per_pixel = int(evaluations_per_pixel)


def render(sim, progress: Callable[[int, int], None] | None = None,
           should_cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, Fallback]:
    """Render with the engine; returns (float32 image, fallback map).

    Parameters
    ----------
    sim : torchbragg.Simulation
        The simulation to render.
    progress : callable, optional
        Called as ``progress(rows_done, rows_total)`` during the render.
    should_cancel : callable, optional
        Called without arguments during the render; True stops it (the engine raises ``RenderCancelled``).

    Returns
    -------
    image : numpy.ndarray
        C-contiguous float32 ``[slow, fast]``.
    fallback : Fallback
        The render's fallback map (reason codes as uint8).
    """
    img, fmap = sim.render_with_fallback(progress=progress, should_cancel=should_cancel)
    fb = Fallback(counts=to_numpy(fmap.counts), reason=to_numpy(fmap.reason).astype(np.uint8, copy=False),
                  reasons={int(k): str(v) for k, v in fmap.REASONS.items()},
                  evaluations_per_pixel=fmap.evaluations_per_pixel)
    return np.ascontiguousarray(to_numpy(img), dtype=np.float32), fb


def fit_reference(args: list[str], reference: np.ndarray, params: str, *, device: str = "cpu",
                  dtype: str = "float64", cwd: str | None = None, max_iter: int = 60, loss: str = "lsq",
                  roi: Sequence[int] | None = None, progress: Callable[[int, int], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None):
    """Fit parameters of the simulation of ``args`` to a reference image (``torchbragg.fit.fit_reference``).

    Parameters
    ----------
    args : list of str
        nanoBragg arguments (the starting values).
    reference : numpy.ndarray
        ``[slow, fast]`` reference image in photons, the simulation's shape.
    params : str
        Comma-separated fittable parameter families, e.g. ``"distance,beam_center,misset"``.
    device, dtype : str
        Where and in which precision (``"float32"``/``"float64"``) to render.
    cwd : str, optional
        Folder that relative file names in ``args`` resolve against.
    max_iter : int
        Most loss evaluations of the optimiser.
    loss : str
        ``"lsq"`` or ``"poisson"``.
    roi : (xmin, xmax, ymin, ymax), optional
        Pixels compared (fast and slow, inclusive); None: all.
    progress : callable, optional
        ``progress(evaluations, max_iter)`` after each loss evaluation.
    should_cancel : callable, optional
        True stops the fit (the engine raises ``RenderCancelled``).

    Returns
    -------
    torchbragg.fit.FitResult
        Fitted values, uncertainties, fitted arguments and the metrics before and after.
    """
    return _module("fit").fit_reference(list(args), reference, params, device=device, dtype=torch_dtype(dtype),
                                        cwd=cwd, max_iter=int(max_iter), loss=loss, roi=roi,
                                        progress=progress, should_cancel=should_cancel)


TAPS = ("hkl_subpixel", "geometry", "intensity")


def tap(sim, slow: int, fast: int):
    """The engine's tap of one pixel: per-evaluation rows, geometry and intensity.

    Parameters
    ----------
    sim : torchbragg.Simulation
        The simulation.
    slow, fast : int
        The pixel.

    Returns
    -------
    torchbragg.taps.PixelTap
        The tap of the ``hkl_subpixel``, ``geometry`` and ``intensity`` taps (``TAPS``).
    """
    return sim.tap(int(slow), int(fast), taps=TAPS)


#: the engine's tap of dI/dp (computed on request: about a second per pixel)
SENSITIVITY_TAP = "sensitivity"


def pixel_sensitivity(sim, slow: int, fast: int) -> dict:
    """The engine's ``sensitivity`` tap of one pixel (:func:`torchbragg.differentiable.pixel_sensitivity`).

    Parameters
    ----------
    sim : torchbragg.Simulation
        The simulation (not changed).
    slow, fast : int
        The pixel.

    Returns
    -------
    dict
        ``intensity``, ``parameters`` (family, component, unit, value, ``dI_dp``, step,
        ``relative_change``), ``reflections`` (hkl, F, ``dI_dF``), ``not_differentiable`` and ``method``.
    """
    return _module("differentiable").pixel_sensitivity(sim, int(slow), int(fast))


def attach_tap(tap_obj, name: str, values: dict) -> None:
    """Add a tap computed later to a pixel's ``PixelTap`` (its documents then include it).

    Parameters
    ----------
    tap_obj : torchbragg.taps.PixelTap
        The pixel's tap.
    name : str
        The tap's name (e.g. :data:`SENSITIVITY_TAP`).
    values : dict
        Its payload, as the engine returned it.
    """
    tap_obj.values[name] = values
    if name not in tap_obj.taps:
        tap_obj.taps = tuple(tap_obj.taps) + (name,)


# ------------------------------------------------------------------ geometry
def pixel_geometry(sim, slow, fast) -> dict:
    """``torchbragg.detector_geometry.pixel_geometry`` of pixel centres.

    Parameters
    ----------
    sim : torchbragg.Simulation
        The simulation whose geometry is used.
    slow, fast : int or array_like of int
        Pixel indices.

    Returns
    -------
    dict
        ``two_theta_deg``, ``d_angstrom``, ``hkl``, ``hkl0`` and ``position_m`` as the engine gives them.
    """
    return _module("detector_geometry").pixel_geometry(sim, slow, fast)


def structure_factor_source(sim, h0: int, k0: int, l0: int) -> tuple[float, str]:
    """F of one integer reflection and where it comes from (``torchbragg.detector_geometry``).

    Parameters
    ----------
    sim : torchbragg.Simulation
        The simulation whose HKL table and default_F are used.
    h0, k0, l0 : int
        Miller indices of the reflection.

    Returns
    -------
    (float, str)
        The structure factor and the engine's lookup-reason name.
    """
    return _module("detector_geometry").structure_factor_source(sim, h0, k0, l0)


def beam_centre(sim) -> tuple[float, float] | None:
    """Where the direct beam meets the detector plane (``beam_centre_pixel`` of the engine).

    Parameters
    ----------
    sim : torchbragg.Simulation
        The simulation.

    Returns
    -------
    (float, float) or None
        ``(slow, fast)`` in pixels; None when the beam misses the detector plane.
    """
    return _module("detector_geometry").beam_centre_pixel(sim)


def resolution_ring(sim, d: float) -> np.ndarray:
    """The detector-plane curve of one resolution (``torchbragg.detector_geometry.resolution_ring``).

    Parameters
    ----------
    sim : torchbragg.Simulation
        The simulation.
    d : float
        Resolution in Å.

    Returns
    -------
    numpy.ndarray
        ``[n, 2]`` (slow, fast) points in pixels (may be empty).
    """
    return _module("detector_geometry").resolution_ring(sim, d)


def default_ring_spacings(sim) -> list[float]:
    """The engine's round d-spacings for resolution rings on this detector.

    Parameters
    ----------
    sim : torchbragg.Simulation
        The simulation.

    Returns
    -------
    list of float
        d-spacings in Å, coarse to fine.
    """
    return _module("detector_geometry").default_ring_spacings(sim)


def table_box_mask(sim, step: int) -> np.ndarray | None:
    """Which pixel centres' nearest reflection lies inside the HKL table's box.

    Parameters
    ----------
    sim : torchbragg.Simulation
        The simulation.
    step : int
        Sample every ``step``-th pixel in both directions.

    Returns
    -------
    numpy.ndarray or None
        bool ``[ceil(slow / step), ceil(fast / step)]``; None without an HKL table.
    """
    return _module("detector_geometry").table_box_mask(sim, step)


# ------------------------------------------------------------------ default_F comparisons
def compare_fallback(current: np.ndarray, reference: np.ndarray) -> dict:
    """Counts of agreement of two default_F maps (``torchbragg.defaultf_map.compare_fallback``).

    Parameters
    ----------
    current, reference : numpy.ndarray
        ``[slow, fast]`` boolean masks or reason codes of the same shape.

    Returns
    -------
    dict
        ``both``, ``only_current``, ``only_reference``, ``neither``, ``reason_changed`` and ``shape``.
    """
    return _module("defaultf_map").compare_fallback(current, reference)


def fallback_labels(current: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Label image of two default_F maps (``torchbragg.defaultf_map.fallback_labels``).

    Parameters
    ----------
    current, reference : numpy.ndarray
        ``[slow, fast]`` boolean masks or reason codes of the same shape.

    Returns
    -------
    numpy.ndarray
        uint8 ``[slow, fast]``: 0 neither, 1 both, 2 only current, 3 only reference, 4 both with another reason.
    """
    return _module("defaultf_map").fallback_labels(current, reference)


def measure_default_F(program: str, args: list[str], cwd: str | None = None):
    """(mask, summary, engine reason) of ``torchbragg.defaultf_map.measure_defaultf_map``.

    Parameters
    ----------
    program : str
        The renderer's command line.
    args : list of str
        nanoBragg arguments to measure.
    cwd : str, optional
        Folder that relative file names are resolved against.

    Returns
    -------
    tuple
        ``(mask, summary, reason)`` exactly as the engine returns them.
    """
    return _module("defaultf_map").measure_defaultf_map(program, list(args), cwd=cwd)


# ------------------------------------------------------------------ evidence
def write_tap_json(tap_obj, folder: Path, tag: str | None = None, tap_id: str = "hkl_subpixel") -> Path:
    """Write one tap document into ``folder`` with the engine's writer (never overwrites).

    Parameters
    ----------
    tap_obj : torchbragg.taps.PixelTap
        The tap.
    folder : Path
        Folder to write into.
    tag : str, optional
        A suffix of the file name.
    tap_id : str
        Which computed tap to write (``specs/tap_schema.json``'s ``tap_id``).

    Returns
    -------
    Path
        The written file.
    """
    return Path(_module("taps").write_tap_json(tap_obj, folder, tag=tag, tap_id=tap_id))


def new_evidence_bundle(parent: Path) -> Path:
    """A fresh ``<parent>/<UTC STAMP>/`` evidence bundle (engine layout: py_taps/, comparison/, commands.txt).

    Parameters
    ----------
    parent : Path
        Folder the bundle is created in.

    Returns
    -------
    Path
        The new bundle folder.
    """
    return Path(_module("report_bundle").new_bundle(parent))


def is_evidence_bundle(path: Path) -> bool:
    """Whether a folder is laid out as an evidence bundle (``torchbragg.report_bundle.is_bundle``).

    Parameters
    ----------
    path : Path
        The folder.

    Returns
    -------
    bool
        True when it has ``py_taps/`` and ``comparison/``.
    """
    return bool(_module("report_bundle").is_bundle(path))


def record_command(bundle: Path, argv: list[str], device: str, dtype: str, note: str | None = None) -> None:
    """Append a command line to the bundle's ``commands.txt`` (``torchbragg.report_bundle.record_command``).

    Parameters
    ----------
    bundle : Path
        The evidence bundle.
    argv : list of str
        The command line, program first.
    device : str
        Device of the run.
    dtype : str
        Floating-point type of the run.
    note : str, optional
        An extra comment line.
    """
    _module("report_bundle").record_command(bundle, argv, device=device, dtype=dtype, note=note)


def compare_images(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """The engine's image comparison metrics (``torchbragg.compare.compare_images``).

    Parameters
    ----------
    ref : numpy.ndarray
        The reference image.
    out : numpy.ndarray
        The image compared with it.

    Returns
    -------
    dict
        ``ImageComparison.to_dict()`` (``correlation``, ``rmse``, ``sum_ratio`` …).
    """
    return _module("compare").compare_images(ref, out).to_dict()


def load_image_info(path: str | Path, shape: tuple[int, int] | None = None,
                    fallback_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, str]:
    """SMV or raw float32 image through the engine: (image, where the shape came from).

    Parameters
    ----------
    path : str or Path
        The image file.
    shape : (int, int), optional
        (slow, fast) of a raw file.
    fallback_shape : (int, int), optional
        Shape tried for a raw file after its sidecar.

    Returns
    -------
    image : numpy.ndarray
        float32 image.
    note : str
        How the shape was found.
    """
    img, note = _module("io.images").load_image_info(str(path), shape, fallback_shape=fallback_shape)
    return np.asarray(to_numpy(img), dtype=np.float32), str(note)


def load_image_photons(path: str | Path, shape: tuple[int, int] | None = None,
                       fallback_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, dict]:
    """An image in photons: SMV counts converted with the scale and ADC offset the
    engine finds (``torchbragg.io.images.load_image_photons``); ``info['warning']``
    says when they could not be.

    Parameters
    ----------
    path : str or Path
        The image file.
    shape : (int, int), optional
        (slow, fast) of a raw file.
    fallback_shape : (int, int), optional
        Shape tried for a raw file after its sidecar.

    Returns
    -------
    image : numpy.ndarray
        float32 image in photons.
    info : dict
        The engine's notes (``converted``, ``scale``, ``adc``, ``note``, ``warning``, ``shape_from``).
    """
    img, info = _module("io.images").load_image_photons(str(path), shape, fallback_shape=fallback_shape)
    return np.asarray(img, dtype=np.float32), dict(info)


def read_smv(path: str | Path) -> tuple[dict, np.ndarray]:
    """An SMV file's header and image (``torchbragg.io.smv.read_smv``).

    Parameters
    ----------
    path : str or Path
        The SMV file.

    Returns
    -------
    header : dict
        The header's keys and values.
    image : numpy.ndarray
        float32 ``[slow, fast]`` counts.
    """
    header, data = _module("io.smv").read_smv(str(path))
    return dict(header), np.asarray(to_numpy(data), dtype=np.float32)


def image_suffixes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(SMV suffixes, raw float suffixes) the engine reads (``torchbragg.io.images``, read without torch).

    Returns
    -------
    smv : tuple of str
        ``SMV_SUFFIXES``.
    raw : tuple of str
        ``RAW_SUFFIXES``.
    """
    return (tuple(_source_literal("io.images", "SMV_SUFFIXES")),
            tuple(_source_literal("io.images", "RAW_SUFFIXES")))
