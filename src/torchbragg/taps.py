"""Pixel taps: the engine's own per-evaluation numbers for one pixel.

A tap runs the rendering kernel (:func:`torchbragg.kernels.eager.evaluate_block`) on a
one-pixel block and keeps everything it computed, so the numbers it reports are
the numbers the image was made from. Tap names:

``hkl_subpixel``
    one record per evaluation (thickness layer, subpixel, source, phi step,
    mosaic domain): fractional and rounded Miller indices, F_cell, F_latt,
    ``out_of_bounds`` (C's definition: no table, or outside its box) and the
    lookup reason.
``f_cell``
    counts and statistics of the structure factors used by the pixel.
``omega``
    per-subpixel solid angle and the value C applies to the pixel.
``intensity``
    the sum before scaling, the step count, capture fraction, polarisation,
    solid angle and the final value (equal to the rendered pixel).
``geometry``
    lab position, scattering vector, 2θ and resolution d of the pixel centre.
``sensitivity``
    dI/dp of the pixel for every differentiable parameter (photons per mm, per degree, per Å,
    per F, ...) with the relative change for a stated step, and the structure factors the pixel
    depends on most (:func:`torchbragg.differentiable.pixel_sensitivity`).

The JSON layout of a tap is specified in ``specs/tap_schema.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .kernels.reasons import LOOKUP_DESCRIPTIONS, LOOKUP_REASONS
from .resolve import R_E_SQR

__all__ = ["TAP_NAMES", "SCHEMA_VERSION", "PixelTap", "TapError", "run_tap", "format_tap_table",
           "tap_filename", "write_tap_json"]

TAP_NAMES = ("hkl_subpixel", "f_cell", "omega", "intensity", "geometry", "sensitivity")
SCHEMA_VERSION = "1.0"


class TapError(ValueError):
    """A tap request that cannot be served (pixel outside the detector, unknown tap)."""


@dataclass
class PixelTap:
    """The result of tapping one pixel.

    Attributes
    ----------
    slow, fast : int
        Pixel indices along the slow and fast detector axes (0-based).
    taps : tuple of str
        The taps requested.
    rows : list of dict
        One record per evaluation (the ``hkl_subpixel`` tap), keys ``thick,
        subS, subF, source, phi, mosaic, h, k, l, h0, k0, l0, F_cell, F_latt,
        out_of_bounds, lookup, skipped``.
    final_intensity : float
        Photons in the pixel: equals the rendered image at (slow, fast).
    values : dict
        Per-tap payloads (see the module docstring).
    summary : str
        One line such as "4 of 4 evaluations used default_F: no HKL table loaded".
    geometry : dict
        The ``geometry`` tap's payload (pixel centre position in m, diffracted direction,
        scattering vector in 1/Å, 2θ in degrees, sin(θ)/λ, d in Å, wavelength in Å),
        kept whether or not that tap was requested.
    meta : dict
        Fields shared by every tap document: ``oversample``, ``config`` (arguments,
        convention, structure-factor source, ...), ``device``, ``dtype``,
        ``timestamp_utc`` and ``engine``.
    """

    slow: int
    fast: int
    taps: tuple
    rows: list[dict]
    final_intensity: float
    values: dict[str, dict]
    summary: str
    geometry: dict
    meta: dict = field(default_factory=dict)

    def to_json(self, tap_id: str = "hkl_subpixel") -> dict:
        """The JSON document of one tap of this pixel (``specs/tap_schema.json``).

        Parameters
        ----------
        tap_id : str
            Name of a computed tap (one of :data:`TAP_NAMES` in ``values``).

        Returns
        -------
        dict
            The document: schema version, tap id, pixel, shared metadata and the tap's values.

        Raises
        ------
        TapError
            When ``tap_id`` was not computed for this pixel.
        """
        if tap_id not in self.values:
            raise TapError(f"tap {tap_id!r} was not computed for this pixel; computed: {', '.join(self.values)}")
        doc = {
            "schema_version": SCHEMA_VERSION,
            "tap_id": tap_id,
            "pixel_coords": [self.slow, self.fast],
            "oversample": self.meta["oversample"],
            "final_intensity": self.final_intensity,
            "summary": self.summary,
            "config": self.meta["config"],
            "device": self.meta["device"],
            "dtype": self.meta["dtype"],
            "timestamp_utc": self.meta["timestamp_utc"],
            "engine": self.meta["engine"],
            "values": self.values[tap_id],
        }
        return doc

    def to_json_all(self) -> list[dict]:
        """One document per computed tap.

        Returns
        -------
        list of dict
            :meth:`to_json` of each computed tap, in the order they were requested.
        """
        return [self.to_json(t) for t in self.values]


def _lookup_summary(rows: list[dict], hkl_info: dict) -> str:
    used = [r for r in rows if not r["skipped"]]
    n = len(used)
    fallback = [r for r in used if r["lookup"].startswith("default_F")]
    if n == 0:
        return (f"0 of {len(rows)} evaluations reached the structure-factor lookup "
                "(all skipped by -dmin or a zero lattice factor)")
    if not fallback:
        interp = sum(r["lookup"] == "interpolated" for r in used)
        how = LOOKUP_DESCRIPTIONS["interpolated" if interp == n else "table"]
        return f"0 of {n} evaluations used default_F: all {how}"
    reasons = {}
    for r in fallback:
        reasons[r["lookup"]] = reasons.get(r["lookup"], 0) + 1
    because = "; ".join(LOOKUP_DESCRIPTIONS[k] + (f" ({v})" if len(reasons) > 1 else "") for k, v in reasons.items())
    return f"{len(fallback)} of {n} evaluations used default_F: {because}"


def run_tap(sim, slow: int, fast: int, taps: Sequence[str] = ("hkl_subpixel",)) -> PixelTap:
    """Tap one pixel of a :class:`~torchbragg.simulation.Simulation`.

    Parameters
    ----------
    sim : Simulation
        The simulation to run the kernel of.
    slow, fast : int
        Pixel indices along the slow and fast axes (0-based).
    taps : sequence of str
        Names of the taps to compute (from :data:`TAP_NAMES`).

    Returns
    -------
    PixelTap
        The per-evaluation records, the requested taps' payloads and the pixel's final
        value (0 for a pixel outside ``-roi`` or masked, which C does not render).

    Raises
    ------
    TapError
        For a pixel outside the detector or an unknown tap name.
    """
    taps = tuple(taps)
    unknown = [t for t in taps if t not in TAP_NAMES]
    if unknown:
        raise TapError(f"unknown tap {unknown[0]!r}; known taps: {', '.join(TAP_NAMES)}")
    ny, nx = sim.shape
    slow, fast = int(slow), int(fast)
    if not (0 <= slow < ny and 0 <= fast < nx):
        raise TapError(f"pixel (slow={slow}, fast={fast}) is outside the {ny}x{nx} detector "
                       f"(slow 0..{ny - 1}, fast 0..{nx - 1})")
    s = sim.setup
    dev = sim.device
    rows_t = torch.tensor([slow], device=dev)
    cols_t = torch.tensor([fast], device=dev)
    with torch.no_grad():
        res = sim.evaluate(rows_t, cols_t, detail=True)
        red = sim.reduce(res)
    active = bool(sim.active_mask(rows_t, cols_t)[0, 0])
    final = float(red["value"][0, 0]) if active else 0.0

    T, os_ = s.thicksteps, s.oversample
    S, P, M = len(s.source_lambdas), s.phisteps, len(s.mosaic_umats)
    hkl = res["hkl"][0, 0].reshape(-1, 3).double().cpu().numpy()
    hkl0 = res["hkl0"][0, 0].reshape(-1, 3).cpu().numpy()
    F_cell = res["F_cell"][0, 0].reshape(-1).double().cpu().numpy()
    F_latt = res["F_latt"][0, 0].reshape(-1).double().cpu().numpy()
    reason = res["reason"][0, 0].reshape(-1).cpu().numpy()
    skipped = res["skipped"][0, 0].reshape(-1).cpu().numpy()
    idx = np.indices((T, os_, os_, S, P, M)).reshape(6, -1).T
    records = []
    for n, (t, ss, sf, src, p, m) in enumerate(idx):
        code = int(reason[n])
        records.append({
            "thick": int(t), "subS": int(ss), "subF": int(sf), "source": int(src), "phi": int(p), "mosaic": int(m),
            "h": float(hkl[n, 0]), "k": float(hkl[n, 1]), "l": float(hkl[n, 2]),
            "h0": int(hkl0[n, 0]), "k0": int(hkl0[n, 1]), "l0": int(hkl0[n, 2]),
            "F_cell": float(F_cell[n]), "F_latt": float(F_latt[n]),
            "out_of_bounds": code in (1, 2), "lookup": LOOKUP_REASONS[code], "skipped": bool(skipped[n]),
        })
    summary = _lookup_summary(records, sim.hkl_info)
    if not active:
        summary += " (pixel outside -roi or masked: C does not render it)"

    geometry = _geometry(sim, res)
    values: dict[str, dict] = {}
    for name in taps:
        if name == "hkl_subpixel":
            values[name] = {
                "subpixels": [_subpixel_record(r) for r in records],
                "evaluations": len(records),
                "loop_order": ["thick", "subS", "subF", "source", "phi", "mosaic"],
                "nearest_neighbour_rule": "h0 = ceil(h - 0.5); outside the table's box or no table: default_F",
            }
        elif name == "f_cell":
            values[name] = _f_cell_stats(records, sim.hkl_info)
        elif name == "omega":
            om = res["omega"][0, 0].reshape(T, os_, os_).double().cpu().numpy()
            values[name] = {
                "subpixels": [{"thick": int(t), "subpixel_index": [int(a), int(b)], "omega_sr": float(om[t, a, b])}
                              for t in range(T) for a in range(os_) for b in range(os_)],
                "oversample_omega": s.oversample_omega,
                "omega_applied_sr": _maybe(red["omega_applied"]),
                "rule": ("solid angle of the first subpixel, applied once to the pixel (C's cached value)"
                         if not s.oversample_omega else
                         "-oversample_omega: C multiplies the running sum by each subpixel's solid angle"
                         if sim.config.compat.oversample_running_product else
                         "-oversample_omega -fix_oversample: each term weighted by its subpixel's solid angle"),
                "point_pixel": s.point_pixel,
            }
        elif name == "intensity":
            values[name] = {
                "I_sum": float(red["I_sum"][0, 0]),
                "I_background": s.I_bg,
                "steps": s.steps,
                "steps_formula": "sources*mosaic_domains*phisteps*oversample^2",
                "r_e_sqr_m2": R_E_SQR,
                "fluence_photons_per_m2": s.fluence,
                "capture_fraction": _maybe(red["capture_applied"]),
                "polarization": _maybe(red["polar_applied"]),
                "omega_sr": _maybe(red["omega_applied"]),
                "oversample_thick": s.oversample_thick, "oversample_polar": s.oversample_polar,
                "oversample_omega": s.oversample_omega,
                "final_intensity": final,
                "formula": "r_e_sqr*fluence*I_sum/steps*capture_fraction*polarization*omega",
            }
        elif name == "geometry":
            values[name] = geometry
        elif name == "sensitivity":
            from .differentiable import pixel_sensitivity

            values[name] = pixel_sensitivity(sim, slow, fast)
    meta = {
        "oversample": s.oversample,
        "config": _config_block(sim),
        "device": str(sim.device),
        "dtype": str(sim.dtype).replace("torch.", ""),
        "timestamp_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "engine": f"torchbragg {__import__('torchbragg').__version__}",
    }
    return PixelTap(slow=slow, fast=fast, taps=taps, rows=records, final_intensity=final, values=values,
                    summary=summary, geometry=geometry, meta=meta)


def _maybe(t) -> float | None:
    return None if t is None else float(t[0, 0])


def _subpixel_record(r: dict) -> dict:
    return {
        "subpixel_index": [r["subS"], r["subF"]],
        "thick": r["thick"], "source": r["source"], "phi": r["phi"], "mosaic": r["mosaic"],
        "hkl_fractional": [r["h"], r["k"], r["l"]],
        "hkl_rounded": [r["h0"], r["k0"], r["l0"]],
        "F_cell": r["F_cell"], "F_latt": r["F_latt"],
        "out_of_bounds": r["out_of_bounds"], "lookup": r["lookup"], "skipped": r["skipped"],
    }


def _f_cell_stats(records: list[dict], hkl_info: dict) -> dict:
    used = [r for r in records if not r["skipped"]]
    counts = {name: 0 for name in LOOKUP_REASONS.values()}
    for r in used:
        counts[r["lookup"]] += 1
    F = np.array([r["F_cell"] for r in used]) if used else np.zeros(0)
    refl = sorted({(r["h0"], r["k0"], r["l0"]) for r in used})
    return {
        "evaluations": len(records),
        "evaluations_used": len(used),
        "counts": counts,
        "default_F_count": sum(v for k, v in counts.items() if k.startswith("default_F")),
        "F_cell_min": float(F.min()) if F.size else None,
        "F_cell_max": float(F.max()) if F.size else None,
        "F_cell_mean": float(F.mean()) if F.size else None,
        "reflections": [list(x) for x in refl],
        "default_F": hkl_info["default_F"],
    }


def _geometry(sim, res) -> dict:
    s = sim.setup
    pos = res["position"][0, 0, 0].reshape(-1, 3).double().mean(0).cpu().numpy()  # centre of layer 0
    air = float(np.linalg.norm(pos))
    d = pos / air
    inc = -s.source_dirs[0]
    lam_A = s.source_lambdas[0] * 1e10
    q = (d - inc) / lam_A
    cos2t = float(np.clip(d @ inc, -1.0, 1.0))
    two_theta = math.acos(cos2t)
    stol = 0.5 * float(np.linalg.norm(q))
    return {
        "position_m": [float(x) for x in pos],
        "airpath_m": air,
        "diffracted_unit": [float(x) for x in d],
        "scattering_vector_invA": [float(x) for x in q],
        "two_theta_deg": math.degrees(two_theta),
        "stol_invA": stol,
        "d_angstrom": (0.5 / stol) if stol > 0 else None,
        "wavelength_A": lam_A,
        "note": "pixel centre (mean of the subpixels of the first sensor layer) and the first source",
    }


def _config_block(sim) -> dict:
    s = sim.setup
    info = sim.hkl_info
    return {
        "args": list(sim.config.args or []),
        "convention": s.convention,
        "pivot": s.pivot,
        "hkl_source": {k: info[k] for k in ("kind", "source", "count", "describe", "warnings")},
        "hkl_bounds": info["bounds"],
        "default_F": info["default_F"],
        "interpolate": s.interpolate,
        "phi0_reuse": sim.config.compat.phi0_reuse,
        "oversample_factors": {"thick": s.oversample_thick, "polar": s.oversample_polar,
                               "omega": s.oversample_omega,
                               "running_product": sim.config.compat.oversample_running_product},
        "shape": [s.spixels, s.fpixels],
        "wavelength_A": s.lambda0 * 1e10,
        "N": list(s.N),
    }


def format_tap_table(tap: PixelTap) -> str:
    """A readable table of an ``hkl_subpixel`` tap (what ``bragg-tap`` prints).

    Parameters
    ----------
    tap : PixelTap
        The tapped pixel.

    Returns
    -------
    str
        A heading (pixel, value, 2θ in degrees, d in Å, summary) and one line per
        evaluation; the thickness, source, phi and mosaic columns appear only when any
        of them is non-zero.
    """
    multi = any(r["thick"] or r["source"] or r["phi"] or r["mosaic"] for r in tap.rows)
    head = ["subS", "subF"] + (["thick", "src", "phi", "mos"] if multi else []) + [
        "h", "k", "l", "h0", "k0", "l0", "F_cell", "F_latt", "lookup"]
    lines = [f"pixel (slow={tap.slow}, fast={tap.fast})  value {tap.final_intensity:.8g} photons"]
    g = tap.geometry
    if g.get("d_angstrom"):
        lines.append(f"  2theta {g['two_theta_deg']:.4f} deg   d {g['d_angstrom']:.4f} A")
    else:
        lines.append(f"  2theta {g['two_theta_deg']:.4f} deg   d inf")
    lines.append(f"  {tap.summary}")
    lines.append("  " + " ".join(f"{h:>12}" if h in ("h", "k", "l", "F_cell", "F_latt") else f"{h:>5}"
                                 if h != "lookup" else f"  {h}" for h in head))
    for r in tap.rows:
        cells = [f"{r['subS']:>5}", f"{r['subF']:>5}"]
        if multi:
            cells += [f"{r['thick']:>5}", f"{r['source']:>5}", f"{r['phi']:>5}", f"{r['mosaic']:>5}"]
        cells += [f"{r['h']:>12.6f}", f"{r['k']:>12.6f}", f"{r['l']:>12.6f}",
                  f"{r['h0']:>5d}", f"{r['k0']:>5d}", f"{r['l0']:>5d}",
                  f"{r['F_cell']:>12.6g}", f"{r['F_latt']:>12.6g}",
                  f"  {r['lookup']}{' (skipped)' if r['skipped'] else ''}"]
        lines.append("  " + " ".join(cells))
    sens = tap.values.get("sensitivity")
    if sens:
        lines.append("  sensitivity dI/dp (photons per unit; relative change for the step):")
        for r in sens["parameters"]:
            rel = f"{100 * r['relative_change']:+.3g}%" if r["relative_change"] is not None else "-"
            lines.append(f"    {r['family'] + ' ' + r['component']:<24} {r['value']:>14.6g} {r['unit']:<11}"
                         f"{r['dI_dp']:>14.5g}   step {r['step']:g}: {rel}")
        for r in sens["reflections"][:8]:
            lines.append(f"    F{tuple(r['hkl'])} = {r['F']:g}: dI/dF {r['dI_dF']:.5g}")
        for name, why in sens["not_differentiable"].items():
            lines.append(f"    {name}: not differentiable here ({why})")
    return "\n".join(lines)


def tap_filename(slow: int, fast: int, tap_id: str, tag: str | None = None) -> str:
    """``tap_<tap>_s<slow>_f<fast>[_<tag>].json``.

    Parameters
    ----------
    slow, fast : int
        Pixel indices along the slow and fast axes.
    tap_id : str
        The tap's name.
    tag : str, optional
        A suffix; characters other than letters, digits, ``-``, ``_`` and ``.`` become ``_``.

    Returns
    -------
    str
        The file name.
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag) if tag else None
    return f"tap_{tap_id}_s{slow}_f{fast}{'_' + safe if safe else ''}.json"


