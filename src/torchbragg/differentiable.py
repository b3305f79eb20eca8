"""Differentiable renders: gradients of a function of the image with respect to the experiment.

A :class:`~torchbragg.Simulation` built with ``requires_grad=[...]`` holds one leaf tensor per
named parameter family (:data:`PARAMETER_FAMILIES`), in the units of its nanoBragg flag. Its
:meth:`~torchbragg.Simulation.render` then returns an image that autograd can differentiate::

    sim = Simulation.from_args(args, dtype=torch.float64, requires_grad=["distance", "misset"])
    loss = ((sim.render() - ref) ** 2).sum()
    loss.backward()
    sim.parameters()["distance"].grad      # d loss / d distance, per mm

How the gradient is computed
----------------------------
* The forward pass is the normal render (compiled kernel where available): the same image, the
  same C parity. When a leaf's value has changed since the last render, the configuration is
  rebuilt from the new values first, so the image is always the render of the current values.
* The backward pass takes the incoming gradient as a whole image (any function of the image may
  be differentiated; nothing needs to decompose over pixels) and differentiates the render with
  the compiled CPU adjoint (:mod:`torchbragg.kernels.cpu_adjoint`: every evaluation's derivative
  in one pass over the pixels, memory that of the image) where it covers the set-up, else by
  re-evaluating blocks of rows with the eager kernel (:func:`torchbragg.kernels.eager.evaluate_block`,
  written in differentiable torch operations) under autograd, memory bounded by the block size.
  ``sim.gradients.last_backward`` says which kernel ran and why.
* The set-up (detector axes, pix0, source directions and wavelengths, lattice vectors per phi
  step and mosaic domain) is resolved once, by :func:`torchbragg.resolve.resolve`; its derivative
  with respect to each geometric parameter is taken by central differences of that one set-up
  code (steps of 1e-5 of the value's scale: relative error about 1e-10, below a float64 render's
  own rounding), then chained with the kernel's exact derivatives. Fluence is an exact scale;
  the structure factors are the table's own values.
* The mosaic domains' rotation angles are single precision in C (the image is a staircase in the
  spread at 1e-7 relative); the derivative is that of the smooth function under the staircase.
* The automatic choices C makes from the starting values (oversampling, interpolation) are kept
  fixed; discrete structure (number of sources, mosaic domains, phi steps) must not change with
  the parameter, else :class:`GradientError` says so.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .resolve import SetupError, resolve

__all__ = ["GradientError", "ParameterFamily", "PARAMETER_FAMILIES", "DifferentiableParameters",
           "arguments_with", "pixel_sensitivity"]

RTD = 180.0 / math.pi
#: kernel-tensor fields the geometric parameters act on
FIELDS = ("fdet", "sdet", "odet", "pix0", "beam", "incident", "inv_lambda", "lattice", "lattice_first",
          "a_star", "distance", "close_distance", "N")
#: evaluations per block of the backward pass (each holds its autograd intermediates)
BACKWARD_EVALUATIONS_PER_CHUNK = 1 << 18


class GradientError(SetupError):
    """A parameter that cannot be differentiated for this configuration (the message says why)."""


@dataclass(frozen=True)
class ParameterFamily:
    """One differentiable parameter family.

    Attributes
    ----------
    name : str
        The name given to ``requires_grad`` (``"distance"``, ``"cell"``, ...).
    labels : tuple of str
        One label per component (``("a", "b", "c", "alpha", "beta", "gamma")``); empty for the
        structure factors, whose components are the listed reflections.
    units : tuple of str
        The unit of each component (the flag's unit).
    kind : str
        ``"setup"`` (through the resolved set-up), ``"fluence"`` (an exact scale) or
        ``"table"`` (structure factors).
    step : tuple of float
        The step a sensitivity tap states the relative change for, per component.
    fittable : bool
        Whether ``torchbragg fit`` can fit it (its fitted value is a flag value).
    doc : str
        What it is, for people.
    """

    name: str
    labels: tuple
    units: tuple
    kind: str
    step: tuple
    fittable: bool
    doc: str


PARAMETER_FAMILIES: dict[str, ParameterFamily] = {f.name: f for f in (
    ParameterFamily("distance", ("distance",), ("mm",), "setup", (0.1,), True,
                    "sample-to-detector distance (-distance, or -close_distance when that was given)"),
    ParameterFamily("beam_center", ("x", "y"), ("mm", "mm"), "setup", (0.01, 0.01), True,
                    "beam centre: -Xbeam/-Ybeam (mm), or -ORGX/-ORGY (pixels) in the XDS and DIALS conventions"),
    ParameterFamily("detector_rotation", ("rotx", "roty", "rotz"), ("deg",) * 3, "setup", (0.01,) * 3, True,
                    "detector rotations -detector_rotx/-detector_roty/-detector_rotz"),
    ParameterFamily("twotheta", ("twotheta",), ("deg",), "setup", (0.01,), True, "detector -twotheta swing"),
    ParameterFamily("misset", ("x", "y", "z"), ("deg",) * 3, "setup", (0.01,) * 3, True,
                    "crystal -misset angles about x, y, z (any orientation)"),
    ParameterFamily("cell", ("a", "b", "c", "alpha", "beta", "gamma"), ("Å",) * 3 + ("deg",) * 3, "setup",
                    (0.01,) * 6, True, "unit cell -cell a b c alpha beta gamma"),
    ParameterFamily("N", ("Na", "Nb", "Nc"), ("cells",) * 3, "setup", (0.1,) * 3, False,
                    "crystal size in unit cells -Na/-Nb/-Nc (continuous: the peak shape)"),
    ParameterFamily("mosaic", ("mosaic",), ("deg",), "setup", (0.01,), True, "-mosaic spread"),
    ParameterFamily("wavelength", ("wavelength",), ("Å",), "setup", (1e-4,), True, "-lambda"),
    ParameterFamily("dispersion", ("dispersion",), ("%",), "setup", (0.01,), True, "-dispersion spectral width"),
    ParameterFamily("fluence", ("fluence",), ("photons/m²",), "fluence", (0.0,), True,
                    "-fluence (or the fluence of -flux x -exposure / -beamsize²)"),
    ParameterFamily("default_F", ("default_F",), ("F",), "table", (1.0,), True, "-default_F"),
    ParameterFamily("F", (), ("F",), "table", (1.0,), False, "structure factors of the listed reflections"),
)}


def _origin_convention(setup) -> bool:
    return setup.convention in ("XDS", "DIALS")


def _misset_start(cfg) -> tuple:
    xtal = cfg.crystal
    if xtal.misset_random:
        from .c_random import random_misset

        seed = xtal.misset_seed if xtal.misset_seed is not None else cfg.output.seed
        if seed is None:
            raise GradientError("misset: -misset random has no seed; give -misset_seed to differentiate it")
        return tuple(m * RTD for m in random_misset(seed))
    return tuple(xtal.misset_deg) if xtal.misset_deg is not None else (0.0, 0.0, 0.0)


def family_values(name: str, cfg, setup) -> np.ndarray:
    """The current value of a family, in its flags' units.

    Parameters
    ----------
    name : str
        A key of :data:`PARAMETER_FAMILIES`.
    cfg : SimulationConfig
        The configuration.
    setup : ResolvedSetup
        Its resolved set-up.

    Returns
    -------
    numpy.ndarray
        float64 values, one per component.
    """
    det, beam, xtal = cfg.detector, cfg.beam, cfg.crystal
    if name == "distance":
        if det.close_distance_mm is not None:
            return np.array([det.close_distance_mm])
        return np.array([det.distance_mm if det.distance_mm is not None else setup.distance * 1e3])
    if name == "beam_center":
        if _origin_convention(setup):
            px = setup.pixel_size
            return np.array([det.orgx if det.orgx is not None else setup.detsize_f / 2.0 / px + 0.5,
                             det.orgy if det.orgy is not None else setup.detsize_s / 2.0 / px + 0.5])
        return np.array([setup.xbeam * 1e3, setup.ybeam * 1e3])
    if name == "detector_rotation":
        return np.array([det.rotx_deg, det.roty_deg, det.rotz_deg])
    if name == "twotheta":
        return np.array([det.twotheta_deg])
    if name == "misset":
        return np.array(_misset_start(cfg), dtype=np.float64)
    if name == "cell":
        a, b, c, al, be, ga = (list(xtal.cell) + [0.0] * 6)[:6]
        return np.array([a, b if b > 0 else a, c if c > 0 else a, al if al > 0 else 90.0, be if be > 0 else 90.0,
                         ga if ga > 0 else 90.0])
    if name == "N":
        return np.array([float(n) for n in xtal.N])
    if name == "mosaic":
        return np.array([setup.mosaic_spread * RTD])
    if name == "wavelength":
        return np.array([beam.wavelength_A])
    if name == "dispersion":
        return np.array([beam.dispersion_percent])
    if name == "fluence":
        return np.array([setup.fluence])
    if name == "default_F":
        return np.array([xtal.default_F])
    if name == "F":
        tb = setup.hkl
        return np.asarray(tb.values, dtype=np.float64)[np.asarray(tb.listed, dtype=bool)].copy()
    raise KeyError(name)


def set_family(name: str, cfg, setup, values) -> None:
    """Write a family's values into a configuration (the structure factors excepted).

    Parameters
    ----------
    name : str
        A key of :data:`PARAMETER_FAMILIES` other than ``"F"``.
    cfg : SimulationConfig
        The configuration to change (in place).
    setup : ResolvedSetup
        The set-up of the starting configuration (for the convention).
    values : sequence of float
        The new values, in the flags' units.
    """
    det, beam, xtal = cfg.detector, cfg.beam, cfg.crystal
    v = [float(x) for x in values]
    if name == "distance":
        if det.close_distance_mm is not None:
            det.close_distance_mm = v[0]
        else:
            det.distance_mm = v[0]
    elif name == "beam_center":
        if _origin_convention(setup):
            det.orgx, det.orgy = v
        else:
            det.xbeam_mm, det.ybeam_mm = v
    elif name == "detector_rotation":
        det.rotx_deg, det.roty_deg, det.rotz_deg = v
    elif name == "twotheta":
        det.twotheta_deg = v[0]
    elif name == "misset":
        xtal.misset_random = False
        xtal.misset_deg = tuple(v)
    elif name == "cell":
        xtal.cell = tuple(v)
    elif name == "N":
        xtal.N = tuple(v)
    elif name == "mosaic":
        xtal.mosaic_deg = v[0]
    elif name == "wavelength":
        beam.wavelength_A = v[0]
    elif name == "dispersion":
        beam.dispersion_percent = v[0]
    elif name == "fluence":
        if beam.flux > 0:
            beam.flux = v[0] * (beam.beamsize_mm * 1e-3) ** 2 / beam.exposure_s
        else:
            beam.fluence = v[0]
    elif name == "default_F":
        xtal.default_F = v[0]
    else:
        raise KeyError(name)


def family_flags(name: str, cfg, setup) -> list[tuple[str, int]]:
    """The nanoBragg flags that carry a family's value: ``[(flag, number of components), ...]``.

    Parameters
    ----------
    name : str
        A fittable key of :data:`PARAMETER_FAMILIES`.
    cfg : SimulationConfig
        The configuration.
    setup : ResolvedSetup
        Its resolved set-up.

    Returns
    -------
    list of (str, int)
        The flags in component order, each with how many components it takes.
    """
    if name == "distance":
        return [("-close_distance" if cfg.detector.close_distance_mm is not None else "-distance", 1)]
    if name == "beam_center":
        return [("-ORGX", 1), ("-ORGY", 1)] if _origin_convention(setup) else [("-Xbeam", 1), ("-Ybeam", 1)]
    if name == "detector_rotation":
        return [("-detector_rotx", 1), ("-detector_roty", 1), ("-detector_rotz", 1)]
    if name == "fluence":
        return [("-flux" if cfg.beam.flux > 0 else "-fluence", 1)]
    flag = {"twotheta": "-twotheta", "misset": "-misset", "cell": "-cell", "N": "-N", "mosaic": "-mosaic",
            "wavelength": "-lambda", "dispersion": "-dispersion", "default_F": "-default_F"}[name]
    return [(flag, len(PARAMETER_FAMILIES[name].labels))]


#: flags that set the same configuration field as a family's flag (removed when the fitted value is written)
_ALIASES = {
    "-lambda": ("-lambda", "-wavelength", "-wave", "-energy"),
    "-mosaic": ("-mosaic", "-mosaicity", "-mosaic_spread"),
    "-N": ("-N", "-Na", "-Nb", "-Nc"),
    "-misset": ("-misset",),
}


def arguments_with(args: Sequence[str], cfg, setup, values: dict) -> list[str]:
    """nanoBragg arguments with the given family values written as their flags.

    Every earlier occurrence of a flag (and of its aliases) is removed and the flag is written
    once at the end with the new value, in the flag's units.

    Parameters
    ----------
    args : sequence of str
        The original argument list.
    cfg : SimulationConfig
        Its configuration.
    setup : ResolvedSetup
        Its resolved set-up.
    values : dict of str to sequence of float
        Family name to values (fittable families only).

    Returns
    -------
    list of str
        The new argument list.
    """
    from .arguments import FLAGS, count_numbers

    out = [str(a) for a in args]
    tail: list[str] = []
    for name, vals in values.items():
        vals = [float(v) for v in vals]
        if name == "fluence" and cfg.beam.flux > 0:
            vals = [vals[0] * (cfg.beam.beamsize_mm * 1e-3) ** 2 / cfg.beam.exposure_s]
        k = 0
        for flag, n in family_flags(name, cfg, setup):
            drop = set(_ALIASES.get(flag, (flag,)))
            kept, i = [], 0
            while i < len(out):
                if out[i] in drop:
                    nargs = FLAGS[out[i]][0]
                    if out[i] == "-misset" and i + 1 < len(out) and out[i + 1].lower().startswith("rand"):
                        nargs = 1
                    elif out[i] == "-cell":
                        nargs = count_numbers(out, i + 1, 6)
                    i += 1 + nargs
                    continue
                kept.append(out[i])
                i += 1
            out = kept
            tail += [flag] + [repr(v) if v != int(v) or abs(v) >= 1e15 else str(int(v)) for v in vals[k:k + n]]
            k += n
    return out + tail


class DifferentiableParameters:
    """The leaf tensors of a differentiable simulation and the pull-back of image gradients to them.

    Built by :class:`~torchbragg.Simulation` when ``requires_grad`` is given; users reach it through
    :meth:`~torchbragg.Simulation.parameters` and :meth:`~torchbragg.Simulation.render`.

    Parameters
    ----------
    sim : Simulation
        The simulation (its configuration is the starting point).
    names : sequence of str
        Keys of :data:`PARAMETER_FAMILIES`.

    Raises
    ------
    GradientError
        For an unknown name or a parameter this configuration cannot differentiate.
    """

    def __init__(self, sim, names: Sequence[str], skip: bool = False):
        self.sim = sim
        #: leave out (rather than raise for) families this configuration cannot differentiate
        self.skip = skip
        #: family name -> why it was left out (with ``skip``)
        self.skipped: dict[str, str] = {}
        names = list(dict.fromkeys(str(n) for n in names))
        unknown = [n for n in names if n not in PARAMETER_FAMILIES]
        if unknown:
            raise GradientError(f"requires_grad: unknown parameter {unknown[0]!r}; known: "
                                f"{', '.join(PARAMETER_FAMILIES)}")
        s = sim.setup
        # C's automatic choices of the starting values stay fixed while the parameters move
        cfg = copy.deepcopy(sim.config)
        cfg.sampling.oversample = s.oversample
        cfg.crystal.interpolate = bool(s.interpolate)
        self.start_setup = s
        self.base_config = cfg
        for n in list(names):
            why = self._not_applicable(n, cfg, s)
            if why and not skip:
                raise GradientError(f"{n}: {why}")
            if why:
                self.skipped[n] = why
                names.remove(n)
        self.names = names
        self._start = {n: family_values(n, cfg, s) for n in names}
        # float64 whatever the render dtype, like the geometry: a float32 beam centre would move it
        self.leaves = {n: torch.tensor(self._start[n], dtype=torch.float64, device=sim.device, requires_grad=True)
                       for n in names}
        self._point = {n: v.copy() for n, v in self._start.items()}
        self._jacobian = None
        self.progress = None
        self.should_cancel = None
        #: "auto": the compiled CPU adjoint where it covers the set-up, else the eager kernel; "eager": always it
        self.backward_kernel = "auto"
        #: which kernel differentiated the last backward pass (and why not the compiled one)
        self.last_backward: str | None = None
        sim._bind(self._config_at(self._point), table_values=self._point.get("F"),
                  continuous_N=self._continuous_N(self._point))

    # ------------------------------------------------------------------ API
    def reflections(self) -> np.ndarray:
        """Miller indices of the ``F`` components: int ``[n, 3]`` in the order of ``parameters()["F"]``."""
        tb = self.start_setup.hkl
        if tb is None:
            return np.zeros((0, 3), dtype=np.int64)
        idx = np.argwhere(np.asarray(tb.listed, dtype=bool))
        return idx + np.array([tb.h_min, tb.k_min, tb.l_min])

    def values(self) -> dict:
        """The leaves' current values (float64 numpy, flag units)."""
        return {n: leaf.detach().to("cpu", torch.float64).numpy().copy() for n, leaf in self.leaves.items()}

    def sync(self, tensors: dict | None = None) -> None:
        """Rebuild the simulation's set-up when a leaf's value changed since the last render.

        Parameters
        ----------
        tensors : dict of str to torch.Tensor, optional
            Values to use instead of the leaves (same names and shapes).
        """
        tensors = self.leaves if tensors is None else {**self.leaves, **tensors}
        now = {n: t.detach().to("cpu", torch.float64).numpy().copy() for n, t in tensors.items()}
        if all(np.array_equal(now[n], self._point[n]) for n in self.names):
            return
        bad = [n for n in self.names if not np.all(np.isfinite(now[n]))]
        if bad:
            raise GradientError(f"{bad[0]}: the parameter's value is not finite ({now[bad[0]]})")
        self._rebind(now)

    def _rebind(self, point: dict) -> None:
        if all(np.array_equal(point[n], self._point[n]) for n in self.names):
            return
        self.sim._bind(self._config_at(point), table_values=point.get("F"), continuous_N=self._continuous_N(point))
        self._point = {n: v.copy() for n, v in point.items()}
        self._jacobian = None

    def render(self, progress=None, should_cancel=None, values: dict | None = None) -> torch.Tensor:
        """The differentiable image of the current values (see the module notes).

        Parameters
        ----------
        progress, should_cancel : callable, optional
            As for :meth:`torchbragg.Simulation.render`; they also serve the backward pass.
        values : dict of str to torch.Tensor, optional
            Tensors to render at instead of the leaves (the gradient then flows to them).

        Returns
        -------
        torch.Tensor
            ``[slow, fast]`` image with a gradient function.
        """
        tensors = self.leaves if values is None else {**self.leaves, **values}
        self.sync(tensors)
        self.progress, self.should_cancel = progress, should_cancel
        return _Render.apply(self, *[tensors[n] for n in self.names])

    def _continuous_N(self, values: dict) -> bool:
        return "N" in values and any(float(v) != int(v) for v in values["N"])

    def fitted_args(self) -> list[str]:
        """The simulation's nanoBragg arguments with the current values of the fittable parameters."""
        vals = {n: v for n, v in self.values().items() if PARAMETER_FAMILIES[n].fittable}
        return arguments_with(self.base_config.args, self.base_config, self.start_setup, vals)

    # ------------------------------------------------------------ internals
    def _not_applicable(self, name: str, cfg, s) -> str | None:
        if name == "cell" and cfg.crystal.cell is None:
            return "the crystal comes from -mat FILE; give -cell to differentiate the cell"
        if name == "N" and any(x > 0 for x in cfg.crystal.size_um):
            return "the number of cells comes from the crystal size (-xtal_size ...); give -N instead"
        if name == "mosaic" and (s.mosaic_spread <= 0 or len(s.mosaic_umats) < 2):
            return "differentiable only with a mosaic spread above 0 (-mosaic > 0 with more than one domain)"
        if name == "dispersion" and (s.dispsteps < 2 or s.dispersion <= 0):
            return ("differentiable only with -dispersion > 0 and more than one wavelength (-dispsteps): at 0 "
                    "C renders one wavelength")
        if name == "dispersion" and self.sim.config.beam.sourcefile:
            return "the wavelengths come from -sourcefile"
        if name == "wavelength" and self.sim.config.beam.sourcefile:
            return "the wavelengths come from -sourcefile"
        if name == "F" and s.hkl is None:
            return "no structure-factor table (-hkl) is loaded"
        return None

    def _config_at(self, values: dict, table: bool = True):
        cfg = copy.deepcopy(self.base_config)
        for n, v in values.items():
            if n != "F":
                set_family(n, cfg, self.start_setup, v)
        if not table:  # the geometry does not depend on the table: skip reading it
            cfg.crystal.hkl_path = None
            cfg.compat.implicit_fdump = False
            if cfg.crystal.default_F == 0.0:
                cfg.crystal.default_F = 1.0
        return cfg

    def _fields(self, kt) -> dict:
        out = {}
        for f in FIELDS:
            v = getattr(kt, f)
            if v is None:
                continue
            out[f] = torch.as_tensor(np.asarray(v, dtype=np.float64) if not isinstance(v, torch.Tensor) else v,
                                     dtype=torch.float64, device=self.sim.device).clone()
        return out

    def jacobian(self) -> dict:
        """d(kernel field) / d(component) at the current values: ``{family: {field: [k, *shape]}}``.

        Returns
        -------
        dict
            Per geometric family, the non-zero field derivatives.

        Raises
        ------
        GradientError
            When a family is not differentiable at these values (unless ``skip`` is set, where it
            is recorded in ``skipped`` and left out).
        """
        if self._jacobian is not None:
            return self._jacobian
        jac = {}
        for n in self.names:
            if PARAMETER_FAMILIES[n].kind != "setup" or n in self.skipped:
                continue
            try:
                jac[n] = self._family_jacobian(n)
            except GradientError as err:
                if not self.skip:
                    raise
                self.skipped[n] = str(err)
        self._jacobian = jac
        return jac

    def _family_jacobian(self, n: str) -> dict:
        from .simulation import build_kernel_tensors

        base = self._fields(self.sim.kernel_tensors)
        v0 = self._point[n]
        per = {f: torch.zeros((len(v0),) + tuple(t.shape), dtype=torch.float64, device=self.sim.device)
               for f, t in base.items()}
        for j in range(len(v0)):
            h = 1e-5 * max(abs(float(v0[j])), 1.0)
            if n == "mosaic":
                # C draws each domain's rotation angle in single precision (a staircase in the spread at
                # 1e-7); the angle is proportional to the spread, so a wide step is exact to ~1e-9
                h = 1e-2 * abs(float(v0[j]))
            sides = []
            for sign in (1.0, -1.0):
                vals = {k: v.copy() for k, v in self._point.items()}
                vals[n][j] += sign * h
                cfg = self._config_at(vals, table=False)
                try:
                    setup = resolve(cfg)
                except (SetupError, ValueError, ZeroDivisionError, OverflowError) as err:
                    raise GradientError(f"{n}: the set-up fails next to the value {v0[j]:g} ({err})") from None
                self._check_discrete(n, setup)
                fields = self._fields(build_kernel_tensors(setup, cfg, torch.float64, self.sim.device))
                if fields.keys() != base.keys() or any(fields[f].shape != base[f].shape for f in base):
                    raise GradientError(f"{n}: the set-up's structure changes next to the value {v0[j]:g}")
                sides.append(fields)
            for f in base:
                per[f][j] = (sides[0][f] - sides[1][f]) / (2.0 * h)
        if all(float(t.abs().max()) == 0.0 for t in per.values()):
            raise GradientError(f"{n}: changing it does not change this configuration's set-up (a value "
                                "the -img header, -sourcefile or another flag fixes)")
        return {f: t for f, t in per.items() if float(t.abs().max()) != 0.0}

    def _check_discrete(self, name: str, setup) -> None:
        s = self.sim.setup
        same = (setup.oversample == s.oversample and len(setup.source_lambdas) == len(s.source_lambdas)
                and len(setup.mosaic_umats) == len(s.mosaic_umats) and setup.phisteps == s.phisteps
                and setup.thicksteps == s.thicksteps and setup.shape_px == s.shape_px)
        if not same:
            raise GradientError(f"{name}: the number of sources, mosaic domains, phi steps or subpixels changes "
                                "next to this value, so the image is not differentiable there")

    def pullback(self, grad_image: torch.Tensor, image: torch.Tensor) -> dict:
        """Gradients of the leaves given the gradient of the image (the backward pass).

        The compiled CPU adjoint (:mod:`torchbragg.kernels.cpu_adjoint`) differentiates the image
        where it covers the set-up and compiled kernels are on; otherwise (and for the first pixel's
        phi = 0 quirk) the eager kernel under autograd does, in blocks. :attr:`last_backward` says which.

        Parameters
        ----------
        grad_image : torch.Tensor
            ``[slow, fast]`` gradient of the differentiated function with respect to the image.
        image : torch.Tensor
            The image of the forward pass.

        Returns
        -------
        dict of str to torch.Tensor
            One gradient per family, float64, shaped as the leaf.
        """
        from .kernels.cpu_adjoint import adjoint_problem, adjoint_unsupported, cpu_adjoint_function
        from .kernels.packing import compiled_kernels_unsupported
        from .simulation import RenderCancelled

        sim, s = self.sim, self.sim.setup
        kt0 = sim.kernel_tensors
        jac = self.jacobian()
        needed = sorted({f for per in jac.values() for f in per})
        base = self._fields(kt0)
        leaves = {f: base[f].clone().requires_grad_(True) for f in needed}
        table_leaf = default_leaf = None
        if "F" in self.names or "default_F" in self.names:
            if kt0.table is not None:
                table_leaf = kt0.table.detach().to(torch.float64).clone().requires_grad_("F" in self.names)
            if "default_F" in self.names:
                default_leaf = torch.tensor(float(s.default_F), dtype=torch.float64, device=sim.device,
                                            requires_grad=True)
        inputs = list(leaves.values()) + [t for t in (table_leaf, default_leaf) if t is not None and t.requires_grad]
        ny, nx = sim.shape
        xmin, xmax, ymin, ymax = s.roi
        r_lo, r_hi = max(0, ymin), min(ny - 1, ymax)
        c_lo, c_hi = max(0, xmin), min(nx - 1, xmax)
        out = {n: torch.zeros(len(self._point[n]), dtype=torch.float64, device=sim.device) for n in self.names}
        g64 = grad_image.detach().to(torch.float64)
        if "fluence" in self.names:
            out["fluence"][0] = (g64 * image.detach().to(torch.float64)).sum() / float(self._point["fluence"][0])
        if inputs and r_hi >= r_lo and c_hi >= c_lo:
            plan = sim.compiled_plan() if self.backward_kernel != "eager" else None
            if self.backward_kernel == "eager":
                why = "backward_kernel is 'eager'"
            elif plan is None and not sim.compiled_kernels_on():
                why = "compiled kernels off"
            elif plan is None:
                why = compiled_kernels_unsupported(kt0, "cpu") or (
                    "a non-integer N renders with the PyTorch kernel" if sim._eager_only else "no compiled CPU render")
            else:
                why = adjoint_unsupported(plan, set(needed))
            if why is None and cpu_adjoint_function(kt0.shape, kt0.table is not None) is None:
                why = f"the compiled adjoint kernel is unavailable: {adjoint_problem(kt0.shape, kt0.table is not None)}"
            self.last_backward = "compiled CPU adjoint" if why is None else f"eager kernel ({why})"
            if why is None:
                first = sim.first_pixel() if kt0.lattice_first is not None else None
                if not self._compiled_pullback(plan, g64, (r_lo, r_hi), (c_lo, c_hi), first, leaves, table_leaf,
                                               default_leaf):
                    raise RenderCancelled("gradient cancelled")
                if first is not None and r_lo <= first[0] <= r_hi and c_lo <= first[1] <= c_hi:
                    # the first pixel's phi = 0 quirk (its own lattice): the eager kernel's
                    self._eager_pullback(g64, [(first[0], first[0] + 1, first[1], first[1] + 1)], leaves,
                                         table_leaf, default_leaf, inputs)
            else:
                self._eager_pullback(g64, self._blocks(r_lo, r_hi, c_lo, c_hi), leaves, table_leaf, default_leaf,
                                     inputs, progress=True)
        for n, per in jac.items():
            for f, J in per.items():
                gf = leaves[f].grad
                if gf is not None:
                    out[n] += (J * gf[None]).reshape(J.shape[0], -1).sum(-1)
        if "F" in self.names and table_leaf is not None and table_leaf.grad is not None:
            listed = torch.as_tensor(np.asarray(s.hkl.listed, dtype=bool).reshape(-1), device=sim.device)
            out["F"] = table_leaf.grad[listed]
        if "default_F" in self.names and default_leaf.grad is not None:
            out["default_F"][0] = default_leaf.grad
        return out

    def _blocks(self, r_lo: int, r_hi: int, c_lo: int, c_hi: int) -> list[tuple[int, int, int, int]]:
        """The backward pass's blocks ``(r0, r1, c0, c1)`` (ends exclusive) of at most
        :data:`BACKWARD_EVALUATIONS_PER_CHUNK` evaluations."""
        E = self.sim.evaluations_per_pixel
        ncols = c_hi - c_lo + 1
        col_step = max(1, min(ncols, BACKWARD_EVALUATIONS_PER_CHUNK // max(1, E)))
        row_step = max(1, BACKWARD_EVALUATIONS_PER_CHUNK // max(1, E * ncols)) if col_step == ncols else 1
        return [(r0, min(r_hi + 1, r0 + row_step), c0, min(c_hi + 1, c0 + col_step))
                for r0 in range(r_lo, r_hi + 1, row_step) for c0 in range(c_lo, c_hi + 1, col_step)]

    def _eager_pullback(self, g64, blocks, leaves, table_leaf, default_leaf, inputs, progress: bool = False):
        """Accumulate the leaves' gradients over ``blocks`` with the eager kernel under autograd."""
        from .kernels.eager import evaluate_block, reduce_evaluations
        from .simulation import RenderCancelled

        sim, s = self.sim, self.sim.setup
        kt0 = sim.kernel_tensors
        cutoff = sim.interpolation_cutoff()
        last_col = blocks[-1][3] if blocks else 0
        rows_total = sum(r1 - r0 for r0, r1, _, c1 in blocks if c1 == last_col)
        rows_done = 0
        for r0, r1, c0, c1 in blocks:
            if self.should_cancel is not None and self.should_cancel():
                raise RenderCancelled("gradient cancelled")
            g = g64[r0:r1, c0:c1]
            if bool((g != 0).any()):
                rows = torch.arange(r0, r1, device=sim.device)
                cols = torch.arange(c0, c1, device=sim.device)
                with torch.enable_grad():  # a custom function's backward runs with grad mode off
                    kt = self._kernel_tensors(kt0, leaves, table_leaf, default_leaf)
                    res = evaluate_block(kt, rows, cols, interp_cutoff=cutoff, fpixels=s.fpixels,
                                         first_pixel=sim.first_pixel())
                    red = reduce_evaluations(res, s, dtype=sim.dtype,
                                             running_product=sim.config.compat.oversample_running_product)
                    act = sim.active_mask(rows, cols)
                    local = (torch.where(act, red["value"].to(torch.float64), 0.0) * g).sum()
                    if local.requires_grad:
                        torch.autograd.backward(local, inputs=inputs)
            if progress and self.progress is not None and c1 == last_col:
                rows_done += r1 - r0
                self.progress(rows_done, rows_total)

    def _compiled_pullback(self, plan, g64, rows, cols, first, leaves, table_leaf, default_leaf) -> bool:
        """Add the compiled adjoint's gradients to the leaves; False when the pass was cancelled."""
        from .kernels.cpu_adjoint import run_adjoint
        from .kernels.packing import D_OFFSETS

        sim = self.sim
        kt0 = sim.kernel_tensors
        want_table = table_leaf is not None or (default_leaf is not None and kt0.table is not None)
        res = run_adjoint(plan, g64, rows, cols, skip_pixel=first, want_table=want_table,
                          progress=self.progress, should_cancel=self.should_cancel)
        if res is None:
            return False
        dev = sim.device
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64), device=dev)  # noqa: E731
        dp, src = res["dp"], res["src"]
        S = src.shape[0]
        grads = {f: t(dp[D_OFFSETS[f]:D_OFFSETS[f] + 3]) for f in ("fdet", "sdet", "odet", "pix0")}
        grads["close_distance"] = t(dp[D_OFFSETS["close"]])
        grads["N"] = t(dp[D_OFFSETS["N"]:D_OFFSETS["N"] + 3])
        grads["a_star"] = t(dp[D_OFFSETS["a_star"]:D_OFFSETS["a_star"] + 9]).reshape(3, 3)
        grads["lattice"] = t(res["lattice"]).reshape(kt0.lattice.shape)
        grads["inv_lambda"] = t(src[:, 3]).reshape(kt0.inv_lambda.shape)
        if "incident" in leaves:
            g_inc = t(src[:, 0:3]).reshape(S, 3)
            if not kt0.nopolar and kt0.kahn != 0.0:  # through the polarisation frame of the packing
                with torch.enable_grad():
                    inc = kt0.incident.detach().to(torch.float64).clone().requires_grad_(True)
                    axis = kt0.polar_axis.detach().to(torch.float64).expand_as(inc)
                    B = torch.linalg.cross(axis, inc)
                    B = B / torch.linalg.vector_norm(B, dim=-1, keepdim=True)
                    E = torch.linalg.cross(inc, B)
                    E = E / torch.linalg.vector_norm(E, dim=-1, keepdim=True)
                    g_be, = torch.autograd.grad((B * t(src[:, 4:7])).sum() + (E * t(src[:, 7:10])).sum(), inc)
                g_inc = g_inc + g_be
            grads["incident"] = g_inc
        for f, leaf in leaves.items():
            g = grads.get(f)  # distance, beam: only -curved_det uses them; lattice_first: the first pixel's
            if g is None:
                continue
            g = g.reshape(leaf.shape)
            leaf.grad = g if leaf.grad is None else leaf.grad + g
        if res["table"] is not None:
            tab = t(res["table"])
            entries, extra = tab[:-1], tab[-1]
            if table_leaf is not None and table_leaf.requires_grad:
                table_leaf.grad = entries if table_leaf.grad is None else table_leaf.grad + entries
            if default_leaf is not None:  # unlisted entries hold default_F, as does the extra one
                gd = extra + entries[~kt0.listed.reshape(-1)].sum()
                default_leaf.grad = gd if default_leaf.grad is None else default_leaf.grad + gd
        elif default_leaf is not None:
            gd = t(dp[D_OFFSETS["default_F"]])
            default_leaf.grad = gd if default_leaf.grad is None else default_leaf.grad + gd
        return True

    def _kernel_tensors(self, kt0, leaves: dict, table_leaf, default_leaf):
        changes = {}
        for f, leaf in leaves.items():
            changes[f] = tuple(leaf.unbind()) if f == "N" else leaf
        dt = kt0.dtype
        if table_leaf is not None or default_leaf is not None:
            table = table_leaf if table_leaf is not None else (
                kt0.table.to(torch.float64) if kt0.table is not None else None)
            if default_leaf is not None:
                changes["default_F"] = default_leaf.to(dt)
                if table is not None:
                    listed = kt0.listed.reshape(-1)
                    table = torch.where(listed, table, default_leaf)
            if table is not None:
                changes["table"] = table.to(dt)
        return dataclasses.replace(kt0, **changes)


class _Render(torch.autograd.Function):
    """The normal render forward; :meth:`DifferentiableParameters.pullback` backward."""

    @staticmethod
    def forward(ctx, params, *leaves):
        image = params.sim._render_image(params.progress, params.should_cancel)
        ctx.params = params
        ctx.point = {n: v.copy() for n, v in params._point.items()}
        ctx.save_for_backward(image)
        return image

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_image):
        (image,) = ctx.saved_tensors
        params = ctx.params
        params._rebind(ctx.point)  # the set-up of this forward pass (others may have run since)
        grads = params.pullback(grad_image, image)
        return (None,) + tuple(grads[n].to(params.leaves[n].dtype).reshape(params.leaves[n].shape)
                               for n in params.names)


def pixel_sensitivity(sim, slow: int, fast: int, max_reflections: int = 32) -> dict:
    """dI/dp of one pixel for every parameter family this configuration can differentiate.

    Parameters
    ----------
    sim : Simulation
        The simulation (not changed: a copy of its configuration is differentiated).
    slow, fast : int
        The pixel.
    max_reflections : int
        How many structure factors to report (those with the largest |dI/dF|).

    Returns
    -------
    dict
        ``intensity`` (photons), ``parameters`` (one record per component: ``family``,
        ``component``, ``unit``, ``value``, ``dI_dp`` in photons per unit, ``step`` and
        ``relative_change`` = dI/dp × step / I, null where I is 0), ``reflections`` (h, k, l,
        F, dI/dF, the ``max_reflections`` largest), and ``not_differentiable`` (family → why).
    """
    from .simulation import Simulation

    names = list(PARAMETER_FAMILIES)
    twin = Simulation(copy.deepcopy(sim.config), device=sim.device, dtype=sim.dtype)
    twin.use_compiled_kernels = False  # one pixel: the eager kernel is the reference
    params = DifferentiableParameters(twin, names, skip=True)
    twin.gradients = params
    params.jacobian()
    ny, nx = twin.shape
    grad = torch.zeros((ny, nx), dtype=twin.dtype, device=twin.device)
    grad[slow, fast] = 1.0
    rows, cols = torch.tensor([slow], device=twin.device), torch.tensor([fast], device=twin.device)
    with torch.no_grad():
        value = twin.reduce(twin.evaluate(rows, cols))["value"]
    active = bool(twin.active_mask(rows, cols)[0, 0])
    intensity = float(value[0, 0]) if active else 0.0
    image = torch.zeros((ny, nx), dtype=torch.float64, device=twin.device)
    image[slow, fast] = intensity
    grads = params.pullback(grad, image)
    values = params.values()
    records = []
    for n in params.names:
        fam = PARAMETER_FAMILIES[n]
        if n == "F" or n in params.skipped:
            continue
        for j, label in enumerate(fam.labels):
            unit = fam.units[j]
            if n == "beam_center" and _origin_convention(twin.setup):
                unit = "px"
            d = float(grads[n][j])
            step = fam.step[j] if n != "fluence" else 0.01 * float(values[n][j])
            records.append({"family": n, "component": label, "unit": unit, "value": float(values[n][j]),
                            "dI_dp": d, "step": step,
                            "relative_change": d * step / intensity if intensity != 0 else None})
    reflections = []
    if "F" in grads:
        g = grads["F"].detach().cpu().numpy()
        hkl = params.reflections()
        order = np.argsort(-np.abs(g))[:max_reflections]
        reflections = [{"hkl": [int(x) for x in hkl[i]], "F": float(values["F"][i]), "dI_dF": float(g[i])}
                       for i in order if g[i] != 0.0]
    return {"intensity": intensity, "parameters": records, "reflections": reflections,
            "not_differentiable": dict(params.skipped),
            "method": "autograd through the eager kernel; set-up derivatives by central differences of the "
                      "set-up (relative step 1e-5)"}
