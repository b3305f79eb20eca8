"""Detector geometry: conventions, pivots, rotations, size, ROI, mask, curved/point pixels, SMV header.

Expected numbers are derived here by hand from the C program's set-up rules
(each rule is paraphrased in a comment next to its use) and compared with
``torchbragg.resolve.resolve(parse_args(...))``.  All lengths are metres.

A detector of 120 (fast) x 80 (slow) pixels of 0.1 mm at 100 mm is used for the
convention tests, so that fast/slow and X/Y mix-ups cannot cancel out.
"""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
import torch

import torchbragg
from torchbragg import parse_args
from torchbragg.cli.command import run_simulation
from torchbragg.io.smv import read_smv, read_smv_header, write_smv
from torchbragg.resolve import resolve

CELL = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100"]
DET = ["-detpixels_f", "120", "-detpixels_s", "80", "-pixel", "0.1", "-distance", "100"]
PX = 1e-4
D = 0.1
# C's fill-in rule: with a pixel count given, the detector size is pixels x pixel size
DETSIZE_F, DETSIZE_S = 120 * PX, 80 * PX
# C's first default: the near point is the detector centre, unless -ORGX/-ORGY place it
FCLOSE0, SCLOSE0 = DETSIZE_F / 2, DETSIZE_S / 2

X, Y, Z = np.eye(3)


def setup_of(*args, cwd=None):
    cfg = parse_args(CELL + list(args))
    cfg.cwd = cwd
    return resolve(cfg)


def close(a, b, tol=1e-12):
    return np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=0, atol=tol)


# -- rotations written out independently of torchbragg.rotations ------------------------------
def rot_x(t):
    c, s = math.cos(t), math.sin(t)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def rot_y(t):
    c, s = math.cos(t), math.sin(t)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rot_z(t):
    c, s = math.cos(t), math.sin(t)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def rot_about(axis, t):
    """Right-handed rotation by t about the unit vector axis (Rodrigues)."""
    k = np.asarray(axis, dtype=float)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return math.cos(t) * np.eye(3) + math.sin(t) * K + (1 - math.cos(t)) * np.outer(k, k)


def c_detector(fdet, sdet, odet, beam, pivot, fbeam, sbeam, fclose, sclose, distance,
               rot=(0.0, 0.0, 0.0), twotheta_axis=None, twotheta=0.0, close_distance=None):
    """The C placement rules, paraphrased:

    * the obliquity ``ratio`` is beam . (odet turned by the x, y, z detector rotations only,
      not by the two-theta swing); a missing close distance is |ratio x distance|, and the
      distance is then re-derived as close_distance / ratio;
    * sample pivot: the first pixel sits at -Fclose f - Sclose s + close_distance o *before*
      the detector turns, and that point is turned with it;
    * the axes turn about x, then y, then z, then about the two-theta axis;
    * beam pivot: the first pixel is placed *after* turning, so that the beam still lands at
      (Fbeam, Sbeam): -Fbeam f - Sbeam s + distance beam;
    * afterwards C re-reads Fclose, Sclose, close_distance from the first pixel, Fbeam and
      Sbeam from the point close_distance / ratio along the beam, distance = close / ratio,
      ORGX = Fclose / pixel + 0.5.
    """
    R = rot_z(rot[2]) @ rot_y(rot[1]) @ rot_x(rot[0])
    T = rot_about(twotheta_axis, twotheta) if twotheta_axis is not None else np.eye(3)
    ratio = float(beam @ (R @ odet))
    if close_distance is None:
        close_distance = abs(ratio * distance)
    distance = close_distance / ratio
    if pivot == "sample":
        pix0 = T @ (R @ (-fclose * fdet - sclose * sdet + close_distance * odet))
    f, s, o = T @ R @ fdet, T @ R @ sdet, T @ R @ odet
    if pivot == "beam":
        pix0 = -fbeam * f - sbeam * s + distance * beam
    close_d = float(pix0 @ o)
    hit = close_d / ratio * beam - pix0
    return {"fdet": f, "sdet": s, "odet": o, "pix0": pix0, "fclose": -float(pix0 @ f),
            "sclose": -float(pix0 @ s), "close_distance": close_d, "fbeam": float(f @ hit),
            "sbeam": float(s @ hit), "distance": close_d / ratio}


