"""Compare a rendered image with a reference (``torchbragg compare``).

Images are loaded with :mod:`torchbragg.io.images` (SMV and raw float32);
:func:`compare_images` computes the statistics, :func:`format_comparison`
prints them, and the golden-data acceptance criteria (correlation >= 0.9999,
``|sum_out/sum_ref - 1| <= 1e-3``, maximum pixel within 1e-3 relative) are
reported alongside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ImageComparison", "compare_images", "format_comparison"]

#: Acceptance thresholds from the golden-data README.
MIN_CORRELATION = 0.9999
MAX_SUM_DEVIATION = 1e-3
MAX_PEAK_DEVIATION = 1e-3


def _finite_or_none(value: float) -> float | None:
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
        Sum of all pixels of the reference and of the output.
    sum_ratio : float
        ``sum_out / sum_ref``.
    max_abs_diff : float
        ``max |out - ref|``.
    max_ref, max_out : float
        Largest pixel value of the reference and of the output.
    max_rel_diff : float
        ``max_abs_diff / max |ref|``.
    worst : list of tuple
        Up to ``n_worst`` (10) ``(slow, fast, ref, out, diff)`` with the largest non-zero
        ``|diff|``, ``diff = out - ref``, largest first (ties: row-major
        order; NaN differences rank first).
    nonfinite_ref, nonfinite_out : int
        Pixels that are NaN or infinite.
    """

    shape: tuple[int, int]
    correlation: float
    rmse: float
    sum_ref: float
    sum_out: float
    sum_ratio: float
    max_abs_diff: float
    max_ref: float
    max_out: float
    max_rel_diff: float
    worst: list[tuple[int, int, float, float, float]] = field(default_factory=list)
    nonfinite_ref: int = 0
    nonfinite_out: int = 0

    def criteria(self) -> dict[str, bool]:
        """The golden-data acceptance tests, each True when passed.

        Returns
        -------
        dict of str to bool
            ``correlation`` (at least ``MIN_CORRELATION``), ``sum_ratio`` (within
            ``MAX_SUM_DEVIATION`` of 1) and ``max_pixel`` (``max_out / max_ref`` within
            ``MAX_PEAK_DEVIATION`` of 1).
        """
        peak = self.max_out / self.max_ref - 1.0 if self.max_ref != 0 else math.inf
        return {
            "correlation": bool(self.correlation >= MIN_CORRELATION),
            "sum_ratio": bool(abs(self.sum_ratio - 1.0) <= MAX_SUM_DEVIATION),
            "max_pixel": bool(abs(peak) <= MAX_PEAK_DEVIATION),
        }

    def passes(self) -> bool:
        """True when every golden-data acceptance test passes.

        Returns
        -------
        bool
            Whether every entry of :meth:`criteria` is True.
        """
        return all(self.criteria().values())

    def to_dict(self) -> dict:
        """JSON-ready dictionary; non-finite numbers become None.

        Returns
        -------
        dict
            Every attribute (``worst`` as a list of dicts with ``slow``, ``fast``, ``ref``,
            ``out``, ``diff``), plus ``criteria`` and ``passes``.
        """
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
        The statistics; a 1-D pair of images is treated as one row.

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
    worst: list[tuple[int, int, float, float, float]] = []
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


def _fmt(value: float) -> str:
    return f"{value:.7g}"


def format_comparison(cmp: ImageComparison, ref_name: str = "reference", out_name: str = "output") -> str:
    """Readable multi-line report of a comparison.

    Parameters
    ----------
    cmp : ImageComparison
        The comparison to report.
    ref_name, out_name : str, optional
        Labels (file names) for the two images.

    Returns
    -------
    str
        The report: one line per statistic with each acceptance test's verdict, the
        overall verdict and the worst pixels.
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


