"""Qt-free, napari-free state of the inspector: simulation, taps, selection,
export, default_F legend and comparison.  Widgets and the napari controller
only call into this and display what it returns."""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _engine
from .io import ImageFormatError, check_image_path, hkl_label, tap_pixel, tap_rows
from .readout import group_by_reflection, hover_text, significant

__all__ = [
    "REASON_COLOURS", "DEFAULT_TOLERANCE", "row_uses_default_F", "format_cell", "table_columns", "TapRecord",
    "tap_view", "SENSITIVITY_COLUMNS", "REFLECTION_COLUMNS", "sensitivity_view",
    "PinnedRun", "ReferenceShapeError", "Comparison", "InspectorModel", "percentile_limits",
]

# Columns of the tap table, in display order.  The loop-index columns other than
# subS/subF are shown only when they take more than one value in the tap.
LOOP_COLUMNS = ("thick", "subS", "subF", "source", "phi", "mosaic")
ALWAYS_SHOWN = ("subS", "subF")
VALUE_COLUMNS = ("h", "k", "l", "h0", "k0", "l0", "F_cell", "F_latt", "lookup")

# default_F reason name (the engine's FallbackMap.REASONS) -> legend colour; the legend's text is
# the engine's description of the reason (torchbragg.kernels.reasons.LOOKUP_DESCRIPTIONS).
REASON_COLOURS: dict[str, str] = {
    "default_F:no_table": "#ff8c00",
    "default_F:outside_table": "#e6194b",
    "default_F:unlisted": "#3cb4ff",
}


def row_uses_default_F(row: Mapping[str, Any]) -> bool:
    """True when this evaluation's F_cell came from default_F, not the table.

    Parameters
    ----------
    row : mapping
        One tap row; its ``lookup`` reason name decides, else its ``out_of_bounds`` flag.

    Returns
    -------
    bool
        Whether the row used default_F.
    """
    lk = row.get("lookup")
    if isinstance(lk, str) and lk:
        return lk.startswith("default_F")
    return bool(row.get("out_of_bounds", False))


def format_cell(key: str, value: Any) -> str:
    """Text shown in the table for one value.

    Parameters
    ----------
    key : str
        The column (``h``, ``k``, ``l`` get 4 decimals; ``F_cell``, ``F_latt`` and other floats 6 significant
        figures).
    value : Any
        The cell's value.

    Returns
    -------
    str
        The text; ``""`` for None, ``"yes"``/``"no"`` for a bool.
    """
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
    """The columns of a tap table, in display order.

    Parameters
    ----------
    rows : sequence of mapping
        The tap's rows.

    Returns
    -------
    list of str
        ``subS``, ``subF``, the other loop indices that take more than one value, then ``VALUE_COLUMNS``.
    """
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
    """One clicked pixel and what the engine's tap said about it.

    Attributes
    ----------
    slow, fast : int
        The pixel.
    tap : Any
        The engine's ``PixelTap``, or the tap JSON document it was read from.
    rows : list of dict
        One row per evaluation.
    columns : list of str
        Columns shown in the table (:func:`table_columns`).
    value : float or None
        The pixel's final intensity.
    d_angstrom, two_theta_deg : float or None
        Resolution (Å) and scattering angle (degrees) of the pixel centre.
    summary : str
        The tap's summary line.
    label : str
        The most common nearest reflection, ``"(h,k,l)"``.
    n_default_F : int
        Rows that used default_F.
    source : str
        ``"engine"`` (tapped now) or where the stored document came from.
    sensitivity : dict or None
        The engine's ``sensitivity`` tap of the pixel (dI/dp per parameter), once computed.
    """

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

    #: where the rows came from: "engine" (tapped now) or the tap JSON file it was read from
    source: str = "engine"
    #: the engine's ``sensitivity`` tap of the pixel, once computed (None until then)
    sensitivity: dict | None = None

    @property
    def pixel(self) -> tuple[int, int]:
        """(slow, fast)."""
        return (self.slow, self.fast)

    @classmethod
    def from_document(cls, doc: Mapping[str, Any], source: str = "tap JSON") -> TapRecord:
        """The stored table of a tap JSON document (specs/tap_schema.json).

        Parameters
        ----------
        doc : mapping
            The tap document.
        source : str
            Where it came from (shown with its table).

        Returns
        -------
        TapRecord
            The record; ``tap`` is the document itself.
        """
        s, f = tap_pixel(doc)
        rows = tap_rows(doc)
        values = doc.get("values") if isinstance(doc.get("values"), Mapping) else {}
        geo = values.get("geometry") if isinstance(values.get("geometry"), Mapping) else {}
        value = doc.get("final_intensity")
        return cls(slow=s, fast=f, tap=doc, rows=rows, columns=table_columns(rows),
                   value=_opt_float(value), d_angstrom=_opt_float(geo.get("d_angstrom")),
                   two_theta_deg=_opt_float(geo.get("two_theta_deg")),
                   summary=str(doc.get("summary", "") or ""), label=hkl_label(rows),
                   n_default_F=sum(row_uses_default_F(r) for r in rows), source=source)

    def table(self) -> list[dict]:
        """Rows as shown: the displayed columns plus ``default_F`` (highlighted).

        Returns
        -------
        list of dict
            One dict per row: the values of ``columns`` (NumPy scalars as Python ones) and ``default_F`` (bool).
        """
        out = []
        for r in self.rows:
            d = {c: _plain(r.get(c)) for c in self.columns}
            d["default_F"] = row_uses_default_F(r)
            out.append(d)
        return out

    def info_line(self) -> str:
        """The pixel, its value, d and 2θ in one line.

        Returns
        -------
        str
            The line, e.g. ``"pixel (slow 1, fast 2), value 3.5, d = 4.2 Å, 2θ = 6.8°"``.
        """
        parts = [f"pixel (slow {self.slow}, fast {self.fast})"]
        if self.value is not None:
            parts.append(f"value {self.value:.6g}")
        if self.d_angstrom is not None:
            parts.append(f"d = {self.d_angstrom:.4g} Å" if math.isfinite(self.d_angstrom) else "d = ∞ Å")
        if self.two_theta_deg is not None:
            parts.append(f"2θ = {self.two_theta_deg:.4g}°")
        return ", ".join(parts)