def assert_geometry(s, expected, tol=1e-12):
    for key, value in expected.items():
        got = getattr(s, key)
        assert close(got, value, tol), f"{key}: engine {got}, C rule {value}"


# --------------------------------------------------------------------------- conventions
def test_mosflm_default():
    s = setup_of(*DET)
    # MOSFLM with no beam centre: Xbeam = (slow size + pixel)/2, Ybeam = (fast size + pixel)/2
    # (X is along the slow axis in MOSFLM), then Fbeam = Ybeam + half a pixel, Sbeam = Xbeam + half.
    xbeam, ybeam = (DETSIZE_S + PX) / 2, (DETSIZE_F + PX) / 2
    fbeam, sbeam = ybeam + PX / 2, xbeam + PX / 2
    assert s.convention == "MOSFLM" and s.pivot == "beam"  # MOSFLM always pivots on the beam spot
    # MOSFLM axes: beam along +x, fast along +z, slow along -y, normal along +x
    assert_geometry(s, {"beam": X, "fdet": Z, "sdet": -Y, "odet": X, "spindle": Z, "polar_vector": Z})
    assert_geometry(s, {"xbeam": xbeam, "ybeam": ybeam, "fbeam": fbeam, "sbeam": sbeam,
                        "pix0": [D, sbeam, -fbeam], "distance": D, "close_distance": D,
                        "fclose": fbeam, "sclose": sbeam, "xclose": FCLOSE0, "yclose": SCLOSE0,
                        "orgx": fbeam / PX + 0.5, "orgy": sbeam / PX + 0.5})
    assert (s.fpixels, s.spixels) == (120, 80)


def test_mosflm_explicit_beam_centre():
    s = setup_of(*DET, "-Xbeam", "3", "-Ybeam", "5")
    # -Xbeam/-Ybeam are MOSFLM's X (slow) and Y (fast), plus half a pixel each
    assert_geometry(s, {"xbeam": 0.003, "ybeam": 0.005, "fbeam": 0.005 + PX / 2, "sbeam": 0.003 + PX / 2,
                        "pix0": [D, 0.003 + PX / 2, -(0.005 + PX / 2)]})


def test_denzo():
    s = setup_of(*DET, "-denzo")
    # DENZO = MOSFLM axes and default centre, but without the half-pixel shift
    xbeam, ybeam = (DETSIZE_S + PX) / 2, (DETSIZE_F + PX) / 2
    assert s.convention == "DENZO" and s.pivot == "beam"
    assert_geometry(s, {"beam": X, "fdet": Z, "sdet": -Y, "odet": X})
    assert_geometry(s, {"xbeam": xbeam, "ybeam": ybeam, "fbeam": ybeam, "sbeam": xbeam,
                        "pix0": [D, xbeam, -ybeam], "distance": D})


def test_adxv():
    s = setup_of(*DET, "-adxv")
    # ADXV: Xbeam = (fast size + pixel)/2, Ybeam = (slow size - pixel)/2; Fbeam = Xbeam and
    # Sbeam = slow size - Ybeam (Y counts from the other edge); beam along +z, fast +x, slow -y
    xbeam, ybeam = (DETSIZE_F + PX) / 2, (DETSIZE_S - PX) / 2
    fbeam, sbeam = xbeam, DETSIZE_S - ybeam
    assert s.convention == "ADXV" and s.pivot == "beam"
    assert_geometry(s, {"beam": Z, "fdet": X, "sdet": -Y, "odet": Z, "spindle": X, "polar_vector": X})
    assert_geometry(s, {"xbeam": xbeam, "ybeam": ybeam, "fbeam": fbeam, "sbeam": sbeam,
                        "pix0": [-fbeam, sbeam, D], "distance": D, "close_distance": D})


