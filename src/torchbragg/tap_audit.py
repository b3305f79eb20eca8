"""The HKL audit of an evidence bundle: ``comparison/tap5_hkl_audit.md``.

For every ``hkl_subpixel`` tap in ``<bundle>/py_taps/`` the audit lists the
subpixel table, the fallback reasons, the structure-factor source and bounds and
the nearest-neighbour rule (quoted from ``specs/engine.md``); given the C
program's taps (the format of ``shared/golden/taps/c_subpixel_taps.json``) it
adds a side-by-side comparison that names every mismatch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["write_audit", "compare_with_c", "nearest_neighbour_rule", "AUDIT_NAME", "load_c_taps", "AuditError"]

AUDIT_NAME = "tap5_hkl_audit.md"
HKL_TOL = 1e-6
INTENSITY_RTOL = 1e-4
_RULE_START = "<!-- rule:nearest-neighbour -->"
_RULE_END = "<!-- /rule:nearest-neighbour -->"


def nearest_neighbour_rule() -> tuple[str, str]:
    """The nearest-neighbour lookup rule as written in ``specs/engine.md`` and where it was read.

    ``specs/engine.md`` is looked for in the repository holding this package, then in the
    current folder; the rule is the text between its ``rule:nearest-neighbour`` markers.

    Returns
    -------
    rule : str
        The rule's text, stripped of surrounding white space.
    source : str
        Path of the ``engine.md`` it was read from.

    Raises
    ------
    FileNotFoundError
        When no ``specs/engine.md`` with the markers is found.
    """
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        spec = base / "specs" / "engine.md"
        if spec.exists():
            text = spec.read_text(encoding="utf-8")
            if _RULE_START in text and _RULE_END in text:
                return text.split(_RULE_START, 1)[1].split(_RULE_END, 1)[0].strip(), str(spec)
    raise FileNotFoundError("specs/engine.md with the nearest-neighbour rule was not found; run the audit from the "
                            "repository root")


def _norm_args(args) -> list[str]:
    out = []
    for a in args:
        try:
            out.append(repr(float(a)))
        except ValueError:
            out.append(str(a))
    return out


def load_c_taps(path) -> dict:
    """Read a C taps file (``configs → args, pixels[pixel_slow_fast, pixel_value, rows]``).

    Parameters
    ----------
    path : str or os.PathLike
        The JSON file (the format of ``c_subpixel_taps.json``).

    Returns
    -------
    dict
        The parsed document; only the presence of its ``configs`` key is checked.

    Raises
    ------
    AuditError
        When the file is not valid JSON or has no ``configs`` key.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AuditError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
    if not isinstance(data, dict) or "configs" not in data:
        raise AuditError(f"{path}: no 'configs' key; expected the format of c_subpixel_taps.json")
    return data


def _find_c_pixel(c_taps: dict, args, pixel) -> tuple[str, dict] | None:
    want = _norm_args(args)
    for name, cfg in c_taps["configs"].items():
        if _norm_args(cfg["args"]) != want:
            continue
        for px in cfg["pixels"]:
            if list(px["pixel_slow_fast"]) == list(pixel):
                return name, px
    return None


class AuditError(ValueError):
    """An input of the audit (bundle, tap JSON, C taps) that cannot be audited; names file and field."""