def tap_view(rec: TapRecord, group: bool = False, default_F_only: bool = False) -> tuple[list[str], list[dict], str]:
    """What the tap table shows: (columns, rows, caption).

    ``group`` collapses the evaluations into one row per nearest reflection
    (h0, k0, l0); ``default_F_only`` keeps the rows that used default_F.  Each
    row carries ``default_F`` (highlighted).

    Parameters
    ----------
    rec : TapRecord
        The tapped pixel.
    group : bool
        One row per nearest reflection.
    default_F_only : bool
        Only the rows that used default_F.

    Returns
    -------
    columns : list of str
        The columns shown.
    rows : list of dict
        The rows shown.
    caption : str
        How many rows of how many evaluations are shown.
    """
    if group:
        cols, rows = group_by_reflection(rec.rows, row_uses_default_F)
    else:
        cols, rows = list(rec.columns), rec.table()
    if default_F_only:
        rows = [r for r in rows if r["default_F"]]
    n_all = len(rec.rows)
    caption = (f"{len(rows)} reflection group(s) of {n_all} evaluations" if group
               else f"{len(rows)} of {n_all} evaluations")
    if default_F_only:
        caption += " (default_F only)"
    return cols, rows, caption


#: columns of the sensitivity table (one row per differentiable parameter component)
SENSITIVITY_COLUMNS = ["parameter", "unit", "value", "dI/dp", "step", "relative change"]
#: columns of the structure-factor table of the sensitivity view
REFLECTION_COLUMNS = ["h,k,l", "F", "dI/dF"]


def _num(value: Any, spec: str = ".6g") -> str:
    if value is None:
        return "—"
    return format(float(value), spec)


def sensitivity_view(doc: Mapping[str, Any], max_reflections: int = 10) -> dict[str, Any]:
    """What the Sensitivity view shows of the engine's ``sensitivity`` tap, as text.

    Parameters
    ----------
    doc : mapping
        The tap's values (``intensity``, ``parameters``, ``reflections``, ``not_differentiable``).
    max_reflections : int
        How many structure factors (largest |dI/dF| first) to list.

    Returns
    -------
    dict
        ``caption`` (str), ``parameters`` (rows: dict of :data:`SENSITIVITY_COLUMNS` to text),
        ``reflections`` (rows: dict of :data:`REFLECTION_COLUMNS` to text) and
        ``not_differentiable`` (list of ``"family: reason"``).
    """
    params = []
    for p in doc.get("parameters", []):
        name = p["family"] if p["component"] == p["family"] else f"{p['family']}.{p['component']}"
        rel = p.get("relative_change")
        params.append({"parameter": name, "unit": str(p["unit"]), "value": _num(p["value"]),
                       "dI/dp": _num(p["dI_dp"], ".4g"), "step": _num(p["step"], ".3g"),
                       "relative change": "—" if rel is None else f"{100.0 * float(rel):+.3g} %"})
    refl_all = list(doc.get("reflections", []))
    refl = [{"h,k,l": "({},{},{})".format(*r["hkl"]), "F": _num(r["F"]), "dI/dF": _num(r["dI_dF"], ".4g")}
            for r in refl_all[:max_reflections]]
    nd = [f"{fam}: {why}" for fam, why in (doc.get("not_differentiable") or {}).items()]
    caption = (f"I = {_num(doc.get('intensity'))} photons; {len(params)} parameter component(s); "
               f"relative change = dI/dp × step / I")
    if len(refl_all) > len(refl):
        caption += f"; top {len(refl)} of {len(refl_all)} structure factors"
    return {"caption": caption, "parameters": params, "reflections": refl, "not_differentiable": nd}


