"""Qt-free, napari-free state of the inspector: simulation, taps, selection,
export, default_F legend and comparison.  Widgets and the napari controller
only call into this and display what it returns."""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _engine
from .io import ImageFormatError, exclusive_write_json, hkl_label, read_image

# Columns of the tap table, in display order.  The loop-index columns other than
# subS/subF are shown only when they take more than one value in the tap.
LOOP_COLUMNS = ("thick", "subS", "subF", "source", "phi", "mosaic")
ALWAYS_SHOWN = ("subS", "subF")
VALUE_COLUMNS = ("h", "k", "l", "h0", "k0", "l0", "F_cell", "F_latt", "lookup")

# default_F reason code -> (legend text, colour).  Code 0 ("table") is transparent.
REASON_STYLE: dict[int, tuple[str, str]] = {
    1: ("no HKL table loaded", "#ff8c00"),
    2: ("outside the table", "#e6194b"),
    3: ("in the table's box, not listed", "#3cb4ff"),
}


def row_uses_default_F(row: Mapping[str, Any]) -> bool:
    """True when this evaluation's F_cell came from default_F, not the table."""
    lk = row.get("lookup")
    if isinstance(lk, str) and lk:
        low = lk.lower()
        if low == "table" or low.startswith("table"):
            return False
        return "default" in low or "no_table" in low or "outside" in low or "unlisted" in low
    return bool(row.get("out_of_bounds", False))


def format_cell(key: str, value: Any) -> str:
    """Text shown in the table for one value."""
    if value is None:
        return ""
    if key in ("h", "k", "l"):
        return f"{float(value):.4f}"
    if key in ("F_cell", "F_latt"):
        return f"{float(value):.6g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return str(value)


def table_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols = []
    for c in LOOP_COLUMNS:
        if c in ALWAYS_SHOWN:
            cols.append(c)
        elif len({r.get(c) for r in rows}) > 1:
            cols.append(c)
    cols.extend(VALUE_COLUMNS)
    return cols


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        return v.item()
    return v


@dataclass
class TapRecord:
    """One clicked pixel and what the engine's tap said about it."""

    slow: int
    fast: int
    tap: Any
    rows: list[dict]
    columns: list[str]
    value: float | None
    d_angstrom: float | None
    two_theta_deg: float | None
    summary: str
    label: str
    n_default_F: int

    @property
    def pixel(self) -> tuple[int, int]:
        return (self.slow, self.fast)

    def table(self) -> list[dict]:
        """Rows as shown: the displayed columns plus ``default_F`` (highlighted)."""
        out = []
        for r in self.rows:
            d = {c: _plain(r.get(c)) for c in self.columns}
            d["default_F"] = row_uses_default_F(r)
            out.append(d)
        return out

    def info_line(self) -> str:
        parts = [f"pixel (slow {self.slow}, fast {self.fast})"]
        if self.value is not None:
            parts.append(f"value {self.value:.6g}")
        if self.d_angstrom is not None and math.isfinite(self.d_angstrom):
            parts.append(f"d = {self.d_angstrom:.4g} Å")
        else:
            parts.append("d = ∞ Å")
        if self.two_theta_deg is not None:
            parts.append(f"2θ = {self.two_theta_deg:.4g}°")
        return ", ".join(parts)


@dataclass
class Comparison:
    path: str
    reference: np.ndarray
    metrics: dict[str, float]
    difference: np.ndarray
    ratio: np.ndarray


