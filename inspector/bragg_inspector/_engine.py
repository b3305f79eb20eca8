"""The one place that talks to ``torchbragg``.

Everything physical (rendering, taps, F lookup, comparison metrics, file formats)
comes from the engine; this module only adapts calls and converts tensors to
NumPy for napari.  If the engine's API moves, fix it here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .args import FALLBACK_TAP_CONFIG_ARGS


def tb():
    """The torchbragg package (imported lazily so the manifest loads fast)."""
    return importlib.import_module("torchbragg")


def available() -> bool:
    try:
        return hasattr(tb(), "Simulation")
    except Exception:  # pragma: no cover - engine missing or broken
        return False


def tap_config_args() -> list[str]:
    try:
        return list(tb().TAP_CONFIG_ARGS)
    except Exception:
        return list(FALLBACK_TAP_CONFIG_ARGS)


def _attr(path: str):
    mod, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), name)
    except Exception:
        return None


def render_cancelled_type() -> type[BaseException] | None:
    t = getattr(tb(), "RenderCancelled", None) or _attr("torchbragg.simulation.RenderCancelled")
    return t


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, shown as a message (not a traceback)."""
    types: list[type[BaseException]] = [ValueError, OSError]
    for path in ("torchbragg.ArgumentError", "torchbragg.hkl_table.HKLFormatError"):
        t = _attr(path)
        if isinstance(t, type) and issubclass(t, BaseException):
            types.append(t)
    return tuple(types)


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
    """NumPy copy of the engine's fallback map."""

    def __init__(self, counts: np.ndarray, reason: np.ndarray, reasons: dict[int, str], evaluations_per_pixel: int):
        self.counts = counts
        self.reason = reason
        self.reasons = dict(reasons)
        self.evaluations_per_pixel = int(evaluations_per_pixel)


def render(sim, progress: Callable[[int, int], None] | None = None,
           should_cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, Fallback | None]:
    """Render with the engine; returns (float32 image, fallback map or None)."""
    if hasattr(sim, "render_with_fallback"):
        img, fmap = sim.render_with_fallback(progress=progress, should_cancel=should_cancel)
        reasons = getattr(fmap, "REASONS", None) or {
            0: "table", 1: "default_F:no_table", 2: "default_F:outside_table", 3: "default_F:unlisted"}
        fb = Fallback(
            counts=to_numpy(fmap.counts),  # the engine's narrowest integer type: no 4x wider copy
            reason=to_numpy(fmap.reason).astype(np.uint8, copy=False),
            reasons={int(k): str(v) for k, v in reasons.items()},
            evaluations_per_pixel=getattr(fmap, "evaluations_per_pixel", 0),
        )
    else:  # pragma: no cover - older engine
        img, fb = sim.render(progress=progress, should_cancel=should_cancel), None
    return np.ascontiguousarray(to_numpy(img), dtype=np.float32), fb


TAPS = ("hkl_subpixel", "geometry", "intensity")


def tap(sim, slow: int, fast: int):
    """The engine's tap of one pixel: per-evaluation rows, geometry and intensity."""
    return sim.tap(int(slow), int(fast), taps=TAPS)


def write_tap_json(tap_obj, folder: Path, tag: str | None = None) -> Path:
    writer = _attr("torchbragg.taps.write_tap_json")
    if writer is None:  # pragma: no cover - engine without the writer
        raise RuntimeError("torchbragg.taps.write_tap_json is not available")
    return Path(writer(tap_obj, folder, tag=tag))


def new_evidence_bundle(parent: Path) -> Path:
    """A fresh ``<parent>/<UTC STAMP>/`` evidence bundle (engine layout: py_taps/, comparison/, commands.txt)."""
    return Path(importlib.import_module("torchbragg.report_bundle").new_bundle(parent))


def is_evidence_bundle(path: Path) -> bool:
    try:
        return bool(importlib.import_module("torchbragg.report_bundle").is_bundle(path))
    except ImportError:  # pragma: no cover
        return False


def record_command(bundle: Path, argv: list[str], device: str, dtype: str, note: str | None = None) -> None:
    importlib.import_module("torchbragg.report_bundle").record_command(
        bundle, argv, device=device, dtype=dtype, note=note)


def compare_images(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    res = tb().compare.compare_images(ref, out) if hasattr(tb(), "compare") else \
        importlib.import_module("torchbragg.compare").compare_images(ref, out)
    d = res.to_dict() if hasattr(res, "to_dict") else dict(vars(res))
    return d


def load_image_info(path: str | Path, shape: tuple[int, int] | None = None,
                    fallback_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, str]:
    """SMV or raw float32 image through the engine: (image, where the shape came from).

    Shape of a raw file: ``shape``, else its ``<name>.json`` sidecar, else
    ``fallback_shape``, else a perfect square; otherwise a ValueError naming the file."""
    cmp = importlib.import_module("torchbragg.compare")
    if hasattr(cmp, "load_image_info"):
        img, note = cmp.load_image_info(str(path), shape, fallback_shape=fallback_shape)
    else:  # pragma: no cover - older engine: load_image only
        img, note = cmp.load_image(str(path), shape=shape or fallback_shape), "load_image"
    return np.asarray(to_numpy(img), dtype=np.float32), str(note)


def read_smv(path: str | Path) -> tuple[dict, np.ndarray]:
    try:
        read = importlib.import_module("torchbragg.smv").read_smv
    except Exception:
        read = None
    if read is not None:
        header, data = read(str(path))
        return dict(header), np.asarray(to_numpy(data), dtype=np.float32)
    import fabio  # fallback when the engine has no SMV reader

    img = fabio.open(str(path))
    return dict(img.header), np.asarray(img.data, dtype=np.float32)