def test_xds_default_and_orgx():
    s = setup_of(*DET, "-xds")
    # XDS: beam +z, fast +x, slow +y, normal +z; pivot on the sample; the beam centre defaults
    # to the near point (the detector centre); the first pixel is -Fclose f - Sclose s + d o
    assert s.convention == "XDS" and s.pivot == "sample"
    assert_geometry(s, {"beam": Z, "fdet": X, "sdet": Y, "odet": Z, "spindle": X, "polar_vector": X})
    assert_geometry(s, {"xbeam": FCLOSE0, "ybeam": SCLOSE0, "fbeam": FCLOSE0, "sbeam": SCLOSE0,
                        "pix0": [-FCLOSE0, -SCLOSE0, D], "close_distance": D, "distance": D,
                        "orgx": FCLOSE0 / PX + 0.5, "orgy": SCLOSE0 / PX + 0.5})
    # -ORGX/-ORGY (pixels) put the near point at (ORGX - 0.5) pixels
    s = setup_of(*DET, "-xds", "-ORGX", "40.5", "-ORGY", "30.5")
    f, sl = 40 * PX, 30 * PX
    assert_geometry(s, {"pix0": [-f, -sl, D], "fclose": f, "sclose": sl, "xbeam": f, "ybeam": sl,
                        "fbeam": f, "sbeam": sl, "orgx": 40.5, "orgy": 30.5})


def test_dials():
    s = setup_of(*DET, "-dials")
    # DIALS: XDS axes and pivot, but the spindle, polarisation and two-theta axes are +y
    assert s.convention == "DIALS" and s.pivot == "sample"
    assert_geometry(s, {"beam": Z, "fdet": X, "sdet": Y, "odet": Z, "spindle": Y, "polar_vector": Y})
    assert_geometry(s, {"pix0": [-FCLOSE0, -SCLOSE0, D], "fbeam": FCLOSE0, "sbeam": SCLOSE0})
    # C's DIALS origin is 1000 x (pix0 . z, pix0 . y, pix0 . -x), in mm
    assert close(s.dials_origin, 1000 * np.array([D, -SCLOSE0, FCLOSE0]), 1e-9)


def test_custom_vectors():
    s = setup_of("-fdet_vector", "0", "0", "2", "-sdet_vector", "0", "-1", "0", "-odet_vector", "1", "0", "0",
                 "-beam_vector", "1", "0", "0", *DET)
    # any detector vector switches to CUSTOM; vectors are made unit length; the beam centre
    # defaults to the near point (detector centre) and Fbeam = Xbeam, Sbeam = Ybeam, no shift
    assert s.convention == "CUSTOM" and s.pivot == "beam"  # -distance (last) implies the beam pivot
    assert_geometry(s, {"fdet": Z, "sdet": -Y, "odet": X, "beam": X})
    assert_geometry(s, {"xbeam": FCLOSE0, "ybeam": SCLOSE0, "fbeam": FCLOSE0, "sbeam": SCLOSE0,
                        "pix0": [D, SCLOSE0, -FCLOSE0], "distance": D})


def test_custom_odet_not_unit_is_rebuilt_from_fast_cross_slow():
    # C: a normal whose length is not 1 is replaced by fast x slow ("auto-generating odet_vector")
    s = setup_of("-fdet_vector", "0", "0", "1", "-sdet_vector", "0", "-1", "0", "-odet_vector", "2", "0", "0",
                 *DET)
    assert close(s.odet, np.cross(Z, -Y)) and close(s.odet, X)
    assert any("auto-generating odet_vector" in line for line in s.log)