def nonfinite_fields(value, where: str = "") -> list[str]:
    """Paths of every NaN or infinite number in a JSON value (Python's json reads NaN/Infinity)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [] if math.isfinite(value) else [f"{where or '<document>'} = {value}"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in nonfinite_fields(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in nonfinite_fields(v, f"{where}[{i}]")]
    return []


def compare_with_c(doc: dict, c_pixel: dict) -> list[str]:
    """Every mismatch between one engine tap document and the C rows of the same pixel.

    Fractional indices must agree within ``HKL_TOL``, rounded indices, ``F_cell`` and the
    out-of-bounds flag exactly, ``F_latt`` within 1e-6 (relative above 1) and the final
    intensity within ``INTENSITY_RTOL`` relative; NaN or infinite numbers are mismatches.

    Parameters
    ----------
    doc : dict
        One engine ``hkl_subpixel`` tap document (as written by :func:`torchbragg.taps.write_tap_json`).
    c_pixel : dict
        The C taps entry of the same pixel (``pixel_slow_fast``, ``pixel_value``, ``rows``).

    Returns
    -------
    list of str
        One message per mismatch; empty when everything agrees.
    """
    problems = [f"engine tap has a non-finite number: {p}" for p in nonfinite_fields(doc)]
    problems += [f"C taps have a non-finite number: {p}" for p in nonfinite_fields(c_pixel)]
    ours = doc["values"]["subpixels"]
    rows = c_pixel["rows"]
    if len(ours) != len(rows):
        problems.append(f"row count: engine {len(ours)}, C {len(rows)}")
    for o, c in zip(ours, rows, strict=False):  # a row-count mismatch is reported above
        where = (f"thick {c['thick']} subS {c['subS']} subF {c['subF']} source {c['source']} "
                 f"phi {c['phi']} mosaic {c['mos']}")
        key = [o["thick"], *o["subpixel_index"], o["source"], o["phi"], o["mosaic"]]
        if key != [c["thick"], c["subS"], c["subF"], c["source"], c["phi"], c["mos"]]:
            problems.append(f"{where}: loop indices differ (engine {key})")
            continue
        for i, name in enumerate("hkl"):
            d = abs(o["hkl_fractional"][i] - c[name])
            if not d <= HKL_TOL:  # NaN compares false: a NaN is a mismatch, never a pass
                problems.append(f"{where}: {name} engine {o['hkl_fractional'][i]:.9g} C {c[name]:.9g} "
                                f"(|diff| {d:.2e} > {HKL_TOL:g})")
        if list(o["hkl_rounded"]) != [c["h0"], c["k0"], c["l0"]]:
            problems.append(f"{where}: (h0,k0,l0) engine {tuple(o['hkl_rounded'])} C {(c['h0'], c['k0'], c['l0'])}")
        if o["F_cell"] != c["F_cell"]:
            problems.append(f"{where}: F_cell engine {o['F_cell']:.9g} C {c['F_cell']:.9g}")
        if bool(o["out_of_bounds"]) != bool(c["oob"]):
            problems.append(f"{where}: out_of_bounds engine {o['out_of_bounds']} C {bool(c['oob'])}")
        if not abs(o["F_latt"] - c["F_latt"]) <= 1e-6 * max(1.0, abs(c["F_latt"])):
            problems.append(f"{where}: F_latt engine {o['F_latt']:.9g} C {c['F_latt']:.9g}")
    ref = c_pixel["pixel_value"]
    rel = abs(doc["final_intensity"] - ref) / abs(ref) if ref else abs(doc["final_intensity"])
    if not rel <= INTENSITY_RTOL:
        problems.append(f"final intensity engine {doc['final_intensity']:.9g} C {ref:.9g} "
                        f"(relative {rel:.2e} > {INTENSITY_RTOL:g})")
    return problems


def _conclusion(doc: dict) -> str:
    sub = doc["values"]["subpixels"]
    cfg = doc["config"]
    n = sum(1 for r in sub if not r.get("skipped"))
    fb = [r for r in sub if r["lookup"].startswith("default_F") and not r.get("skipped")]
    s, f = doc["pixel_coords"]
    refl = sorted({tuple(r["hkl_rounded"]) for r in sub})
    refl_text = ", ".join(f"({h},{k},{l})" for h, k, l in refl[:6]) + (" …" if len(refl) > 6 else "")
    if not fb:
        return (f"Pixel ({s}, {f}) does not use default_F: all {n} evaluations took F_cell from the table "
                f"({cfg['hkl_source']['describe']}); nearest reflections {refl_text}.")
    reasons = sorted({r["lookup"] for r in fb})
    why = {
        "default_F:no_table": f"no HKL table is loaded (the arguments give only -default_F {cfg['default_F']:g}), "
                              "so every lookup returns default_F — C counts this as out of bounds (oob = 1)",
        "default_F:outside_table": f"the rounded indices {refl_text} lie outside the table's box {cfg['hkl_bounds']}",
        "default_F:unlisted": "the rounded indices lie inside the table's box but are not listed in the file, and C "
                              "pre-fills the box with default_F",
    }
    return (f"Pixel ({s}, {f}) uses default_F = {cfg['default_F']:g} in {len(fb)} of {n} evaluations "
            f"(F_cell = {fb[0]['F_cell']:g}): " + "; ".join(why[r] for r in reasons) + ". Its nearest "
            f"reflections are {refl_text}; the pixel holds {doc['final_intensity']:.8g} photons.")


def write_audit(bundle, c_taps_path=None) -> Path:
    """Write ``<bundle>/comparison/tap5_hkl_audit.md`` (never overwriting; a rerun gets ``-2``).

    Parameters
    ----------
    bundle : str or os.PathLike
        An evidence bundle (see :mod:`torchbragg.report_bundle`) whose ``py_taps/`` holds
        at least one ``hkl_subpixel`` tap JSON.
    c_taps_path : str or os.PathLike, optional
        A C taps file to compare with (see :func:`load_c_taps`); no comparison when omitted.

    Returns
    -------
    pathlib.Path
        The audit file written.

    Raises
    ------
    AuditError
        For a folder that is not a bundle, a bundle without ``hkl_subpixel`` taps, or a
        tap or C taps file that is malformed.
    """
    from .report_bundle import is_bundle

    bundle = Path(bundle)
    if not is_bundle(bundle):
        raise AuditError(f"{bundle}: not an evidence bundle (no py_taps/ and comparison/ folders)")
    docs = []
    for path in sorted((bundle / "py_taps").glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise AuditError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
        if doc.get("tap_id") == "hkl_subpixel":
            docs.append((path, doc))
    if not docs:
        raise AuditError(f"{bundle}/py_taps: no hkl_subpixel tap JSON to audit")
    c_taps = load_c_taps(c_taps_path) if c_taps_path else None
    rule, rule_src = nearest_neighbour_rule()

    out = ["# HKL audit (tap 5): which structure factor each subpixel used", ""]
    out.append(f"Bundle: `{bundle}`  ")
    out.append(f"C taps: `{c_taps_path}`" if c_taps_path else "C taps: none given")
    out += ["", f"## Nearest-neighbour rule (quoted from `{Path(rule_src).name}`)", ""]
    out += ["> " + line if line else ">" for line in rule.splitlines()]
    total_problems = 0
    for path, doc in docs:
        try:
            chunk, n_problems = _audit_one(path, doc, c_taps)
        except _CTapsShapeError as err:
            raise AuditError(f"{c_taps_path}: malformed C taps for {path.name}: {err}") from None
        except (KeyError, TypeError, IndexError, AttributeError, ValueError, OverflowError) as err:
            raise AuditError(f"{path}: malformed tap JSON: {_shape_message(err)}") from None
        out += chunk
        total_problems += n_problems
    return _finish(bundle, docs, c_taps, total_problems, out)


class _CTapsShapeError(AuditError):
    """A C taps entry that lacks a field or has one of the wrong type."""


def _as_flag(row, key: str) -> int:
    """A 0/1 field of a tap row (a bool, or a number equal to 0 or 1), as an int."""
    v = row[key]
    if isinstance(v, bool) or (isinstance(v, (int, float)) and v in (0, 1)):
        return int(v)
    raise ValueError(f"field {key!r} is {v!r}, expected true/false")


def _shape_message(err: BaseException) -> str:
    if isinstance(err, KeyError):
        return f"missing field {err.args[0]!r}"
    return f"a field of the wrong type or shape ({err})"


def _audit_one(path, doc, c_taps):
    """The report lines of one tap document and its mismatch count."""
    out: list[str] = []
    total_problems = 0
    if not isinstance(doc, dict):
        raise TypeError("the document is not a JSON object")
    s, f = doc["pixel_coords"]
    cfg = doc["config"]
    src = cfg["hkl_source"]
    out += ["", f"## Pixel (slow {s}, fast {f}) — `{path.name}`", ""]
    out.append(f"- arguments: `{' '.join(cfg['args'])}`")
    out.append(f"- structure factors: {src.get('describe', src['kind'])}; bounds {cfg['hkl_bounds']}; "
               f"default_F {cfg['default_F']:g}; kind {src['kind']}")
    for w in src.get("warnings", []):
        out.append(f"- warning: {w}")
    out.append(f"- oversample {doc['oversample']}, dtype {doc['dtype']}, device {doc['device']}, "
               f"final intensity {doc['final_intensity']:.9g} photons")
    counts = {}
    for r in doc["values"]["subpixels"]:
        counts[r["lookup"]] = counts.get(r["lookup"], 0) + 1
    out.append("- lookup reasons: " + ", ".join(f"{k} × {v}" for k, v in sorted(counts.items())))
    out += ["", "| subS | subF | thick | src | phi | mos | h | k | l | h0 | k0 | l0 "
                "| F_cell | F_latt | oob | lookup |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:--:|:--|"]
    for r in doc["values"]["subpixels"]:
        h, k, l = r["hkl_fractional"]
        h0, k0, l0 = r["hkl_rounded"]
        out.append(f"| {r['subpixel_index'][0]} | {r['subpixel_index'][1]} | {r['thick']} | {r['source']} | "
                   f"{r['phi']} | {r['mosaic']} | {h:.9g} | {k:.9g} | {l:.9g} | {h0} | {k0} | {l0} | "
                   f"{r['F_cell']:.6g} | {r['F_latt']:.9g} | {_as_flag(r, 'out_of_bounds')} | {r['lookup']} |")
    out += ["", "**Finding.** " + _conclusion(doc)]
    bad = nonfinite_fields(doc)
    if bad and c_taps is None:  # with C taps, compare_with_c counts them
        total_problems += len(bad)
        out += ["", f"**{len(bad)} non-finite number(s) in the tap** (a mismatch, whatever C says):"]
        out += [f"- {p}" for p in bad[:20]]
    if c_taps is not None:
        try:
            hit = _find_c_pixel(c_taps, cfg["args"], [s, f])
        except (KeyError, TypeError, IndexError, AttributeError) as err:
            raise _CTapsShapeError(_shape_message(err)) from None
        out.append("")
        if hit is None:
            out.append("C comparison: no C rows for these arguments and this pixel in the C taps file.")
        else:
            name, cpx = hit
            try:
                problems = compare_with_c(doc, cpx)
            except (KeyError, TypeError, IndexError, AttributeError) as err:
                raise _CTapsShapeError(_shape_message(err)) from None
            total_problems += len(problems)
            out += [f"### Side by side with C (config `{name}`)", "",
                    "| subS | subF | h engine | h C | k engine | k C | l engine | l C "
                    "| (h0,k0,l0) engine / C | F_cell engine / C | oob engine / C |",
                    "|---:|---:|---:|---:|---:|---:|---:|---:|:--|:--|:--|"]
            for o, c in zip(doc["values"]["subpixels"], cpx["rows"], strict=False):
                out.append(f"| {c['subS']} | {c['subF']} | {o['hkl_fractional'][0]:.9g} | {c['h']:.9g} | "
                           f"{o['hkl_fractional'][1]:.9g} | {c['k']:.9g} | {o['hkl_fractional'][2]:.9g} | "
                           f"{c['l']:.9g} | {tuple(o['hkl_rounded'])} / {(c['h0'], c['k0'], c['l0'])} | "
                           f"{o['F_cell']:g} / {c['F_cell']:g} | {_as_flag(o, 'out_of_bounds')} / {c['oob']} |")
            out.append("")
            out.append(f"Pixel value: engine {doc['final_intensity']:.9g}, C {cpx['pixel_value']:.9g}.")
            if problems:
                out.append(f"**{len(problems)} mismatch(es):**")
                out += [f"- {p}" for p in problems]
            else:
                out.append(f"**No mismatch**: h,k,l within {HKL_TOL:g}, identical (h0,k0,l0), F_cell and "
                           f"out_of_bounds, F_latt within 1e-6, final intensity within "
                           f"{INTENSITY_RTOL:g} relative.")
    return out, total_problems


def _finish(bundle, docs, c_taps, total_problems, out):
    from .io.atomic_io import atomic_write_bytes

    out += ["", "## Summary", ""]
    out.append(f"{len(docs)} pixel(s) audited" + (f"; {total_problems} mismatch(es) against C." if c_taps else
                                                  f"; {total_problems} non-finite number(s)." if total_problems
                                                  else "."))
    text = "\n".join(out) + "\n"
    comp = bundle / "comparison"
    n = 1
    while True:
        path = comp / (AUDIT_NAME if n == 1 else AUDIT_NAME.replace(".md", f"-{n}.md"))
        try:
            return atomic_write_bytes(path, text.encode("utf-8"), overwrite=False)
        except FileExistsError:
            n += 1
