"""The :class:`Simulation` object: configuration → image, fallback map, taps."""

from __future__ import annotations

import dataclasses
import math
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .arguments import parse_args
from .config import SimulationConfig
from .interpolation_switch_off import InterpolationSwitchOff
from .kernels.build import compiled_kernels_enabled, slow_path_note
from .kernels.cpu import CpuPlan
from .kernels.eager import KernelTensors, evaluate_block, reduce_evaluations
from .kernels.packing import compiled_kernels_unsupported, fallback_count_dtype
from .kernels.reasons import FALLBACK_REASONS
from .kernels.row_stats import ROW_STATS, combine_row_statistics, row_statistics
from .resolve import R_E_SQR, ResolvedSetup, SetupError, resolve
from .rotations import axis_rotation_matrix

__all__ = ["Simulation", "RenderCancelled", "FallbackMap", "RenderStats", "build_kernel_tensors"]

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]

#: evaluations held at once by default (bounds memory: ~100 bytes each in float32)
DEFAULT_EVALUATIONS_PER_CHUNK = 1 << 21
#: evaluations per block of the fused kernel (it holds a few numbers per pixel, not per evaluation;
#: the block size only sets how often progress and cancellation are checked)
FAST_EVALUATIONS_PER_CHUNK = 1 << 23


class RenderCancelled(RuntimeError):
    """Raised inside :meth:`Simulation.render` when ``should_cancel()`` says so."""


@dataclass
class FallbackMap:
    """Where the structure factor fell back to ``default_F``.

    Attributes
    ----------
    counts : torch.Tensor
        [slow, fast]: evaluations of each pixel that used default_F, in the
        smallest signed integer dtype that holds ``evaluations_per_pixel``: int8
        up to 127, int16 up to 32767, int32 beyond (see
        :func:`torchbragg.kernels.fallback_count_dtype`). Sums promote to int64;
        convert before other arithmetic (``counts.int()``).
    reason : torch.Tensor
        uint8 [slow, fast]: the dominant fallback reason of each pixel
        (0 none, 1 no table, 2 outside the table, 3 unlisted in the table).
    evaluations_per_pixel : int
        Evaluations of each pixel (sensor layers × subpixels × sources × phi steps ×
        mosaic domains): the largest possible count.
    """

    counts: torch.Tensor
    reason: torch.Tensor
    evaluations_per_pixel: int
    REASONS = FALLBACK_REASONS

    def pixel_counts(self) -> dict:
        """Number of pixels whose dominant reason is each code.

        Returns
        -------
        dict of str to int
            Pixel count per reason name (``REASONS``), the ``none`` code included.
        """
        values = torch.bincount(self.reason.flatten().long(), minlength=4).tolist()
        return {self.REASONS[i]: int(values[i]) for i in range(4)}


@dataclass
class RenderStats:
    """The statistics nanoBragg prints after a render.

    Attributes
    ----------
    max_I : float
        Largest rendered pixel value (photons); 0 when no pixel is above 0.
    max_I_fast_m, max_I_slow_m : float
        Position of that pixel's last subpixel centre along the fast and slow axes (m),
        as C prints it; 0 when no pixel is above 0.
    max_pixel : tuple of (int, int)
        ``(slow, fast)`` of that pixel (the first one in render order on ties).
    mean : float
        Mean of the rendered pixels (inside ``-roi``, not masked), photons.
    rms : float
        Root mean square of the rendered pixels (divided by n - 1, as C), photons.
    rmsd : float
        Root-mean-square deviation from ``mean`` over every pixel inside ``-roi``
        (masked ones included, as C), photons.
    solid_angle_sr : float
        Solid angle subtended by the rendered pixels (steradians), as C computes it
        (the summed solid angles of the evaluations divided by ``steps``).
    pixels : int
        Number of rendered pixels.
    """

    max_I: float
    max_I_fast_m: float
    max_I_slow_m: float
    max_pixel: tuple[int, int]
    mean: float
    rms: float
    rmsd: float
    solid_angle_sr: float
    pixels: int

    def lines(self) -> list[str]:
        """The statistics as nanoBragg prints them.

        Returns
        -------
        list of str
            Three lines: solid angle, maximum and its position, mean/rms/rmsd.
        """
        return [
            f"solid angle subtended by detector = {self.solid_angle_sr:g} steradian "
            f"( {100 * self.solid_angle_sr / 4 / math.pi:g}% sphere)",
            f"max_I = {self.max_I:g}  at {self.max_I_fast_m:g} {self.max_I_slow_m:g}",
            f"mean= {self.mean:g} rms= {self.rms:g} rmsd= {self.rmsd:g}",
        ]