# --------------------------------------------------------------------------- pivots
def test_twotheta_with_mosflm_keeps_the_beam_pivot():
    s = setup_of(*DET, "-twotheta", "20")
    # -twotheta asks for the sample pivot, but the MOSFLM block forces the beam pivot again
    assert s.pivot == "beam"
    fbeam, sbeam = (DETSIZE_F + PX) / 2 + PX / 2, (DETSIZE_S + PX) / 2 + PX / 2
    exp = c_detector(Z, -Y, X, X, "beam", fbeam, sbeam, None, None, D,
                     twotheta_axis=-Z, twotheta=math.radians(20))  # MOSFLM two-theta axis is -z
    assert_geometry(s, exp)
    # the beam still lands on (Fbeam, Sbeam) at 100 mm along the beam...
    assert close(s.pix0 + fbeam * s.fdet + sbeam * s.sdet, D * X)
    # ...and the re-derived distance uses the obliquity without the swing: close / 1
    assert s.close_distance == pytest.approx(D * math.cos(math.radians(20)), abs=1e-15)
    assert s.distance == pytest.approx(s.close_distance, abs=1e-15)


def test_twotheta_with_xds_pivots_on_the_sample():
    s = setup_of(*DET, "-xds", "-twotheta", "20")
    exp = c_detector(X, Y, Z, Z, "sample", None, None, FCLOSE0, SCLOSE0, D,
                     twotheta_axis=X, twotheta=math.radians(20))  # XDS two-theta axis is +x
    assert_geometry(s, exp)
    # the near point and the sample-to-detector-plane distance are what stays put
    assert_geometry(s, {"fclose": FCLOSE0, "sclose": SCLOSE0, "close_distance": D})


CUSTOM_MOSFLM_AXES = ["-fdet_vector", "0", "0", "1", "-sdet_vector", "0", "-1", "0", "-odet_vector", "1", "0", "0"]


@pytest.mark.parametrize("order, pivot", [
    (["-distance", "100", "-twotheta", "20"], "sample"),
    (["-twotheta", "20", "-distance", "100"], "beam"),
])
def test_custom_pivot_follows_the_last_flag(order, pivot):
    # In CUSTOM the pivot is whatever the last pivot-implying flag said (-distance/-Xbeam/-Ybeam:
    # beam; -close_distance/-Xclose/-Yclose/-ORGX/-ORGY/-twotheta: sample)
    s = setup_of(*CUSTOM_MOSFLM_AXES, "-detpixels_f", "120", "-detpixels_s", "80", "-pixel", "0.1", *order)
    assert s.pivot == pivot
    # C's CUSTOM two-theta axis is its initial +z; the near point and beam centre both default
    # to the detector centre
    exp = c_detector(Z, -Y, X, X, pivot, FCLOSE0, SCLOSE0, FCLOSE0, SCLOSE0, D,
                     twotheta_axis=Z, twotheta=math.radians(20))
    assert_geometry(s, exp)


def test_close_distance_with_rotation():
    s = setup_of(*CUSTOM_MOSFLM_AXES, "-detpixels_f", "120", "-detpixels_s", "80", "-pixel", "0.1",
                 "-close_distance", "90", "-detector_roty", "10")
    assert s.pivot == "sample"
    exp = c_detector(Z, -Y, X, X, "sample", None, None, FCLOSE0, SCLOSE0, None, rot=(0, math.radians(10), 0),
                     close_distance=0.09)
    assert_geometry(s, exp)
    assert s.close_distance == pytest.approx(0.09, abs=1e-15)
    # distance along the beam = close distance / (beam . turned normal) = 0.09 / cos(10 deg)
    assert s.distance == pytest.approx(0.09 / math.cos(math.radians(10)), rel=1e-14)


def test_orgx_is_ignored_by_the_beam_pivot_of_mosflm():
    # -ORGX moves the near point, but MOSFLM places the detector from the beam centre
    plain, with_org = setup_of(*DET), setup_of(*DET, "-ORGX", "40", "-ORGY", "30")
    assert with_org.pivot == "beam"
    assert close(plain.pix0, with_org.pix0)
    assert with_org.xclose == pytest.approx((40 - 0.5) * PX)


