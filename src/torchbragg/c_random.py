"""Bit-faithful re-implementation of the C nanoBragg random-number machinery.

The C program draws every random number it needs from one Numerical-Recipes
style generator (``ran1``: a Park-Miller "minimal standard" congruential
generator computed with Schrage's trick, followed by a 32-slot Bays-Durham
shuffle).  Three consumers use it:

* ``-misset random`` builds a random orientation from three uniform deviates
  (seed variable ``misset_seed``);
* the mosaic-domain list is built from three uniform deviates per domain
  (seed variable ``mosaic_seed``);
* the ``-noisefile`` image draws one Poisson deviate per pixel (seed variable
  ``seed``).

This module reproduces those streams exactly, including the places where the
C code computes in 32-bit ``float`` (every ``float`` variable and every
``float`` return value is rounded to IEEE single precision here as well), so
that the noise image and the photon count match the C program bit for bit.

Shared statics -- what the C process really does
-----------------------------------------------
Each consumer owns its own ``long`` seed variable (the LCG state ``idum``),
but the shuffle table (``iy`` and the 32-entry ``iv``) are *static* variables
inside ``ran1`` and therefore shared by all three streams of one process.  The
Gaussian spare deviate of ``gaussdev`` (``iset``/``gset``) and the cached
per-mean constants of ``poidev`` (``oldm``, ``g``, ``sq``, ``alxm``) are process
statics too.

``ran1`` reloads its shuffle table only when it is entered with ``idum <= 0``
or when ``iy`` is still 0 (never called in this process).  On a reload a
non-positive ``idum`` is negated, except that ``idum >= 0`` (including a
positive ``idum`` on the very first call) is replaced by 1.  The command line
turns ``-seed N``, ``-mosaic_seed N`` and ``-misset_seed N`` into ``idum = -N``
(``atoi``), so

* with the usual positive ``N`` (and with ``N = 0``) every stream starts by
  reloading the table from its own seed: its values do not depend on what ran
  before.  This is the case of the golden ``water_noise_0p2um`` run: the
  mosaic loop first draws 3 values from the default mosaic seed, then the noise
  loop enters with ``idum = -12345`` and reloads -- the noise image depends on
  ``-seed`` alone.
* with a negative ``N`` the stream enters with a positive ``idum`` and, because
  an earlier stream already filled the table, *does not* reload: it uses the
  table left by the previous stream (mosaic before noise, misset before
  mosaic).  Note that the mosaic loop always runs (at least one domain, three
  draws per domain, even for zero spread), so the noise stream of a real run
  is never the first one.

:class:`CRandom` models this with an explicit, shareable statics object: a
generator created with ``share_with=other`` uses the same shuffle table and
``gaussdev``/``poidev`` statics as ``other``, exactly as two seed variables of
one C process do.  :func:`nanobragg_streams` replays the C order (misset,
mosaic, noise) and hands back the generator the noise loop would use.

Other facts about the C program worth knowing:

* default seeds: ``seed = -time()``, ``mosaic_seed = -12345678`` (the help text
  claims 1234567; :data:`DEFAULT_MOSAIC_SEED` holds the real value) and
  ``misset_seed`` is a copy of the time seed taken *before* the arguments are
  parsed, so ``-seed`` does not change it (the help text says otherwise).
* ``-misset_seed N`` is also matched as ``-misset`` (flags are matched by
  substring) and then reads three numbers after it as misset angles; it only
  has its intended effect when it precedes ``-misset random``.
* ``-misset random`` calls the mosaic-cap routine with a "mosaicity" of
  ``90.0`` in *radians* (the routine's argument is in radians; the comment in
  the C source speaks of degrees), i.e. the rotation angle is
  ``90 * (1 - r**2)**(1/3)`` radians.

Floating point of the reference build
-------------------------------------
The golden images come from a build that fuses ``a*b + c`` into one rounding
(a fused multiply-add) wherever GCC's default ``-ffp-contract=fast`` allows it
on an FMA-capable target (aarch64, or x86-64 with an FMA ``-march``).  It
matters: in the golden ``water_noise_0p2um`` noise image the first rejection
test of pixel 10100 compares 0.4938250 with a ``t`` whose exponent
``em*alxm - gammln(em+1) - g`` loses about 12 bits to cancellation; fused it
rejects, as the C run did, unfused it accepts and 11853 later pixels differ.
``fma=True`` (the default everywhere) models the fused build, ``fma=False`` a
build without FMA (plain x86-64 SSE2).  Which products GCC fuses: in
``x*y + z*w`` the product computed first; a product that also feeds a
multiplication is never fused (``r2*r2`` in the mosaic routine, which GCC
shares with the matrix's ``v3*v3``).

Checked, besides the golden image, against GCC 12 builds (x86-64, with and
without ``-march=haswell``) of a C restatement of the same formulas: ``ran1``,
``gaussdev``, ``poidev`` (all branches, 4000 draws), 600 mosaic matrices and
3000 ``-misset random`` matrices agree bit for bit in both modes;
:func:`umat2misset` agrees bit for bit without FMA and to 1 ulp (25 of 3000
angles) with FMA, where GCC's choice of the fused product depends on how it
vectorises the surrounding code.

Which function is which
-----------------------
:func:`poisson_noise_image` is the exact, sequential C noise loop in pure
Python: about 3 microseconds per pixel with means >= 12 (the C algorithm
needs about two rejection trials there; 0.2 s for the 256x256 golden water
image, roughly a minute for 4096x4096) and about 1 microsecond per dark
pixel.  :func:`poisson_noise_fast` draws from numpy's Generator
instead: same distribution, clipping and truncation, but *not* the C
sequence -- use it for huge images where C identity is not needed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import warnings
from array import array
from typing import NamedTuple

import numpy as np

__all__ = [
    "CRandom",
    "DEFAULT_MOSAIC_SEED",
    "mosaic_rotation_umat",
    "mosaic_umats",
    "umat2misset",
    "random_misset",
    "nanobragg_streams",
    "poisson_noise_image",
    "poisson_noise_fast",
]

#: The mosaic seed the C program uses when ``-mosaic_seed`` is not given
#: (its variable starts at ``-12345678``, i.e. as if ``-mosaic_seed 12345678``).
DEFAULT_MOSAIC_SEED = 12345678

# --- ran1 constants (Park-Miller multiplier, Schrage decomposition) ---------
_IA = 16807
_IM = 2147483647
_AM = 1.0 / _IM
_IQ = 127773
_IR = 2836
_NTAB = 32
_NDIV = 1 + (_IM - 1) // _NTAB
_RNMX = 1.0 - 1.2e-7  # compared in double precision
_CHUNK = 1 << 16  # deviates generated per vectorised block

_POWERS: list = []


def _lcg_powers() -> np.ndarray:
    """``IA**i mod IM`` for i = 1 .. _CHUNK (uint64), built once by doubling."""
    if not _POWERS:
        pw = np.empty(_CHUNK, dtype=np.uint64)
        pw[0] = _IA
        n = 1
        while n < _CHUNK:
            step = int(pw[n - 1])  # IA**n mod IM
            m = min(n, _CHUNK - n)
            pw[n : n + m] = (pw[:m] * np.uint64(step)) % np.uint64(_IM)
            n += m
        _POWERS.append(pw)
    return _POWERS[0]

# Rounding of a Python float (a C double) to IEEE single precision, the way a C
# assignment to a ``float`` does it: store into a one-element float array and
# read it back (fastest pure-Python way, round-to-nearest-even, keeps
# subnormals, overflows to inf).
_F32 = array("f", [0.0])


def _f32(x: float) -> float:
    _F32[0] = x
    return _F32[0]


_RNMX_F = _f32(_RNMX)  # what ran1 returns when it clips: 1 - 2**-23
_ONE_THIRD_F = _f32(1.0 / 3.0)

# Coefficients of the Lanczos-type series used by the C ``gammln``.
_GAMMLN_COF = (
    76.18009172947146,
    -86.50532032941677,
    24.01409824083091,
    -1.231739572450155,
    0.1208650973866179e-2,
    -0.5395239384953e-5,
)


def _load_powf():
    """Return the C library's ``powf`` (what the C program calls), if reachable."""
    try:
        name = ctypes.util.find_library("m")
        if not name:
            return None
        libm = ctypes.CDLL(name)
        fn = libm.powf
        fn.restype = ctypes.c_float
        fn.argtypes = [ctypes.c_float, ctypes.c_float]
        return fn
    except (OSError, AttributeError):  # pragma: no cover - platform dependent
        return None


