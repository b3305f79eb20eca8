"""Text the inspector shows: the hover readout, the tap table (grouped and
filtered) and its tab-separated copy.  Qt-free and napari-free.

Every number comes from the engine (``torchbragg.detector_geometry`` for the
pixel-centre geometry, the fallback map of the render for default_F); this
module only formats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _engine

__all__ = ["hover_text", "group_by_reflection", "table_tsv", "spread_labels",
           "reason_text", "significant"]


def reason_text(name: str) -> str:
    """Display text of an engine lookup-reason name: ``default_F: <the engine's description>`` for the
    fallbacks, the name itself otherwise (``table``, ``interpolated``).

    Parameters
    ----------
    name : str
        An engine lookup-reason name.

    Returns
    -------
    str
        The text shown.
    """
    if name.startswith("default_F"):
        return f"default_F: {_engine.lookup_descriptions().get(name, name)}"
    return name


def significant(x: float, digits: int = 4) -> str:
    """``x`` with ``digits`` significant figures for the readout ("∞" or "nan" when not finite).

    Parameters
    ----------
    x : float
        The number.
    digits : int
        Significant figures.

    Returns
    -------
    str
        The text shown.
    """
    if x is None or not math.isfinite(float(x)):
        return "∞" if x is not None and float(x) > 0 else "nan"
    return f"{float(x):.{digits}g}"


def hover_text(slow: int, fast: int, *, value: float | None, geometry: Mapping[str, Any],
               f_value: float | None, f_reason: str | None,
               default_F_count: int | None = None, evaluations: int | None = None,
               with_hkl: bool = True) -> str:
    """The status-bar line for one pixel.

    Parameters
    ----------
    slow, fast : int
        The pixel.
    value : float or None
        The image value there (shown with 4 significant figures).
    geometry : mapping
        ``torchbragg.detector_geometry.pixel_geometry`` of the pixel (0-d entries).
    f_value, f_reason : float, str or None
        F of the nearest reflection and its lookup reason name.
    default_F_count, evaluations : int, optional
        The fallback map's count at the pixel and evaluations per pixel.
    with_hkl : bool
        False for an image whose crystal is unknown (an opened SMV file).

    Returns
    -------
    str
        The parts (pixel, I, hkl, d, 2θ, F and its source, default_F count) joined by two spaces;
        those without a value are left out.
    """
    parts = [f"[{slow}, {fast}]"]
    if value is not None:
        parts.append(f"I {significant(value)}")
    if with_hkl:
        hkl = np.asarray(geometry["hkl"], dtype=float).reshape(3)
        hkl0 = np.asarray(geometry["hkl0"]).reshape(3)
        parts.append("hkl ({:.2f}, {:.2f}, {:.2f}) → ({},{},{})".format(*hkl, *(int(v) for v in hkl0)))
    d = float(geometry["d_angstrom"])
    parts.append(f"d {significant(d)} Å" if math.isfinite(d) else "d ∞ Å")
    parts.append(f"2θ {float(geometry['two_theta_deg']):.3f}°")
    if f_reason is not None:
        src = reason_text(f_reason)
        parts.append(f"F {significant(f_value)} ({src})")
    if default_F_count is not None and evaluations:
        parts.append(f"default_F in {int(default_F_count)}/{int(evaluations)} evaluations")
    return "  ".join(parts)


def group_by_reflection(rows: Sequence[Mapping[str, Any]], uses_default_F) -> tuple[list[str], list[dict]]:
    """One row per nearest reflection (h0, k0, l0), in order of first appearance.

    Parameters
    ----------
    rows : sequence of mapping
        Tap rows with ``h0``, ``k0``, ``l0``, ``h``, ``k``, ``l`` (``F_cell``, ``lookup`` optional).
    uses_default_F : callable
        ``uses_default_F(row)``: whether a row used default_F.

    Returns
    -------
    (columns, rows)
        Columns ``h0 k0 l0 evaluations default_F evals F_cell lookup h k l`` (h, k, l:
        the mean fractional indices of the group; F_cell: the group's first row's);
        each row dict also carries ``default_F`` (bool: any evaluation of the group used default_F).
    """
    groups: dict[tuple[int, int, int], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((int(r["h0"]), int(r["k0"]), int(r["l0"])), []).append(r)
    out = []
    for (h0, k0, l0), rs in groups.items():
        n_def = sum(bool(uses_default_F(r)) for r in rs)
        lookups = sorted({str(r.get("lookup")) for r in rs})
        out.append({
            "h0": h0, "k0": k0, "l0": l0, "evaluations": len(rs), "default_F evals": n_def,
            "F_cell": float(rs[0].get("F_cell", float("nan"))), "lookup": ", ".join(lookups),
            "h": float(np.mean([r["h"] for r in rs])), "k": float(np.mean([r["k"] for r in rs])),
            "l": float(np.mean([r["l"] for r in rs])), "default_F": n_def > 0,
        })
    return ["h0", "k0", "l0", "evaluations", "default_F evals", "F_cell", "lookup", "h", "k", "l"], out


def table_tsv(columns: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """The table as tab-separated text with a header line (for the clipboard).

    Parameters
    ----------
    columns : sequence of str
        Column headers.
    cells : sequence of sequence of str
        The rows' cells (converted with ``str``).

    Returns
    -------
    str
        One line per row after the header, each ending with a newline.
    """
    lines = ["\t".join(columns)]
    lines += ["\t".join(str(c) for c in row) for row in cells]
    return "\n".join(lines) + "\n"


def spread_labels(xy: np.ndarray, min_separation: float) -> np.ndarray:
    """Which labels to show so that no two shown are closer than ``min_separation``.

    Greedy in the given order (earlier labels win), on screen positions.

    Parameters
    ----------
    xy : numpy.ndarray
        ``[n, 2]`` screen positions of the labelled points.
    min_separation : float
        Screen pixels.

    Returns
    -------
    numpy.ndarray
        bool ``[n]``.
    """
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    keep = np.zeros(len(xy), dtype=bool)
    shown: list[np.ndarray] = []
    for i, p in enumerate(xy):
        if not shown or np.min(np.hypot(*(np.asarray(shown) - p).T)) >= min_separation:
            keep[i] = True
            shown.append(p)
    return keep