@pytest.mark.parametrize("order, pivot", [
    (["-pivot", "sample", "-distance", "100"], "beam"),
    (["-distance", "100", "-pivot", "sample"], "sample"),
    (["-close_distance", "100", "-pivot", "beam"], "beam"),
])
def test_custom_pivot_flag_is_one_of_the_ordered_flags(order, pivot):
    # C reads the line in order and every pivot-setting flag overwrites the pivot, -pivot included
    s = setup_of(*CUSTOM_MOSFLM_AXES, "-detpixels_f", "120", "-detpixels_s", "80", "-pixel", "0.1",
                 "-detector_roty", "10", *order)
    assert s.pivot == pivot


# --------------------------------------------------------------------------- rotations
def test_detector_rotations_and_twotheta_xds(reference_case):
    case = reference_case("detector_rot_xds_os3")
    s = resolve(parse_args(case.args))
    rot = tuple(math.radians(v) for v in (5, 3, 2))
    exp = c_detector(X, Y, Z, Z, "sample", None, None, 0.0256, 0.0256, D, rot=rot,
                     twotheta_axis=X, twotheta=math.radians(10))
    assert_geometry(s, exp)
    # the same axes, printed by the C program (6 significant digits)
    log = case.log()
    for label, vec in (("X", s.fdet), ("Y", s.sdet), ("Z", s.odet)):
        printed = re.search(rf"DIRECTION_OF_DETECTOR_{label}-AXIS= (\S+) (\S+) (\S+)", log).groups()
        assert np.allclose(vec, [float(v) for v in printed], rtol=1e-5, atol=1e-6), label


@pytest.mark.parametrize("flag, matrix", [("-detector_rotx", rot_x), ("-detector_roty", rot_y),
                                          ("-detector_rotz", rot_z)])
def test_single_detector_rotation_is_right_handed(flag, matrix):
    s = setup_of(*DET, "-xds", flag, "30")
    R = matrix(math.radians(30))
    assert_geometry(s, {"fdet": R @ X, "sdet": R @ Y, "odet": R @ Z})
    # XDS pivots on the sample: the unturned first pixel, at the close distance |beam . R z| x 100 mm,
    # turns with the detector
    close_d = abs(float(Z @ (R @ Z))) * D
    assert close(s.pix0, R @ np.array([-FCLOSE0, -SCLOSE0, close_d]))
    assert s.close_distance == pytest.approx(close_d, abs=1e-15)


# --------------------------------------------------------------------------- golden logs
LOG_FIELDS = {
    "xbeam": r"Xbeam=(\S+)", "ybeam": r"Ybeam=(\S+)", "fbeam": r"Fbeam=(\S+)", "sbeam": r"Sbeam=(\S+)",
    "xclose": r"Xclose=(\S+)", "yclose": r"Yclose=(\S+)", "fclose": r"Fclose=(\S+)", "sclose": r"Sclose=(\S+)",
    "distance": r"  distance=(\S+)", "pixel_size": r"pixel=(\S+) meters",
}
LOG_VECTORS = {
    "fdet": "DIRECTION_OF_DETECTOR_X-AXIS=", "sdet": "DIRECTION_OF_DETECTOR_Y-AXIS=",
    "odet": "DIRECTION_OF_DETECTOR_Z-AXIS=", "beam": "INCIDENT_BEAM_DIRECTION=", "spindle": "spindle ROTATION_AXIS=",
    "dials_origin": "dials origin=",
}


