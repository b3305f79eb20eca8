"""Tests of torchbragg.c_random against the C program's own random streams.

The strongest check is the golden ``water_noise_0p2um`` case: the noise image
the C program wrote with ``-seed 12345`` must come out pixel for pixel, with
the same printed photon count.  A copy of its first 2000 pixels lives in
``tests/data`` so that the sequence is still checked without ``../shared``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from torchbragg import c_random as cr

HERE = Path(__file__).resolve()
GOLDEN = Path(os.environ.get("TORCHBRAGG_GOLDEN") or HERE.parents[2].parent / "shared" / "golden")
WATER = GOLDEN / "cases" / "water_noise_0p2um"
HEAD = HERE.parents[1] / "data" / "c_random_water_noise_head.npz"
DEG = math.pi / 180.0


def _draws(gen: cr.CRandom, n: int) -> list:
    return [gen.ran1() for _ in range(n)]


def _read_smv_pixels(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    header = raw[:512].decode("latin1")
    nbytes = int(re.search(r"HEADER_BYTES=(\d+);", header).group(1))
    fast = int(re.search(r"SIZE1=(\d+);", header).group(1))
    slow = int(re.search(r"SIZE2=(\d+);", header).group(1))
    assert "little_endian" in header and "unsigned_short" in header
    return np.frombuffer(raw[nbytes:], dtype="<u2").reshape(slow, fast)


# --------------------------------------------------------------- noise images
@pytest.mark.skipif(not WATER.is_dir(), reason=f"golden case not found at {WATER}")
def test_golden_noise_image_is_bit_identical():
    floats = np.fromfile(WATER / "img.f32", dtype="<f4").reshape(256, 256)
    reference = _read_smv_pixels(WATER / "noise.smv")
    log = (WATER / "log.txt").read_text()
    photons_c, overloads_c = map(int, re.search(r"(\d+) photons on noise image \((\d+) overloads\)", log).groups())
    assert "seed: -12345" in log  # -seed 12345 became idum = -12345

    image, photons, overloads = cr.poisson_noise_image(floats, 12345)

    assert image.dtype == np.uint16 and image.shape == (256, 256)
    np.testing.assert_array_equal(image, reference)
    assert f"{photons:.0f}" == str(photons_c) == "47685089"
    assert overloads == overloads_c == 0


@pytest.mark.skipif(not WATER.is_dir(), reason=f"golden case not found at {WATER}")
def test_golden_noise_needs_fused_multiply_add():
    """Without FMA rounding pixel 10100 takes another rejection path (see module docs)."""
    floats = np.fromfile(WATER / "img.f32", dtype="<f4").reshape(256, 256)
    reference = _read_smv_pixels(WATER / "noise.smv").ravel()
    image, photons, _ = cr.poisson_noise_image(floats, cr.CRandom.from_seed(12345, fma=False))
    bad = np.flatnonzero(image.ravel() != reference)
    assert bad[0] == 10100
    assert f"{photons:.0f}" != "47685089"


def test_noise_head_matches_c_without_shared_data():
    data = np.load(HEAD)
    floats = data["float_head"].reshape(1, -1)
    image, photons, overloads = cr.poisson_noise_image(floats, int(data["seed"]), float(data["adc_offset"]))
    np.testing.assert_array_equal(image.ravel(), data["noise_head"])
    assert photons == float(data["noise_head"].astype(np.int64).sum() - 40 * data["noise_head"].size)
    assert overloads == 0


def test_scalar_poidev_and_fast_loop_agree_on_every_branch():
    """poisson_noise_image (vectorised helpers, inlined FMA) == CRandom.poidev, one draw at a time."""
    means = np.array(
        [0.0, 0.5, 3.0, 11.9, 11.9, 12.0, 50.0, 1e5, 2e6, 5e7, 3e6, -3.0, 0.0, 7.25, 1e6,
         1000.5, 12.0, 2.5e6, 1e-3, 30.0, np.nan, 40.0, 70000.0, 65600.0],
        dtype=np.float32,
    )
    floats = np.tile(means, 30).reshape(20, -1) * np.linspace(0.9, 1.1, 20, dtype=np.float32)[:, None]
    for fma in (True, False):
        scalar = cr.CRandom.from_seed(99, fma=fma)
        expected = [scalar.poidev(float(v)) for v in floats.ravel()]
        fast = cr.CRandom.from_seed(99, fma=fma)
        image, photons, overloads = cr.poisson_noise_image(floats, fast)
        counts = np.array(expected)
        finite = np.isfinite(counts)
        want = np.where(finite, np.minimum(counts + 40.0, 65535.0), 0.0).astype(np.int64)
        np.testing.assert_array_equal(image.ravel(), want)
        assert overloads == int((counts[finite] + 40.0 > 65535.0).sum())
        assert math.isnan(photons)  # a NaN mean poisons C's sum too
        # the generator (and the shared statics) end exactly where the scalar one does
        assert (fast.idum, fast.iy, fast.iv) == (scalar.idum, scalar.iy, scalar.iv)
        assert fast.ran1() == scalar.ran1()
        assert fast.gaussdev() == scalar.gaussdev()


def test_noise_clipping_truncation_and_roi():
    floats = np.full((6, 7), 30.0, dtype=np.float32)
    floats[2, 3] = 2.0e6  # Gaussian branch, non-integer deviate
    floats[4, 1] = 9.0e4  # above 65535 after the offset: clipped and counted
    image, photons, overloads = cr.poisson_noise_image(floats, 5)
    assert overloads == 2 and image[4, 1] == image[2, 3] == 65535
    g = cr.CRandom.from_seed(5)
    values = np.array([g.poidev(float(v)) for v in floats.ravel()])
    assert photons == values.sum() and photons != round(photons)  # Gaussian branch is not integer
    # C truncates toward zero (an offset of 0.7 does not round up) ...
    trunc, _, _ = cr.poisson_noise_image(floats, 5, adc_offset=0.7)
    np.testing.assert_array_equal(trunc.ravel(), np.minimum(np.trunc(values + 0.7), 65535))
    # ... and does not clamp at 0: a negative offset wraps like the C cast on x86-64
    low, _, _ = cr.poisson_noise_image(np.zeros((1, 3), np.float32), 5, adc_offset=-2.0)
    np.testing.assert_array_equal(low, [[65534, 65534, 65534]])

    # -roi visits only the box (inclusive bounds): same stream as the cropped image
    roi_image, roi_photons, _ = cr.poisson_noise_image(floats, 5, roi=(2, 4, 1, 3))
    crop_image, crop_photons, _ = cr.poisson_noise_image(floats[1:4, 2:5], 5)
    np.testing.assert_array_equal(roi_image[1:4, 2:5], crop_image)
    assert roi_photons == crop_photons
    roi_image[1:4, 2:5] = 0
    assert not roi_image.any()


def test_noise_seed_sign_convention_and_negative_seed_warning():
    floats = np.full((3, 3), 20.0, dtype=np.float32)
    a, _, _ = cr.poisson_noise_image(floats, 7)
    b, _, _ = cr.poisson_noise_image(floats, cr.CRandom(-7))  # -seed 7 is idum = -7
    np.testing.assert_array_equal(a, b)
    with pytest.warns(UserWarning, match="mosaic stream"):
        cr.poisson_noise_image(floats, -7)


def test_poisson_noise_fast_is_statistically_right_but_not_c():
    floats = np.full((200, 200), 25.0, dtype=np.float32)
    image, photons, overloads = cr.poisson_noise_fast(floats, 3)
    assert image.dtype == np.uint16 and image.shape == floats.shape and overloads == 0
    counts = image.astype(np.float64) - 40.0
    assert abs(counts.mean() - 25.0) < 0.1 and abs(counts.var() - 25.0) < 1.0
    assert photons == counts.sum()
    exact, _, _ = cr.poisson_noise_image(floats, 3)
    assert (exact != image).any()
    big = np.array([[1.0e5, 3.0e6]], dtype=np.float32)
    img2, _, over2 = cr.poisson_noise_fast(big, 1)
    assert over2 == 2 and (img2 == 65535).all()


# ------------------------------------------------------------------- ran1
def test_ran1_reference_values_and_range():
    # Numerical Recipes' ran1 with idum = -1 starts 0.415999...; as float32 bits:
    r = cr.CRandom(-1)
    assert r.ran1() == float.fromhex("0x1.a9fbbcp-2")
    assert r.ran1() == float.fromhex("0x1.78b02ep-4")
    first = [cr.CRandom.from_seed(12345).ran1() for _ in range(2)]
    assert first[0] == first[1] == float.fromhex("0x1.d8a342p-1")
    values = cr.CRandom.from_seed(12345).uniforms(100_000)
    assert values.dtype == np.float32
    assert values.min() > 0.0 and values.max() < 1.0
    assert abs(values.mean() - 0.5) < 0.005
    # scalar and vectorised generation give the same stream and state
    g1, g2 = cr.CRandom.from_seed(4242), cr.CRandom.from_seed(4242)
    np.testing.assert_array_equal(g1.uniforms(70_000), np.array([g2.ran1() for _ in range(70_000)], np.float32))
    assert (g1.idum, g1.iy, g1.iv) == (g2.idum, g2.iy, g2.iv)


def test_ran1_reload_rules():
    # seed 0 (idum 0) and a positive idum on the first call both reload from idum = 1
    ref = _draws(cr.CRandom(-1), 3)
    assert _draws(cr.CRandom.from_seed(0), 3) == ref
    assert _draws(cr.CRandom(5), 3) == ref
    # a positive idum continues a table that is already filled ...
    first = cr.CRandom.from_seed(12345678)
    first.ran1()
    follower = cr.CRandom(5, share_with=first)
    assert follower.shares_statics_with(first) and follower.iv == first.iv
    fresh = cr.CRandom(5)
    assert follower.ran1() != fresh.ran1()
    # ... while a non-positive idum always reloads: the earlier stream does not matter
    reloaded = cr.CRandom.from_seed(12345, share_with=first)
    assert _draws(reloaded, 5) == _draws(cr.CRandom.from_seed(12345), 5)


def test_nanobragg_streams_models_shared_statics():
    # positive -seed: the noise stream reloads, the mosaic stream before it is irrelevant
    run = cr.nanobragg_streams(12345, 0.5 * DEG, 5, mosaic_seed=7)
    assert _draws(run.noise_rng, 4) == _draws(cr.CRandom.from_seed(12345), 4)
    np.testing.assert_array_equal(run.mosaic_umats, cr.mosaic_umats(0.5 * DEG, 5, 7))
    assert run.misset is None
    # negative -seed: idum > 0 continues the table the mosaic loop left behind
    neg = cr.nanobragg_streams(-5, 0.5 * DEG, 5, mosaic_seed=7)
    mosaic = cr.CRandom.from_seed(7)
    cr.mosaic_umats(0.5 * DEG, 5, rng=mosaic)
    manual = cr.CRandom(5, share_with=mosaic)
    assert neg.noise_rng.iv == manual.iv
    assert _draws(neg.noise_rng, 5) == _draws(manual, 5)
    assert _draws(cr.nanobragg_streams(-5, 0.5 * DEG, 5, mosaic_seed=7).noise_rng, 5) != _draws(cr.CRandom(5), 5)
    # with -misset random first, the mosaic stream still reloads from its own seed
    mis = cr.nanobragg_streams(1, 0.5 * DEG, 5, mosaic_seed=7, misset_seed=42)
    assert mis.misset == cr.random_misset(42)
    np.testing.assert_array_equal(mis.mosaic_umats, run.mosaic_umats)


# ------------------------------------------------------------ rotations
def _rotation_angle(u: np.ndarray) -> float:
    return math.acos(max(-1.0, min(1.0, (np.trace(u) - 1.0) / 2.0)))


def test_mosaic_umats_mosaic_phi_case():
    """-mosaic 0.5 -mosaic_dom 5 -mosaic_seed 7, as in the golden mosaic_phi case."""
    spread = 0.5 * DEG
    umats = cr.mosaic_umats(spread, 5, 7)
    assert umats.shape == (5, 3, 3) and umats.dtype == np.float64
    np.testing.assert_array_equal(umats[0], np.eye(3))  # domain 0 forced to identity
    for u in umats:
        np.testing.assert_allclose(u @ u.T, np.eye(3), atol=1e-14)
        assert abs(np.linalg.det(u) - 1.0) < 1e-14
        assert _rotation_angle(u) <= spread * (1 + 1e-6)
    assert all(_rotation_angle(u) > 0 for u in umats[1:])
    np.testing.assert_array_equal(umats, cr.mosaic_umats(spread, 5, 7))  # deterministic
    assert not np.array_equal(umats[1:], cr.mosaic_umats(spread, 5, 8)[1:])
    # three deviates per domain, domain 0 included
    g = cr.CRandom.from_seed(7)
    cr.mosaic_umats(spread, 5, rng=g)
    h = cr.CRandom.from_seed(7)
    h.uniforms(15)
    assert (g.idum, g.iy, g.iv) == (h.idum, h.iy, h.iv)


def test_mosaic_angles_fill_the_cap():
    spread = 2.0 * DEG
    angles = np.array([_rotation_angle(u) for u in cr.mosaic_umats(spread, 400, 11)[1:]])
    assert angles.max() <= spread * (1 + 1e-6)
    assert angles.max() > 0.95 * spread and np.median(angles) > 0.5 * spread
    assert _rotation_angle(cr.mosaic_umats(spread, 3, cr.DEFAULT_MOSAIC_SEED)[1]) <= spread


def _rotate_xyz(rotx: float, roty: float, rotz: float) -> np.ndarray:
    cx, sx, cy, sy = math.cos(rotx), math.sin(rotx), math.cos(roty), math.sin(roty)
    cz, sz = math.cos(rotz), math.sin(rotz)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx  # C's rotate(): about x, then y, then z


def test_random_misset_angles_reproduce_the_random_umat():
    for seed in (1, 42, 12345):
        umat = cr.mosaic_rotation_umat(90.0, cr.CRandom.from_seed(seed))
        angles = cr.random_misset(seed)
        assert angles == cr.random_misset(seed)
        assert all(math.isfinite(a) for a in angles)
        np.testing.assert_allclose(_rotate_xyz(*angles), umat, atol=1e-12)
    # 90 *radians* of cap: orientations are spread over the whole sphere
    tilts = [abs(cr.random_misset(s)[1]) for s in range(1, 200)]
    assert max(tilts) > 1.2
    with pytest.raises(ValueError):
        cr.random_misset()


def test_umat2misset_degenerate_rows():
    # an all-zero matrix is rebuilt as the identity
    assert cr.umat2misset(np.zeros((3, 3))) == (0.0, -0.0, 0.0)
    # gimbal lock: uzx = +-1
    u = _rotate_xyz(0.3, math.pi / 2, 0.0)
    rx, ry, rz = cr.umat2misset(u)
    assert math.isclose(ry, math.pi / 2, abs_tol=1e-7)
