"""Fit a reference image: least-squares or Poisson refinement of chosen parameters with gradients.

:func:`fit_reference` renders the simulation of nanoBragg arguments, compares it with a
reference image over a region, and refines the chosen parameter families
(:data:`torchbragg.differentiable.PARAMETER_FAMILIES`, the fittable ones) by L-BFGS on the
exact gradient of the loss (:mod:`torchbragg.differentiable`). The uncertainty of each fitted
value is the Gauss-Newton estimate ``sqrt(diag(σ² (JᵀJ)⁻¹))`` (Poisson: ``(JᵀWJ)⁻¹`` with
``W = 1/I``), J being the image's derivative with respect to the parameters over the region
(central differences of renders at the fitted values) and σ² the residual variance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .differentiable import PARAMETER_FAMILIES, family_flags

__all__ = ["FitError", "FitResult", "FIT_STEPS", "parse_param_list", "fit_reference"]

#: the optimiser's unit per family component, in flag units (parameters are refined as start + unit × u)
FIT_STEPS = {"distance": 1.0, "beam_center": 0.1, "detector_rotation": 0.1, "twotheta": 0.1, "misset": 0.1,
             "cell": 0.1, "mosaic": 0.1, "wavelength": 1e-3, "dispersion": 0.1}
_ALIASES = {"beam_centre": "beam_center", "beamcenter": "beam_center", "lambda": "wavelength",
            "rotation": "detector_rotation"}


class FitError(ValueError):
    """A fit request that cannot be served (unknown parameter, shapes that differ, an empty region)."""


@dataclass
class FitResult:
    """The outcome of :func:`fit_reference`.

    Attributes
    ----------
    parameters : list of dict
        One record per component: ``family``, ``component``, ``unit``, ``flag``, ``start``,
        ``fitted``, ``offset`` (fitted - start), ``uncertainty``.
    fitted_args : list of str
        The whole nanoBragg argument list after the fit, in the flags' own units.
    metrics_before, metrics_after : dict
        ``loss``, ``rmsd`` (photons), ``max_abs_diff`` (photons), ``correlation`` and ``pixels`` over the region.
    iterations : int
        Loss evaluations the optimiser made.
    loss : str
        ``"lsq"`` or ``"poisson"``.
    roi : list of int or None
        ``[xmin, xmax, ymin, ymax]`` (fast, slow, inclusive) of the region, or None for the whole image.
    """

    parameters: list
    fitted_args: list
    metrics_before: dict
    metrics_after: dict
    iterations: int
    loss: str
    roi: list | None = None
    notes: list = field(default_factory=list)

    def to_json(self) -> dict:
        """The ``fit.json`` document.

        Returns
        -------
        dict
            Every attribute, JSON-ready.
        """
        return {"fitted_args": list(self.fitted_args), "parameters": self.parameters,
                "metrics_before": self.metrics_before, "metrics_after": self.metrics_after,
                "iterations": self.iterations, "loss": self.loss, "roi": self.roi, "notes": list(self.notes)}

    def lines(self) -> list[str]:
        """The fit for people: one line per parameter, then the metrics.

        Returns
        -------
        list of str
            Lines without newlines.
        """
        out = []
        for p in self.parameters:
            unc = f" ± {p['uncertainty']:.3g}" if p["uncertainty"] is not None else ""
            out.append(f"{p['family']} {p['component']} ({p['flag']}): {p['start']:.6g} -> {p['fitted']:.6g} "
                       f"{p['unit']} (offset {p['offset']:+.4g}{unc})")
        for when, m in (("before", self.metrics_before), ("after", self.metrics_after)):
            out.append(f"{when}: loss {m['loss']:.6g}, rmsd {m['rmsd']:.6g} photons, max |diff| "
                       f"{m['max_abs_diff']:.6g}, correlation {m['correlation']:.6f} over {m['pixels']} pixels")
        return out


def parse_param_list(text: str | Sequence[str]) -> list[str]:
    """Family names from ``"distance,beam_center,misset"`` (or a list), checked to be fittable.

    Parameters
    ----------
    text : str or sequence of str
        Comma-separated names.

    Returns
    -------
    list of str
        The names, in order, without repeats.

    Raises
    ------
    FitError
        For an empty list, an unknown name or one that cannot be fitted.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    names = []
    for raw in items:
        n = raw.strip()
        n = _ALIASES.get(n, n)
        if not n:
            continue
        fam = PARAMETER_FAMILIES.get(n)
        fittable = [k for k, f in PARAMETER_FAMILIES.items() if f.fittable]
        if fam is None:
            raise FitError(f"--params: unknown parameter {raw.strip()!r}; fittable: {', '.join(fittable)}")
        if not fam.fittable:
            raise FitError(f"--params: {n} can be differentiated but not fitted (its fitted value is no flag "
                           f"value); fittable: {', '.join(fittable)}")
        if n not in names:
            names.append(n)
    if not names:
        raise FitError("--params: give at least one parameter, e.g. distance,beam_center,misset")
    return names