def write_tap_json(tap: PixelTap, folder, tag: str | None = None, tap_id: str = "hkl_subpixel") -> Path:
    """Write one tap document into ``folder`` without overwriting anything.

    An existing file of the same name is kept; the new one gets ``-2``, ``-3``
    ... before ``.json``. The write is atomic (no half-written JSON).

    Parameters
    ----------
    tap : PixelTap
        The tapped pixel.
    folder : str or os.PathLike
        Folder to write into (created with its parents when missing).
    tag : str, optional
        A suffix of the file name (see :func:`tap_filename`).
    tap_id : str
        Which computed tap to write.

    Returns
    -------
    pathlib.Path
        The file written.

    Raises
    ------
    TapError
        When ``tap_id`` was not computed for this pixel.
    ValueError
        When the document holds a NaN or infinite number (JSON cannot store it).
    """
    from .io.atomic_io import atomic_write_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = tap_filename(tap.slow, tap.fast, tap_id, tag)
    text = json.dumps(tap.to_json(tap_id), indent=1, allow_nan=False) + "\n"
    stem = name[:-5]
    n = 1
    while True:
        path = folder / (name if n == 1 else f"{stem}-{n}.json")
        try:
            return atomic_write_bytes(path, text.encode(), overwrite=False)
        except FileExistsError:
            n += 1