class Simulation:
    """A nanoBragg simulation bound to a device and dtype.

    Parameters
    ----------
    config : SimulationConfig
        The configuration; it is resolved (:func:`torchbragg.resolve.resolve`) at once.
    device : str or torch.device
        Where to render (``"cpu"``, ``"cuda"``, ``"cuda:N"``).
    dtype : torch.dtype
        ``torch.float32`` (default) or ``torch.float64``.
    chunk_rows : int, optional
        Detector rows rendered at once; by default chosen to hold about two
        million evaluations. The image does not depend on it.
    requires_grad : sequence of str, optional
        Parameter families to differentiate (keys of
        :data:`torchbragg.differentiable.PARAMETER_FAMILIES`: ``"distance"``,
        ``"beam_center"``, ``"misset"``, ``"cell"``, ...). :meth:`parameters` then
        gives their leaf tensors and :meth:`render` a differentiable image.

    Raises
    ------
    SetupError
        For a configuration that cannot be rendered, or a ``chunk_rows`` below 1.
    ValueError
        For a ``dtype`` other than float32 or float64.

    Examples
    --------
    >>> sim = Simulation.from_args(["-cell", "100", "100", "100", "90", "90", "90",
    ...                             "-default_F", "100", "-N", "5", "-detpixels", "64"])
    >>> image = sim.render()
    """

    #: fused CPU render kernel: None follows ``TORCHBRAGG_FAST`` (on unless "0"), True/False forces it
    use_compiled_kernels: bool | None = None

    def __init__(self, config: SimulationConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, chunk_rows: int | None = None,
                 requires_grad: Sequence[str] | None = None):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # as tensors report it: cuda:N
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        self._bind(config)
        E = self.evaluations_per_pixel
        if chunk_rows and int(chunk_rows) < 1:  # 0 or None: automatic
            raise SetupError(f"chunk_rows: expected a positive number of rows, got {chunk_rows}")
        self.chunk_rows = int(chunk_rows) if chunk_rows else max(
            1, DEFAULT_EVALUATIONS_PER_CHUNK // max(1, self.setup.fpixels * E))
        self.last_stats: RenderStats | None = None
        #: which kernel rendered the last image: "fused CPU kernel", "GPU kernel" or "eager kernel"
        #: (with "+ eager rows" where the row of C's interpolation switch-off was rendered eagerly)
        self.last_kernel: str | None = None
        #: after a render that wanted a compiled kernel but could not build one: the one plain line
        #: saying it took the PyTorch path, why, and how to get the fast one (else None)
        self.last_kernel_note: str | None = None
        #: the differentiable parameters (see :mod:`torchbragg.differentiable`), or None
        self.gradients = None
        if requires_grad:
            from .differentiable import DifferentiableParameters

            self.gradients = DifferentiableParameters(self, list(requires_grad))

    # ------------------------------------------------------------------ API
    @classmethod
    def from_args(cls, args: Sequence[str], device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, cwd: str | None = None,
                  chunk_rows: int | None = None, requires_grad: Sequence[str] | None = None) -> Simulation:
        """Build a simulation from nanoBragg command-line arguments.

        Parameters
        ----------
        args : sequence of str
            nanoBragg arguments, without the program name (see :func:`torchbragg.parse_args`).
        device : str or torch.device
            Where to render.
        dtype : torch.dtype
            ``torch.float32`` or ``torch.float64``.
        cwd : str, optional
            Folder that relative file names in ``args`` are resolved against; the current
            folder when omitted.
        chunk_rows : int, optional
            Detector rows rendered at once (see :class:`Simulation`).
        requires_grad : sequence of str, optional
            Parameter families to differentiate (see :class:`Simulation`).

        Returns
        -------
        Simulation
            The simulation of those arguments.
        """
        cfg = parse_args(list(args))
        cfg.cwd = str(cwd) if cwd is not None else None
        return cls(cfg, device=device, dtype=dtype, chunk_rows=chunk_rows, requires_grad=requires_grad)

    def parameters(self) -> dict:
        """The differentiable parameters: family name → float64 leaf tensor (flag units, ``.grad`` after backward).

        Returns
        -------
        dict of str to torch.Tensor
            Empty unless the simulation was built with ``requires_grad``. Units: distance mm,
            beam_center mm (pixels for -ORGX/-ORGY), angles degrees, cell Å and degrees, N cells,
            wavelength Å, dispersion percent, fluence photons/m², F and default_F electrons.
        """
        return dict(self.gradients.leaves) if self.gradients is not None else {}

    def _bind(self, config: SimulationConfig, table_values=None, continuous_N: bool = False) -> None:
        """Resolve ``config`` and make it this simulation's set-up (tensors and caches renewed).

        ``table_values`` replaces the listed structure factors; ``continuous_N`` renders a
        non-integer N with the differentiable peak shape (eager kernel, see
        :mod:`torchbragg.differentiable`) rather than C's formula.
        """
        try:
            setup: ResolvedSetup = resolve(config)
        except (OverflowError, ZeroDivisionError, ValueError) as err:
            if isinstance(err, ValueError) and type(err) is not ValueError:
                raise  # the project's own errors (SetupError, HKLFormatError, ...) say it better
            raise SetupError(f"the flag values make the set-up arithmetic fail ({err}): give values of "
                             "smaller magnitude") from None
        if table_values is not None and setup.hkl is not None:
            values = np.array(setup.hkl.values, dtype=np.float64, copy=True)
            values[np.asarray(setup.hkl.listed, dtype=bool)] = table_values
            setup.hkl = dataclasses.replace(setup.hkl, values=values)
        self.config = config
        self.setup = setup
        self._tensors = self._make_tensors()
        self._eager_only = continuous_N
        if continuous_N:
            N = tuple(torch.tensor(float(n), dtype=torch.float64, device=self.device) for n in setup.N)
            self._tensors = dataclasses.replace(self._tensors, N=N)
        self.switch_off = InterpolationSwitchOff(self)
        self.__dict__.pop("_compiled_plan_cache", None)
        self.__dict__.pop("_first_pixel", None)

    @property
    def kernel_tensors(self) -> KernelTensors:
        """The set-up on the simulation's device and dtype, as the kernels read it."""
        return self._tensors

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape (slow, fast)."""
        return self.setup.shape_px

    @property
    def evaluations_per_pixel(self) -> int:
        """Evaluations of one pixel: sensor layers × oversample² × sources × phi steps × mosaic domains."""
        s = self.setup
        return s.thicksteps * s.oversample ** 2 * len(s.source_lambdas) * s.phisteps * len(s.mosaic_umats)

    @property
    def hkl_info(self) -> dict:
        """Where the structure factors came from (kind, source, bounds, count, default_F, warnings)."""
        return dict(self.setup.hkl_source)

    def render(self, progress: ProgressFn | None = None, should_cancel: CancelFn | None = None) -> torch.Tensor:
        """Render the image: photons per pixel, ``[slow, fast]`` on the simulation's device.

        Also sets :attr:`last_stats`, :attr:`last_kernel` and :attr:`last_kernel_note`.

        Parameters
        ----------
        progress : callable, optional
            Called as ``progress(rows_done, rows_total)`` after each block of rows.
        should_cancel : callable, optional
            Called with no arguments before each block; when it returns True the render stops.

        Returns
        -------
        torch.Tensor
            ``[slow, fast]`` image in the simulation's dtype; pixels outside ``-roi`` or
            masked are 0.

        Raises
        ------
        RenderCancelled
            When ``should_cancel()`` returned True.
        """
        if self.gradients is not None and torch.is_grad_enabled():
            return self.gradients.render(progress, should_cancel)
        if self.gradients is not None:
            self.gradients.sync()
        return self._render_image(progress, should_cancel)

    def _render_image(self, progress=None, should_cancel=None) -> torch.Tensor:
        image, _ = self._render(progress, should_cancel, fallback=False)
        return image

    def render_with_fallback(self, progress: ProgressFn | None = None,
                             should_cancel: CancelFn | None = None) -> tuple[torch.Tensor, FallbackMap]:
        """Render the image and the per-pixel default_F fallback map.

        On the CPU the map's memory is recycled from earlier maps that nothing refers to
        any more (never from one still in use), which saves mapping fresh pages on repeated
        renders.

        Parameters
        ----------
        progress : callable, optional
            Called as ``progress(rows_done, rows_total)`` after each block of rows.
        should_cancel : callable, optional
            Called with no arguments before each block; when it returns True the render stops.

        Returns
        -------
        image : torch.Tensor
            ``[slow, fast]`` image, as :meth:`render` gives it.
        fallback : FallbackMap
            Where each pixel's structure factors fell back to ``default_F``.

        Raises
        ------
        RenderCancelled
            When ``should_cancel()`` returned True.
        """
        if self.gradients is not None:  # the current values of the parameters (not differentiable)
            self.gradients.sync()
        return self._render(progress, should_cancel, fallback=True)

    def tap(self, slow: int, fast: int, taps: Sequence[str] = ("hkl_subpixel",)):
        """Run the engine's kernel on one pixel and return its :class:`~torchbragg.taps.PixelTap`.

        Parameters
        ----------
        slow, fast : int
            Pixel indices (0-based).
        taps : sequence of str
            Names of the taps to compute (:data:`torchbragg.taps.TAP_NAMES`).

        Returns
        -------
        PixelTap
            See :func:`torchbragg.taps.run_tap`.
        """
        from .taps import run_tap

        if self.gradients is not None:
            self.gradients.sync()
        return run_tap(self, slow, fast, taps)

    # ------------------------------------------------------------ internals
    def _make_tensors(self) -> KernelTensors:
        return build_kernel_tensors(self.setup, self.config, self.dtype, self.device)

    def active_mask(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Pixels of a block that C renders (inside -roi, not zero in -mask).

        Parameters
        ----------
        rows, cols : torch.Tensor
            1-D integer tensors of the block's slow and fast indices, on the simulation's device.

        Returns
        -------
        torch.Tensor
            bool ``[len(rows), len(cols)]``.
        """
        xmin, xmax, ymin, ymax = self.setup.roi
        act = ((rows >= ymin) & (rows <= ymax))[:, None] & ((cols >= xmin) & (cols <= xmax))[None, :]
        if self.setup.mask is not None:
            m = torch.as_tensor(self.setup.mask != 0, device=self.device)
            act = act & m[rows][:, cols]
        return act

    def first_pixel(self) -> tuple[int, int] | None:
        """The first pixel C renders (row-major inside the ROI and mask).

        Returns
        -------
        tuple of (int, int) or None
            ``(slow, fast)``, or None when no pixel is rendered. Computed once and kept.
        """
        if not hasattr(self, "_first_pixel"):
            self._first_pixel = self._find_first_pixel()
        return self._first_pixel

    def _find_first_pixel(self) -> tuple[int, int] | None:
        xmin, xmax, ymin, ymax = self.setup.roi
        ymax, xmax = min(ymax, self.setup.spixels - 1), min(xmax, self.setup.fpixels - 1)
        if self.setup.mask is None:
            return (ymin, xmin) if ymin <= ymax and xmin <= xmax else None
        sub = np.asarray(self.setup.mask)[ymin:ymax + 1, xmin:xmax + 1] != 0
        hits = np.argwhere(sub)
        return (int(hits[0][0]) + ymin, int(hits[0][1]) + xmin) if len(hits) else None

    def interpolation_cutoff(self, until_row: int | None = None) -> int | None:
        """Global evaluation ordinal where C switches interpolation off (None: never).

        See :meth:`torchbragg.interpolation_switch_off.InterpolationSwitchOff.cutoff`.

        Parameters
        ----------
        until_row : int, optional
            Last row the search needs to cover; the whole image when omitted.

        Returns
        -------
        int or None
            The global evaluation ordinal, or None.
        """
        return self.switch_off.cutoff(until_row)

    def evaluate(self, rows: torch.Tensor, cols: torch.Tensor, detail: bool = False) -> dict:
        """Run the kernel on a block (used by rendering and taps).

        Parameters
        ----------
        rows, cols : torch.Tensor
            1-D integer tensors of the block's slow and fast indices, on the simulation's device.
        detail : bool
            Also keep the per-evaluation quantities a tap reports.

        Returns
        -------
        dict
            The per-evaluation results of :func:`torchbragg.kernels.eager.evaluate_block`.
        """
        cutoff = self.interpolation_cutoff(until_row=int(rows.max()))
        return evaluate_block(self._tensors, rows, cols, interp_cutoff=cutoff,
                              fpixels=self.setup.fpixels, first_pixel=self.first_pixel(), detail=detail)

    def reduce(self, res: dict) -> dict:
        """Reduce per-evaluation results to pixel values (:func:`torchbragg.kernels.eager.reduce_evaluations`).

        Parameters
        ----------
        res : dict
            Results of :meth:`evaluate`.

        Returns
        -------
        dict
            Pixel values (``value``) and the factors applied to them.
        """
        return reduce_evaluations(res, self.setup, dtype=self.dtype,
                                  running_product=self.config.compat.oversample_running_product)

    def plan_arguments(self) -> dict:
        """The keyword arguments of a compiled-kernel plan (:class:`~torchbragg.kernels.cpu.CpuPlan`,
        :class:`~torchbragg.kernels.gpu.GpuPlan`) for this simulation, besides its tensors.

        Returns
        -------
        dict
            ``I_bg``, ``scale`` (r_e² × fluence / steps), ``fpixels``, ``mask``,
            ``oversample_factors`` (thick, polar, omega) and ``running_product``.
        """
        s = self.setup
        return dict(I_bg=s.I_bg, scale=R_E_SQR * s.fluence / s.steps, fpixels=s.fpixels, mask=s.mask,
                    oversample_factors=(s.oversample_thick, s.oversample_polar, s.oversample_omega),
                    running_product=self.config.compat.oversample_running_product)

    def compiled_kernels_on(self) -> bool:
        """``use_compiled_kernels`` (instance or class attribute) when not None, else ``TORCHBRAGG_FAST``.

        Returns
        -------
        bool
            Whether renders may use a compiled kernel.
        """
        return compiled_kernels_enabled() if self.use_compiled_kernels is None else bool(self.use_compiled_kernels)

    def compiled_plan(self) -> CpuPlan | None:
        """The compiled-kernel plan for this simulation (fused CPU or GPU), or None where only the
        eager kernel applies (see :meth:`compiled_kernels_on`).

        Returns
        -------
        CpuPlan or GpuPlan or None
            The plan, built on first use and kept.
        """
        if not self.compiled_kernels_on() or self._eager_only:
            return None
        cached = self.__dict__.get("_compiled_plan_cache")
        if cached is None:
            kt = self._tensors
            plan = None
            packing = self.plan_arguments()
            if compiled_kernels_unsupported(kt, "cpu") is None:
                plan = CpuPlan(kt, **packing)
            elif kt.device.type == "cuda":
                from .kernels.gpu import GpuPlan

                if compiled_kernels_unsupported(kt, "cuda") is None:
                    plan = GpuPlan(kt, **packing)
            cached = self.__dict__["_compiled_plan_cache"] = (plan,)
        return cached[0]

    def _render(self, progress, should_cancel, fallback: bool):
        s = self.setup
        ny, nx = self.shape
        out_dtype = self.dtype
        xmin, xmax, ymin, ymax = s.roi
        r_lo, r_hi = max(0, ymin), min(ny - 1, ymax)
        c_lo, c_hi = max(0, xmin), min(nx - 1, xmax)
        cols = torch.arange(c_lo, c_hi + 1, device=self.device)
        cutoff = self.interpolation_cutoff()
        total = max(0, r_hi - r_lo + 1)
        plan = self.compiled_plan() if total > 0 and c_hi >= c_lo else None
        self.last_kernel_note = None
        if plan is not None and plan.function(fallback) is None:
            self.last_kernel_note = slow_path_note(plan.problem(fallback))
            plan = None  # no compiler: eager kernel
        # every pixel of the ROI is written (masked ones with 0): only pixels outside it need zeroing
        full = (r_lo, r_hi, c_lo, c_hi) == (0, ny - 1, 0, nx - 1)
        new = torch.empty if full else torch.zeros
        image = new((ny, nx), dtype=out_dtype, device=self.device)
        counts = reason = None
        if fallback:  # recycled memory where a previous map is no longer used (see _RecycledBuffers)
            count_dtype = fallback_count_dtype(self.evaluations_per_pixel)
            if self.device.type == "cpu":
                counts = _fallback_buffers.empty((ny, nx), count_dtype)
                reason = _fallback_buffers.empty((ny, nx), torch.uint8)
                if not full:
                    counts.zero_()
                    reason.zero_()
            else:
                counts = new((ny, nx), dtype=count_dtype, device=self.device)
                reason = new((ny, nx), dtype=torch.uint8, device=self.device)
        segments = self._row_segments(plan, fallback, cutoff, r_lo, r_hi, nx)
        omega_sum = 0.0
        done = 0
        # fused kernel: statistics come per row from the kernel (eager rows: from row_statistics)
        row_stats = np.zeros((total, len(ROW_STATS))) if plan is not None else None
        ncols = c_hi - c_lo + 1
        # rows per compiled-kernel block; a GPU needs many pixels (threads) per launch to be busy,
        # however many evaluations each has
        per_chunk = getattr(plan, "evaluations_per_chunk", FAST_EVALUATIONS_PER_CHUNK)
        min_rows = -(-getattr(plan, "min_pixels_per_chunk", 0) // max(1, ncols))
        compiled_step = max(1, min_rows, per_chunk // max(1, ncols * self.evaluations_per_pixel))
        with torch.no_grad():
            for mode, seg_lo, seg_hi in segments:
                step = self.chunk_rows if mode == "eager" else compiled_step
                for r0 in range(seg_lo, seg_hi + 1, step):
                    if should_cancel is not None and should_cancel():
                        raise RenderCancelled("render cancelled")
                    r1 = min(seg_hi + 1, r0 + step)
                    if mode == "eager":
                        rows = torch.arange(r0, r1, device=self.device)
                        value, act, omega_rows = self._eager_rows(rows, cols, image, counts, reason, c_lo, c_hi)
                        if row_stats is not None:
                            row_stats[r0 - r_lo:r1 - r_lo] = row_statistics(value, act, omega_rows)
                        else:
                            omega_sum += float(omega_rows.sum())
                    else:
                        block = (slice(r0, r1), slice(c_lo, c_hi + 1))
                        row_stats[r0 - r_lo:r1 - r_lo] = plan.run(
                            r0, r1 - r0, c_lo, ncols, image[block], counts[block] if fallback else None,
                            reason[block] if fallback else None, interp=(mode == "interp"))
                    done += r1 - r0
                    if progress is not None:
                        progress(done, total)
            first = self.first_pixel()
            if (plan is not None and self._tensors.lattice_first is not None and first is not None
                    and not any(m == "eager" and lo <= first[0] <= hi for m, lo, hi in segments)):
                # C's very first phi loop keeps the unrotated crystal: redo that one pixel eagerly
                fs, ff = first
                self._eager_rows(torch.tensor([fs], device=self.device), torch.tensor([ff], device=self.device),
                                 image, counts, reason, ff, ff)
                omega_row = torch.tensor([row_stats[fs - r_lo, ROW_STATS.index("omega")]])
                row = torch.tensor([fs], device=self.device)
                row_stats[fs - r_lo] = row_statistics(image[fs:fs + 1, c_lo:c_hi + 1],
                                                      self.active_mask(row, cols), omega_row)[0]
        self.last_kernel = _kernel_label(plan, segments)
        if row_stats is not None:  # the same statistics as _stats, from the kernel's row sums
            self.last_stats = self._stats_from_rows(row_stats, np.arange(r_lo, r_lo + total), c_lo)
        else:
            self.last_stats = self._stats(image, omega_sum)
        if fallback:
            return image, FallbackMap(counts=counts, reason=reason, evaluations_per_pixel=self.evaluations_per_pixel)
        return image, None

    def _row_segments(self, plan, fallback: bool, cutoff: int | None, r_lo: int, r_hi: int, nx: int):
        """Row ranges and the kernel that renders each: ``[(mode, first_row, last_row), ...]``.

        ``mode`` is ``"eager"`` (eager kernel), ``"fast"`` (fused kernel,
        nearest-index lookups) or ``"interp"`` (fused kernel, every lookup
        interpolated). With interpolation, rows wholly before C's switch-off
        point interpolate, the row holding it is eager (it switches mid-row)
        and later rows use nearest indices.
        """
        if plan is None:
            return [("eager", r_lo, r_hi)]
        if not self._tensors.interpolate:
            return [("fast", r_lo, r_hi)]
        before = "interp" if plan.function(fallback, interp=True) is not None else "eager"
        if cutoff is None:  # interpolation never switches off
            return [(before, r_lo, r_hi)]
        last_interp_pixel = (cutoff - 1) // self.evaluations_per_pixel if cutoff > 0 else -1
        cut_row = max(r_lo - 1, min(r_hi, last_interp_pixel // nx)) if last_interp_pixel >= 0 else r_lo - 1
        segments = [(before, r_lo, cut_row - 1), ("eager", cut_row, cut_row), ("fast", cut_row + 1, r_hi)]
        return [(m, lo, hi) for m, lo, hi in segments if lo <= hi and lo >= r_lo]

    def _eager_rows(self, rows, cols, image, counts, reason, c_lo, c_hi):
        """Render a block with the eager kernel into the image.

        Returns the block's values, its active mask and each row's solid-angle sum.
        """
        s = self.setup
        out_dtype = self.dtype
        res = self.evaluate(rows, cols)
        red = self.reduce(res)
        act = self.active_mask(rows, cols)
        value = torch.where(act, red["value"].to(out_dtype), torch.zeros((), dtype=out_dtype, device=self.device))
        image[rows[0]:rows[-1] + 1, c_lo:c_hi + 1] = value
        om = res["omega"] if s.oversample_omega else res["omega"][:, :, :1, :1, :1].expand_as(res["omega"])
        omega_rows = (om.sum(dim=(2, 3, 4)) * act).sum(-1)
        if counts is not None:
            c, r = _fallback_counts(res, act)
            counts[rows[0]:rows[-1] + 1, c_lo:c_hi + 1] = c
            reason[rows[0]:rows[-1] + 1, c_lo:c_hi + 1] = r
        return value, act, omega_rows

    def _stats_from_rows(self, row_stats: np.ndarray, row_index: np.ndarray, col0: int) -> RenderStats:
        n, mean, rms, rmsd, max_I, (sl, fa), omega_sum = combine_row_statistics(row_stats, row_index, col0)
        if n == 0:
            return RenderStats(0.0, 0.0, 0.0, (0, 0), 0.0, 0.0, 0.0, 0.0, 0)
        max_I, f_m, s_m, (sl, fa) = self._maximum_position(max_I, sl, fa)
        return RenderStats(max_I, f_m, s_m, (sl, fa), mean, rms, rmsd, omega_sum / self.setup.steps, n)

    def _maximum_position(self, max_I: float, sl: int, fa: int):
        """C's printed maximum: its value and the position (m) of the pixel's last subpixel.

        C never updates the position when no pixel is above 0: it prints ``0 at 0 0``.
        """
        if max_I <= 0:
            return 0.0, 0.0, 0.0, (0, 0)
        s = self.setup
        sub = s.pixel_size / s.oversample
        last = s.oversample - 1
        return (max_I, sub * (fa * s.oversample + last) + sub / 2.0,
                sub * (sl * s.oversample + last) + sub / 2.0, (sl, fa))

    def _stats(self, image: torch.Tensor, omega_sum: float) -> RenderStats:
        """C's statistics of the float image.

        C keeps the image as 32-bit floats, so the values are rounded to float32
        first (a float64 render then ranks tied mirror pixels like C). mean and
        rms run over rendered pixels (inside -roi, not masked); rmsd, C's second
        pass, runs over every pixel inside -roi, masked ones (value 0) included.
        """
        s = self.setup
        img = image.detach().to("cpu", torch.float32).to(torch.float64)
        rows = torch.arange(img.shape[0])
        cols = torch.arange(img.shape[1])
        act = self.active_mask(rows.to(self.device), cols.to(self.device)).cpu()
        xmin, xmax, ymin, ymax = s.roi
        in_roi = ((rows >= ymin) & (rows <= ymax))[:, None] & ((cols >= xmin) & (cols <= xmax))[None, :]
        vals = img[act]
        n = int(vals.numel())
        if n == 0:
            return RenderStats(0.0, 0.0, 0.0, (0, 0), 0.0, 0.0, 0.0, 0.0, 0)
        # C keeps the first maximum in render order (strictly greater)
        flat_img = torch.where(act, img, torch.full_like(img, -math.inf)).reshape(-1)
        idx = int(torch.argmax(flat_img))
        sl, fa = divmod(idx, img.shape[1])
        max_I, f_m, s_m, (sl, fa) = self._maximum_position(float(flat_img[idx]), sl, fa)
        mean = float(vals.sum()) / n
        rms = math.sqrt(float((vals * vals).sum()) / max(1, n - 1))
        roi_vals = img[in_roi]
        rmsd = math.sqrt(float(((roi_vals - mean) ** 2).sum()) / max(1, int(roi_vals.numel()) - 1))
        return RenderStats(max_I, f_m, s_m, (sl, fa), mean, rms, rmsd, omega_sum / s.steps, n)


def build_kernel_tensors(setup: ResolvedSetup, config: SimulationConfig, dtype: torch.dtype,
                         device: torch.device) -> KernelTensors:
    """The set-up as the kernels read it, on ``device`` in ``dtype`` (geometry in float64).

    Parameters
    ----------
    setup : ResolvedSetup
        The resolved set-up.
    config : SimulationConfig
        The configuration it was resolved from (for C's phi = 0 quirk switch).
    dtype : torch.dtype
        The render dtype.
    device : torch.device
        The render device.

    Returns
    -------
    KernelTensors
        The kernels' inputs.
    """
    s, dt, dev = setup, dtype, device

    def t(x):
        return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=dt, device=dev)

    def g(x):  # geometry is always float64: h = a·q needs C's precision
        return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=torch.float64, device=dev)

    phis = s.phi_values
    base = s.a0 * 1e10  # rows a, b, c in Å
    rotations = [axis_rotation_matrix(s.spindle, p) if p != 0.0 else None for p in phis]
    normal, first = _phi_orientations(phis, config.compat.phi0_reuse)
    umats = s.mosaic_umats if s.mosaic_spread > 0 else np.eye(3)[None]
    if s.mosaic_spread <= 0:
        umats = np.repeat(umats, len(s.mosaic_umats), axis=0)

    def lattice(index_list):
        mats = []
        for q in index_list:
            ap = base if q is None or rotations[q] is None else base @ rotations[q].T
            mats.append(np.stack([ap @ u.T for u in umats]))
        return np.stack(mats)  # [P,M,3,3]

    lat = lattice(normal)
    lat_first = lattice(first) if first != normal else None
    table = listed = bounds = None
    if s.hkl is not None:
        tb = s.hkl
        table = t(np.ascontiguousarray(tb.values).reshape(-1))
        listed = torch.as_tensor(np.ascontiguousarray(tb.listed).reshape(-1), device=dev)
        bounds = (tb.h_min, tb.h_max, tb.k_min, tb.k_max, tb.l_min, tb.l_max)
    return KernelTensors(
        dtype=dt, device=dev, fdet=g(s.fdet), sdet=g(s.sdet), odet=g(s.odet), pix0=g(s.pix0), beam=g(s.beam),
        pixel_size=s.pixel_size, subpixel_size=s.pixel_size / s.oversample, oversample=s.oversample,
        thick_offsets=g(np.arange(s.thicksteps) * s.thickstep), thickstep=s.thickstep, mu=s.mu, thick=s.thick,
        distance=s.distance, close_distance=s.close_distance, curved=s.curved, point_pixel=s.point_pixel,
        incident=g(-s.source_dirs), inv_lambda=g(1e-10 / s.source_lambdas), polar_axis=g(s.polar_vector),
        # C recomputes the polarisation per subpixel even with -nopolar
        kahn=s.kahn, nopolar=s.nopolar and not s.oversample_polar,
        dmin_A=s.dmin * 1e10, lattice=g(lat),
        lattice_first=g(lat_first) if lat_first is not None else None, a_star=g(s.a_star), N=s.N,
        shape=s.shape, fudge=s.fudge, water=s.water_size != 0.0, table=table, listed=listed, bounds=bounds,
        default_F=s.default_F, interpolate=s.interpolate and s.hkl is not None,
    )


def _kernel_label(plan, segments) -> str:
    """What rendered an image, for people: the compiled kernel's name, or the eager kernel."""
    modes = {m for m, _, _ in segments}
    if plan is None or modes == {"eager"}:
        return "eager kernel"
    return plan.label + (" + eager rows" if "eager" in modes else "")


class _RecycledBuffers:
    """CPU memory for fallback maps, reused once nothing refers to an earlier map any more.

    A render writes its fallback map into fresh memory, and when pixels have few evaluations
    the first touch of fresh pages (the operating system mapping and zeroing them) is most of
    the map's cost. A buffer handed out here backs the tensor through a numpy array; when the
    last tensor, view or array on it is gone, a finalizer on that numpy array puts the buffer
    on a small free list, so repeated renders write into memory that is already mapped. A
    buffer is never handed out again while anything can still reach it. The free list keeps
    at most ``max_bytes``.
    """

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self._free: dict[int, list[np.ndarray]] = {}
        self._held = 0
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised CPU tensor (like ``torch.empty``) on recycled or new memory."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = int(np.prod(shape)) * itemsize
        with self._lock:
            spare = self._free.get(nbytes)
            base = spare.pop() if spare else None
            if base is not None:
                self._held -= nbytes
        if base is None:
            base = np.empty(max(nbytes, 1), dtype=np.uint8)  # malloc: pages are touched by the writer
        view = base[:nbytes].view(np.dtype(str(dtype).replace("torch.", ""))).reshape(shape)
        weakref.finalize(view, self._release, base)
        return torch.from_numpy(view)

    def _release(self, base: np.ndarray) -> None:
        with self._lock:
            if self._held + base.nbytes <= self.max_bytes:
                self._free.setdefault(base.nbytes, []).append(base)
                self._held += base.nbytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._held = 0


_fallback_buffers = _RecycledBuffers()


def _fallback_counts(res: dict, act: torch.Tensor):
    R, C = act.shape
    reason = res["reason"].reshape(R, C, -1)
    used = ~res["skipped"].reshape(R, C, -1)
    per = [((reason == code) & used).sum(-1, dtype=torch.int32) for code in (1, 2, 3)]
    stack = torch.stack(per, -1)
    counts = stack.sum(-1, dtype=torch.int32)
    dominant = (torch.argmax(stack, dim=-1) + 1).to(torch.uint8)
    dominant = torch.where(counts > 0, dominant, torch.zeros_like(dominant))
    return counts * act, dominant * act


def _phi_orientations(phis: np.ndarray, reuse: bool):
    """Which spindle rotation each phi step uses.

    Returns two lists of indices into ``phis`` (``None`` = unrotated): one for
    every phi loop, one for the very first loop of the run. With C's quirk a
    step at phi == 0 keeps the orientation of the last non-zero step before it,
    wrapping round to the previous loop; the very first loop starts unrotated.
    """
    P = len(phis)
    nonzero = [i for i in range(P) if phis[i] != 0.0]
    normal, first = [], []
    for p in range(P):
        if phis[p] != 0.0 or not reuse:
            normal.append(p if phis[p] != 0.0 else None)
            first.append(p if phis[p] != 0.0 else None)
            continue
        before = [i for i in nonzero if i < p]
        if before:
            normal.append(before[-1])
            first.append(before[-1])
        else:
            normal.append(nonzero[-1] if nonzero else None)
            first.append(None)
    return normal, first
