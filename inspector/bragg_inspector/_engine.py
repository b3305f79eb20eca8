"""The one place that talks to ``torchbragg``.

Everything physical (rendering, taps, F lookup, detector geometry, comparison
metrics, file formats) comes from the engine; this module only adapts calls and
converts tensors to NumPy for napari.  ``torchbragg`` (and so torch) is
imported on first use, so loading the plugin's manifest stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def tb():
    """The torchbragg package."""
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
    """The engine's 4096² tap configuration (``torchbragg.TAP_CONFIG_ARGS``, read without torch)."""
    return [str(a) for a in _source_literal("config", "TAP_CONFIG_ARGS")]


def render_cancelled_type() -> type[BaseException]:
    return tb().RenderCancelled


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, shown as a message (not a traceback)."""
    return (ValueError, OSError, tb().ArgumentError, tb().SetupError, _module("io.hkl_table").HKLFormatError)


def lookup_descriptions() -> dict[str, str]:
    """The engine's lookup-reason names and what they mean (``torchbragg.kernels.reasons``, read without torch)."""
    return dict(_source_literal("kernels.reasons", "LOOKUP_DESCRIPTIONS"))


def fallback_reasons() -> dict[int, str]:
    """The engine's fallback-map reason codes and names."""
    return dict(tb().FallbackMap.REASONS)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[name]


def make_simulation(args: list[str], device: str = "cpu", dtype: str = "float32", cwd: str | None = None):
    return tb().Simulation.from_args(list(args), device=device, dtype=torch_dtype(dtype), cwd=cwd)


def to_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu().numpy()
    return np.asarray(t)


class Fallback:
    """NumPy copy of the engine's fallback map (counts keep the engine's narrow dtype)."""

    def __init__(self, counts: np.ndarray, reason: np.ndarray, reasons: dict[int, str], evaluations_per_pixel: int):
        self.counts = counts
        self.reason = reason
        self.reasons = dict(reasons)
        self.evaluations_per_pixel = int(evaluations_per_pixel)


def render(sim, progress: Callable[[int, int], None] | None = None,
           should_cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, Fallback]:
    """Render with the engine; returns (float32 image, fallback map)."""
    img, fmap = sim.render_with_fallback(progress=progress, should_cancel=should_cancel)
    fb = Fallback(counts=to_numpy(fmap.counts), reason=to_numpy(fmap.reason).astype(np.uint8, copy=False),
                  reasons={int(k): str(v) for k, v in fmap.REASONS.items()},
                  evaluations_per_pixel=fmap.evaluations_per_pixel)
    return np.ascontiguousarray(to_numpy(img), dtype=np.float32), fb


TAPS = ("hkl_subpixel", "geometry", "intensity")


def tap(sim, slow: int, fast: int):
    """The engine's tap of one pixel: per-evaluation rows, geometry and intensity."""
    return sim.tap(int(slow), int(fast), taps=TAPS)


# ------------------------------------------------------------------ geometry
def pixel_geometry(sim, slow, fast) -> dict:
    return _module("detector_geometry").pixel_geometry(sim, slow, fast)


def structure_factor_source(sim, h0: int, k0: int, l0: int) -> tuple[float, str]:
    return _module("detector_geometry").structure_factor_source(sim, h0, k0, l0)


def beam_centre(sim) -> tuple[float, float] | None:
    return _module("detector_geometry").beam_centre_pixel(sim)


def resolution_ring(sim, d: float) -> np.ndarray:
    return _module("detector_geometry").resolution_ring(sim, d)


def default_ring_spacings(sim) -> list[float]:
    return _module("detector_geometry").default_ring_spacings(sim)


def table_box_mask(sim, step: int) -> np.ndarray | None:
    return _module("detector_geometry").table_box_mask(sim, step)


# ------------------------------------------------------------------ default_F comparisons
def compare_fallback(current: np.ndarray, reference: np.ndarray) -> dict:
    return _module("defaultf_map").compare_fallback(current, reference)


def fallback_labels(current: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return _module("defaultf_map").fallback_labels(current, reference)


def measure_default_F(program: str, args: list[str], cwd: str | None = None):
    """(mask, summary, engine reason) of ``torchbragg.defaultf_map.measure_defaultf_map``."""
    return _module("defaultf_map").measure_defaultf_map(program, list(args), cwd=cwd)


# ------------------------------------------------------------------ evidence
def write_tap_json(tap_obj, folder: Path, tag: str | None = None) -> Path:
    return Path(_module("taps").write_tap_json(tap_obj, folder, tag=tag))


def new_evidence_bundle(parent: Path) -> Path:
    """A fresh ``<parent>/<UTC STAMP>/`` evidence bundle (engine layout: py_taps/, comparison/, commands.txt)."""
    return Path(_module("report_bundle").new_bundle(parent))


def is_evidence_bundle(path: Path) -> bool:
    return bool(_module("report_bundle").is_bundle(path))


def record_command(bundle: Path, argv: list[str], device: str, dtype: str, note: str | None = None) -> None:
    _module("report_bundle").record_command(bundle, argv, device=device, dtype=dtype, note=note)


def compare_images(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    return _module("compare").compare_images(ref, out).to_dict()


def load_image_info(path: str | Path, shape: tuple[int, int] | None = None,
                    fallback_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, str]:
    """SMV or raw float32 image through the engine: (image, where the shape came from)."""
    img, note = _module("io.images").load_image_info(str(path), shape, fallback_shape=fallback_shape)
    return np.asarray(to_numpy(img), dtype=np.float32), str(note)


def load_image_photons(path: str | Path, shape: tuple[int, int] | None = None,
                       fallback_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, dict]:
    """An image in photons: SMV counts converted with the scale and ADC offset the
    engine finds (``torchbragg.io.images.load_image_photons``); ``info['warning']``
    says when they could not be."""
    img, info = _module("io.images").load_image_photons(str(path), shape, fallback_shape=fallback_shape)
    return np.asarray(img, dtype=np.float32), dict(info)


def read_smv(path: str | Path) -> tuple[dict, np.ndarray]:
    header, data = _module("io.smv").read_smv(str(path))
    return dict(header), np.asarray(to_numpy(data), dtype=np.float32)


def image_suffixes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(SMV suffixes, raw float suffixes) the engine reads (``torchbragg.io.images``, read without torch)."""
    return (tuple(_source_literal("io.images", "SMV_SUFFIXES")),
            tuple(_source_literal("io.images", "RAW_SUFFIXES")))
