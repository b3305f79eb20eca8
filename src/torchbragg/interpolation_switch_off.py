"""C's interpolation switch-off: where tricubic interpolation stops for the rest of the run.

nanoBragg interpolates structure factors until the first lookup whose 4×4×4
neighbourhood leaves the table, then switches interpolation off for every later
evaluation of the run. :class:`InterpolationSwitchOff` finds that evaluation's
global ordinal in render order for one :class:`~torchbragg.Simulation`: a cheap
proof that no evaluation can leave the table, else the compiled CPU kernel's scan
(evaluations within rounding of C's tests decided by the eager kernel), else the
eager kernel alone. All three give the eager scan's ordinal.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .kernels.cpu import CpuPlan
from .kernels.eager import evaluate_block, evaluation_ordinals, interp_out_of_range
from .kernels.packing import compiled_kernels_unsupported

__all__ = ["InterpolationSwitchOff"]


class InterpolationSwitchOff:
    """The switch-off search of one simulation, remembering how far it has scanned.

    Parameters
    ----------
    sim : torchbragg.Simulation
        The simulation (its set-up, tensors, mask and compiled-kernel plan).
    """

    def __init__(self, sim):
        self.sim = sim
        self._scanned: tuple[int, int | None] | None = None  # (rows scanned, cutoff)
        self._plan: CpuPlan | None = None

    def cutoff(self, until_row: int | None = None) -> int | None:
        """Global evaluation ordinal where C switches interpolation off (None: never).

        C turns tricubic interpolation off for the rest of the run at the first
        lookup whose 4×4×4 neighbourhood leaves the table. The scan runs in
        render order and stops at ``until_row`` when given (a tap only needs to
        know whether the switch happened before its pixel).

        It first tries a cheap proof that no evaluation of the image can leave
        the table (:meth:`table_holds_every_neighbourhood`); otherwise the
        fused kernel scans the rows (:meth:`scan_compiled`, the eager
        kernel deciding evaluations within rounding of C's tests), or, without
        it, the eager kernel does (:meth:`scan_eager`). All three give
        the eager scan's ordinal.

        Parameters
        ----------
        until_row : int, optional
            Last detector row (slow index) the scan needs to cover; the whole image
            when omitted. Rows already scanned are not scanned again.

        Returns
        -------
        int or None
            The global ordinal (in render order, counting every evaluation of every
            pixel) of the first evaluation that switches interpolation off, or None
            when none does within the rows scanned (always None without interpolation).
        """
        kt = self.sim.kernel_tensors
        if not kt.interpolate:
            return None
        scanned, cutoff = self._scanned or (0, None)
        ny, nx = self.sim.shape
        limit = ny if until_row is None else min(ny, until_row + 1)
        if cutoff is not None or scanned >= limit:
            return cutoff
        if scanned == 0 and self.table_holds_every_neighbourhood():
            self._scanned = (ny, None)
            return None
        plan = self.scan_plan()
        with torch.no_grad():
            if plan is not None:
                cutoff = self.scan_compiled(plan, scanned, limit)
            else:
                cutoff = self.scan_eager(scanned, limit)
        self._scanned = (limit, cutoff)
        return cutoff

    def scan_eager(self, start: int, limit: int) -> int | None:
        """The switch-off ordinal among rows ``start .. limit-1``, by the eager kernel (None: none).

        Parameters
        ----------
        start : int
            First row to scan.
        limit : int
            One past the last row to scan.

        Returns
        -------
        int or None
            Global evaluation ordinal of the switch-off, or None.
        """
        cols = torch.arange(self.sim.shape[1], device=self.sim.device)
        for r0 in range(start, limit, self.sim.chunk_rows):
            hit = self.eager_block(torch.arange(r0, min(limit, r0 + self.sim.chunk_rows), device=self.sim.device),
                                           cols)
            if hit is not None:
                return hit
        return None

    def eager_pixel(self, slow: int, fast: int) -> int | None:
        """The first evaluation of one (rendered) pixel that switches interpolation off, by the eager kernel.

        Parameters
        ----------
        slow, fast : int
            The pixel's indices.

        Returns
        -------
        int or None
            Global evaluation ordinal, or None when no lookup of the pixel leaves the table
            (or the pixel is not rendered).
        """
        return self.eager_block(torch.tensor([slow], device=self.sim.device),
                                        torch.tensor([fast], device=self.sim.device))

    def eager_block(self, rows: torch.Tensor, cols: torch.Tensor) -> int | None:
        """The first evaluation of a block's rendered pixels whose lookup leaves the table (None: none).

        Parameters
        ----------
        rows, cols : torch.Tensor
            1-D integer tensors of the block's slow and fast indices, on the simulation's device.

        Returns
        -------
        int or None
            The smallest global evaluation ordinal among the block's rendered pixels whose
            interpolation neighbourhood leaves the table (skipped evaluations excluded), or None.
        """
        kt = self.sim.kernel_tensors
        res = evaluate_block(kt, rows, cols, first_pixel=self.sim.first_pixel(), want_hkl_only=True)
        bad = interp_out_of_range(kt, res["hkl"]) & ~res["skipped"]
        act = self.sim.active_mask(rows, cols)
        bad = bad & act.reshape(act.shape + (1,) * (bad.dim() - 2))
        if not bool(bad.any()):
            return None
        ords = evaluation_ordinals(rows, cols, self.sim.shape[1], res["E"], bad.shape)
        return int(ords[bad].min())

    def scan_compiled(self, plan: CpuPlan, start: int, limit: int) -> int | None:
        """The switch-off ordinal among rows ``start .. limit-1``, by the fused kernel's scan.

        The scan returns the first evaluation that is not certainly harmless; one
        within rounding of C's tests is decided by the eager kernel (its pixel),
        and the scan goes on after that pixel when it does not switch off. The
        first pixel, whose first phi loop keeps the unrotated crystal when
        ``lattice_first`` applies, is always checked eagerly.

        Parameters
        ----------
        plan : CpuPlan
            The fused CPU kernel plan whose scan is used.
        start : int
            First row to scan.
        limit : int
            One past the last row to scan.

        Returns
        -------
        int or None
            Global evaluation ordinal of the switch-off, or None.
        """
        ny, nx = self.sim.shape
        E = self.sim.evaluations_per_pixel
        xmin, xmax, ymin, ymax = self.sim.setup.roi
        r_lo, r_hi = max(0, ymin, start), min(ny - 1, ymax, limit - 1)
        c_lo, c_hi = max(0, xmin), min(nx - 1, xmax)
        first = self.sim.first_pixel()
        if first is None or r_lo > r_hi or c_lo > c_hi:
            return None
        row, col = r_lo, c_lo
        if self.sim.kernel_tensors.lattice_first is not None and r_lo <= first[0] <= r_hi:
            # nothing before the first pixel renders; it and the rest of its row come next
            hit = self.eager_pixel(*first)
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
            exact = self.eager_pixel(prow, pcol)
            if exact is not None:
                return exact
            row, col = prow, pcol + 1
        return None

    def scan_plan(self) -> CpuPlan | None:
        """A fused-kernel plan whose switch-off scan applies here, or None (eager scan).

        Returns
        -------
        CpuPlan or None
            The simulation's own CPU plan, or (for a render elsewhere) a CPU plan built and kept
            here; None when compiled kernels are off, unsupported or have no scan function.
        """
        plan = self.sim.compiled_plan()
        if not isinstance(plan, CpuPlan):
            # the render may be on the GPU while the scan runs on the CPU
            kt = self.sim.kernel_tensors
            if not self.sim.compiled_kernels_on() or compiled_kernels_unsupported(kt, None) is not None:
                return None
            plan = self._plan
            if plan is None:
                plan = self._plan = CpuPlan(self.sim.kernel_tensors, **self.sim.plan_arguments())
        return plan if plan.scan_function() is not None else None

    def table_holds_every_neighbourhood(self) -> bool:
        """True when no evaluation of the image can leave the table (C never switches interpolation off).

        A conservative bound, no render: every subpixel position lies in the box
        spanned by the rendered region's corner subpixels and the detector
        thickness; on tiles of it ``d·a = (pos·a)/|pos|`` is bounded by the
        corners' ``pos·a`` and the nearest and farthest points of the tile, for
        every lattice (phi step, mosaic domain, and the first pixel's unrotated
        one) and source. False does not mean it switches off, only that the scan
        has to look.

        Returns
        -------
        bool
            True when the bound proves every lookup stays inside the table (or nothing is
            rendered); False without a table, for a curved detector, for non-orthonormal
            detector axes, or when the bound cannot prove it.
        """
        kt = self.sim.kernel_tensors
        s = self.sim.setup
        if kt.bounds is None or kt.curved:
            return False
        ny, nx = self.sim.shape
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
