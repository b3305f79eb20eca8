"""The parameters of one simulation packed for the compiled kernels.

Both compiled kernels (the CPU one, :class:`~torchbragg.kernels.cpu.CpuPlan`,
and the GPU one, :class:`~torchbragg.kernels.gpu.GpuPlan`) read the same
packing: a float64 array of scalars and vectors (``D_*`` indices), an int64
array of counts and switches (``I_*``), the ``[P*M, 9]`` lattice vectors, the
``[S, 10]`` sources and the structure-factor table with one extra entry,
default_F, for every index outside its box. The indices reach the native
sources as ``-D`` switches (:func:`parameter_defines`), the variant's switches
as :func:`variant_defines`.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from .eager import KernelTensors

__all__ = ["KernelParameters", "compiled_kernels_unsupported", "fallback_count_dtype", "parameter_defines",
           "variant_defines", "SHAPE_CODES", "RENDER_ARGTYPES"]

#: crystal shapes the compiled kernels know, and their TB_SHAPE codes
SHAPE_CODES = {"square": 0, "round": 1, "gauss": 2, "tophat": 3}

#: the float64 parameters (name, length): ``dp[D_<name>]`` in the native sources
D_FIELDS = (("fdet", 3), ("sdet", 3), ("odet", 3), ("pix0", 3), ("subpixel", 1), ("pixel", 1),
            ("close", 1), ("thickstep", 1), ("mu", 1), ("dmin", 1), ("kahn", 1), ("I_bg", 1),
            ("scale", 1), ("N", 3), ("default_F", 1), ("fudge", 1), ("a_star", 9), ("N2prod", 1),
            ("Nprod", 1), ("scan_eps", 1), ("beam", 3), ("distance", 1))
#: the int64 parameters: ``ip[I_<name>]``
I_FIELDS = (("oversample", 1), ("T", 1), ("S", 1), ("P", 1), ("M", 1), ("fpixels", 1), ("point_pixel", 1),
            ("nopolar", 1), ("thick_on", 1), ("dmin_on", 1), ("water", 1), ("bounds", 6),
            ("count_bytes", 1), ("ov_thick", 1), ("ov_polar", 1), ("ov_omega", 1), ("curved", 1))


def _field_offsets(fields):
    out, pos = {}, 0
    for name, n in fields:
        out[name] = pos
        pos += n
    return out, pos


D_OFFSETS, D_LEN = _field_offsets(D_FIELDS)
I_OFFSETS, I_LEN = _field_offsets(I_FIELDS)

#: ctypes argument types of a host render entry point (the CPU kernel's ``tb_render``, the GPU
#: kernel's host build ``tb_render_host``): dp, ip, lattice, src, table, mask, row0, nrows, col0, ncols,
#: image, image_stride, counts, reasons, fb_stride, row statistics (GPU: per-pixel solid angles)
RENDER_ARGTYPES = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int64,
                                                                  ctypes.c_void_p, ctypes.c_void_p,
                                                                  ctypes.c_int64, ctypes.c_void_p]


def parameter_defines() -> list[str]:
    """The packed-parameter indices as ``-D`` switches: ``D_<name>=<index>``, ``I_<name>=<index>``.

    Returns
    -------
    list of str
        ``D_<name>=<offset>`` for every float64 field, then ``I_<name>=<offset>`` for every int64 field.
    """
    return [f"D_{k}={v}" for k, v in D_OFFSETS.items()] + [f"I_{k}={v}" for k, v in I_OFFSETS.items()]


def variant_defines(dtype: torch.dtype, shape: str, table: bool, count: bool, interp: bool,
                    over: int) -> list[str]:
    """The switches of one compiled variant, then the parameter indices.

    Parameters
    ----------
    dtype : torch.dtype
        float32 or float64 (``TB_REAL``, ``TB_DOUBLE``).
    shape : str
        Crystal shape, a key of :data:`SHAPE_CODES`.
    table : bool
        Whether the variant reads a structure-factor table.
    count : bool
        Whether the variant counts default_F fallbacks (writes the fallback maps).
    interp : bool
        Tricubic interpolation of every lookup (only with a table).
    over : int
        The -oversample_* rule: 0 none, 1 C's running product, 2 per-term weighting.

    Returns
    -------
    list of str
        ``NAME=VALUE`` switches.
    """
    double = dtype == torch.float64
    return [f"TB_REAL={'double' if double else 'float'}", f"TB_DOUBLE={int(double)}",
            f"TB_SHAPE={SHAPE_CODES[shape]}", f"TB_TABLE={int(table)}", f"TB_COUNT={int(count)}",
            f"TB_INTERP={int(interp and table)}", f"TB_OVER={int(over)}"] + parameter_defines()


def compiled_kernels_unsupported(kt: KernelTensors, device_type: str | None = "cpu") -> str | None:
    """Why the compiled kernel for ``device_type`` cannot render this set-up.

    Parameters
    ----------
    kt : KernelTensors
        The set-up.
    device_type : {"cpu", "cuda", None}, optional
        The kernel: the CPU one, the GPU one, or None for what both have in common whatever the
        set-up's device (the GPU kernel's host build renders a CPU set-up).

    Returns
    -------
    str or None
        The reason, or None when the kernel covers the set-up.
    """
    if device_type is not None and kt.device.type != device_type:
        return "not a CPU render" if device_type == "cpu" else "not a CUDA render"
    if kt.shape not in SHAPE_CODES:
        return f"crystal shape {kt.shape}"
    if kt.shape == "square" and any(n > 1 and n != int(n) for n in kt.N):
        return "fractional N with a square crystal"
    return None


def fallback_count_dtype(evaluations_per_pixel: int) -> torch.dtype:
    """dtype of fallback-map counts: the smallest signed integer that holds a pixel's evaluations.

    int8 up to 127, int16 up to 32767, int32 beyond. The map is written into fresh memory on
    every render, and the operating system's zeroing of those pages is most of its cost when a
    pixel has few evaluations, so the narrower the better.

    Parameters
    ----------
    evaluations_per_pixel : int
        The largest count a pixel can reach: its number of evaluations.

    Returns
    -------
    torch.dtype
        ``torch.int8``, ``torch.int16`` or ``torch.int32``.
    """
    for dt in (torch.int8, torch.int16):
        if evaluations_per_pixel <= torch.iinfo(dt).max:
            return dt
    return torch.int32


class KernelParameters:
    """The packed parameters of one simulation (see the module's description).

    Parameters
    ----------
    kt : KernelTensors
        The set-up.
    I_bg : float
        The background added to every pixel's sum (C's ``I``).
    scale : float
        The pixel scale (fluence, r_e², ...) applied after the sum.
    fpixels : int
        Pixels per detector row (the mask's row stride).
    mask : numpy.ndarray, optional
        [slow, fast] non-zero where a pixel is rendered.
    oversample_factors : tuple of bool, optional
        -oversample_thick, -oversample_polar, -oversample_omega.
    running_product : bool, optional
        With any of those: C's running product (True) or per-term weighting.

    Attributes
    ----------
    kt : KernelTensors
        The set-up.
    dtype : torch.dtype
        The render dtype (``kt.dtype``).
    fpixels : int
        Pixels per detector row.
    dparams : numpy.ndarray
        float64 scalars and vectors at the ``D_*`` offsets (lengths in metres, wavelengths as 1/Å).
    iparams : numpy.ndarray
        int64 counts and switches at the ``I_*`` offsets.
    lattice : numpy.ndarray
        float64 ``[P*M, 9]``: the real-space cell vectors (a, b, c rows, Å) per phi step and mosaic domain.
    src : numpy.ndarray
        float64 ``[S, 10]`` per source: incident direction (3), 1/λ in 1/Å (1), and the polarisation
        frame's B and E vectors (3 + 3, zero when polarisation is off or the Kahn factor is 0).
    table : torch.Tensor or None
        The flattened structure-factor table on the CPU with one extra last entry, default_F, or None.
    mask : numpy.ndarray or None
        uint8 ``[slow, fast]``, 1 where a pixel is rendered, or None for every pixel.
    evaluations_per_pixel : int
        Layers x subpixels x sources x phi steps x mosaic domains.
    count_dtype : torch.dtype
        The dtype of the fallback counts (:func:`fallback_count_dtype`).
    oversample_factors : tuple of bool
        Which of -oversample_thick, -oversample_polar, -oversample_omega apply per evaluation.
    over : int
        The variant's -oversample_* rule: 0 none, 1 C's running product, 2 per-term weighting.

    Raises
    ------
    ValueError
        When the compiled kernels do not cover the set-up (:func:`compiled_kernels_unsupported`).
    """

    def __init__(self, kt: KernelTensors, *, I_bg: float, scale: float, fpixels: int,
                 mask: np.ndarray | None = None, oversample_factors: tuple[bool, bool, bool] = (False, False, False),
                 running_product: bool = True):
        why = compiled_kernels_unsupported(kt, None)
        if why is not None:
            raise ValueError(why)
        self.kt = kt
        self.dtype = kt.dtype
        self.fpixels = int(fpixels)
        d = np.zeros(D_LEN, dtype=np.float64)
        i = np.zeros(I_LEN, dtype=np.int64)
        g = lambda x: np.asarray(x.detach().cpu(), dtype=np.float64)  # noqa: E731
        for name in ("fdet", "sdet", "odet", "pix0"):
            d[D_OFFSETS[name]:D_OFFSETS[name] + 3] = g(getattr(kt, name))
        d[D_OFFSETS["subpixel"]] = kt.subpixel_size
        d[D_OFFSETS["pixel"]] = kt.pixel_size
        d[D_OFFSETS["close"]] = kt.close_distance
        d[D_OFFSETS["beam"]:D_OFFSETS["beam"] + 3] = g(kt.beam)
        d[D_OFFSETS["distance"]] = kt.distance
        d[D_OFFSETS["thickstep"]] = kt.thickstep
        d[D_OFFSETS["mu"]] = kt.mu
        d[D_OFFSETS["dmin"]] = kt.dmin_A
        d[D_OFFSETS["kahn"]] = kt.kahn
        d[D_OFFSETS["I_bg"]] = I_bg
        d[D_OFFSETS["scale"]] = scale
        Na, Nb, Nc = (float(n) for n in kt.N)
        if kt.shape == "square":  # the eager kernel leaves out axes with N <= 1
            d[D_OFFSETS["N"]:D_OFFSETS["N"] + 3] = [n if n > 1 else 1.0 for n in (Na, Nb, Nc)]
        else:
            d[D_OFFSETS["N"]:D_OFFSETS["N"] + 3] = [Na, Nb, Nc]
        d[D_OFFSETS["default_F"]] = kt.default_F
        d[D_OFFSETS["fudge"]] = kt.fudge
        d[D_OFFSETS["a_star"]:D_OFFSETS["a_star"] + 9] = g(kt.a_star).reshape(-1)
        d[D_OFFSETS["N2prod"]] = Na * Na * Nb * Nb * Nc * Nc
        d[D_OFFSETS["Nprod"]] = Na * Nb * Nc
        # the switch-off scan's margin on h, k, l: far above the rounding of a·q (terms up to
        # 2|a|/lambda) however the eager kernel orders its sums
        lat_abs = float(np.abs(g(kt.lattice)).sum(-1).max()) if kt.lattice.numel() else 0.0
        bound_abs = max((abs(b) for b in kt.bounds), default=0) if kt.bounds is not None else 0
        d[D_OFFSETS["scan_eps"]] = 1e-8 + 1e-12 * (2.0 * float(g(kt.inv_lambda).max()) * lat_abs + bound_abs)
        T = kt.thick_offsets.numel()
        S = kt.incident.shape[0]
        P, M = kt.lattice.shape[0], kt.lattice.shape[1]
        i[I_OFFSETS["oversample"]] = kt.oversample
        i[I_OFFSETS["T"]], i[I_OFFSETS["S"]], i[I_OFFSETS["P"]], i[I_OFFSETS["M"]] = T, S, P, M
        i[I_OFFSETS["fpixels"]] = self.fpixels
        i[I_OFFSETS["point_pixel"]] = int(kt.point_pixel)
        i[I_OFFSETS["curved"]] = int(kt.curved)
        i[I_OFFSETS["nopolar"]] = int(kt.nopolar)
        i[I_OFFSETS["thick_on"]] = int(kt.thick > 0)
        i[I_OFFSETS["dmin_on"]] = int(kt.dmin_A > 0)
        i[I_OFFSETS["water"]] = int(kt.water)
        if kt.bounds is not None:
            i[I_OFFSETS["bounds"]:I_OFFSETS["bounds"] + 6] = kt.bounds
        self.dparams, self.iparams = d, i
        self.lattice = np.ascontiguousarray(g(kt.lattice).reshape(P * M, 9))
        inc = g(kt.incident)
        src = np.zeros((S, 10), dtype=np.float64)
        src[:, 0:3] = inc
        src[:, 3] = g(kt.inv_lambda)
        if not kt.nopolar and kt.kahn != 0.0:  # the eager kernel's polarisation frame
            axis = np.broadcast_to(g(kt.polar_axis), inc.shape)
            B = np.cross(axis, inc)
            B = B / np.linalg.norm(B, axis=-1, keepdims=True)
            E = np.cross(inc, B)
            E = E / np.linalg.norm(E, axis=-1, keepdims=True)
            src[:, 4:7], src[:, 7:10] = B, E
        self.src = np.ascontiguousarray(src)
        # the kernel's table has one extra entry, default_F, used for every index outside the box
        self.table = None
        self._flagged = None
        if kt.table is not None:
            extra = torch.full((1,), kt.default_F, dtype=kt.table.dtype)
            self.table = torch.cat([kt.table.detach().cpu(), extra]).contiguous()
        self.mask = None if mask is None else np.ascontiguousarray(np.asarray(mask) != 0, dtype=np.uint8)
        self.evaluations_per_pixel = T * kt.oversample ** 2 * S * P * M
        #: fallback counts: the smallest signed integer that holds a pixel's evaluations
        self.count_dtype = fallback_count_dtype(self.evaluations_per_pixel)
        i[I_OFFSETS["count_bytes"]] = torch.empty((), dtype=self.count_dtype).element_size()
        #: -oversample_thick/_polar/_omega: which factors apply per evaluation, and the kernel variant
        #: (0 none, 1 C's running product of the pixel's sum, 2 each term weighted by its own factors)
        self.oversample_factors = tuple(bool(f) for f in oversample_factors)
        for name, on in zip(("ov_thick", "ov_polar", "ov_omega"), self.oversample_factors, strict=True):
            i[I_OFFSETS[name]] = int(on)
        self.over = 0 if not any(self.oversample_factors) else (1 if running_product else 2)

    def flagged_table(self) -> torch.Tensor:
        """The table for fallback counting: magnitudes, the sign bit set on every default_F entry.

        Only squared there, so the image is unchanged; the sign tells the kernel a lookup used
        default_F (unlisted, or the extra entry outside the box) without a second gather.

        Returns
        -------
        torch.Tensor
            The flagged copy of :attr:`table` (made once, then kept); the table must not be None.
        """
        if self._flagged is None:
            kt = self.kt
            flag = torch.cat([~kt.listed.detach().cpu(), torch.ones(1, dtype=torch.bool)])
            mag = self.table.abs()
            self._flagged = torch.where(flag, -mag, mag).contiguous()
        return self._flagged

    @property
    def interpolates(self) -> bool:
        """Whether the compiled kernels can interpolate this table: at least 4 entries along each
        axis, the neighbourhood tb_tricubic reads (else the eager kernel interpolates).

        Returns
        -------
        bool
            False without a table.
        """
        b = self.kt.bounds
        return b is not None and all(b[2 * i + 1] - b[2 * i] + 1 >= 4 for i in range(3))

    def wide_table(self) -> torch.Tensor:
        """The table in float64, what the interpolating variants read (the same values).

        Returns
        -------
        torch.Tensor
            float64 copy of :attr:`table` (made once, then kept); the table must not be None.
        """
        if getattr(self, "_wide", None) is None:
            self._wide = self.table.to(torch.float64).contiguous()
        return self._wide