def test_geometry_printed_by_c(golden_case):
    """Every number the C program printed about its detector, to its 6 printed digits."""
    s = resolve(_cfg_in(golden_case))
    log = golden_case.log()
    for key, pattern in LOG_FIELDS.items():
        printed = float(re.search(pattern, log).group(1))
        assert np.isclose(getattr(s, key), printed, rtol=1e-5, atol=1e-12), (key, getattr(s, key), printed)
    for key, label in LOG_VECTORS.items():
        printed = [float(v) for v in re.search(re.escape(label) + r" (\S+) (\S+) (\S+)", log).groups()]
        assert np.allclose(getattr(s, key), printed, rtol=1e-5, atol=1e-5), (key, getattr(s, key), printed)
    size = re.search(r"\((\d+)x(\d+) pixels\)", log).groups()
    assert (s.fpixels, s.spixels) == tuple(int(v) for v in size)
    # the beam in the detector frame, "XDS incident beam"
    printed = [float(v) for v in re.search(r"XDS incident beam: (\S+) (\S+) (\S+)", log).groups()]
    assert np.allclose([s.beam @ s.fdet, s.beam @ s.sdet, s.beam @ s.odet], printed, rtol=1e-5, atol=1e-6)


def _cfg_in(case):
    cfg = parse_args(case.args)
    cfg.cwd = str(case.folder)
    return cfg


# --------------------------------------------------------------------------- detector size
@pytest.mark.parametrize("args, pixels, size_mm", [
    # pixels = ceil(size / pixel - 0.5): 10 mm / 0.3 mm = 33.3 -> 33, the size stays 10 mm
    (["-detsize", "10", "-pixel", "0.3"], (33, 33), (10.0, 10.0)),
    (["-detsize", "10", "-pixel", "0.4"], (25, 25), (10.0, 10.0)),
    (["-detsize_f", "12", "-detsize_s", "8", "-pixel", "0.1"], (120, 80), (12.0, 8.0)),
    # a pixel count wins over a size whatever the order: size = pixels x pixel
    (["-detpixels", "20", "-detsize", "10", "-pixel", "0.3"], (20, 20), (6.0, 6.0)),
    (["-detsize", "10", "-detpixels", "20", "-pixel", "0.3"], (20, 20), (6.0, 6.0)),
    # nothing given: C's 102.4 mm square of 0.1 mm pixels
    ([], (1024, 1024), (102.4, 102.4)),
])
def test_detsize_versus_detpixels(args, pixels, size_mm):
    s = setup_of(*args)
    assert (s.fpixels, s.spixels) == pixels
    assert s.detsize_f == pytest.approx(size_mm[0] / 1000, abs=1e-15)
    assert s.detsize_s == pytest.approx(size_mm[1] / 1000, abs=1e-15)
    # MOSFLM beam centre follows the size, not the pixel count
    assert s.xbeam == pytest.approx((s.detsize_s + s.pixel_size) / 2, abs=1e-15)


# --------------------------------------------------------------------------- rendering switches
SMALL = CELL + ["-N", "5", "-lambda", "1", "-distance", "100", "-detpixels", "32", "-pixel", "0.5"]


def _render(args, cwd=None, dtype=torch.float64):
    sim = torchbragg.Simulation.from_args(args, cwd=cwd, dtype=dtype)
    return sim, sim.render().numpy()


def test_roi_leaves_pixels_outside_at_zero():
    _, full = _render(SMALL)
    sim, part = _render(SMALL + ["-roi", "3", "10", "5", "12"])  # fast 3..10, slow 5..12 inclusive
    inside = np.zeros_like(full, dtype=bool)
    inside[5:13, 3:11] = True
    assert np.all(part[~inside] == 0.0)
    assert np.allclose(part[inside], full[inside], rtol=1e-12, atol=0)
    assert (part[inside] > 0).all()
    assert sim.last_stats.pixels == 8 * 8


def test_mask_skips_zero_pixels(tmp_path):
    mask = np.ones((24, 32), np.uint16)
    mask[3:6, 4:9] = 0
    mask[10, :] = 0
    write_smv(tmp_path / "mask.smv", mask, {})
    base = CELL + ["-N", "5", "-lambda", "1", "-distance", "100", "-pixel", "0.5"]
    sim, masked = _render(base + ["-mask", "mask.smv"], cwd=tmp_path)
    # the detector takes its size from the mask image
    assert (sim.setup.fpixels, sim.setup.spixels) == (32, 24)
    _, plain = _render(base + ["-detpixels_f", "32", "-detpixels_s", "24"])
    assert np.all(masked[mask == 0] == 0.0)
    assert np.allclose(masked[mask != 0], plain[mask != 0], rtol=1e-12, atol=0)
    assert sim.last_stats.pixels == int((mask != 0).sum())