@dataclass
class PinnedRun:
    """A render kept as a reference: survives later runs.

    ``default_F`` is the engine's reason map (uint8 codes) for a render, or a
    boolean mask for a map measured from outside a renderer.

    Attributes
    ----------
    name : str
        The run's name.
    image : numpy.ndarray or None
        The rendered image; None for a measured map.
    default_F : numpy.ndarray
        ``[slow, fast]`` reason codes (uint8) or a boolean mask.
    args : list of str
        The nanoBragg arguments.
    hkl_source : dict
        ``sim.hkl_info`` of the run.
    engine : str
        The engine kernel that rendered it, or the measured program.
    device, dtype : str
        Device and dtype of the render (empty for a measured map).
    commands : list of list of str or None
        A measured map: the renderer's two command lines.
    summary : dict or None
        A measured map: the measurement's summary.
    """

    name: str
    image: np.ndarray | None
    default_F: np.ndarray
    args: list[str]
    hkl_source: dict
    engine: str
    device: str
    dtype: str
    commands: list[list[str]] | None = None  # a measured map: the renderer's two command lines
    summary: dict | None = None


#: default relative tolerance of an intensity comparison: |sim - ref| > tolerance * max|ref| is flagged
DEFAULT_TOLERANCE = 1e-3


class ReferenceShapeError(ImageFormatError):
    """The reference's size is not the simulation's (the reference stays chosen)."""


@dataclass
class Comparison:
    """An intensity comparison of the current render with a reference image.

    ``over_tolerance`` is 1 where ``|difference| > tolerance * scale`` (``scale`` is
    ``max |ref|``, or ``max |sim|`` for an all-zero reference); ``limits`` are the
    symmetric colour limits of the difference: its 99.9th percentile of ``|difference|``
    but never below ``tolerance * scale``, so that agreement within the tolerance
    (float32 rounding included) shows as white, not as noise stretched to full colour.

    Attributes
    ----------
    path : str
        The reference file.
    reference : numpy.ndarray
        The reference image in photons.
    metrics : dict
        The engine's metrics (``ImageComparison.to_dict()``) plus ``tolerance`` and ``pixels_over_tolerance``.
    difference : numpy.ndarray
        float32 ``sim - ref``.
    ratio : numpy.ndarray
        float32 ``sim / ref`` (NaN where ``ref`` is 0).
    tolerance : float
        Relative tolerance.
    shape : (int, int) or None
        The shape asked for a raw reference file.
    scale : float
        ``max |ref|`` (``max |sim|`` for an all-zero reference; 1 when that is 0 too).
    over_tolerance : numpy.ndarray or None
        uint8 ``[slow, fast]``, 1 where the difference is over ``tolerance * scale`` or not finite.
    limits : (float, float)
        Symmetric colour limits of the difference.
    stamp : (int, int) or None
        (size, mtime_ns) of the reference file when it was read.
    """

    path: str
    reference: np.ndarray
    metrics: dict[str, float]
    difference: np.ndarray
    ratio: np.ndarray
    tolerance: float = DEFAULT_TOLERANCE
    shape: tuple[int, int] | None = None
    scale: float = 1.0
    over_tolerance: np.ndarray | None = None
    limits: tuple[float, float] = (-1.0, 1.0)
    #: (size, mtime_ns) of the reference file when it was read
    stamp: tuple[int, int] | None = None

    @property
    def n_over_tolerance(self) -> int:
        """Pixels over the tolerance (0 before the tolerance is applied)."""
        return 0 if self.over_tolerance is None else int(np.count_nonzero(self.over_tolerance))

    @property
    def threshold(self) -> float:
        """The absolute difference above which a pixel is flagged (photons)."""
        return self.tolerance * self.scale


