"""Per-row image statistics of the compiled kernels, and the whole image's from them.

The compiled kernels return, for every rendered row, the count, sum and sum of
squares of its pixels, their squared deviations, the first maximum and the
solid angle (:data:`ROW_STATS`); :func:`combine_row_statistics` turns those
into C's image statistics without a second pass over the image, and
:func:`row_statistics` computes the same columns for rows rendered another way.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["ROW_STATS", "row_statistics", "combine_row_statistics"]

#: columns of the per-row statistics the fused kernel returns (values rounded to float32 like C's float
#: image; ``m2`` is over every ROI pixel of the row, masked ones as 0, about the row's ROI mean)
ROW_STATS = ("count", "sum", "sumsq", "m2", "max", "argmax", "omega", "roi_count")


def row_statistics(values: torch.Tensor, active: torch.Tensor | None = None,
                   omega: torch.Tensor | None = None) -> np.ndarray:
    """The fused kernel's ``[rows, 8]`` row statistics for ROI rows rendered another way.

    ``values`` are the rows' ROI pixels as rendered (0 where masked), ``active``
    which of them are rendered (broadcast to ``values``; None: all of them), ``omega``
    each row's solid-angle sum. The reductions run on the values' device; only the
    ``[rows, 8]`` result moves.

    Parameters
    ----------
    values : torch.Tensor
        ``[rows, ROI columns]`` pixel values, photons; rounded to float32 first, like C's float image.
    active : torch.Tensor or None, optional
        Bool, broadcastable to ``values``: the rendered pixels (None: every pixel).
    omega : torch.Tensor or None, optional
        ``[rows]`` sum of the solid angles of each row's rendered pixels, steradians (None: 0).

    Returns
    -------
    numpy.ndarray
        float64 ``[rows, 8]`` with the columns of :data:`ROW_STATS`; ``argmax`` is the column within the
        row (``-1`` and ``max`` of ``-inf`` for a row with no rendered pixel).
    """
    v = values.detach().to(torch.float32).to(torch.float64)
    nroi = torch.full(v.shape[:-1], float(v.shape[-1]), dtype=torch.float64, device=v.device)
    if v.shape[-1] == 0:
        zero = torch.zeros_like(nroi)
        mx, am = torch.full_like(nroi, -math.inf), torch.full_like(nroi, -1.0)
        cnt, s, sq, m2 = zero, zero, zero, zero
    elif active is None:  # every pixel rendered: one pass for mean and variance, one for the maximum
        var, mean = torch.var_mean(v, dim=-1, correction=0)
        cnt = nroi
        s = mean * nroi
        m2 = var * nroi
        sq = m2 + s * mean  # sum v^2 = n var + n mean^2 (both terms >= 0: no cancellation)
        mx, am = v.max(-1)
        am = am.to(torch.float64)
    else:
        act = active.to(v.device).expand_as(v)
        cnt = act.sum(-1).to(torch.float64)
        z = torch.where(act, v, torch.zeros((), dtype=torch.float64, device=v.device))
        s = z.sum(-1)
        sq = (z * z).sum(-1)
        d = z - (s / nroi)[:, None]
        m2 = (d * d).sum(-1)
        masked = torch.where(act, v, torch.full((), -math.inf, dtype=torch.float64, device=v.device))
        mx, am = masked.max(-1)
        am = torch.where(torch.isfinite(mx), am.to(torch.float64), torch.full_like(s, -1.0))
    om = torch.zeros_like(s) if omega is None else omega.detach().to(v.device, torch.float64)
    return torch.stack([cnt, s, sq, m2, mx, am, om, nroi], -1).cpu().numpy()


def combine_row_statistics(stats: np.ndarray, row_index: np.ndarray, col0: int):
    """Whole-image statistics from row statistics (Chan's pairwise variance).

    Returns ``(n, mean, rms, rmsd, max_I, (slow, fast) of the first maximum, omega_sum)``
    with the conventions of :meth:`Simulation._stats`: mean and rms over the
    rendered pixels, rmsd about that mean over every ROI pixel (masked ones 0).

    Parameters
    ----------
    stats : numpy.ndarray
        ``[rows, 8]`` row statistics (columns of :data:`ROW_STATS`), from the compiled kernels or
        :func:`row_statistics`, in any row order.
    row_index : numpy.ndarray
        ``[rows]`` the detector row (slow index) of each row of ``stats``.
    col0 : int
        The first column of the rows, added to each row's ``argmax`` for the fast index.

    Returns
    -------
    n : int
        Rendered pixels.
    mean : float
        Mean pixel value over the rendered pixels, photons.
    rms : float
        ``sqrt(sum of squares / (n - 1))`` over the rendered pixels.
    rmsd : float
        ``sqrt(sum of squared deviations / (ROI pixels - 1))``, the deviations about ``mean`` taken over
        every ROI pixel (masked ones as 0).
    max_I : float
        The largest rendered pixel value.
    where : tuple of int
        ``(slow, fast)`` of the first pixel holding ``max_I`` in row-major order.
    omega_sum : float
        Sum of the solid angles of the rendered pixels, steradians.
    """
    cnt, s, sq, m2, mx, am, om, nroi = (stats[:, j] for j in range(len(ROW_STATS)))
    n = int(cnt.sum())
    omega_sum = float(om.sum())
    if n == 0:
        return 0, 0.0, 0.0, 0.0, 0.0, (0, 0), omega_sum
    with np.errstate(invalid="ignore", over="ignore"):  # an image beyond the dtype: NaN/inf statistics, no warning
        mean = float(s.sum()) / n
        rows = nroi > 0
        roi_mean = np.where(rows, s / np.where(rows, nroi, 1.0), 0.0)
        M2 = float((m2 + nroi * (roi_mean - mean) ** 2)[rows].sum())
        rms = math.sqrt(float(sq.sum()) / max(1, n - 1)) if math.isfinite(float(sq.sum())) else math.inf
        rmsd = math.sqrt(M2 / max(1, int(nroi.sum()) - 1)) if M2 >= 0 else math.nan
    has = cnt > 0
    order = np.argsort(row_index, kind="stable")
    mx_o = np.where(has, mx, -np.inf)[order]
    j = int(np.argmax(mx_o))  # first row holding the maximum
    max_I = float(mx_o[j])
    where = (int(row_index[order][j]), int(am[order][j]) + col0)
    return n, mean, rms, rmsd, max_I, where, omega_sum
