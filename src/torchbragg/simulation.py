"""The :class:`Simulation` object: configuration → image, fallback map, taps."""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .arguments import parse_args
from .config import SimulationConfig
from .kernel import (ROW_STATS, FastPlan, KernelTensors, combine_row_statistics, evaluate_block,
                     evaluation_ordinals, fallback_count_dtype, fast_enabled, fast_unsupported, fused_unsupported,
                     interp_out_of_range, row_statistics)
from .rotations import axis_rotation_matrix
from .setup import R_E_SQR, ResolvedSetup, SetupError, resolve

__all__ = ["Simulation", "RenderCancelled", "FallbackMap", "RenderStats"]

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
        :func:`torchbragg.kernel.fallback_count_dtype`). Sums promote to int64;
        convert before other arithmetic (``counts.int()``).
    reason : torch.Tensor
        uint8 [slow, fast]: the dominant fallback reason of each pixel
        (0 none, 1 no table, 2 outside the table, 3 unlisted in the table).
    evaluations_per_pixel : int
    """

    counts: torch.Tensor
    reason: torch.Tensor
    evaluations_per_pixel: int
    REASONS = {0: "table", 1: "default_F:no_table", 2: "default_F:outside_table", 3: "default_F:unlisted"}

    def pixel_counts(self) -> dict:
        """Number of pixels whose dominant reason is each code."""
        values = torch.bincount(self.reason.flatten().long(), minlength=4).tolist()
        return {self.REASONS[i]: int(values[i]) for i in range(4)}


@dataclass
class RenderStats:
    """The statistics nanoBragg prints after a render."""

    max_I: float
    max_I_fast_m: float
    max_I_slow_m: float
    max_pixel: Tuple[int, int]
    mean: float
    rms: float
    rmsd: float
    solid_angle_sr: float
    pixels: int

    def lines(self) -> List[str]:
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
    device : str or torch.device
    dtype : torch.dtype
        ``torch.float32`` (default) or ``torch.float64``.
    chunk_rows : int, optional
        Detector rows rendered at once; by default chosen to hold about two
        million evaluations. The image does not depend on it.

    Examples
    --------
    >>> sim = Simulation.from_args(["-cell", "100", "100", "100", "90", "90", "90",
    ...                             "-default_F", "100", "-N", "5", "-detpixels", "64"])
    >>> image = sim.render()
    """

    #: fused CPU render kernel: None follows ``TORCHBRAGG_FAST`` (on unless "0"), True/False forces it
    use_fast_kernel: Optional[bool] = None

    def __init__(self, config: SimulationConfig, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32, chunk_rows: Optional[int] = None):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.config = config
        try:
            self.setup: ResolvedSetup = resolve(config)
        except (OverflowError, ZeroDivisionError, ValueError) as err:
            if isinstance(err, ValueError) and type(err) is not ValueError:
                raise  # the project's own errors (SetupError, HKLFormatError, ...) say it better
            raise SetupError(f"the flag values make the set-up arithmetic fail ({err}): give values of "
                             "smaller magnitude") from None
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # as tensors report it: cuda:N
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        self._tensors = self._make_tensors()
        E = self.evaluations_per_pixel
        if chunk_rows and int(chunk_rows) < 1:  # 0 or None: automatic
            raise SetupError(f"chunk_rows: expected a positive number of rows, got {chunk_rows}")
        self.chunk_rows = int(chunk_rows) if chunk_rows else max(
            1, DEFAULT_EVALUATIONS_PER_CHUNK // max(1, self.setup.fpixels * E))
        self._cutoff_cache: Optional[Tuple[int, Optional[int]]] = None  # (rows scanned, cutoff)
        self.last_stats: Optional[RenderStats] = None
        #: which kernel rendered the last image: "fused CPU kernel", "GPU kernel" or "eager kernel"
        #: (with "+ eager rows" where the row of C's interpolation switch-off was rendered eagerly)
        self.last_kernel: Optional[str] = None

    # ------------------------------------------------------------------ API
    @classmethod
    def from_args(cls, args: Sequence[str], device: Union[str, torch.device] = "cpu",
                  dtype: torch.dtype = torch.float32, cwd: Optional[str] = None,
                  chunk_rows: Optional[int] = None) -> "Simulation":
        """Build a simulation from nanoBragg command-line arguments."""
        cfg = parse_args(list(args))
        cfg.cwd = str(cwd) if cwd is not None else None
        return cls(cfg, device=device, dtype=dtype, chunk_rows=chunk_rows)

    @property
    def shape(self) -> Tuple[int, int]:
        """Image shape (slow, fast)."""
        return self.setup.shape_px

    @property
    def evaluations_per_pixel(self) -> int:
        s = self.setup
        return s.thicksteps * s.oversample ** 2 * len(s.source_lambdas) * s.phisteps * len(s.mosaic_umats)

    @property
    def hkl_info(self) -> dict:
        """Where the structure factors came from (kind, source, bounds, count, default_F, warnings)."""
        return dict(self.setup.hkl_source)

    def render(self, progress: Optional[ProgressFn] = None, should_cancel: Optional[CancelFn] = None) -> torch.Tensor:
        """Render the image: photons per pixel, ``[slow, fast]`` on the simulation's device."""
        image, _ = self._render(progress, should_cancel, fallback=False)
        return image

    def render_with_fallback(self, progress: Optional[ProgressFn] = None,
                             should_cancel: Optional[CancelFn] = None) -> Tuple[torch.Tensor, FallbackMap]:
        """Render the image and the per-pixel default_F fallback map.

        On the CPU the map's memory is recycled from earlier maps that nothing refers to
        any more (never from one still in use), which saves mapping fresh pages on repeated
        renders.
        """
        return self._render(progress, should_cancel, fallback=True)

    def tap(self, slow: int, fast: int, taps: Sequence[str] = ("hkl_subpixel",)):
        """Run the engine's kernel on one pixel and return its :class:`~torchbragg.taps.PixelTap`."""
        from .taps import run_tap

        return run_tap(self, slow, fast, taps)

    # ------------------------------------------------------------ internals
    def _make_tensors(self) -> KernelTensors:
        s, dt, dev = self.setup, self.dtype, self.device

        def t(x):
            return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=dt, device=dev)

        def g(x):  # geometry is always float64: h = a·q needs C's precision
            return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=torch.float64, device=dev)

        phis = s.phi_values
        base = s.a0 * 1e10  # rows a, b, c in Å
        rotations = [axis_rotation_matrix(s.spindle, p) if p != 0.0 else None for p in phis]
        normal, first = _phi_orientations(phis, self.config.compat.phi0_reuse)
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

    def active_mask(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Pixels of a block that C renders (inside -roi, not zero in -mask)."""
        xmin, xmax, ymin, ymax = self.setup.roi
        act = ((rows >= ymin) & (rows <= ymax))[:, None] & ((cols >= xmin) & (cols <= xmax))[None, :]
        if self.setup.mask is not None:
            m = torch.as_tensor(self.setup.mask != 0, device=self.device)
            act = act & m[rows][:, cols]
        return act

    def first_pixel(self) -> Optional[Tuple[int, int]]:
        """The first pixel C renders (row-major inside the ROI and mask)."""
        if not hasattr(self, "_first_pixel"):
            self._first_pixel = self._find_first_pixel()
        return self._first_pixel

    def _find_first_pixel(self) -> Optional[Tuple[int, int]]:
        xmin, xmax, ymin, ymax = self.setup.roi
        ymax, xmax = min(ymax, self.setup.spixels - 1), min(xmax, self.setup.fpixels - 1)
        if self.setup.mask is None:
            return (ymin, xmin) if ymin <= ymax and xmin <= xmax else None
        sub = np.asarray(self.setup.mask)[ymin:ymax + 1, xmin:xmax + 1] != 0
        hits = np.argwhere(sub)
        return (int(hits[0][0]) + ymin, int(hits[0][1]) + xmin) if len(hits) else None

    def interpolation_cutoff(self, until_row: Optional[int] = None) -> Optional[int]:
        """Global evaluation ordinal where C switches interpolation off (None: never).

        C turns tricubic interpolation off for the rest of the run at the first
        lookup whose 4×4×4 neighbourhood leaves the table. The scan runs in
        render order and stops at ``until_row`` when given (a tap only needs to
        know whether the switch happened before its pixel).

        It first tries a cheap proof that no evaluation of the image can leave
        the table (:meth:`_table_holds_every_neighbourhood`); otherwise the
        fused kernel scans the rows (:meth:`_scan_cutoff_fast`, the eager
        kernel deciding evaluations within rounding of C's tests), or, without
        it, the eager kernel does (:meth:`_scan_cutoff_eager`). All three give
        the eager scan's ordinal.
        """
        kt = self._tensors
        if not kt.interpolate:
            return None
        scanned, cutoff = self._cutoff_cache or (0, None)
        ny, nx = self.shape
        limit = ny if until_row is None else min(ny, until_row + 1)
        if cutoff is not None or scanned >= limit:
            return cutoff
        if scanned == 0 and self._table_holds_every_neighbourhood():
            self._cutoff_cache = (ny, None)
            return None
        plan = self._scan_plan()
        with torch.no_grad():
            if plan is not None:
                cutoff = self._scan_cutoff_fast(plan, scanned, limit)
            else:
                cutoff = self._scan_cutoff_eager(scanned, limit)
        self._cutoff_cache = (limit, cutoff)
        return cutoff

    def _scan_cutoff_eager(self, start: int, limit: int) -> Optional[int]:
        """The switch-off ordinal among rows ``start .. limit-1``, by the eager kernel (None: none)."""
        cols = torch.arange(self.shape[1], device=self.device)
        for r0 in range(start, limit, self.chunk_rows):
            hit = self._eager_block_cutoff(torch.arange(r0, min(limit, r0 + self.chunk_rows), device=self.device),
                                           cols)
            if hit is not None:
                return hit
        return None

    def _eager_pixel_cutoff(self, slow: int, fast: int) -> Optional[int]:
        """The first evaluation of one (rendered) pixel that switches interpolation off, by the eager kernel."""
        return self._eager_block_cutoff(torch.tensor([slow], device=self.device),
                                        torch.tensor([fast], device=self.device))

    def _eager_block_cutoff(self, rows: torch.Tensor, cols: torch.Tensor) -> Optional[int]:
        """The first evaluation of a block's rendered pixels whose lookup leaves the table (None: none)."""
        kt = self._tensors
        res = evaluate_block(kt, rows, cols, first_pixel=self.first_pixel(), want_hkl_only=True)
        bad = interp_out_of_range(kt, res["hkl"]) & ~res["skipped"]
        act = self.active_mask(rows, cols)
        bad = bad & act.reshape(act.shape + (1,) * (bad.dim() - 2))
        if not bool(bad.any()):
            return None
        ords = evaluation_ordinals(rows, cols, self.shape[1], res["E"], bad.shape)
        return int(ords[bad].min())

    def _scan_cutoff_fast(self, plan: FastPlan, start: int, limit: int) -> Optional[int]:
        """The switch-off ordinal among rows ``start .. limit-1``, by the fused kernel's scan.

        The scan returns the first evaluation that is not certainly harmless; one
        within rounding of C's tests is decided by the eager kernel (its pixel),
        and the scan goes on after that pixel when it does not switch off. The
        first pixel, whose first phi loop keeps the unrotated crystal when
        ``lattice_first`` applies, is always checked eagerly.
        """
        ny, nx = self.shape
        E = self.evaluations_per_pixel
        xmin, xmax, ymin, ymax = self.setup.roi
        r_lo, r_hi = max(0, ymin, start), min(ny - 1, ymax, limit - 1)
        c_lo, c_hi = max(0, xmin), min(nx - 1, xmax)
        first = self.first_pixel()
        if first is None or r_lo > r_hi or c_lo > c_hi:
            return None
        row, col = r_lo, c_lo
        if self._tensors.lattice_first is not None and r_lo <= first[0] <= r_hi:
            # nothing before the first pixel renders; it and the rest of its row come next
            hit = self._eager_pixel_cutoff(*first)
            if hit is not None:
                return hit
            row, col = first[0], first[1] + 1
        while row <= r_hi:
            if col > c_hi:
                row, col = row + 1, c_lo
                continue
            if col > c_lo:  # the rest of a row
                hit = plan.scan(row, 1, col, c_hi - col + 1)
                if hit is None:
                    row, col = row + 1, c_lo
                    continue
            else:
                hit = plan.scan(row, r_hi - row + 1, c_lo, c_hi - c_lo + 1)
                if hit is None:
                    return None
            ordinal, certain = hit
            if certain:
                return ordinal
            prow, pcol = divmod(ordinal // E, nx)
            exact = self._eager_pixel_cutoff(prow, pcol)
            if exact is not None:
                return exact
            row, col = prow, pcol + 1
        return None

    def _scan_plan(self) -> Optional[FastPlan]:
        """A fused-kernel plan whose switch-off scan applies here, or None (eager scan)."""
        plan = self._fast_plan()
        if not isinstance(plan, FastPlan):
            # the render may be on the GPU while the scan runs on the CPU
            if not self._compiled_kernels_on() or fused_unsupported(self._tensors) is not None:
                return None
            plan = self.__dict__.get("_scan_plan_cache")
            if plan is None:
                plan = self.__dict__["_scan_plan_cache"] = FastPlan(self._tensors, **self.plan_arguments())
        return plan if plan.scan_function() is not None else None

    def _table_holds_every_neighbourhood(self) -> bool:
        """True when no evaluation of the image can leave the table (C never switches interpolation off).

        A conservative bound, no render: every subpixel position lies in the box
        spanned by the rendered region's corner subpixels and the detector
        thickness; on tiles of it ``d·a = (pos·a)/|pos|`` is bounded by the
        corners' ``pos·a`` and the nearest and farthest points of the tile, for
        every lattice (phi step, mosaic domain, and the first pixel's unrotated
        one) and source. False does not mean it switches off, only that the scan
        has to look.
        """
        kt = self._tensors
        s = self.setup
        if kt.bounds is None or kt.curved:
            return False
        ny, nx = self.shape
        xmin, xmax, ymin, ymax = s.roi
        r_lo, r_hi = max(0, ymin), min(ny - 1, ymax)
        c_lo, c_hi = max(0, xmin), min(nx - 1, xmax)
        if r_lo > r_hi or c_lo > c_hi:
            return True
        f, sd, o, p0 = (np.asarray(t.detach().cpu(), dtype=np.float64) for t in (kt.fdet, kt.sdet, kt.odet, kt.pix0))
        basis = np.stack([f, sd, o])
        if not np.allclose(basis @ basis.T, np.eye(3), rtol=0, atol=1e-12):
            return False  # the nearest-point bound below needs orthonormal detector axes
        os_, sub = kt.oversample, kt.subpixel_size
        T = kt.thick_offsets.numel()
        lats = [np.asarray(kt.lattice.detach().cpu(), dtype=np.float64).reshape(-1, 3, 3)]
        if kt.lattice_first is not None:
            lats.append(np.asarray(kt.lattice_first.detach().cpu(), dtype=np.float64).reshape(-1, 3, 3))
        lat = np.concatenate(lats).reshape(-1, 3)  # [L*3] rows a, b, c of every lattice
        norm_a = np.linalg.norm(lat, axis=-1)
        inc = np.asarray(kt.incident.detach().cpu(), dtype=np.float64)  # [S, 3]
        il = np.asarray(kt.inv_lambda.detach().cpu(), dtype=np.float64)[:, None]  # [S, 1]
        ia = inc @ lat.T  # [S, L*3]
        hmin, hmax, kmin, kmax, lmin, lmax = kt.bounds
        low = np.tile(np.array([hmin, kmin, lmin], dtype=np.float64) + 2.0, len(lat) // 3)  # C: h - 2 >= hmin
        high = np.tile(np.array([hmax, kmax, lmax], dtype=np.float64) - 2.0, len(lat) // 3)  # h <= hmax - 2
        margin = 1e-6 * (1.0 + np.abs(low).max() + np.abs(high).max())
        fa, fb = (c_lo * os_ + 0.5) * sub, (c_hi * os_ + os_ - 0.5) * sub
        sa, sb = (r_lo * os_ + 0.5) * sub, (r_hi * os_ + os_ - 0.5) * sub
        ta, tb = sorted((0.0, float((T - 1) * kt.thickstep)))
        pf, ps, po = -(p0 @ f), -(p0 @ sd), -(p0 @ o)  # the origin in detector coordinates
        # coarse tiles first, finer ones while they may still succeed (the bound's slack shrinks with the tile)
        cap = int(max(1, math.sqrt(4e6 / (8 * len(lat)))))  # [tiles, 8, L*3] stays near 32 MB
        for nt in sorted({min(n, cap) for n in (8, 32, 128)}):
            fe = np.linspace(fa, fb, min(nt, c_hi - c_lo + 1) + 1)
            se = np.linspace(sa, sb, min(nt, r_hi - r_lo + 1) + 1)
            F0, S0 = (x.reshape(-1) for x in np.meshgrid(fe[:-1], se[:-1]))  # tile ranges [F0, F1] x [S0, S1]
            F1, S1 = (x.reshape(-1) for x in np.meshgrid(fe[1:], se[1:]))
            corners = np.stack([Fc[:, None] * f + Sc[:, None] * sd + tc * o + p0
                                for Fc in (F0, F1) for Sc in (S0, S1) for tc in (ta, tb)], axis=1)  # [tiles, 8, 3]
            dist = np.linalg.norm(corners, axis=-1)
            rmax = dist.max(-1)
            # nearest point of a tile box to the origin: clamp the origin's detector coordinates
            df, ds, dt = np.clip(pf, F0, F1) - pf, np.clip(ps, S0, S1) - ps, np.clip(po, ta, tb) - po
            rmin = np.sqrt(df * df + ds * ds + dt * dt)
            u = (corners.reshape(-1, 3) @ lat.T).reshape(len(F0), 8, -1)  # [tiles, 8, L*3]: pos·a
            umin, umax = u.min(1), u.max(1)
            with np.errstate(divide="ignore", invalid="ignore"):
                dhi = np.where(umax > 0, umax / rmin[:, None], umax / rmax[:, None]).max(0)
                dlo = np.where(umin > 0, umin / rmax[:, None], umin / rmin[:, None]).min(0)
                dhi, dlo = np.minimum(dhi, norm_a), np.maximum(dlo, -norm_a)  # d·a, |d| = 1
                hi, lo = il * (dhi - ia), il * (dlo - ia)  # [S, L*3]
                if np.all(lo >= low + margin) and np.all(hi <= high - margin):
                    return True
                # values at the corners themselves: outside there, finer tiles cannot prove it
                d_at = (u / dist[..., None]).reshape(-1, len(lat))
                if not (np.all(il * (d_at.min(0) - ia) >= low) and np.all(il * (d_at.max(0) - ia) <= high)):
                    return False
        return False

    def evaluate(self, rows: torch.Tensor, cols: torch.Tensor, detail: bool = False) -> dict:
        """Run the kernel on a block (used by rendering and taps)."""
        cutoff = self.interpolation_cutoff(until_row=int(rows.max()))
        return evaluate_block(self._tensors, rows, cols, interp_cutoff=cutoff,
                              fpixels=self.setup.fpixels, first_pixel=self.first_pixel(), detail=detail)

    def reduce(self, res: dict) -> dict:
        """Reduce per-evaluation results to pixel values, following C's factor rules.

        Returns a dict with ``value`` (photons), ``I_sum`` (sum before scaling,
        background included), and the factors applied at the end.
        """
        s = self.setup
        inten = res["intensity"]
        R, C = inten.shape[:2]
        flat = inten.reshape(R, C, -1).to(torch.float64 if self.dtype == torch.float64 else inten.dtype)
        omega, capture, polar = res["omega"], res["capture"], res["polar"]
        T = capture.shape[2]
        omega_first = omega[:, :, 0, 0, 0]
        capture_last = capture[:, :, T - 1, 0, 0]
        # polarisation: value at the first (subpixel, source) not skipped by -dmin
        pol = polar.reshape(R, C, -1)
        ok = ~res["dmin_skip"].reshape(R, C, -1)
        first_ok = torch.argmax(ok.to(torch.int8), dim=-1)
        polar_first = torch.where(ok.any(-1), torch.gather(pol, -1, first_ok[..., None])[..., 0],
                                  torch.zeros_like(pol[..., 0]))
        scale = R_E_SQR * s.fluence / s.steps
        if not (s.oversample_thick or s.oversample_polar or s.oversample_omega):
            I_sum = flat.sum(-1) + s.I_bg
            value = I_sum * scale * capture_last * polar_first * omega_first
            return {"value": value, "I_sum": I_sum, "omega_applied": omega_first,
                    "capture_applied": capture_last, "polar_applied": polar_first}
        # each evaluation's oversampled factors (capture, omega per subpixel; polar per source too)
        evshape = inten.shape
        mult = torch.ones(evshape, dtype=inten.dtype, device=inten.device)
        sub_shape = evshape[:5] + (1,) * (len(evshape) - 5)
        if s.oversample_thick:
            mult = mult * capture.reshape(sub_shape)
        if s.oversample_omega:
            mult = mult * omega.reshape(sub_shape)
        if s.oversample_polar:
            mult = mult * polar.reshape(evshape[:6] + (1,) * (len(evshape) - 6))
        if self.config.compat.oversample_running_product:
            # C multiplies the running sum (background and earlier terms) by each factor inside the loop
            mult = torch.where(res["skipped"], torch.ones_like(mult), mult).reshape(R, C, -1)
            suffix = torch.flip(torch.cumprod(torch.flip(mult, [-1]), -1), [-1])
            I_sum = (flat * suffix).sum(-1) + s.I_bg * suffix[..., 0]
        else:
            # -fix_oversample: each term weighted by its own factor, the background by their mean
            mult = mult.reshape(R, C, -1).to(flat.dtype)
            I_sum = (flat * mult).sum(-1) + s.I_bg * mult.mean(-1)
        value = I_sum * scale
        if not s.oversample_thick:
            value = value * capture_last
        if not s.oversample_polar:
            value = value * polar_first
        if not s.oversample_omega:
            value = value * omega_first
        return {"value": value, "I_sum": I_sum, "omega_applied": omega_first if not s.oversample_omega else None,
                "capture_applied": capture_last if not s.oversample_thick else None,
                "polar_applied": polar_first if not s.oversample_polar else None}

    def plan_arguments(self) -> dict:
        """The keyword arguments of a compiled-kernel plan (:class:`~torchbragg.kernel.FastPlan`,
        :class:`~torchbragg.gpu_kernel.GpuPlan`) for this simulation, besides its tensors."""
        s = self.setup
        return dict(I_bg=s.I_bg, scale=R_E_SQR * s.fluence / s.steps, fpixels=s.fpixels, mask=s.mask,
                    oversample_factors=(s.oversample_thick, s.oversample_polar, s.oversample_omega),
                    running_product=self.config.compat.oversample_running_product)

    def _compiled_kernels_on(self) -> bool:
        """``use_fast_kernel`` (instance or class attribute) when not None, else ``TORCHBRAGG_FAST``."""
        return fast_enabled() if self.use_fast_kernel is None else bool(self.use_fast_kernel)

    def _fast_plan(self) -> Optional[FastPlan]:
        """The compiled-kernel plan for this simulation (fused CPU or GPU), or None where only the
        eager kernel applies (see :meth:`_compiled_kernels_on`)."""
        if not self._compiled_kernels_on():
            return None
        cached = self.__dict__.get("_fast_plan_cache")
        if cached is None:
            kt = self._tensors
            plan = None
            packing = self.plan_arguments()
            if fast_unsupported(kt) is None:
                plan = FastPlan(kt, **packing)
            elif kt.device.type == "cuda":
                from .gpu_kernel import GpuPlan, gpu_unsupported

                if gpu_unsupported(kt) is None:
                    plan = GpuPlan(kt, **packing)
            cached = self.__dict__["_fast_plan_cache"] = (plan,)
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
        plan = self._fast_plan() if total > 0 and c_hi >= c_lo else None
        if plan is not None and plan.function(fallback) is None:
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

    def _row_segments(self, plan, fallback: bool, cutoff: Optional[int], r_lo: int, r_hi: int, nx: int):
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
        self._free: Dict[int, List[np.ndarray]] = {}
        self._held = 0
        self._lock = threading.Lock()

    def empty(self, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
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