@dataclass
class InspectorModel:
    """State shared by the panels of one viewer.

    Attributes
    ----------
    args : list of str
        nanoBragg arguments (default: the tap configuration).
    device, dtype : str
        Torch device and ``"float32"``/``"float64"`` of renders.
    cwd : str or None
        Folder that relative file names resolve against.
    sim : torchbragg.Simulation or None
        The simulation of the image shown.
    image : numpy.ndarray or None
        The rendered image.
    fallback : Fallback or None
        The render's default_F fallback map.
    hkl_info : dict
        Where F came from (``sim.hkl_info``).
    current : TapRecord or None
        The pixel whose table is shown.
    selection : dict of (int, int) to TapRecord
        The selected pixels.
    comparison : Comparison or None
        The intensity comparison on screen.
    pinned : dict of str to PinnedRun
        The pinned runs by name.
    reference_note : str
        The engine's note (or warning) on converting the reference to photons.
    reference_request : dict or None
        The chosen reference image (``path``, ``shape``, ``tolerance``), kept across re-runs.
    tolerance : float
        Relative tolerance of the next intensity comparison.
    default_F_comparison : dict or None
        The default_F comparison on screen: ``reference``, ``counts`` and ``labels``.
    """

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
    pinned: dict[str, PinnedRun] = field(default_factory=dict)
    reference_note: str = ""
    #: the reference image the user chose (path, shape, tolerance): kept across re-runs
    reference_request: dict | None = None
    #: relative tolerance of the next intensity comparison
    tolerance: float = DEFAULT_TOLERANCE
    _last_comparison: Comparison | None = field(default=None, repr=False)
    #: the default_F comparison on screen: {"reference": name, "counts": {...}, "labels": uint8 array}
    default_F_comparison: dict | None = None

    # ------------------------------------------------------------ simulation
    @property
    def shape(self) -> tuple[int, int] | None:
        """(slow, fast) of the simulation; None before a render."""
        if self.sim is not None:
            return tuple(int(x) for x in self.sim.shape)
        return None

    def prepare(self, args: Sequence[str], device: str | None = None, dtype: str | None = None):
        """Build the engine's Simulation (raises the engine's argument / HKL errors).

        Parameters
        ----------
        args : sequence of str
            nanoBragg arguments.
        device, dtype : str, optional
            Default: the model's.

        Returns
        -------
        torchbragg.Simulation
            The simulation (not rendered).
        """
        return _engine.make_simulation(list(args), device or self.device, dtype or self.dtype, cwd=self.cwd)

    def set_rendered(self, sim, args: Sequence[str], image: np.ndarray,
                     fallback: _engine.Fallback | None, device: str, dtype: str) -> None:
        """Swap in a finished render (all at once: never half-updated).

        The shown tap is dropped and the intensity comparison is cleared (see :meth:`refresh_comparison`).

        Parameters
        ----------
        sim : torchbragg.Simulation
            The rendered simulation.
        args : sequence of str
            Its arguments.
        image : numpy.ndarray
            The image.
        fallback : Fallback or None
            Its fallback map.
        device, dtype : str
            Device and dtype of the render.
        """
        self.sim = sim
        self.args = list(args)
        self.device, self.dtype = device, dtype
        self.image = image
        self.fallback = fallback
        self.hkl_info = dict(sim.hkl_info)
        self.current = None
        self._last_comparison = self.comparison  # its reference array is reused if the file is unchanged
        self.comparison = None  # recomputed by refresh_comparison() for the new image

    # ------------------------------------------------------------ pinned runs
    def pin(self, name: str | None = None) -> str:
        """Keep the current render as a named reference run; returns its name
        (``run 1``, ``run 2``… by default; an existing name gets a suffix).

        Parameters
        ----------
        name : str, optional
            The wanted name.

        Returns
        -------
        str
            The name it is pinned under.

        Raises
        ------
        ValueError
            Nothing rendered.
        """
        if self.sim is None or self.fallback is None:
            raise ValueError("render a simulation before pinning it")
        base = (name or f"run {len(self.pinned) + 1}").strip() or f"run {len(self.pinned) + 1}"
        name, i = base, 2
        while name in self.pinned:
            name, i = f"{base} ({i})", i + 1
        self.pinned[name] = PinnedRun(
            name=name, image=self.image.copy(), default_F=self.fallback.reason.copy(), args=list(self.args),
            hkl_source=dict(self.hkl_info), engine=str(self.sim.last_kernel), device=self.device, dtype=self.dtype)
        return name

    def measure_default_F(self, program: str, name: str | None = None) -> str:
        """Measure a renderer's default_F map from outside (two renders, -default_F
        1000x apart, ``torchbragg.defaultf_map``) for the current arguments; pinned
        under ``name`` (default: the program's name).

        Parameters
        ----------
        program : str
            The renderer's command line.
        name : str, optional
            Name of the pinned run (default ``<program file name> (measured)``; a taken name gets a suffix).

        Returns
        -------
        str
            The name it is pinned under.

        Raises
        ------
        ValueError
            Nothing rendered (the arguments measured are the render's).
        """
        if self.sim is None:
            raise ValueError("render a simulation first: its arguments are the ones measured")
        mask, summary, _engine_reason = _engine.measure_default_F(program, self.args, cwd=self.cwd)
        label = name or f"{Path(str(program).split()[0]).name} (measured)"
        pinned_name, i = label, 2
        while pinned_name in self.pinned:
            pinned_name, i = f"{label} ({i})", i + 1
        self.pinned[pinned_name] = PinnedRun(
            name=pinned_name, image=None, default_F=mask.astype(bool), args=list(self.args),
            hkl_source=dict(self.hkl_info), engine=str(program), device="", dtype="",
            commands=summary.get("commands"), summary=summary)
        return pinned_name

    def compare_default_F(self, reference: str) -> dict:
        """Where the current render and a pinned run used default_F: counts of
        ``both``, ``only_current``, ``only_reference``, ``neither``, ``reason_changed``.

        The result (with the label image) is kept as :attr:`default_F_comparison`.

        Parameters
        ----------
        reference : str
            Name of the pinned run.

        Returns
        -------
        dict
            The counts (and ``shape``).

        Raises
        ------
        ValueError
            Nothing rendered, no such pinned run, or maps of different shapes.
        """
        if self.fallback is None:
            raise ValueError("render a simulation before comparing default_F regions")
        if reference not in self.pinned:
            raise ValueError(f"no pinned run named {reference!r}; pinned: {', '.join(self.pinned) or 'none'}")
        ref = self.pinned[reference]
        cur = self.fallback.reason
        if ref.default_F.shape != cur.shape:
            raise ValueError(f"{reference!r} is {ref.default_F.shape[0]}×{ref.default_F.shape[1]}, "
                             f"the current render is {cur.shape[0]}×{cur.shape[1]}")
        counts = dict(_engine.compare_fallback(cur, ref.default_F))
        labels = _engine.fallback_labels(cur, ref.default_F)
        self.default_F_comparison = {"reference": reference, "counts": counts, "labels": labels}
        return counts

    def refresh_default_F_comparison(self) -> dict | None:
        """The comparison on screen recomputed for a new render (None when it cannot be).

        Returns
        -------
        dict or None
            The new counts; None without a comparison, or when it failed (it is then dropped).
        """
        cmp = self.default_F_comparison
        if cmp is None:
            return None
        try:
            return self.compare_default_F(cmp["reference"])
        except ValueError:
            self.default_F_comparison = None
            return None

    def retap_selection(self) -> tuple[int, int]:
        """Tap the selected pixels again on the current simulation (after a re-run).

        Returns (re-tapped, dropped: outside the new detector).

        Returns
        -------
        (int, int)
            Pixels re-tapped and pixels dropped.
        """
        old = list(self.selection)
        self.selection = {}
        dropped = 0
        for s, f in old:
            try:
                self.check_pixel(s, f)
            except ValueError:
                dropped += 1
                continue
            rec = self._tap_record(s, f)
            self.selection[rec.pixel] = rec
        return len(self.selection), dropped

    # ------------------------------------------------------------ hover
    def hover(self, slow: int, fast: int) -> str:
        """The status-bar readout of a pixel (value, h,k,l, d, 2θ, F source).

        With an intensity comparison of the same shape the reference and the difference follow.

        Parameters
        ----------
        slow, fast : int
            The pixel.

        Returns
        -------
        str
            The readout.

        Raises
        ------
        ValueError
            Nothing rendered, or a pixel outside the detector.
        """
        s, f = self.check_pixel(slow, fast)
        geo = _engine.pixel_geometry(self.sim, s, f)
        h0, k0, l0 = (int(v) for v in np.asarray(geo["hkl0"]).reshape(3))
        F, reason = _engine.structure_factor_source(self.sim, h0, k0, l0)
        fb = self.fallback
        text = hover_text(
            s, f, value=None if self.image is None else float(self.image[s, f]), geometry=geo,
            f_value=F, f_reason=reason,
            default_F_count=None if fb is None else int(fb.counts[s, f]),
            evaluations=None if fb is None else fb.evaluations_per_pixel)
        cmp = self.comparison
        if cmp is not None and cmp.reference.shape == self.image.shape:
            flag = "  over tolerance" if cmp.over_tolerance is not None and cmp.over_tolerance[s, f] else ""
            ref, diff = float(cmp.reference[s, f]), float(cmp.difference[s, f])
            text += f"  ref {significant(ref)}  diff {significant(diff)}{flag}"
        return text

    @property
    def uses_default_F_everywhere(self) -> bool:
        """True when no HKL table is loaded: every evaluation used default_F."""
        return self.sim is not None and self.sim.setup.hkl is None

    def hkl_lines(self) -> list[str]:
        """Where F came from (``sim.hkl_info``), for the panel.

        Returns
        -------
        list of str
            Lines of text (kind, bounds, default_F, file, warnings); empty before a render.
        """
        info = self.hkl_info
        if not info:
            return []
        lines = []
        if info.get("describe"):
            lines.append(str(info["describe"]))
        else:
            kind = info.get("kind")
            if kind and kind != "none":
                lines.append(f"{kind} table: {info.get('count', '?')} reflections")
            if info.get("bounds"):
                b = info["bounds"]
                lines.append(f"h {b[0][0]}…{b[0][1]}, k {b[1][0]}…{b[1][1]}, l {b[2][0]}…{b[2][1]}")
            if info.get("default_F") is not None:
                lines.append(f"default_F {info['default_F']}")
        if info.get("source"):
            lines.append(f"file: {info['source']}")
        for w in info.get("warnings") or []:
            lines.append(f"⚠ {w}")
        return lines

    # ------------------------------------------------------------ taps
    def check_pixel(self, slow: int, fast: int) -> tuple[int, int]:
        """A pixel of the rendered detector.

        Parameters
        ----------
        slow, fast : int
            The pixel.

        Returns
        -------
        (int, int)
            ``(slow, fast)`` as int.

        Raises
        ------
        ValueError
            Nothing rendered, or the pixel is outside the detector.
        """
        if self.sim is None:
            raise ValueError("nothing rendered yet: run a simulation first")
        s, f = int(slow), int(fast)
        ns, nf = self.shape
        if not (0 <= s < ns and 0 <= f < nf):
            raise ValueError(f"pixel (slow {s}, fast {f}) is outside the {ns}×{nf} detector")
        return s, f

    def tap(self, slow: int, fast: int) -> TapRecord:
        """Tap a pixel with the engine; it becomes :attr:`current`.

        Parameters
        ----------
        slow, fast : int
            The pixel.

        Returns
        -------
        TapRecord
            The tap.

        Raises
        ------
        ValueError
            Nothing rendered, or the pixel is outside the detector.
        """
        s, f = self.check_pixel(slow, fast)
        rec = self._tap_record(s, f)
        self.current = rec
        return rec

    def _tap_record(self, s: int, f: int) -> TapRecord:
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
        return rec

    def sensitivity(self, sim, slow: int, fast: int) -> dict:
        """The engine's ``sensitivity`` tap of a pixel of ``sim`` (about a second; safe in a worker thread).

        Parameters
        ----------
        sim : torchbragg.Simulation
            The simulation the pixel was tapped on (not changed).
        slow, fast : int
            The pixel.

        Returns
        -------
        dict
            The tap's values (:func:`_engine.pixel_sensitivity`).
        """
        return _engine.pixel_sensitivity(sim, slow, fast)

    def attach_sensitivity(self, rec: TapRecord, values: dict) -> None:
        """Keep a computed ``sensitivity`` tap with its record (and the selected record of the same pixel),
        so that the export writes it too.

        Parameters
        ----------
        rec : TapRecord
            The engine tap of the pixel, on the current simulation.
        values : dict
            The tap's values.
        """
        recs = [rec]
        other = self.selection.get(rec.pixel)
        if other is not None and other is not rec and other.source == "engine":
            recs.append(other)
        for r in recs:
            r.sensitivity = values
            if r.source == "engine":
                _engine.attach_tap(r.tap, _engine.SENSITIVITY_TAP, values)

    # ------------------------------------------------------------ selection
    def select(self, rec: TapRecord) -> bool:
        """Add a tapped pixel to the selection; False if it was already there.

        Parameters
        ----------
        rec : TapRecord
            The tap.

        Returns
        -------
        bool
            True when it was added.
        """
        if rec.pixel in self.selection:
            return False
        self.selection[rec.pixel] = rec
        return True

    def deselect(self, pixel: tuple[int, int]) -> None:
        """Remove a pixel from the selection (nothing happens when it is not selected).

        Parameters
        ----------
        pixel : (int, int)
            (slow, fast).
        """
        self.selection.pop(tuple(pixel), None)

    def clear_selection(self) -> None:
        """Empty the selection."""
        self.selection = {}

    def default_bundle_parent(self) -> Path:
        """Where fresh evidence bundles go.

        Returns
        -------
        Path
            ``<cwd>/reports/inspector/export`` (``cwd`` defaults to ``.``).
        """
        return Path(self.cwd or ".") / "reports" / "inspector" / "export"

    def export(self, folder: str | Path | None = None, *, bundle_root: str | Path | None = None) -> list[Path]:
        """One tap JSON per selected pixel (engine schema, engine writer), never
        overwriting; a pixel whose ``sensitivity`` tap was computed gets a
        second file with it.  ``folder`` None → a fresh evidence bundle under
        ``bundle_root`` (default ``reports/inspector/export``), taps in its
        ``py_taps/`` and the arguments in its ``commands.txt``; an existing
        bundle folder → its ``py_taps/``.  If a write fails, what this export
        wrote is removed again.

        A bundle also gets the comparisons on screen (``comparison/``) and the command line.

        Parameters
        ----------
        folder : str or Path, optional
            A folder, an existing evidence bundle, or None for a fresh bundle.
        bundle_root : str or Path, optional
            Where a fresh bundle is made (default: :meth:`default_bundle_parent`).

        Returns
        -------
        list of Path
            The tap files written.

        Raises
        ------
        ValueError
            The selection is empty.
        NotADirectoryError
            The target is a file.
        """
        if not self.selection:
            raise ValueError("the selection is empty: shift-click pixels to select them")
        bundle: Path | None = None
        fresh_bundle = False
        if folder is None:
            bundle = _engine.new_evidence_bundle(Path(bundle_root) if bundle_root else self.default_bundle_parent())
            fresh_bundle = True
        elif _engine.is_evidence_bundle(Path(folder)):
            bundle = Path(folder)
        target = bundle / "py_taps" if bundle is not None else Path(folder)
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"{target} is a file, not a folder")
        written: list[Path] = []
        try:
            target.mkdir(parents=True, exist_ok=True)
            for rec in self.selection.values():
                written.append(_engine.write_tap_json(rec.tap, target))
                if rec.sensitivity is not None and rec.source == "engine":
                    written.append(_engine.write_tap_json(rec.tap, target, tap_id=_engine.SENSITIVITY_TAP))
            if bundle is not None:
                self._write_comparisons(bundle / "comparison")
                pixels = " ".join(f"({s},{f})" for s, f in self.selection)
                _engine.record_command(bundle, ["bragg-inspector"] + list(self.args), self.device, self.dtype,
                                       note=f"napari inspector export of pixels {pixels}")
        except BaseException:
            for p in written:
                Path(p).unlink(missing_ok=True)
            if fresh_bundle and bundle is not None:
                shutil.rmtree(bundle, ignore_errors=True)
            raise
        return written

    def _write_comparisons(self, folder: Path) -> None:
        """The comparisons on screen, as evidence: default_F counts against the pinned
        run (with its arguments, engine and, for a measured map, the renderer's
        commands) and the image metrics against a reference file (path, sha256)."""
        import hashlib

        from .io import exclusive_write_json

        if self.default_F_comparison is not None:
            ref = self.pinned[self.default_F_comparison["reference"]]
            exclusive_write_json(folder / "default_F_comparison.json", {
                "current": {"args": list(self.args), "hkl_source": self.hkl_info,
                            "engine": str(self.sim.last_kernel), "device": self.device, "dtype": self.dtype},
                "reference": {"name": ref.name, "args": ref.args, "hkl_source": ref.hkl_source,
                              "engine": ref.engine, "commands": ref.commands},
                "counts": dict(self.default_F_comparison["counts"]),
                "labels": {"0": "neither", "1": "both", "2": "only current", "3": "only reference",
                           "4": "both, reason changed"},
            })
        if self.comparison is not None:
            path = Path(self.comparison.path)
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            exclusive_write_json(folder / "image_comparison.json", {
                "reference_path": str(path), "reference_sha256": digest,
                "metrics": {k: float(v) for k, v in self.comparison.metrics.items()
                            if isinstance(v, (int, float))},
                "tolerance": self.comparison.tolerance,
                "pixels_over_tolerance": self.comparison.n_over_tolerance,
                "threshold_photons": self.comparison.threshold,
                "reference_note": self.reference_note,
                "current_args": list(self.args)})

    # ------------------------------------------------------------ default_F legend
    def fallback_legend(self) -> list[dict]:
        """One entry per default_F reason: code, name, text, colour, pixel count.

        Returns
        -------
        list of dict
            ``code``, ``name``, ``text`` (the engine's description), ``colour`` and ``pixels`` of each reason in
            :data:`REASON_COLOURS`; empty before a render.
        """
        if self.fallback is None:
            return []
        counts = np.bincount(self.fallback.reason.ravel(), minlength=max(4, len(self.fallback.reasons)))
        out = []
        for code, name in sorted(self.fallback.reasons.items()):
            if name not in REASON_COLOURS:
                continue
            text, colour = _engine.lookup_descriptions().get(name, name), REASON_COLOURS[name]
            out.append({"code": code, "name": name, "text": text, "colour": colour, "pixels": int(counts[code])})
        return out

    # ------------------------------------------------------------ compare
    def load_reference(self, path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
        """The reference in photons (SMV counts converted where the engine can; see
        :attr:`reference_note`).  ``shape`` is the (slow, fast) of a raw float file
        that has no sidecar (otherwise the simulation's shape is assumed).

        Parameters
        ----------
        path : str or Path
            The reference image.
        shape : (int, int), optional
            (slow, fast) of a raw file.

        Returns
        -------
        numpy.ndarray
            float32 ``[slow, fast]`` in photons.

        Raises
        ------
        ValueError
            Nothing rendered.
        ImageFormatError
            The file cannot be read as an image.
        ReferenceShapeError
            Its shape is not the simulation's.
        """
        if self.image is None:
            raise ValueError("render a simulation before opening a reference image")
        path = check_image_path(path)  # the plugin's messages for a missing file or another suffix
        sim_shape = self.image.shape
        shape = None if shape is None else (int(shape[0]), int(shape[1]))
        try:  # read once: the engine's reader converts SMV counts and names the file in its errors
            ref, info = _engine.load_image_photons(path, shape=shape, fallback_shape=sim_shape)
        except (ValueError, OSError) as exc:
            raise ImageFormatError(str(exc)) from None
        if ref.shape != sim_shape:
            raise ReferenceShapeError(
                f"{path.name}: reference is {ref.shape[0]}×{ref.shape[1]}, the simulation is "
                f"{sim_shape[0]}×{sim_shape[1]}: render with -detpixels_s {ref.shape[0]} "
                f"-detpixels_f {ref.shape[1]} and it is compared")
        self.reference_note = info.get("warning") or info.get("note") or ""
        return ref

    def compare(self, path: str | Path, shape: tuple[int, int] | None = None,
                tolerance: float | None = None) -> Comparison:
        """Compare the current render with a reference image; it stays the reference
        for later renders (:meth:`refresh_comparison`) until another is chosen.

        Parameters
        ----------
        path : str or Path
            The reference image.
        shape : (int, int), optional
            (slow, fast) of a raw file without sidecar.
        tolerance : float, optional
            Relative tolerance (default: :attr:`tolerance`).

        Returns
        -------
        Comparison
            The new comparison, also kept as :attr:`comparison`.

        Raises
        ------
        ValueError
            A negative or non-finite tolerance, or nothing rendered.
        ImageFormatError
            The file cannot be read (a :class:`ReferenceShapeError` keeps the reference chosen).
        """
        tolerance = float(self.tolerance if tolerance is None else tolerance)
        if not (np.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"tolerance must be a finite number ≥ 0, got {tolerance!r}")
        request = {"path": str(path), "shape": shape, "tolerance": tolerance}
        previous = self.comparison or self._last_comparison
        self.comparison = self._last_comparison = None
        try:
            ref = self._reference_image(path, shape, previous)
        except ReferenceShapeError:
            self.reference_request = request  # compared once a render has its size
            raise
        self.tolerance = tolerance
        self.reference_request = request
        out = self.image
        metrics = _engine.compare_images(ref, out)
        diff = (out.astype(np.float64) - ref).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(ref != 0, out / np.where(ref != 0, ref, 1), np.nan).astype(np.float32)
        self.comparison = Comparison(str(path), ref, metrics, diff, ratio, shape=shape, stamp=_file_stamp(path))
        self._apply_tolerance(tolerance)
        return self.comparison

    def _reference_image(self, path, shape, previous: Comparison | None) -> np.ndarray:
        """The reference array: the one already loaded when it is the same unchanged file
        (a re-run compares again without reading it), else read now."""
        stamp = _file_stamp(path)
        if (previous is not None and previous.path == str(path) and previous.shape == shape
                and stamp is not None and previous.stamp == stamp
                and previous.reference.shape == self.image.shape):
            return previous.reference
        return self.load_reference(path, shape)

    def set_tolerance(self, tolerance: float) -> Comparison | None:
        """A new tolerance for the comparison on screen (kept for later ones).

        Parameters
        ----------
        tolerance : float
            Relative tolerance.

        Returns
        -------
        Comparison or None
            The updated comparison; None when there is none.

        Raises
        ------
        ValueError
            A negative or non-finite tolerance.
        """
        tolerance = float(tolerance)
        if not (np.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"tolerance must be a finite number ≥ 0, got {tolerance!r}")
        self.tolerance = tolerance
        if self.reference_request is not None:
            self.reference_request["tolerance"] = tolerance
        if self.comparison is None:
            return None
        self._apply_tolerance(tolerance)
        return self.comparison

    def _apply_tolerance(self, tolerance: float) -> None:
        cmp = self.comparison
        absdiff = np.abs(cmp.difference)
        scale = float(np.nanmax(np.abs(cmp.reference))) if cmp.reference.size else 0.0
        if not scale > 0:
            scale = float(np.nanmax(np.abs(self.image))) if self.image is not None and self.image.size else 0.0
        scale = scale if np.isfinite(scale) and scale > 0 else 1.0
        cmp.tolerance, cmp.scale = tolerance, scale
        # NaN differences are disagreements too
        cmp.over_tolerance = ((absdiff > tolerance * scale) | ~np.isfinite(absdiff)).astype(np.uint8)
        finite = absdiff[np.isfinite(absdiff)]
        spread = float(percentile_limits(finite, 0.0, 99.9)[1]) if finite.size and finite.max() > 0 else 0.0
        lim = max(spread, tolerance * scale) or 1.0
        cmp.limits = (-lim, lim)
        cmp.metrics["tolerance"] = tolerance
        cmp.metrics["pixels_over_tolerance"] = float(cmp.n_over_tolerance)

    def refresh_comparison(self) -> Comparison | None:
        """The chosen reference compared again with a new render (its path, shape and
        tolerance kept).  Raises the reason when it no longer can be (e.g. a new size).

        Returns
        -------
        Comparison or None
            The new comparison; None without a chosen reference or a render.
        """
        req = self.reference_request
        if req is None or self.image is None:
            return None
        return self.compare(req["path"], req["shape"], req["tolerance"])

    def clear_reference(self) -> None:
        """Forget the reference image and its comparison."""
        self.reference_request = None
        self.comparison = self._last_comparison = None
        self.reference_note = ""


def _file_stamp(path) -> tuple[int, int] | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def _opt_float(v: Any) -> float | None:
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def percentile_limits(image: np.ndarray, lo: float = 0.0, hi: float = 99.9,
                      max_samples: int = 1 << 20) -> tuple[float, float]:
    """Contrast limits from percentiles (on a strided subsample for big images).

    Parameters
    ----------
    image : numpy.ndarray
        The values (non-finite ones are ignored).
    lo, hi : float
        Percentiles of the limits.
    max_samples : int
        About the most values used (every ``size // max_samples``-th).

    Returns
    -------
    (float, float)
        ``(low, high)`` with ``high > low``; ``(0.0, 1.0)`` without finite values.
    """
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