_LIBM_POWF = _load_powf()


def _powf(x: float, y: float) -> float:
    """Single-precision power ``powf(x, y)`` for float32-valued ``x`` and ``y``.

    Uses the C library's own ``powf`` when it can be loaded (as the C program
    does); otherwise the correctly rounded value ``float32(pow(x, y))``, which
    equals ``powf`` except in rare last-bit cases.
    """
    if _LIBM_POWF is not None:
        return float(_LIBM_POWF(x, y))
    return _f32(math.pow(x, y))


def _fma(a: float, b: float, c: float) -> float:
    """Fused multiply-add in double precision: ``a*b + c`` rounded once.

    Exact rational arithmetic on the binary values (every finite double is an
    integer over a power of two); Python's int true division rounds correctly.
    """
    try:
        na, da = a.as_integer_ratio()
        nb, db = b.as_integer_ratio()
        nc, dc = c.as_integer_ratio()
    except (OverflowError, ValueError):  # inf or nan: no rounding question
        return a * b + c
    dp = da * db
    if dp >= dc:
        num, den = na * nb + nc * (dp // dc), dp
    else:
        num, den = na * nb * (dc // dp) + nc, dc
    try:
        return num / den
    except OverflowError:
        return math.copysign(math.inf, num)


def _fmaf(a: float, b: float, c: float) -> float:
    """Single-precision fused multiply-add ``fmaf(a, b, c)`` for float32 inputs.

    The product of two float32 values is exact in double; the sum is formed
    with an error-free two-sum, and the only case where rounding the double
    sum to float32 differs from rounding the exact sum -- the double sum lying
    exactly on a float32 half-way point while the exact sum does not -- is
    corrected.
    """
    p = a * b
    s = p + c
    _F32[0] = s
    r = _F32[0]
    if r != s:
        z = s - p
        err = (p - (s - z)) + (c - z)  # exact: p + c == s + err
        if err != 0.0 and err == err:
            return _fmaf_tie(s, err, r)
    return r


def _fmaf_tie(s: float, err: float, r: float) -> float:
    """Correct ``r = float32(s)`` when ``s`` is a float32 tie but ``s + err`` is not.

    ``s`` is the double nearest to the exact value ``s + err``; no float32
    rounding boundary lies strictly between them, so only an ``s`` exactly
    half-way between two float32 values can round the wrong way.
    """
    e = math.frexp(s)[1]
    bits = 24 if e >= -125 else 24 - (-125 - e)  # fewer bits for float32 subnormals
    q = math.ldexp(s, bits + 1 - e)
    if q.is_integer() and int(q) & 1:
        _F32[0] = math.nextafter(s, math.copysign(math.inf, err))
        return _F32[0]
    return r


def _muladd(a: float, b: float, c: float) -> float:
    """``a*b + c`` in double with two roundings (no contraction)."""
    return a * b + c


def _muladdf(a: float, b: float, c: float) -> float:
    """``a*b + c`` in float32 with two roundings (no contraction)."""
    _F32[0] = a * b
    _F32[0] = _F32[0] + c
    return _F32[0]


def _gammln(xx: float, fma: bool = True) -> float:
    """ln Gamma(xx) with the C program's float argument/result and double body."""
    x = _f32(xx)
    y = x
    tmp = x + 5.5
    if fma:
        tmp = _fma(-(x + 0.5), math.log(tmp), tmp)
    else:
        tmp -= (x + 0.5) * math.log(tmp)
    ser = 1.000000000190015
    for c in _GAMMLN_COF:
        y += 1.0
        ser += c / y
    return _f32(-tmp + math.log(2.5066282746310005 * ser / x))


def _exp(x: float) -> float:
    """C ``exp``: overflow gives inf instead of raising."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _to_ushort(test: float) -> int:
    """C's ``(unsigned short) test`` for a double, as gcc does it on x86-64.

    The value is truncated toward zero to a 32-bit int (NaN and out-of-range
    values give INT_MIN) and the low 16 bits are kept.  Only negative values
    (a negative ``-adc``) or NaN reach the undefined part of the C
    conversion; an aarch64 build would give 0 for those.
    """
    if test >= 0.0:
        if test < 2147483648.0:
            return int(test) & 0xFFFF
        return 0
    if test > -2147483649.0:  # negative values wrap (the noise loop never clamps at 0)
        return int(test) & 0xFFFF
    return 0  # NaN or below INT_MIN


class _CStatics:
    """Process-wide static variables of the C random functions."""

    __slots__ = ("iy", "iv", "iset", "gset", "oldm", "g", "sq", "alxm")

    def __init__(self) -> None:
        self.iy = 0                      # ran1: last shuffle output, 0 = never used
        self.iv = [0] * _NTAB            # ran1: shuffle table
        self.iset = 0                    # gaussdev: spare deviate available?
        self.gset = 0.0                  # gaussdev: the spare deviate
        self.oldm = -1.0                 # poidev: mean of the previous call
        self.g = 0.0                     # poidev: exp(-xm) or xm*ln(xm)-lnGamma(xm+1)
        self.sq = 0.0                    # poidev: sqrt(2 xm)
        self.alxm = 0.0                  # poidev: ln(xm)


class CRandom:
    """The C program's ``ran1`` generator and the deviates built on it.

    Parameters
    ----------
    idum : int
        The C seed variable itself (the ``long`` whose address is passed to
        ``ran1``).  The command-line convention is ``idum = -N`` for
        ``-seed N``; use :meth:`from_seed` for that.
    share_with : CRandom, optional
        Share the process statics (shuffle table ``iy``/``iv``, the
        ``gaussdev`` spare deviate and the ``poidev`` cache) with this
        generator, as two seed variables of the same C process do.  By default
        the generator gets fresh statics, as in a newly started process.
    fma : bool, optional
        Model a C build that fuses ``a*b + c`` into one rounding (GCC's default
        contraction on an FMA-capable target; this is what the golden
        reference build does).  ``False`` models a build without FMA (plain
        x86-64 SSE2).  Affects :meth:`gaussdev`, :meth:`poidev` and the
        rotations drawn with this generator, never :meth:`ran1`.

    Notes
    -----
    ``ran1`` reloads the shuffle table when called with ``idum <= 0`` or while
    the table is still empty (``iy == 0``); see the module documentation for
    what that means for the misset, mosaic and noise streams of one run.
    All deviates are returned as Python floats holding float32 values.
    """

    __slots__ = ("_idum", "_st", "fma")

    def __init__(
        self, idum: int, share_with: CRandom | None = None, *, fma: bool = True
    ) -> None:
        self._idum = int(idum)
        self._st = share_with._st if share_with is not None else _CStatics()
        self.fma = bool(fma)

    @classmethod
    def from_seed(
        cls, seed: int, share_with: CRandom | None = None, *, fma: bool = True
    ) -> CRandom:
        """Generator for a command-line seed ``N`` (``-seed N`` -> ``idum = -N``).

        Parameters
        ----------
        seed : int
            The number given after ``-seed``, ``-mosaic_seed`` or ``-misset_seed``.
        share_with : CRandom, optional
            See :class:`CRandom`.
        fma : bool, optional
            See :class:`CRandom`.

        Returns
        -------
        CRandom
            A generator whose seed variable is ``idum = -seed``.
        """
        return cls(-int(seed), share_with=share_with, fma=fma)

    # ------------------------------------------------------------------ state
    @property
    def idum(self) -> int:
        """Current value of the C seed variable."""
        return self._idum

    @property
    def iy(self) -> int:
        """Current shuffle output ``iy`` (shared static; 0 before first use)."""
        return self._st.iy

    @property
    def iv(self) -> tuple:
        """Copy of the 32-entry shuffle table (shared static)."""
        return tuple(self._st.iv)

    def shares_statics_with(self, other: CRandom) -> bool:
        """Whether both generators use the same process statics.

        Parameters
        ----------
        other : CRandom
            The generator to compare with.

        Returns
        -------
        bool
            True when both share one shuffle table and one set of deviate statics.
        """
        return self._st is other._st

    def _snapshot(self):
        st = self._st
        return (self._idum, st.iy, list(st.iv))

    def _restore(self, snap) -> None:
        self._idum, self._st.iy, iv = snap
        self._st.iv[:] = iv

    # ------------------------------------------------------------------ ran1
    def _reload(self) -> None:
        """Reload the shuffle table (``ran1`` entered with idum <= 0 or iy == 0)."""
        idum = self._idum
        idum = 1 if -idum < 1 else -idum
        iv = self._st.iv
        for j in range(_NTAB + 7, -1, -1):
            k = idum // _IQ
            idum = _IA * (idum - k * _IQ) - _IR * k
            if idum < 0:
                idum += _IM
            if j < _NTAB:
                iv[j] = idum
        self._st.iy = iv[0]
        self._idum = idum

    def _step_int(self) -> int:
        """One ran1 step on the integers (reload included); returns ``iy``."""
        if self._idum <= 0 or not self._st.iy:
            self._reload()
        st = self._st
        idum = self._idum
        k = idum // _IQ
        idum = _IA * (idum - k * _IQ) - _IR * k
        if idum < 0:
            idum += _IM
        self._idum = idum
        j = st.iy // _NDIV
        st.iy = st.iv[j]
        st.iv[j] = idum
        return st.iy

    def _next_ints(self, n: int, keep: bool = True):
        """Advance ``n`` ran1 steps; return the ``iy`` values (or None).

        Once ``0 < idum < IM`` (always true after a normal reload) Schrage's
        step is exactly ``idum * IA mod IM`` and never reaches 0 (IM is prime),
        so the congruential part of a block is computed with numpy
        (``idum * IA**i mod IM``); only the shuffle runs in Python.
        """
        out = [] if keep else None
        st = self._st
        iv = st.iv
        done = 0
        while done < n:
            idum = self._idum
            if idum <= 0 or not st.iy or idum >= _IM:
                iy = self._step_int()
                if keep:
                    out.append(iy)
                done += 1
                continue
            m = min(n - done, _CHUNK)
            idums = ((idum * _lcg_powers()[:m]) % _IM).tolist()
            iy = st.iy
            ndiv = _NDIV
            if keep:
                append = out.append
                for d in idums:
                    j = iy // ndiv
                    iy = iv[j]
                    iv[j] = d
                    append(iy)
            else:
                for d in idums:
                    j = iy // ndiv
                    iy = iv[j]
                    iv[j] = d
            st.iy = iy
            self._idum = idums[-1]
            done += m
        return out

    def _uniform_chunk(self, n: int) -> list:
        """``n`` consecutive ran1 values as Python floats (vectorised rounding)."""
        iys = np.asarray(self._next_ints(n), dtype=np.float64)
        temp = (iys * _AM).astype(np.float32).astype(np.float64)
        temp[temp > _RNMX] = _RNMX_F
        return temp.tolist()

    def ran1(self) -> float:
        """One uniform deviate in (0, 1), exactly as the C ``ran1``.

        Returns
        -------
        float
            A float32 value; at most ``1 - 2**-23``.
        """
        temp = _f32(_AM * self._step_int())
        return _RNMX_F if temp > _RNMX else temp

    def uniforms(self, n: int) -> np.ndarray:
        """The next ``n`` values of :meth:`ran1` as a float32 array.

        Parameters
        ----------
        n : int
            Number of deviates to draw.

        Returns
        -------
        numpy.ndarray
            float32 ``[n]``, the same values ``n`` calls of :meth:`ran1` would give.
        """
        return np.asarray(self._uniform_chunk(int(n)), dtype=np.float32)

    # ------------------------------------------------------------ deviates
    def gaussdev(self) -> float:
        """Standard normal deviate (polar Box-Muller with a spare), as C ``gaussdev``.

        Returns
        -------
        float
            A float32 value.  Every second call returns the spare deviate kept
            in the shared statics.
        """
        st = self._st
        if st.iset == 0:
            while True:
                v1 = _f32(2.0 * self.ran1() - 1.0)
                v2 = _f32(2.0 * self.ran1() - 1.0)
                # GCC fuses the first product of ``v1*v1 + v2*v2``
                rsq = (_fmaf if self.fma else _muladdf)(v1, v1, _f32(v2 * v2))
                if not (rsq >= 1.0 or rsq == 0.0):
                    break
            fac = _f32(math.sqrt(-2.0 * math.log(rsq) / rsq))
            st.gset = _f32(v1 * fac)
            st.iset = 1
            return _f32(v2 * fac)
        st.iset = 0
        return st.gset

    def gammln(self, xx: float) -> float:
        """ln Gamma(xx) as the C ``gammln`` (float in, double series, float out).

        Parameters
        ----------
        xx : float
            The argument (positive).

        Returns
        -------
        float
            A float32 value, computed with this generator's ``fma`` arithmetic.
        """
        return _gammln(xx, self.fma)

    def poidev(self, xm: float) -> float:
        """Poisson deviate with mean ``xm``, as the C ``poidev``.

        Parameters
        ----------
        xm : float
            The mean; rounded to float32 first (the C argument is a ``float``).

        Returns
        -------
        float
            A float32 value: an integer count, except above ``xm = 1e6`` where
            C returns the Gaussian approximation ``xm + sqrt(xm) * gaussdev()``
            without rounding it to an integer.

        Notes
        -----
        Below 12 the product-of-uniforms method is used, otherwise the
        Lorentzian rejection method.  The per-mean constants are cached in the
        shared statics and recomputed only when ``xm`` differs from the mean
        of the previous call (initially -1, with the constants still 0).
        """
        xm = _f32(xm)
        st = self._st
        fma = self.fma
        madd, maddf = (_fma, _fmaf) if fma else (_muladd, _muladdf)
        if xm > 1.0e6:
            return _f32(madd(math.sqrt(xm), self.gaussdev(), xm))
        if xm < 12.0:
            if xm != st.oldm:
                st.oldm = xm
                st.g = _f32(_exp(-xm))
            g = st.g
            em = -1.0
            t = 1.0
            while True:
                em += 1.0
                t = _f32(t * self.ran1())
                if not (t > g):
                    return em
        if xm != st.oldm:
            st.oldm = xm
            st.sq = _f32(math.sqrt(2.0 * xm))
            st.alxm = _f32(math.log(xm))
            st.g = maddf(xm, st.alxm, -_gammln(xm + 1.0, fma))
        sq, alxm, g = st.sq, st.alxm, st.g
        if xm != xm:  # NaN: C falls through both loops once and returns NaN
            self.ran1()
            self.ran1()
            return math.nan
        while True:
            while True:
                y = _f32(math.tan(math.pi * self.ran1()))
                em = maddf(sq, y, xm)
                if not (em < 0.0):
                    break
            em = float(math.floor(em))
            t = _f32(
                0.9 * (1.0 + _f32(y * y))
                * math.exp(_f32(maddf(em, alxm, -_gammln(em + 1.0, fma)) - g))
            )
            if not (self.ran1() > t):
                return em


# ----------------------------------------------------------------- rotations
def mosaic_rotation_umat(mosaicity_rad: float, rng: CRandom) -> np.ndarray:
    """Random rotation on a spherical cap, as the C ``mosaic_rotation_umat``.

    Three uniform deviates pick a rotation axis uniformly on the sphere and an
    angle ``mosaicity * (1 - r**2)**(1/3)`` (computed in float32 with
    ``powf``, as in C); the matrix is built with the Rodrigues formula in
    double precision.  With ``rng.fma`` (the default) every ``a*b + c`` that
    GCC contracts is rounded once, as in the reference build.

    Parameters
    ----------
    mosaicity_rad : float
        Cap size in radians (rounded to float32, the C parameter type).
    rng : CRandom
        Generator to draw the three deviates from; its ``fma`` flag selects
        the arithmetic.

    Returns
    -------
    numpy.ndarray
        (3, 3) float64 rotation matrix, rows as the C ``umat[0..8]``.
    """
    fma = _fma if rng.fma else _muladd
    r1 = 2.0 * rng.ran1() - 1.0  # exact, fused or not
    r2 = 2.0 * rng.ran1() - 1.0
    r3 = 2.0 * rng.ran1() - 1.0
    # r2*r2 is also the z*z of the matrix diagonal; GCC computes it once and,
    # since that product also feeds a multiplication, does not fuse it here
    ring = math.sqrt(1.0 - r2 * r2)
    angle = _f32(_f32(mosaicity_rad) * _powf(_f32(fma(-r3, r3, 1.0)), _ONE_THIRD_F))
    ax = ring * math.sin(math.pi * r1)
    ay = ring * math.cos(math.pi * r1)
    az = r2
    c = math.cos(angle)
    omc = 1.0 - c
    s = math.sin(angle)
    # C's products, grouped as in the source; in "x*y +- s*z" GCC fuses the
    # first product (computed first), the second one is rounded on its own
    ox = omc * ax
    oy = omc * ay
    sx, sy, sz = s * ax, s * ay, s * az
    return np.array(
        [
            [fma(omc, ax * ax, c), fma(ox, ay, -sz), fma(ox, az, sy)],
            [fma(ox, ay, sz), fma(omc, ay * ay, c), fma(oy, az, -sx)],
            [fma(ox, az, -sy), fma(oy, az, sx), fma(omc, az * az, c)],
        ],
        dtype=np.float64,
    )


def mosaic_umats(
    mosaic_spread_rad: float,
    domains: int,
    mosaic_seed: int = DEFAULT_MOSAIC_SEED,
    *,
    rng: CRandom | None = None,
) -> np.ndarray:
    """The mosaic-domain rotation list, built exactly as the C program does.

    Every domain draws one :func:`mosaic_rotation_umat`; domain 0 is then
    overwritten by the identity (its three deviates are still consumed).

    Parameters
    ----------
    mosaic_spread_rad : float
        Mosaic spread in radians (``-mosaic`` degrees converted).
    domains : int
        Number of domains after the C defaults were applied (``-mosaic_dom``;
        C uses 1 when the spread is 0 or unset, and 10 when a spread is given
        without a domain count).
    mosaic_seed : int, optional
        The number after ``-mosaic_seed`` (``idum = -mosaic_seed``); the C
        default corresponds to :data:`DEFAULT_MOSAIC_SEED`.
    rng : CRandom, optional
        Use this generator instead (e.g. one sharing statics with the misset
        stream, see :func:`nanobragg_streams`); ``mosaic_seed`` is then ignored.

    Returns
    -------
    numpy.ndarray
        (domains, 3, 3) float64.
    """
    if rng is None:
        rng = CRandom.from_seed(mosaic_seed)
    out = np.empty((int(domains), 3, 3), dtype=np.float64)
    for i in range(int(domains)):
        out[i] = mosaic_rotation_umat(mosaic_spread_rad, rng)
        if i == 0:
            out[0] = np.eye(3)
    return out


def _norm3(v, fma) -> float:
    """``sqrt(x*x + y*y + z*z)`` as C evaluates it (first and last product fused)."""
    return math.sqrt(fma(v[2], v[2], fma(v[0], v[0], v[1] * v[1])))


def _unit_cross(p, q, fma):
    v = [
        fma(p[1], q[2], -(p[2] * q[1])),
        fma(p[2], q[0], -(p[0] * q[2])),
        fma(p[0], q[1], -(p[1] * q[0])),
    ]
    m = _norm3(v, fma)
    if m > 0:
        v = [v[0] / m, v[1] / m, v[2] / m]
    return v


def umat2misset(umat, fma: bool = True) -> tuple:
    """Misset angles (rotx, roty, rotz) in radians of a rotation matrix, as C.

    The rows are normalised, empty rows are rebuilt from cross products of the
    others (twice), the rows are normalised again and the XYZ Euler angles are
    read off; the gimbal-lock case ``uzx**2 >= 1`` gives ``(pi, pi/2,
    atan2(uxy, -uyy))``.

    Parameters
    ----------
    umat : array_like
        (3, 3) matrix or 9 numbers, row-major like the C ``umat[9]``.
    fma : bool, optional
        Round contracted ``a*b + c`` once, as the reference (FMA) build does.

    Returns
    -------
    tuple of float
        (rotx, roty, rotz) in radians, to be applied about x, then y, then z.
    """
    madd = _fma if fma else _muladd
    u = [float(v) for v in np.asarray(umat, dtype=np.float64).reshape(9)]
    rows = [u[0:3], u[3:6], u[6:9]]
    norms = [_norm3(r, madd) for r in rows]
    for r, m in zip(rows, norms, strict=True):
        if m > 0:
            r[0] /= m
            r[1] /= m
            r[2] /= m
    mx, my, mz = norms
    axes = ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    # exactly one non-empty row: the other two become the unit axes
    for keep in range(3):
        others = [i for i in range(3) if i != keep]
        if norms[keep] >= 0 and all(norms[i] <= 0 for i in others):
            for i in others:
                rows[i] = list(axes[i])
    for _ in range(2):
        xcy = _unit_cross(rows[0], rows[1], madd)
        ycz = _unit_cross(rows[1], rows[2], madd)
        zcx = _unit_cross(rows[2], rows[0], madd)
        if mx <= 0:
            rows[0] = ycz
        if my <= 0:
            rows[1] = zcx
        if mz <= 0:
            rows[2] = xcy
    for r in rows:
        m = _norm3(r, madd)
        if m > 0:
            r[0] /= m
            r[1] /= m
            r[2] /= m
    (uxx, uxy, _), (uyx, uyy, _), (uzx, uzy, uzz) = rows
    if uzx * uzx < 1.0:
        rotx = math.atan2(uzy, uzz)
        roty = math.atan2(-uzx, math.sqrt(madd(uzy, uzy, uzz * uzz)))
        rotz = math.atan2(uyx, uxx)
    else:
        rotx = math.atan2(1, 1) * 4
        roty = math.atan2(1, 1) * 2
        rotz = math.atan2(uxy, -uyy)
    return (rotx, roty, rotz)


def random_misset(misset_seed: int | None = None, *, rng: CRandom | None = None) -> tuple:
    """Angles chosen by ``-misset random``, as the C program computes them.

    C draws ``mosaic_rotation_umat(90.0, ...)`` -- a cap of 90 *radians*, i.e.
    a thoroughly random orientation -- and converts it with
    :func:`umat2misset`.

    Parameters
    ----------
    misset_seed : int, optional
        The number N of ``-misset_seed N`` (``idum = -N``).  In C the default is
        the time-based seed, so a value (or ``rng``) must be given here.
    rng : CRandom, optional
        Use this generator instead of a fresh one from ``misset_seed``.

    Returns
    -------
    tuple of float
        (rotx, roty, rotz) in radians.
    """
    if rng is None:
        if misset_seed is None:
            raise ValueError("give misset_seed or rng (C's default is the time-based seed)")
        rng = CRandom.from_seed(misset_seed)
    return umat2misset(mosaic_rotation_umat(90.0, rng), rng.fma)


class NanoBraggStreams(NamedTuple):
    """What :func:`nanobragg_streams` returns.

    Attributes
    ----------
    misset : tuple of float or None
        (rotx, roty, rotz) of ``-misset random`` in radians, or None without a misset seed.
    mosaic_umats : numpy.ndarray
        (domains, 3, 3) float64 mosaic-domain rotations (see :func:`mosaic_umats`).
    noise_rng : CRandom
        The generator the noise loop starts with.
    """

    misset: tuple | None
    mosaic_umats: np.ndarray
    noise_rng: CRandom


def nanobragg_streams(
    seed: int,
    mosaic_spread_rad: float = 0.0,
    mosaic_domains: int = 1,
    mosaic_seed: int = DEFAULT_MOSAIC_SEED,
    misset_seed: int | None = None,
    *,
    fma: bool = True,
) -> NanoBraggStreams:
    """Replay the random streams of one C run in the C order, sharing statics.

    Order: ``-misset random`` (only when ``misset_seed`` is given), then the
    mosaic domains, then the generator the noise loop starts with.  All three
    share one set of statics, so a stream whose seed number is negative
    continues the shuffle table of the stream before it, as in C.

    Parameters
    ----------
    seed : int
        The number of ``-seed N``.
    mosaic_spread_rad : float
        Mosaic spread in radians, as for :func:`mosaic_umats`.
    mosaic_domains : int
        Number of mosaic domains, as ``domains`` of :func:`mosaic_umats`.
    mosaic_seed : int, optional
        The number after ``-mosaic_seed``, as for :func:`mosaic_umats`.
    misset_seed : int, optional
        The misset seed number when ``-misset random`` is in effect.
    fma : bool, optional
        See :class:`CRandom`.

    Returns
    -------
    NanoBraggStreams
        ``misset`` angles (or None), ``mosaic_umats``, and ``noise_rng`` to pass
        to :func:`poisson_noise_image`.
    """
    first = None
    misset = None
    if misset_seed is not None:
        first = CRandom.from_seed(misset_seed, fma=fma)
        misset = random_misset(rng=first)
    mosaic_rng = CRandom.from_seed(mosaic_seed, share_with=first, fma=fma)
    umats = mosaic_umats(mosaic_spread_rad, mosaic_domains, rng=mosaic_rng)
    return NanoBraggStreams(misset, umats, CRandom.from_seed(seed, share_with=mosaic_rng, fma=fma))


# ----------------------------------------------------------------- noise
def _f32_arr(a) -> np.ndarray:
    """Round a float64 array to float32 values (kept as float64)."""
    return np.asarray(a, dtype=np.float64).astype(np.float32).astype(np.float64)


def _fma_vec(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Vectorised exact double ``fma(a, b, c)``.

    Dekker's two-product and Knuth's two-sum give ``a*b + c`` as an exact
    unevaluated sum whenever the last two-sum is exact; the few other elements
    (and non-finite or extreme ones) are done by the scalar :func:`_fma`.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    with np.errstate(all="ignore"):
        p = a * b
        sa = 134217729.0 * a
        ah = sa - (sa - a)
        al = a - ah
        sb = 134217729.0 * b
        bh = sb - (sb - b)
        bl = b - bh
        e = al * bl - (((p - ah * bh) - al * bh) - ah * bl)  # a*b == p + e
        s = p + c
        z = s - p
        t1 = (p - (s - z)) + (c - z)  # p + c == s + t1
        u = t1 + e
        z = u - t1
        t2 = (t1 - (u - z)) + (e - z)  # t1 + e == u + t2
        r = s + u
        bad = (
            (t2 != 0.0)
            | ~np.isfinite(r)
            | ~np.isfinite(sa)
            | ~np.isfinite(sb)
            | ((np.abs(p) < 1e-280) & (a != 0.0) & (b != 0.0))
        )
    for i in np.flatnonzero(bad):
        r[i] = _fma(float(a[i]), float(b[i]), float(c[i]))
    return r


def _fmaf_vec(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Vectorised :func:`_fmaf` for float32-valued float64 arrays."""
    with np.errstate(all="ignore"):
        p = a * b
        s = p + c
        r = _f32_arr(s)
        z = s - p
        err = (p - (s - z)) + (c - z)
        check = (err != 0.0) & (r != s)
    for i in np.flatnonzero(check):
        r[i] = _fmaf(float(a[i]), float(b[i]), float(c[i]))
    return r


def _gammln_vec(xx: np.ndarray, fma: bool) -> np.ndarray:
    """:func:`_gammln` for an array of arguments > 0 (same bits)."""
    x = _f32_arr(xx)
    tmp = x + 5.5
    lg = np.array([math.log(v) for v in tmp.tolist()], dtype=np.float64)
    if fma:
        tmp = _fma_vec(-(x + 0.5), lg, tmp)
    else:
        tmp = tmp - (x + 0.5) * lg
    y = x.copy()
    ser = np.full_like(x, 1.000000000190015)
    for cof in _GAMMLN_COF:
        y = y + 1.0
        ser = ser + cof / y
    arg = (2.5066282746310005 * ser / x).tolist()
    return _f32_arr(-tmp + np.array([math.log(v) for v in arg], dtype=np.float64))


def _rejection_constants(xm: np.ndarray, fma: bool):
    """poidev's cached ``sq``, ``alxm``, ``g`` for means in [12, 1e6]."""
    sq = _f32_arr(np.sqrt(2.0 * xm))
    alxm = _f32_arr([math.log(v) for v in xm.tolist()])
    gl = _gammln_vec(xm + 1.0, fma)
    if fma:
        g = _fmaf_vec(xm, alxm, -gl)
    else:
        g = _f32_arr(_f32_arr(xm * alxm) - gl)
    return sq, alxm, g


def _roi_box(shape, roi):
    """Half-open (y0, y1, x0, x1) of the pixels the C noise loop visits."""
    ns, nf = shape
    if roi is None:
        return 0, ns, 0, nf
    xmin, xmax, ymin, ymax = (int(v) for v in roi)
    # C: negative bounds mean "default" (0 .. npixels); bounds are inclusive
    xmin = 0 if xmin < 0 else xmin
    ymin = 0 if ymin < 0 else ymin
    xmax = nf if xmax < 0 else xmax
    ymax = ns if ymax < 0 else ymax
    return ymin, max(ymin, min(ns, ymax + 1)), xmin, max(xmin, min(nf, xmax + 1))


def poisson_noise_image(
    float_image: np.ndarray,
    seed,
    adc_offset: float = 40.0,
    *,
    roi=None,
):
    """The C ``-noisefile`` image: one ``poidev`` per pixel, bit for bit.

    Pixels are visited slow-major (row by row, fast index fastest), each draws
    ``poidev(pixel)`` from one sequential stream, the sum of the deviates is
    the printed photon count, ``adc_offset`` is added, values above 65535 are
    clipped to 65535 and counted as overloads, and the result is truncated to
    ``unsigned short`` (no clamp at 0: a negative offset wraps as in C).

    Parameters
    ----------
    float_image : numpy.ndarray
        (slow, fast) float image in photons; rounded to float32 (C keeps its
        float image in ``float``).
    seed : int or CRandom
        The number N of ``-seed N`` (``idum = -N``, fresh process statics, the
        FMA build), or a generator to continue (e.g.
        ``nanobragg_streams(...).noise_rng``; it is left exactly where the C
        stream would be).  A negative N with fresh statics is *not* what C
        does (it would continue the mosaic stream's table); use
        :func:`nanobragg_streams` for that.
    adc_offset : float, optional
        ``-adc`` value, default 40.
    roi : tuple of int, optional
        ``(xmin, xmax, ymin, ymax)`` of ``-roi`` (inclusive); pixels outside
        draw nothing and stay 0.

    Returns
    -------
    image : numpy.ndarray
        (slow, fast) uint16.
    photons : float
        Sum of the deviates (C prints it with ``%.0f``).
    overloads : int
        Number of clipped pixels.

    Notes
    -----
    Pure Python and sequential by nature (each pixel consumes a
    data-dependent number of deviates).  The deviates are generated in numpy
    blocks and the per-pixel ``poidev`` constants are precomputed vectorised;
    what remains is about 3 microseconds per pixel with a mean >= 12 and
    about 1 microsecond for dark pixels (4096x4096: roughly 20-60 s).
    :func:`poisson_noise_fast` is the vectorised, non-identical alternative.
    """
    img = np.asarray(float_image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError("float_image must be 2-D (slow, fast)")
    if isinstance(seed, CRandom):
        rng = seed
    else:
        if int(seed) < 0:
            warnings.warn(
                "negative -seed: C would reuse the mosaic stream's shuffle table; "
                "use nanobragg_streams() to model that",
                stacklevel=2,
            )
        rng = CRandom.from_seed(int(seed))
    y0, y1, x0, x1 = _roi_box(img.shape, roi)
    image = np.zeros(img.shape, dtype=np.uint16)

    st = rng._st
    oldm, g, sq, alxm, iset, gset = st.oldm, st.g, st.sq, st.alxm, st.iset, st.gset
    fma = rng.fma
    madd, maddf = (_fma, _fmaf) if fma else (_muladd, _muladdf)
    fb = array("f", [0.0])
    sqrt, log, tan, floor, exp = math.sqrt, math.log, math.tan, math.floor, math.exp
    PI = math.pi
    gl_cache: dict = {}
    gammln = _gammln
    tie = _fmaf_tie
    to_ushort = _to_ushort
    adc = float(adc_offset)
    snap = None
    U: list = []
    nU = 0
    pos = 0
    total = 0.0
    overloads = 0
    width = x1 - x0
    rows_per_block = max(1, _CHUNK // max(width, 1))

    for r0 in range(y0, y1, rows_per_block):
        r1 = min(y1, r0 + rows_per_block)
        v64 = img[r0:r1, x0:x1].astype(np.float64).ravel()
        n = v64.size
        with np.errstate(invalid="ignore"):
            rej = (v64 >= 12.0) & (v64 <= 1.0e6)
            small = v64 < 12.0
        SQ = np.zeros(n)
        AL = np.zeros(n)
        G = np.zeros(n)
        if rej.any():
            SQ[rej], AL[rej], G[rej] = _rejection_constants(v64[rej], fma)
        if small.any():
            G[small] = _f32_arr([_exp(-v) for v in v64[small].tolist()])
        xs = v64.tolist()
        SQ = SQ.tolist()
        AL = AL.tolist()
        G = G.tolist()
        res = [0] * n

        for i in range(n):
            xm = xs[i]
            if xm < 12.0:
                # product of uniforms until it drops to exp(-xm)
                if xm != oldm:
                    oldm = xm
                    g = G[i]
                if pos == nU:
                    snap = rng._snapshot()
                    U = rng._uniform_chunk(_CHUNK)
                    nU = _CHUNK
                    pos = 0
                t = U[pos]  # 1.0 * u is exact
                pos += 1
                em = 0.0
                while t > g:
                    em += 1.0
                    if pos == nU:
                        snap = rng._snapshot()
                        U = rng._uniform_chunk(_CHUNK)
                        nU = _CHUNK
                        pos = 0
                    fb[0] = t * U[pos]
                    t = fb[0]
                    pos += 1
            elif xm <= 1.0e6:
                # Lorentzian rejection
                if xm != oldm:
                    oldm = xm
                    sq = SQ[i]
                    alxm = AL[i]
                    g = G[i]
                while True:
                    while True:
                        if pos == nU:
                            snap = rng._snapshot()
                            U = rng._uniform_chunk(_CHUNK)
                            nU = _CHUNK
                            pos = 0
                        fb[0] = tan(PI * U[pos])
                        y = fb[0]
                        pos += 1
                        p = sq * y  # exact
                        if fma:
                            s = p + xm
                            fb[0] = s
                            em = fb[0]
                            if em != s:
                                z = s - p
                                err = (p - (s - z)) + (xm - z)
                                if err != 0.0:
                                    em = tie(s, err, em)
                        else:
                            fb[0] = p
                            fb[0] = fb[0] + xm
                            em = fb[0]
                        if not (em < 0.0):
                            break
                    k = floor(em)
                    gl = gl_cache.get(k)
                    if gl is None:
                        gl = gl_cache[k] = gammln(k + 1.0, fma)
                    fb[0] = y * y
                    yy = fb[0]
                    p = k * alxm  # exact: both fit in 24 bits
                    if fma:
                        s = p - gl
                        fb[0] = s
                        a = fb[0]
                        if a != s:
                            z = s - p
                            err = (p - (s - z)) + (-gl - z)
                            if err != 0.0:
                                a = tie(s, err, a)
                    else:
                        fb[0] = p
                        fb[0] = fb[0] - gl
                        a = fb[0]
                    fb[0] = a - g
                    fb[0] = 0.9 * (1.0 + yy) * exp(fb[0])
                    t = fb[0]
                    if pos == nU:
                        snap = rng._snapshot()
                        U = rng._uniform_chunk(_CHUNK)
                        nU = _CHUNK
                        pos = 0
                    u = U[pos]
                    pos += 1
                    if not (u > t):
                        break
                em = float(k)
            elif xm > 1.0e6:
                # Gaussian approximation, gaussdev with its spare deviate
                if iset == 0:
                    while True:
                        if pos == nU:
                            snap = rng._snapshot()
                            U = rng._uniform_chunk(_CHUNK)
                            nU = _CHUNK
                            pos = 0
                        fb[0] = 2.0 * U[pos] - 1.0
                        v1 = fb[0]
                        pos += 1
                        if pos == nU:
                            snap = rng._snapshot()
                            U = rng._uniform_chunk(_CHUNK)
                            nU = _CHUNK
                            pos = 0
                        fb[0] = 2.0 * U[pos] - 1.0
                        v2 = fb[0]
                        pos += 1
                        fb[0] = v2 * v2
                        rsq = maddf(v1, v1, fb[0])
                        if not (rsq >= 1.0 or rsq == 0.0):
                            break
                    fb[0] = sqrt(-2.0 * log(rsq) / rsq)
                    fac = fb[0]
                    fb[0] = v1 * fac
                    gset = fb[0]
                    iset = 1
                    fb[0] = v2 * fac
                    gd = fb[0]
                else:
                    iset = 0
                    gd = gset
                fb[0] = madd(sqrt(xm), gd, xm)
                em = fb[0]
            else:
                # NaN mean: one pass through the rejection loops, result NaN
                oldm = xm
                sq = alxm = g = math.nan
                for _ in range(2):
                    if pos == nU:
                        snap = rng._snapshot()
                        U = rng._uniform_chunk(_CHUNK)
                        nU = _CHUNK
                        pos = 0
                    pos += 1
                em = math.nan
            total += em
            test = em + adc
            if test > 65535.0:
                test = 65535.0
                overloads += 1
            if test >= 0.0:
                res[i] = int(test)
            else:
                res[i] = to_ushort(test)
        image[r0:r1, x0:x1] = np.asarray(res, dtype=np.int64).reshape(r1 - r0, width)

    # leave the generator exactly where the C stream is: rewind the last block
    if snap is not None:
        rng._restore(snap)
        rng._next_ints(pos, keep=False)
    st.oldm, st.g, st.sq, st.alxm, st.iset, st.gset = oldm, g, sq, alxm, iset, gset
    return image, total, overloads


def poisson_noise_fast(
    float_image: np.ndarray,
    seed,
    adc_offset: float = 40.0,
):
    """Vectorised Poisson noise image -- same recipe, *not* the C sequence.

    Draws with :class:`numpy.random.Generator` (Poisson below a mean of 1e6,
    ``xm + sqrt(xm) * N(0, 1)`` above, like C), then applies the C offset,
    clipping, overload count and truncation.  Use it for large images where
    :func:`poisson_noise_image` is too slow and C identity is not required.

    Parameters
    ----------
    float_image : numpy.ndarray
        (slow, fast) float image in photons.  Negative or NaN means give 0
        photons.
    seed : int or numpy.random.Generator
        Seed for ``numpy.random.default_rng`` or a generator.
    adc_offset : float, optional
        Added to every pixel, default 40.

    Returns
    -------
    image : numpy.ndarray
        (slow, fast) uint16.
    photons : float
        Sum of the deviates.
    overloads : int
        Number of pixels clipped at 65535.
    """
    gen = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    lam = np.asarray(float_image, dtype=np.float32).astype(np.float64)
    lam = np.where(np.isfinite(lam) & (lam > 0), lam, 0.0)
    big = lam > 1.0e6
    counts = gen.poisson(np.where(big, 0.0, lam)).astype(np.float64)
    if big.any():
        lb = lam[big]
        counts[big] = (lb + np.sqrt(lb) * gen.standard_normal(lb.shape)).astype(np.float32)
    photons = float(counts.sum())
    test = counts + float(adc_offset)
    over = test > 65535.0
    test = np.where(over, 65535.0, test)
    image = np.trunc(test).astype(np.int64) & 0xFFFF
    return image.astype(np.uint16), photons, int(over.sum())