def _metrics(image: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, loss_value: float) -> dict:
    a, b = image[mask], ref[mask]
    d = a - b
    n = int(mask.sum())
    sa, sb = a - a.mean(), b - b.mean()
    den = float(torch.sqrt((sa * sa).sum() * (sb * sb).sum()))
    return {"loss": float(loss_value), "rmsd": float(torch.sqrt((d * d).mean())) if n else 0.0,
            "max_abs_diff": float(d.abs().max()) if n else 0.0,
            "correlation": float((sa * sb).sum()) / den if den > 0 else 0.0, "pixels": n}


def fit_reference(args: Sequence[str], reference, params: Sequence[str] | str, *, roi: Sequence[int] | None = None,
                  loss: str = "lsq", dtype: torch.dtype = torch.float64, max_iter: int = 60,
                  cwd: str | None = None, device: str = "cpu",
                  progress: Callable[[int, int], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None) -> FitResult:
    """Fit parameters of a simulation to a reference image.

    Parameters
    ----------
    args : sequence of str
        nanoBragg arguments of the simulation (the starting values).
    reference : numpy.ndarray or torch.Tensor
        ``[slow, fast]`` reference image in photons, the simulation's shape.
    params : str or sequence of str
        Fittable family names (:func:`parse_param_list`).
    roi : (xmin, xmax, ymin, ymax), optional
        Region compared (fast and slow pixel indices, inclusive, as ``-roi``); pixels the
        simulation does not render (outside its ``-roi`` or masked) are always left out.
    loss : str
        ``"lsq"`` (sum of squared differences) or ``"poisson"`` (negative Poisson log-likelihood).
    dtype : torch.dtype
        Render dtype.
    max_iter : int
        Most loss evaluations of the optimiser.
    cwd : str, optional
        Folder that relative file names in ``args`` are resolved against.
    device : str
        Where to render.
    progress : callable, optional
        ``progress(evaluations, max_iter)`` after each loss evaluation.
    should_cancel : callable, optional
        Checked during every render and backward pass; True stops the fit with
        :class:`~torchbragg.RenderCancelled`.

    Returns
    -------
    FitResult
        The fitted values, their uncertainties, the fitted arguments and the metrics.

    Raises
    ------
    FitError
        For a bad request (the message names the option and value).
    torchbragg.differentiable.GradientError
        For a parameter this configuration cannot differentiate.
    """
    from .simulation import Simulation

    names = parse_param_list(params)
    if loss not in ("lsq", "poisson"):
        raise FitError(f"--loss: expected lsq or poisson, got {loss!r}")
    if int(max_iter) < 1:
        raise FitError(f"--max-iter: expected a positive number, got {max_iter}")
    sim = Simulation.from_args(list(args), device=device, dtype=dtype, cwd=cwd, requires_grad=names)
    grads = sim.gradients
    ref = torch.as_tensor(np.asarray(reference, dtype=np.float64), device=sim.device)
    if tuple(ref.shape) != tuple(sim.shape):
        raise FitError(f"reference: {ref.shape[0]}x{ref.shape[1]} pixels, the simulation {sim.shape[0]}x"
                       f"{sim.shape[1]}: give the arguments the reference was made with")
    ny, nx = sim.shape
    mask = sim.active_mask(torch.arange(ny, device=sim.device), torch.arange(nx, device=sim.device))
    if roi is not None:
        xmin, xmax, ymin, ymax = (int(v) for v in roi)
        if xmin > xmax or ymin > ymax or xmin < 0 or ymin < 0 or xmax >= nx or ymax >= ny:
            raise FitError(f"--roi {xmin} {xmax} {ymin} {ymax}: expected xmin <= xmax < {nx} and "
                           f"ymin <= ymax < {ny} (fast, then slow pixel indices)")
        sel = torch.zeros_like(mask)
        sel[ymin:ymax + 1, xmin:xmax + 1] = True
        mask = mask & sel
    if not bool(mask.any()):
        raise FitError("--roi: the region holds no rendered pixel")
    start = grads.values()
    steps, slices, k = {}, {}, 0
    for n in names:
        v = start[n]
        if n == "fluence":
            unit = np.full(len(v), 0.1 * abs(float(v[0])) or 1.0)
        elif n == "default_F":
            unit = np.full(len(v), 0.1 * max(abs(float(v[0])), 1.0))
        else:
            unit = np.full(len(v), FIT_STEPS[n])
            if n == "beam_center" and family_flags(n, sim.config, sim.setup)[0][0] == "-ORGX":
                unit = np.full(len(v), 1.0)  # pixels
        steps[n] = torch.as_tensor(unit, dtype=torch.float64, device=sim.device)
        slices[n] = slice(k, k + len(v))
        k += len(v)
    p0 = {n: torch.as_tensor(start[n], dtype=torch.float64, device=sim.device) for n in names}
    wsum = float((ref[mask] ** 2).sum()) or 1.0
    if loss == "poisson":
        wsum = float(ref[mask].abs().sum()) or 1.0

    def values_at(u):
        return {n: p0[n] + steps[n] * u[slices[n]] for n in names}

    def loss_of(image):
        img = image.to(torch.float64)
        if loss == "lsq":
            return ((img - ref)[mask] ** 2).sum() / wsum
        lam = img[mask].clamp_min(1e-12)
        return (lam - ref[mask] * torch.log(lam)).sum() / wsum

    with torch.no_grad():
        image0 = grads.render(values=values_at(torch.zeros(k, dtype=torch.float64, device=sim.device)),
                              should_cancel=should_cancel)
        before = _metrics(image0.to(torch.float64), ref, mask, float(loss_of(image0)))
    u = torch.zeros(k, dtype=torch.float64, device=sim.device, requires_grad=True)
    evaluations = [0]
    opt = torch.optim.LBFGS([u], lr=1.0, max_iter=int(max_iter), max_eval=int(max_iter), history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        value = loss_of(grads.render(values=values_at(u), should_cancel=should_cancel))
        value.backward()
        evaluations[0] += 1
        if progress is not None:
            progress(min(evaluations[0], int(max_iter)), int(max_iter))
        return value

    opt.step(closure)
    fitted_u = u.detach()
    fitted = {n: t.detach() for n, t in values_at(fitted_u).items()}
    with torch.no_grad():
        image1 = grads.render(values=fitted, should_cancel=should_cancel).to(torch.float64)
        after = _metrics(image1, ref, mask, float(loss_of(image1)))
        for n in names:
            grads.leaves[n].copy_(fitted[n])
        uncertainty = _uncertainty(grads, fitted, steps, names, slices, k, image1, ref, mask, loss, should_cancel)
    records = []
    for n in names:
        fam = PARAMETER_FAMILIES[n]
        flags = [f for f, c in family_flags(n, sim.config, sim.setup) for _ in range(c)]
        for j, label in enumerate(fam.labels):
            unit = "px" if flags[j] in ("-ORGX", "-ORGY") else fam.units[j]
            unc = uncertainty[slices[n]][j] if uncertainty is not None else None
            records.append({"family": n, "component": label, "unit": unit, "flag": flags[j],
                            "start": float(start[n][j]), "fitted": float(fitted[n][j]),
                            "offset": float(fitted[n][j]) - float(start[n][j]),
                            "uncertainty": None if unc is None or not math.isfinite(unc) else float(unc)})
    return FitResult(parameters=records, fitted_args=grads.fitted_args(), metrics_before=before,
                     metrics_after=after, iterations=evaluations[0], loss=loss,
                     roi=[int(v) for v in roi] if roi is not None else None)


def _uncertainty(grads, fitted, steps, names, slices, k, image, ref, mask, loss, should_cancel):
    """Gauss-Newton standard errors (flag units) from central differences of renders; None if singular."""
    cols = []
    for n in names:
        for j in range(len(fitted[n])):
            h = 1e-3 * float(steps[n][j])
            sides = []
            for sign in (1.0, -1.0):
                vals = dict(fitted)
                v = fitted[n].clone()
                v[j] += sign * h
                vals[n] = v
                sides.append(grads.render(values=vals, should_cancel=should_cancel).to(torch.float64)[mask])
            cols.append((sides[0] - sides[1]) / (2 * h))
    grads.sync({n: fitted[n] for n in names})
    J = torch.stack(cols, -1)  # [pixels, k]
    r = (image - ref)[mask]
    dof = max(1, int(mask.sum()) - k)
    if loss == "poisson":
        w = 1.0 / image[mask].clamp_min(1e-12)
        A = J.T @ (J * w[:, None])
        sigma2 = float((r * r * w).sum()) / dof
    else:
        A = J.T @ J
        sigma2 = float((r * r).sum()) / dof
    try:
        cov = torch.linalg.inv(A) * sigma2
    except RuntimeError:
        return None
    return torch.sqrt(torch.clamp(torch.diagonal(cov), min=0.0)).tolist()