def test_mask_header_sets_the_geometry(tmp_path):
    mask = np.ones((20, 30), np.uint16)
    write_smv(tmp_path / "mask.smv", mask, {"PIXEL_SIZE": 0.5, "DISTANCE": 80, "WAVELENGTH": 1.5,
                                            "BEAM_CENTER_X": 7.0, "BEAM_CENTER_Y": 4.0})
    s = setup_of("-mask", "mask.smv", cwd=str(tmp_path))
    # C reads the mask header before the arguments: size, pixel, distance, wavelength and the
    # beam centre; the mask's BEAM_CENTER_Y counts from the far edge (slow size - Y)
    assert (s.fpixels, s.spixels) == (30, 20)
    assert s.pixel_size == pytest.approx(0.0005)
    assert s.distance == pytest.approx(0.08)
    assert s.lambda0 == pytest.approx(1.5e-10)
    assert s.xbeam == pytest.approx(0.007)
    assert s.ybeam == pytest.approx(20 * 0.0005 - 0.004)
    # arguments given on the command line win over the header
    s = setup_of("-mask", "mask.smv", "-distance", "120", "-lambda", "1", cwd=str(tmp_path))
    assert s.distance == pytest.approx(0.12) and s.lambda0 == pytest.approx(1e-10)


FLAT = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "1", "-lambda", "1", "-distance", "100",
        "-detpixels", "64", "-pixel", "1", "-oversample", "1"]  # N = 1: F_latt = 1, a flat scatterer


def _radius(setup):
    """Distance from the sample to each pixel centre of a flat detector."""
    f = (np.arange(setup.fpixels) + 0.5) * setup.pixel_size
    sl = (np.arange(setup.spixels) + 0.5) * setup.pixel_size
    pos = setup.pix0 + f[None, :, None] * setup.fdet + sl[:, None, None] * setup.sdet
    return np.linalg.norm(pos, axis=-1)


def test_curved_detector_brightens_the_edges():
    flat_sim, flat = _render(FLAT)
    curved_sim, curved = _render(FLAT + ["-curved_det"])
    assert curved_sim.setup.curved and not flat_sim.setup.curved
    R = _radius(flat_sim.setup)
    c = np.unravel_index(np.argmin(R), R.shape)
    # near the beam the two agree; at the corner every curved pixel is still 100 mm away, so
    # its solid angle is larger by (R / d)^3 (polarisation changes it by < 1 %)
    assert curved[c] == pytest.approx(flat[c], rel=1e-3)
    gain = (R[0, 0] / 0.1) ** 3
    assert gain > 1.25
    assert curved[0, 0] / flat[0, 0] == pytest.approx(gain, rel=0.02)
    assert curved[0, 0] > flat[0, 0]


def test_point_pixel_drops_the_pixel_area_and_obliquity():
    sim, normal = _render(FLAT)
    point_sim, point = _render(FLAT + ["-point_pixel"])
    assert point_sim.setup.point_pixel
    # solid angle: pixel^2 / R^2 * (close_distance / R) normally, 1 / R^2 with -point_pixel
    R = _radius(sim.setup)
    expected = R / (sim.setup.pixel_size ** 2 * sim.setup.close_distance)
    assert np.allclose(point / normal, expected, rtol=1e-9)
    assert (point / normal)[0, 0] > (point / normal)[32, 32]