@dataclass
class InspectorModel:
    """State shared by the panels of one viewer."""

    args: list[str] = field(default_factory=_engine.tap_config_args)
    device: str = "cpu"
    dtype: str = "float32"
    cwd: str | None = None
    sim: Any = None
    image: np.ndarray | None = None
    fallback: _engine.Fallback | None = None
    hkl_info: dict = field(default_factory=dict)
    current: TapRecord | None = None
    selection: dict[tuple[int, int], TapRecord] = field(default_factory=dict)
    comparison: Comparison | None = None

    # ------------------------------------------------------------ simulation
    @property
    def shape(self) -> tuple[int, int] | None:
        if self.sim is not None:
            return tuple(int(x) for x in self.sim.shape)
        return None

    def prepare(self, args: Sequence[str], device: str | None = None, dtype: str | None = None):
        """Build the engine's Simulation (raises the engine's argument / HKL errors)."""
        return _engine.make_simulation(list(args), device or self.device, dtype or self.dtype, cwd=self.cwd)

    def set_rendered(self, sim, args: Sequence[str], image: np.ndarray,
                     fallback: _engine.Fallback | None, device: str, dtype: str) -> None:
        """Swap in a finished render (all at once: never half-updated)."""
        self.sim = sim
        self.args = list(args)
        self.device, self.dtype = device, dtype
        self.image = image
        self.fallback = fallback
        self.hkl_info = dict(getattr(sim, "hkl_info", {}) or {})
        self.current = None
        self.selection = {}
        self.comparison = None

    def hkl_lines(self) -> list[str]:
        """Where F came from, for the panel."""
        info = self.hkl_info
        if not info:
            return []
        lines = []
        if info.get("describe"):
            lines.append(str(info["describe"]))
        kind = info.get("kind")
        if kind and kind != "none" and info.get("source"):
            lines.append(f"source ({kind}): {info['source']}")
        if info.get("bounds"):
            b = info["bounds"]
            lines.append("bounds: h {}…{}, k {}…{}, l {}…{}".format(b[0][0], b[0][1], b[1][0], b[1][1], b[2][0], b[2][1]))
        if kind and kind != "none":
            lines.append(f"reflections: {info.get('count', '?')}")
        if info.get("default_F") is not None:
            lines.append(f"default_F = {info['default_F']:g}" if isinstance(info["default_F"], (int, float))
                         else f"default_F = {info['default_F']}")
        for w in info.get("warnings") or []:
            lines.append(f"⚠ {w}")
        return lines

    # ------------------------------------------------------------ taps
    def check_pixel(self, slow: int, fast: int) -> tuple[int, int]:
        if self.sim is None:
            raise ValueError("nothing rendered yet: run a simulation first")
        s, f = int(slow), int(fast)
        ns, nf = self.shape
        if not (0 <= s < ns and 0 <= f < nf):
            raise ValueError(f"pixel (slow {s}, fast {f}) is outside the {ns}×{nf} detector")
        return s, f

    def tap(self, slow: int, fast: int) -> TapRecord:
        s, f = self.check_pixel(slow, fast)
        t = _engine.tap(self.sim, s, f)
        rows = [dict(r) for r in t.rows]
        geo = dict(getattr(t, "geometry", None) or {})
        value = getattr(t, "final_intensity", None)
        rec = TapRecord(
            slow=s, fast=f, tap=t, rows=rows, columns=table_columns(rows),
            value=None if value is None else float(value),
            d_angstrom=_opt_float(geo.get("d_angstrom")),
            two_theta_deg=_opt_float(geo.get("two_theta_deg")),
            summary=str(getattr(t, "summary", "") or ""),
            label=hkl_label(rows),
            n_default_F=sum(row_uses_default_F(r) for r in rows),
        )
        self.current = rec
        return rec

    # ------------------------------------------------------------ selection
    def select(self, rec: TapRecord) -> bool:
        """Add a tapped pixel to the selection; False if it was already there."""
        if rec.pixel in self.selection:
            return False
        self.selection[rec.pixel] = rec
        return True

    def deselect(self, pixel: tuple[int, int]) -> None:
        self.selection.pop(tuple(pixel), None)

    def clear_selection(self) -> None:
        self.selection = {}

    def new_bundle_folder(self, root: str | Path | None = None) -> Path:
        root = Path(root) if root is not None else Path(self.cwd or ".") / "evidence"
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = root / f"inspector-{stamp}"
        cand, i = base, 1
        while True:
            try:
                cand.mkdir(parents=True, exist_ok=False)
                return cand
            except FileExistsError:
                cand = base.with_name(f"{base.name}-{i}")
                i += 1

    def export(self, folder: str | Path | None = None, *, bundle_root: str | Path | None = None) -> list[Path]:
        """One tap JSON per selected pixel (engine schema, engine writer), never
        overwriting.  Without a folder, a fresh evidence bundle is made.  If a
        write fails, the files of this export are removed again."""
        if not self.selection:
            raise ValueError("the selection is empty: shift-click pixels to select them")
        fresh_bundle = folder is None
        target = self.new_bundle_folder(bundle_root) if fresh_bundle else Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        try:
            for rec in self.selection.values():
                written.append(_engine.write_tap_json(rec.tap, target))
            if fresh_bundle:
                written.append(exclusive_write_json(target / "inspector_bundle.json", self.bundle_manifest(written)))
        except BaseException:
            for p in written:
                Path(p).unlink(missing_ok=True)
            if fresh_bundle:
                try:
                    target.rmdir()
                except OSError:
                    pass
            raise
        return written

    def bundle_manifest(self, tap_files: Sequence[Path]) -> dict:
        return {
            "what": "bragg_inspector evidence bundle: one torchbragg tap JSON per selected pixel",
            "args": list(self.args),
            "device": self.device,
            "dtype": self.dtype,
            "hkl_info": {k: v for k, v in self.hkl_info.items()},
            "pixels": [list(p) for p in self.selection],
            "files": [Path(p).name for p in tap_files],
        }

    # ------------------------------------------------------------ default_F legend
    def fallback_legend(self) -> list[dict]:
        """One entry per default_F reason: code, name, text, colour, pixel count."""
        if self.fallback is None:
            return []
        counts = np.bincount(self.fallback.reason.ravel(), minlength=max(4, len(self.fallback.reasons)))
        out = []
        for code, name in sorted(self.fallback.reasons.items()):
            if code == 0:
                continue
            text, colour = REASON_STYLE.get(code, (name, "#ffffff"))
            out.append({"code": code, "name": name, "text": text, "colour": colour, "pixels": int(counts[code])})
        return out

    # ------------------------------------------------------------ compare
    def load_reference(self, path: str | Path) -> np.ndarray:
        if self.image is None:
            raise ValueError("render a simulation before opening a reference image")
        path = Path(path)
        shape = self.image.shape
        ref, _meta = read_image(path, fallback_shape=shape)
        if ref.shape != shape:
            raise ImageFormatError(
                f"{path.name}: reference is {ref.shape[0]}×{ref.shape[1]}, the simulation is {shape[0]}×{shape[1]}")
        return ref

    def compare(self, path: str | Path) -> Comparison:
        ref = self.load_reference(path)
        out = self.image
        metrics = _engine.compare_images(ref, out)
        diff = (out.astype(np.float64) - ref).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(ref != 0, out / np.where(ref != 0, ref, 1), np.nan).astype(np.float32)
        self.comparison = Comparison(str(path), ref, metrics, diff, ratio)
        return self.comparison


def _opt_float(v: Any) -> float | None:
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def percentile_limits(image: np.ndarray, lo: float = 0.0, hi: float = 99.9, max_samples: int = 1 << 20) -> tuple[float, float]:
    """Contrast limits from percentiles (on a strided subsample for big images)."""
    flat = np.asarray(image).ravel()
    step = max(1, flat.size // max_samples)
    sample = flat[::step]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return (0.0, 1.0)
    a, b = (float(x) for x in np.percentile(sample, [lo, hi]))
    if not b > a:
        b = float(sample.max())
        if not b > a:
            b = a + 1.0
    return (a, b)
