"""Compare a rendered image with a reference (``torchbragg compare``).

Images are loaded with :func:`load_image`:

* ``.smv`` / ``.img``: SMV files (:func:`torchbragg.smv.read_smv`);
* ``.bin`` / ``.f32`` / ``.raw``: raw little-endian float32, no header, fast
  index fastest.  The shape comes from, in order: the ``shape`` argument
  (``--shape SLOW FAST``), a sidecar ``<file>.json`` holding
  ``{"shape": [slow, fast]}``, the reference image's shape (for the second
  image of a comparison), or the square root of the pixel count when it is a
  perfect square (reported as a guess).  Anything else is an error.

:func:`compare_images` computes the statistics, :func:`format_comparison`
prints them, and the golden-data acceptance criteria (correlation >= 0.9999,
``|sum_out/sum_ref - 1| <= 1e-3``, maximum pixel within 1e-3 relative) are
reported alongside.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .smv import SMVFormatError, read_smv

__all__ = [
    "ImageComparison",
    "compare_images",
    "format_comparison",
    "load_image",
    "load_image_info",
    "load_image_photons",
    "main_compare",
]

PathLike = Union[str, "os.PathLike[str]"]

SMV_SUFFIXES = (".smv", ".img")
RAW_SUFFIXES = (".bin", ".f32", ".raw")

#: Acceptance thresholds from the golden-data README.
MIN_CORRELATION = 0.9999
MAX_SUM_DEVIATION = 1e-3
MAX_PEAK_DEVIATION = 1e-3


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


@dataclass
class ImageComparison:
    """Statistics comparing ``out`` with the reference ``ref`` (float64).

    Attributes
    ----------
    shape : tuple of int
        ``(slow, fast)``.
    correlation : float
        Pearson correlation over all pixels (NaN if either image is flat or
        holds non-finite values).
    rmse : float
        Root-mean-square of ``out - ref``.
    sum_ref, sum_out : float
    sum_ratio : float
        ``sum_out / sum_ref``.
    max_abs_diff : float
        ``max |out - ref|``.
    max_ref, max_out : float
    max_rel_diff : float
        ``max_abs_diff / max |ref|``.
    worst : list of tuple
        Up to 10 ``(slow, fast, ref, out, diff)`` with the largest non-zero
        ``|diff|``, ``diff = out - ref``, largest first (ties: row-major
        order; NaN differences rank first).
    nonfinite_ref, nonfinite_out : int
        Pixels that are NaN or infinite.
    """

    shape: Tuple[int, int]
    correlation: float
    rmse: float
    sum_ref: float
    sum_out: float
    sum_ratio: float
    max_abs_diff: float
    max_ref: float
    max_out: float
    max_rel_diff: float
    worst: List[Tuple[int, int, float, float, float]] = field(default_factory=list)
    nonfinite_ref: int = 0
    nonfinite_out: int = 0

    def criteria(self) -> Dict[str, bool]:
        """The golden-data acceptance tests, each True when passed."""
        peak = self.max_out / self.max_ref - 1.0 if self.max_ref != 0 else math.inf
        return {
            "correlation": bool(self.correlation >= MIN_CORRELATION),
            "sum_ratio": bool(abs(self.sum_ratio - 1.0) <= MAX_SUM_DEVIATION),
            "max_pixel": bool(abs(peak) <= MAX_PEAK_DEVIATION),
        }

    def passes(self) -> bool:
        """True when every golden-data acceptance test passes."""
        return all(self.criteria().values())

    def to_dict(self) -> dict:
        """JSON-ready dictionary; non-finite numbers become None."""
        return {
            "shape": list(self.shape),
            "correlation": _finite_or_none(self.correlation),
            "rmse": _finite_or_none(self.rmse),
            "sum_ref": _finite_or_none(self.sum_ref),
            "sum_out": _finite_or_none(self.sum_out),
            "sum_ratio": _finite_or_none(self.sum_ratio),
            "max_abs_diff": _finite_or_none(self.max_abs_diff),
            "max_ref": _finite_or_none(self.max_ref),
            "max_out": _finite_or_none(self.max_out),
            "max_rel_diff": _finite_or_none(self.max_rel_diff),
            "worst": [
                {
                    "slow": s,
                    "fast": f,
                    "ref": _finite_or_none(r),
                    "out": _finite_or_none(o),
                    "diff": _finite_or_none(d),
                }
                for s, f, r, o, d in self.worst
            ],
            "nonfinite_ref": self.nonfinite_ref,
            "nonfinite_out": self.nonfinite_out,
            "criteria": self.criteria(),
            "passes": self.passes(),
        }


def _safe_ratio(num: float, den: float) -> float:
    if den != 0.0:
        return num / den
    return math.nan if num == 0.0 else math.copysign(math.inf, num)


def compare_images(ref: np.ndarray, out: np.ndarray, *, n_worst: int = 10) -> ImageComparison:
    """Compare two images of the same shape.

    Parameters
    ----------
    ref : numpy.ndarray
        The reference (e.g. the C program's image).
    out : numpy.ndarray
        The image under test.
    n_worst : int, optional
        How many worst pixels to list (10).

    Returns
    -------
    ImageComparison

    Raises
    ------
    ValueError
        The shapes differ or the images are empty.
    """
    r = np.asarray(ref, dtype=np.float64)
    o = np.asarray(out, dtype=np.float64)
    if r.shape != o.shape:
        raise ValueError(f"image shapes differ: reference {r.shape}, output {o.shape}")
    if r.size == 0:
        raise ValueError("images are empty")
    if r.ndim == 1:
        r = r.reshape(1, -1)
        o = o.reshape(1, -1)
    diff = o - r
    abs_diff = np.abs(diff)
    nonfinite_ref = int(np.count_nonzero(~np.isfinite(r)))
    nonfinite_out = int(np.count_nonzero(~np.isfinite(o)))

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        rc = r - r.mean()
        oc = o - o.mean()
        denom = math.sqrt(float(np.sum(rc * rc)) * float(np.sum(oc * oc)))
        correlation = float(np.sum(rc * oc)) / denom if denom > 0 else math.nan
        rmse = float(np.sqrt(np.mean(diff * diff)))
    sum_ref = float(r.sum())
    sum_out = float(o.sum())
    max_abs_diff = float(abs_diff.max())
    max_ref = float(r.max())
    max_out = float(o.max())
    max_rel_diff = _safe_ratio(max_abs_diff, float(np.abs(r).max()))

    flat = np.where(np.isnan(abs_diff), np.inf, abs_diff).ravel()
    k = min(n_worst, int(np.count_nonzero(flat)))  # identical pixels are not "worst"
    worst: List[Tuple[int, int, float, float, float]] = []
    if k > 0:
        idx = np.argpartition(-flat, k - 1)[:k]
        idx = idx[np.lexsort((idx, -flat[idx]))]
        for i in idx:
            s, f = np.unravel_index(int(i), r.shape)
            worst.append((int(s), int(f), float(r[s, f]), float(o[s, f]), float(diff[s, f])))

    return ImageComparison(
        shape=tuple(int(n) for n in r.shape),  # type: ignore[arg-type]
        correlation=correlation,
        rmse=rmse,
        sum_ref=sum_ref,
        sum_out=sum_out,
        sum_ratio=_safe_ratio(sum_out, sum_ref),
        max_abs_diff=max_abs_diff,
        max_ref=max_ref,
        max_out=max_out,
        max_rel_diff=max_rel_diff,
        worst=worst,
        nonfinite_ref=nonfinite_ref,
        nonfinite_out=nonfinite_out,
    )


def _sidecar_shape(path: Path) -> Optional[Tuple[int, int]]:
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.exists():
        return None
    try:
        meta = json.loads(sidecar.read_text())
        shape = meta["shape"]
        if len(shape) != 2:
            raise ValueError
        slow, fast = (int(n) for n in shape)
        if slow <= 0 or fast <= 0 or slow != shape[0] or fast != shape[1]:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"{sidecar}: expected JSON like {{\"shape\": [slow, fast]}} with positive integers"
        ) from None
    return slow, fast


def load_image_info(
    path: PathLike,
    shape: Optional[Sequence[int]] = None,
    *,
    fallback_shape: Optional[Sequence[int]] = None,
) -> Tuple[np.ndarray, str]:
    """Load an image and say where its shape came from.

    Parameters
    ----------
    path : str or os.PathLike
        ``.smv``/``.img`` (SMV) or ``.bin``/``.f32``/``.raw`` (raw float32).
    shape : (slow, fast), optional
        Shape of a raw file; ignored for SMV files except as a check.
    fallback_shape : (slow, fast), optional
        Tried after the sidecar and before the perfect-square guess (used for
        the second image of a comparison: the reference's shape).

    Returns
    -------
    image : numpy.ndarray
        2-D ``(slow, fast)``: the stored dtype (float32 for raw files).
    note : str
        How the shape was found, e.g. ``"SMV header"``, ``"--shape"``,
        ``"sidecar img.f32.json"``, ``"guessed square 512x512"``.

    Raises
    ------
    ValueError
        Unknown extension, a raw file whose size is not a whole number of
        float32 values or does not match the shape, no way to determine the
        shape, or an unreadable SMV file (message names the file).
    FileNotFoundError
        The file does not exist.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in SMV_SUFFIXES:
        _, image = read_smv(p)
        if shape is not None and tuple(image.shape) != tuple(int(n) for n in shape):
            raise ValueError(f"{p}: SMV image is {image.shape[0]}x{image.shape[1]}, not {shape[0]}x{shape[1]}")
        return image, "SMV header"
    if suffix not in RAW_SUFFIXES:
        raise ValueError(
            f"{p}: unknown image type {suffix or '(no extension)'!r}; expected "
            f"{', '.join(SMV_SUFFIXES + RAW_SUFFIXES)}"
        )
    size = p.stat().st_size
    if size % 4:
        raise ValueError(f"{p}: {size} bytes is not a whole number of float32 values")
    n = size // 4
    if n == 0:
        raise ValueError(f"{p}: empty file")
    if shape is not None:
        target = tuple(int(x) for x in shape)
        note = "--shape"
    else:
        target = _sidecar_shape(p)
        note = f"sidecar {p.name}.json"
        if target is None and fallback_shape is not None:
            fb = tuple(int(x) for x in fallback_shape)
            if fb[0] * fb[1] != n:
                raise ValueError(
                    f"{p}: {n} float32 values ({size} bytes) do not fit the reference "
                    f"image's {fb[0]}x{fb[1]} = {fb[0] * fb[1]} pixels"
                )
            target, note = fb, "reference image's shape"
        if target is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(
                    f"{p}: cannot tell the shape of {n} float32 values ({size} bytes): not a "
                    f"perfect square; give --shape SLOW FAST or a {p.name}.json sidecar"
                )
            target, note = (side, side), f"guessed square {side}x{side} from the file size"
    if len(target) != 2 or min(target) <= 0:
        raise ValueError(f"{p}: shape must be two positive integers, got {target}")
    if target[0] * target[1] != n:
        raise ValueError(
            f"{p}: {n} float32 values ({size} bytes) do not fit shape "
            f"{target[0]}x{target[1]} = {target[0] * target[1]} pixels ({note})"
        )
    image = np.fromfile(p, dtype="<f4").reshape(target).astype(np.float32, copy=False)
    return image, note


def load_image(path: PathLike, shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """Load an SMV or raw float32 image (see :func:`load_image_info`).

    Parameters
    ----------
    path : str or os.PathLike
    shape : (slow, fast), optional

    Returns
    -------
    numpy.ndarray
        2-D ``(slow, fast)``.
    """
    return load_image_info(path, shape)[0]


def _fmt(value: float) -> str:
    return f"{value:.7g}"


def format_comparison(cmp: ImageComparison, ref_name: str = "reference", out_name: str = "output") -> str:
    """Readable multi-line report of a comparison.

    Parameters
    ----------
    cmp : ImageComparison
    ref_name, out_name : str, optional
        Labels (file names) for the two images.

    Returns
    -------
    str
    """
    crit = cmp.criteria()

    def mark(ok: bool) -> str:
        return "ok" if ok else "FAIL"

    peak = _safe_ratio(cmp.max_out, cmp.max_ref) - 1.0
    lines = [
        f"compare {out_name} against {ref_name}: {cmp.shape[0]}x{cmp.shape[1]} (slow x fast)",
        f"  correlation   {cmp.correlation:.8f}   [{mark(crit['correlation'])}: >= {MIN_CORRELATION}]",
        f"  sum           ref {_fmt(cmp.sum_ref)}  out {_fmt(cmp.sum_out)}  ratio {cmp.sum_ratio:.8f}"
        f"   [{mark(crit['sum_ratio'])}: within {MAX_SUM_DEVIATION:g}]",
        f"  max pixel     ref {_fmt(cmp.max_ref)}  out {_fmt(cmp.max_out)}  rel {peak:+.3e}"
        f"   [{mark(crit['max_pixel'])}: within {MAX_PEAK_DEVIATION:g}]",
        f"  rmse          {_fmt(cmp.rmse)}",
        f"  max |diff|    {_fmt(cmp.max_abs_diff)}  ({cmp.max_rel_diff:.3e} of max |ref|)",
    ]
    if cmp.nonfinite_ref or cmp.nonfinite_out:
        lines.append(f"  non-finite    ref {cmp.nonfinite_ref}  out {cmp.nonfinite_out}")
    lines.append(f"  overall       {'PASS' if cmp.passes() else 'FAIL'}")
    if cmp.worst:
        lines.append("  worst pixels (slow, fast): ref -> out (diff)")
        for s, f, r, o, d in cmp.worst:
            lines.append(f"    ({s:5d}, {f:5d}): {_fmt(r)} -> {_fmt(o)} ({d:+.4g})")
    return "\n".join(lines)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def main_compare(argv: Optional[Sequence[str]] = None) -> int:
    """Command line ``torchbragg compare REF OUT [--shape S F] [--json]``.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after ``compare`` (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 after printing the report (whether or not the images agree);
        2 for bad input, with a one-line error on stderr.
    """
    parser = _Parser(
        prog="torchbragg compare",
        description="Compare an image with a reference image (SMV or raw float32).",
    )
    parser.add_argument("ref", help="reference image (.smv/.img or raw float32 .bin/.f32/.raw)")
    parser.add_argument("out", help="image to check, same kinds")
    parser.add_argument(
        "--shape", nargs=2, type=int, metavar=("SLOW", "FAST"),
        help="shape of raw float32 images (default: sidecar <file>.json, the other image, or a square)",
    )
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    parser.add_argument("--smv-scale", type=float,
                        help="SMV counts per photon (default: header, else the log beside it)")
    parser.add_argument("--smv-adc", type=float, help="SMV ADC offset (default: header, else 40)")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except _UsageError as exc:
        print(f"torchbragg compare: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        if args.shape is not None and min(args.shape) <= 0:
            raise ValueError(f"--shape needs two positive integers, got {args.shape[0]} {args.shape[1]}")
        ref, ref_info = load_image_photons(args.ref, args.shape, scale=args.smv_scale, adc=args.smv_adc)
        out, out_info = load_image_photons(args.out, args.shape, fallback_shape=ref.shape, scale=args.smv_scale,
                                           adc=args.smv_adc)
        ref_note, out_note = ref_info["shape_from"], out_info["shape_from"]
        for info in (ref_info, out_info):
            if info["converted"]:
                print(f"note: {info['note']}", file=sys.stderr)
            if info["warning"]:
                print(f"WARNING: {info['warning']}", file=sys.stderr)
        if ref.shape != out.shape:
            raise ValueError(
                f"{args.out}: image is {out.shape[0]}x{out.shape[1]} but reference {args.ref} is "
                f"{ref.shape[0]}x{ref.shape[1]}"
            )
        cmp = compare_images(ref, out)
    except (OSError, ValueError, SMVFormatError) as exc:
        message = str(exc) if not isinstance(exc, OSError) or not exc.filename else (
            f"{exc.filename}: {exc.strerror}"
        )
        print(f"torchbragg compare: error: {message}", file=sys.stderr)
        return 2
    if args.json:
        data = cmp.to_dict()
        data["ref"] = {"path": str(args.ref), "shape_from": ref_note}
        data["out"] = {"path": str(args.out), "shape_from": out_note}
        print(json.dumps(data, indent=2))
    else:
        for name, note in ((args.ref, ref_note), (args.out, out_note)):
            if note.startswith("guessed"):
                print(f"note: {name}: {note}")
        print(format_comparison(cmp, str(args.ref), str(args.out)))
    return 0


def _log_scale(path: Path) -> Tuple[Optional[float], str]:
    """Scale of an SMV image from the nanoBragg/torchbragg log saved beside it (``log.txt``, ``<name>.log``)."""
    import re

    for log in (path.with_name(path.name + ".log"), path.with_suffix(".log"), path.with_name("log.txt")):
        if not log.is_file():
            continue
        prev = ""
        for line in log.read_text(errors="replace").splitlines():
            line = line.strip()
            if line == f"writing {path.name} as 2-byte integers":
                m = re.match(r"intfile_scale = (\S+)$", prev)
                if m:
                    return float(m.group(1)), f"intfile_scale from {log.name}"
                if re.match(r"\S+ photons on noise image", prev):
                    return 1.0, f"noise image (scale 1) per {log.name}"
            if line:
                prev = line
    return None, ""


def load_image_photons(path: PathLike, shape: Optional[Sequence[int]] = None, *, scale: Optional[float] = None,
                       adc: Optional[float] = None, fallback_shape: Optional[Sequence[int]] = None
                       ) -> Tuple[np.ndarray, dict]:
    """Load an image in photons: SMV counts become ``(count - adc) / scale``.

    nanoBragg writes ``count = photons * scale + adc`` and puts neither number in
    the header.  The scale comes from ``scale``, a header key ``SCALE`` /
    ``INTFILE_SCALE``, or the program's log beside the file (``log.txt`` or
    ``<file>.log``: the ``intfile_scale = X`` line before ``writing <file>``); the
    ADC offset from ``adc``, a header key ``ADC_OFFSET``/``ADC``, else nanoBragg's
    default 40.  Count 0 (outside ``-roi``) is 0 photons.

    Returns
    -------
    image : numpy.ndarray
        float64 ``[slow, fast]`` (raw float images unchanged, as float64).
    info : dict
        ``converted`` (bool), ``scale``, ``adc``, ``note`` (how), ``warning``
        (a sentence naming the file when the counts were NOT converted, else None),
        ``shape_from``.
    """
    p = Path(path)
    image, shape_note = load_image_info(p, shape, fallback_shape=fallback_shape)
    info = {"converted": False, "scale": None, "adc": None, "note": "float image (photons)", "warning": None,
            "shape_from": shape_note}
    if p.suffix.lower() not in SMV_SUFFIXES:
        return image.astype(np.float64), info
    from .smv import read_smv_header

    header = {k.upper(): v for k, v in read_smv_header(p).items()}
    how = []
    if scale is None:
        for key in ("SCALE", "INTFILE_SCALE"):
            if key in header:
                scale, src = float(header[key]), f"header {key}"
                break
        else:
            scale, src = _log_scale(p)
        how.append(src)
    else:
        how.append("scale given")
    if adc is None:
        for key in ("ADC_OFFSET", "ADC"):
            if key in header:
                adc = float(header[key])
                how.append(f"ADC from header {key}")
                break
        else:
            adc = 40.0
            how.append("ADC 40 (nanoBragg default)")
    counts = image.astype(np.float64)
    if scale is None or not scale > 0:
        info["warning"] = (f"{p}: SMV counts NOT converted to photons: no scale in the header or a log beside "
                           f"it (give --smv-scale); sums and maxima are in raw counts")
        info["note"] = "raw SMV counts"
        return counts, info
    photons = np.where(counts == 0, 0.0, (counts - adc) / scale)
    info.update(converted=True, scale=float(scale), adc=float(adc), note="photons = (count - adc) / scale: "
                + ", ".join(how))
    if np.any((counts > 0) & (counts < adc)):
        info["warning"] = f"{p}: counts below the ADC offset {adc:g}: the offset is probably wrong (give --smv-adc)"
    return photons, info