# --------------------------------------------------------------------------- SMV header
C_HEADER_KEYS = [
    "HEADER_BYTES", "DIM", "BYTE_ORDER", "TYPE", "SIZE1", "SIZE2", "PIXEL_SIZE", "DISTANCE", "WAVELENGTH",
    "BEAM_CENTER_X", "BEAM_CENTER_Y", "ADXV_CENTER_X", "ADXV_CENTER_Y", "MOSFLM_CENTER_X", "MOSFLM_CENTER_Y",
    "DENZO_X_BEAM", "DENZO_Y_BEAM", "DIALS_ORIGIN", "XDS_ORGX", "XDS_ORGY", "CLOSE_DISTANCE", "PHI",
    "OSC_START", "OSC_RANGE", "TWOTHETA", "DETECTOR_SN", "BEAMLINE",
]


def _write_intfile(args, folder, monkeypatch):
    monkeypatch.chdir(folder)
    assert run_simulation(list(args) + ["-intfile", "img.smv"], out=io.StringIO()) == 0
    return folder / "img.smv"


def test_intfile_header_has_the_c_keys(tmp_path, monkeypatch):
    args = SMALL + ["-adxv", "-Xbeam", "7", "-Ybeam", "9", "-phi", "10", "-osc", "2", "-twotheta", "5"]
    path = _write_intfile(args, tmp_path, monkeypatch)
    header = read_smv_header(path)
    assert list(header) == C_HEADER_KEYS
    s = resolve(parse_args(args))
    mm = 1000.0

    def num(key, i=0):
        return float(header[key].split(",")[i])

    # C writes lengths in mm; the centre in each program's convention
    assert header["SIZE1"] == "32" and header["SIZE2"] == "32" and header["TYPE"] == "unsigned_short"
    assert num("PIXEL_SIZE") == pytest.approx(0.5)
    assert num("BEAM_CENTER_X") == pytest.approx(7.0) and num("BEAM_CENTER_Y") == pytest.approx(9.0)
    assert num("ADXV_CENTER_X") == pytest.approx(s.fbeam * mm, rel=1e-5)
    assert num("ADXV_CENTER_Y") == pytest.approx((s.detsize_s - s.sbeam) * mm, rel=1e-5)
    assert num("MOSFLM_CENTER_X") == pytest.approx((s.sbeam - s.pixel_size / 2) * mm, rel=1e-5)
    assert num("MOSFLM_CENTER_Y") == pytest.approx((s.fbeam - s.pixel_size / 2) * mm, rel=1e-5)
    assert num("DENZO_X_BEAM") == pytest.approx(s.sbeam * mm, rel=1e-5)
    assert num("DENZO_Y_BEAM") == pytest.approx(s.fbeam * mm, rel=1e-5)
    for i in range(3):
        assert num("DIALS_ORIGIN", i) == pytest.approx(s.dials_origin[i], rel=1e-5, abs=1e-9)
    assert num("XDS_ORGX") == pytest.approx(s.fclose / s.pixel_size + 0.5, rel=1e-5)
    assert num("CLOSE_DISTANCE") == pytest.approx(s.close_distance * mm, rel=1e-5)
    assert num("DISTANCE") == pytest.approx(s.distance * mm, rel=1e-5)
    assert num("PHI") == 10 and num("OSC_START") == 10 and num("OSC_RANGE") == 2 and num("TWOTHETA") == 5
    assert header["DETECTOR_SN"] == "000" and header["BEAMLINE"] == "fake"
    raw = path.read_bytes()
    assert len(raw) == 512 + 2 * 32 * 32 and raw[:2] == b"{\n"


def test_intfile_header_is_byte_identical_to_c(reference_case, tmp_path, monkeypatch):
    case = reference_case("detector_rot_xds_os3")
    path = _write_intfile(case.args, tmp_path, monkeypatch)
    c_header = (case.folder / "img.smv").read_bytes()[:512] if (case.folder / "img.smv").exists() \
        else (case.folder / "img_header.smv").read_bytes()
    assert path.read_bytes()[:512] == c_header
    _, ints = read_smv(path)
    assert ints.shape == case.shape
