"""The compiled kernels' own arithmetic (``kernel_math.h``, the CPU exponential) against numpy.

The kernels evaluate sin(πy), cos(πy) and e^x as polynomials after an exact range
reduction, so that they vectorise; these must agree with the C library to a few
units in the last place in the render dtype, keep subnormal results, and give 0
and infinity where the C library does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchbragg.kernels.cpu import kernel_math_probe

pytestmark = pytest.mark.usefixtures("needs_fast")
DTYPES = [pytest.param(torch.float32, np.float32, id="float32"), pytest.param(torch.float64, np.float64, id="float64")]


def _ulps(got, want, np_dtype):
    """|got - want| in units of the last place of want (in np_dtype), 0 where both are equal."""
    want = want.astype(np_dtype)
    spacing = np.spacing(np.abs(want).astype(np_dtype)).astype(np.float64)
    return np.abs(got - want.astype(np.float64)) / spacing


@pytest.mark.parametrize("dtype, np_dtype", DTYPES)
def test_sinpi_and_cospi(dtype, np_dtype):
    x = np.concatenate([np.linspace(-40, 40, 200001), np.arange(-20, 21) * 0.5, [0.0, -0.0, 1e-30, 0.25]])
    xr = x.astype(np_dtype).astype(np.float64)  # the kernel sees x rounded to its dtype
    # sin(pi x) and cos(pi x) in float64 from the reduced argument (numpy's sin(pi*x) loses digits)
    k = np.rint(xr)
    sign = np.where(np.mod(k, 2) == 0, 1.0, -1.0)
    want_s = sign * np.sin(np.pi * (xr - k))
    want_c = sign * np.cos(np.pi * (xr - k))
    got_s = kernel_math_probe(dtype, "sinpi", x)
    got_c = kernel_math_probe(dtype, "cospi", x)
    tol = 4.0  # units in the last place of the result, or absolute near the zeros
    tiny = np.finfo(np_dtype).eps
    for got, want in ((got_s, want_s), (got_c, want_c)):
        err = np.abs(got - want)
        ok = (_ulps(got, want, np_dtype) <= tol) | (err <= 2 * tiny)
        assert ok.all(), (x[~ok][:5], got[~ok][:5], want[~ok][:5])
    # exact values where they are exact
    half = np.arange(-20, 21) * 0.5
    assert np.array_equal(kernel_math_probe(dtype, "sinpi", np.arange(-20.0, 21.0)), np.zeros(41))
    assert np.array_equal(np.abs(kernel_math_probe(dtype, "cospi", half[::2])), np.ones(21))


@pytest.mark.parametrize("dtype, np_dtype", DTYPES)
def test_exp(dtype, np_dtype):
    lo = -745.5 if np_dtype == np.float64 else -104.5
    hi = 709.0 if np_dtype == np.float64 else 88.0
    x = np.concatenate([np.linspace(lo, hi, 400001), [0.0, -1e-20, 1.0, -1.0]])
    xr = x.astype(np_dtype)
    with np.errstate(under="ignore", over="ignore"):
        want = np.exp(xr).astype(np.float64)  # the C library's exp in the dtype, subnormals included
    got = kernel_math_probe(dtype, "exp", x)
    normal = np.abs(want) >= np.finfo(np_dtype).tiny
    assert (_ulps(got[normal], want[normal], np_dtype) <= 4).all()
    # subnormal results are kept (to within their own, coarser spacing) and vanish where the C library's do
    sub = ~normal
    assert sub.sum() > 1000
    step = float(np.finfo(np_dtype).smallest_subnormal)
    assert (np.abs(got[sub] - want[sub]) <= 2 * step).all()
    assert np.array_equal(got[want == 0] == 0, np.ones(int((want == 0).sum()), bool))
    assert kernel_math_probe(dtype, "exp", np.array([1e6]))[0] == np.inf
    assert kernel_math_probe(dtype, "exp", np.array([-1e6]))[0] == 0.0


@pytest.mark.parametrize("dtype, np_dtype", DTYPES)
def test_round_crystal_factor(dtype, np_dtype):
    hrad = np.concatenate([[0.0], np.logspace(-2, 3, 20001)])
    y = np.sqrt(hrad.astype(np_dtype)).astype(np.float64)  # as the kernel: sqrt in its dtype
    x = np.pi * y
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.where(x == 0, 1.0, 3 * (np.sin(x) / x - np.cos(x)) / (x * x)) * 0.723601254558268
    got = kernel_math_probe(dtype, "round_factor", hrad)
    assert got[0] == pytest.approx(0.723601254558268, rel=1e-6)
    # absolute error on the factor's scale (its maximum is 0.72 at x = 0); below x ~ 0.5 the formula
    # itself cancels (sin x / x - cos x ~ x^2 / 3) in float32, as in the eager kernel
    far = x > 0.5
    tol = 1e-12 if np_dtype == np.float64 else 2e-6
    assert (np.abs(got - want)[far] <= tol).all()
    assert far.sum() > 10000
